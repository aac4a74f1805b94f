"""The shared entry point of the evaluation commands: `--config=FILE --config.a.b=v` (ml_collections)."""

from __future__ import annotations

import sys
from typing import Callable


def main(run: Callable, default_config: str, errors: tuple[type[Exception], ...] = ()) -> None:
    """Parse the config flag (defined only here, so importing a command module never defines flags) and run;
    an exception of a type in `errors` (bad input, a failed judge) ends the command with its one-line message."""
    from absl import app
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", default_config, "ml_collections config file")

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.KEY=VALUE")
        try:
            run(config.value)
        except errors as e:
            sys.exit(f"error: {e}")

    app.run(_main)
