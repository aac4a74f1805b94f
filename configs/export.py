"""Export a saved checkpoint step of a training run as an HF folder.

    python -m jax_implicit.export --config.run=checkpoints/runs/default --config.step=50
"""

from ml_collections import ConfigDict

from jax_implicit import export


def get_config() -> ConfigDict:
    return export.default_config()
