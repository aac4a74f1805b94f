"""The shared entry point of the evaluation commands: `--config=FILE --config.a.b=v` (ml_collections)."""

from __future__ import annotations

import sys
from typing import Callable

from jax_implicit import runlock


def main(run: Callable, default_config: str) -> None:
    """Parse the config flag (defined only here, so importing a command module never defines flags) and run."""
    from absl import app
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", default_config, "ml_collections config file")

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.KEY=VALUE")
        try:
            run(config.value)
        except (ValueError, FileNotFoundError, runlock.Busy, runlock.Unwritable) as e:  # named input errors
            sys.exit(f"error: {e}")

    app.run(_main)
