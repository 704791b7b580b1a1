"""One writer per output folder: `OUT/_lock`, held with flock(2) for the whole job.

Two jobs on one `--out` would delete each other's temporaries and interleave their manifests, so
the second is refused with one line naming the first one's process. The lock is the kernel's: it
goes with the process that holds it, so a job killed with SIGKILL leaves a file whose lock is
free, and the next job takes it over (the process id written in it only makes the message
useful). The file stays in the folder (deleting it would let a third job lock a fresh file
while a second still holds the old one); its name starts with '_', which Parquet readers skip.
"""
from __future__ import annotations

import fcntl
import os

from common.errors import UserError

LOCK = "_lock"


class BusyError(UserError, RuntimeError):
    """Another job is writing the same output folder: one line."""


class OutputLock:
    """`with OutputLock(out_dir):` holds the folder's lock, or raises BusyError at once."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK)
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise BusyError(f"{os.path.dirname(self.path)} is being written by another job "
                            f"({who}); wait for it to finish or stop it, or choose another "
                            f"--out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
