"""One launcher per sweep: an exclusive lock on `<root>/sweeps/<name>/hyper.lock`.

Two launchers on one sweep would duplicate its front rows, mark each other's runs KILLED and
share its cores (every latency then wrong). `fcntl.flock` ties the lock to the open file, so the
kernel drops it when its process ends however it ends (SIGKILL, the OOM killer): a lock file
left behind never blocks `--resume`. The file says who holds it (pid, host, since when), for the
message that refuses the second launcher. Pure: the standard library only.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

FILE = "hyper.lock"


class SweepLocked(ValueError):
    """Another launcher holds the sweep."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # taken a moment ago, not written yet
        return "a launcher that has not written its pid yet"


@contextmanager
def hold(sweep_dir: Path, name: str):
    """Hold `sweep_dir`'s lock for the `with` block (the folder is made if missing); a
    `SweepLocked` naming the holder when another process holds it."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _holder(fd)
        os.close(fd)
        raise SweepLocked(
            f"sweep {name!r} is in use by another launcher: {who} holds {path}; one sweep takes "
            f"one launcher at a time (two would log its trials twice and share its cores). "
            f"Wait for it to end or stop it, then `--resume {name}`") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)
