"""One run per output_dir: `<output_dir>/.prefalign.lock`, holding the process id and host.

The lock is an exclusive `flock` on that file, held for the whole run: the kernel drops it when
the process dies, however it dies, so a lock left by a dead run never blocks the next one (it is
taken over, with a note naming the old holder). A second run while the first is alive is refused
with one line naming it. Under several processes the first one (process index 0) holds the lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from prefalign.errors import PrefalignError

logger = logging.getLogger(__name__)

LOCK_NAME = ".prefalign.lock"


class OutputDirLock:
    def __init__(self, output_dir: str | Path, *, enabled: bool = True):
        self.path = Path(output_dir) / LOCK_NAME
        self.enabled = enabled
        self._fd: int | None = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(os.read(fd, 4096))
                os.close(fd)
                raise PrefalignError(
                    f"output_dir: {self.path.parent} is in use by another run ({holder}); wait for it to finish, "
                    "stop it, or choose another output_dir") from None
            # the file may have been removed by its last holder between our open and our lock: retry on the new one
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = os.read(fd, 4096)
        if old.strip():
            logger.warning("output_dir: taking over the stale lock %s of a run that ended without releasing it (%s)",
                           self.path, _describe(old))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can take the old file meanwhile
            os.close(self._fd)
            self._fd = None
        return False


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"process {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
