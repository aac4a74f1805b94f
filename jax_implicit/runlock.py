"""One run per output: an exclusive lock held for the life of a run, so that two runs on one training folder
or one evaluation output cannot overwrite each other's checkpoints, metrics and results.

The lock is `fcntl.flock` on a lock file (released by the kernel when the holder exits, however it exits,
so a killed run never leaves a stale lock). The file records who holds it, for the error a second run
gets, and is removed when the run ends (a run that locked a file just removed retries on the new one).
flock works on local file systems and on NFSv4 (emulated with POSIX locks); in a multi-host run
only the writer process takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator


class Busy(OSError):
    """Another live run holds the lock (an OSError, so every command reports it in one line)."""


class Unwritable(OSError):
    """The output's folder cannot be written (found before any work, not after it)."""


def beside(output: str | Path) -> Path:
    """The lock file of an output file: a hidden sibling, so outputs in one folder lock separately."""
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def hold(lock_file: str | Path, what: str) -> Iterator[Path]:
    """Hold `lock_file` exclusively until the block ends, or raise `Busy` at once naming the holder.

    `what` names the protected thing in the error ("training folder X", "output Y"). Creating the lock
    file also proves the folder writable: `Unwritable` otherwise.
    """
    lock_file = Path(lock_file)
    fd = _lock(lock_file, what)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)
        yield lock_file
    finally:
        lock_file.unlink(missing_ok=True)  # while still locked: nobody can take the lock of a file being removed
        os.close(fd)


def _lock(lock_file: Path, what: str) -> int:
    """An open descriptor of `lock_file`, exclusively locked, still linked at that path."""
    while True:
        try:
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise Unwritable(f"cannot write {what}: {lock_file.parent} is not a writable folder "
                             f"({type(e).__name__}: {e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1024, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise Busy(f"{what} is in use by {holder} (lock {lock_file}); wait for it to finish or use "
                       f"another folder") from None
        try:
            if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
