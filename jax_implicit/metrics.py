"""A run's metrics as a researcher reads them: one JSON line per optimizer step (`metrics.jsonl`, the record a
resume trusts), the same scalars as TensorBoard event files (`tensorboard/`, plotted live with
`tensorboard --logdir <run>`), and a loss plot at the end."""

from __future__ import annotations

import json
from pathlib import Path

from jax_implicit import files

SCALARS = ("loss", "heldout_loss", "lr", "grad_norm", "tokens_per_s")  # what TensorBoard shows


def read(path: Path) -> list[dict]:
    """The metric lines a run folder holds (a killed run may have logged past its last checkpoint, and
    its last line may be cut short)."""
    rows, lines = [], path.read_text(errors="replace").splitlines() if path.is_file() else []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            int(row["step"])
        except (json.JSONDecodeError, TypeError, KeyError, ValueError):
            if n == len(lines):  # a line cut short by a kill
                continue
            raise ValueError(f"{path} line {n} is damaged; repair or delete that line to resume") from None
        rows.append(row)
    return rows


class Log:
    """Appends each step's row to the JSONL file and, optionally, to TensorBoard. Opened at a resumed
    step, it first drops what a killed run logged past that step (from both)."""

    def __init__(self, out: Path, rows: list[dict], *, tensorboard: bool):
        self.path = out / "metrics.jsonl"
        files.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self.file = open(self.path, "a")
        self.board = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            step = rows[-1]["step"] if rows else 0
            self.board = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1, flush_secs=10)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.board is not None:
            for name in SCALARS:
                if name in row:
                    self.board.add_scalar(f"train/{name}", row[name], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def plot_loss(rows: list[dict], out: Path) -> Path:
    """Training loss (and the held-out loss, where logged) against the optimizer step, as a PNG."""
    fig, ax = files.figure((6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training")
    held = [r for r in rows if "heldout_loss" in r]
    if held:
        ax.plot([r["step"] for r in held], [r["heldout_loss"] for r in held], "o-", label="held out")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    return files.save_figure(fig, out)
