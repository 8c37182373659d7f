"""Which host uid a sandbox runs as.

As root, every sandbox gets its own unprivileged uid (and a gid of the same
number) from a configured range, leased with an ``flock`` on a file in the
state folder: the lease lasts as long as the open file, so a crashed broker
frees its uids.  The uid follows the data folder: a kernel restarted on a
folder already owned by a uid in the range takes that uid again if it is
free, so its files stay its own.

Without root there is no choice to make: the sandbox runs as the broker's
user inside an unprivileged user namespace.
"""

from __future__ import annotations

import fcntl
import os
import random
from dataclasses import dataclass

from broker.errors import SandboxError


@dataclass
class Identity:
    uid: int
    gid: int
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _try_lease(lock_dir: str, uid: int) -> int | None:
    path = os.path.join(lock_dir, str(uid))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lease_uid(lock_dir: str, start: int, size: int, preferred: int | None = None) -> Identity:
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    if preferred is not None and start <= preferred < start + size:
        fd = _try_lease(lock_dir, preferred)
        if fd is not None:
            return Identity(preferred, preferred, fd)
    offset = random.randrange(size)
    for i in range(size):
        uid = start + (offset + i) % size
        fd = _try_lease(lock_dir, uid)
        if fd is not None:
            return Identity(uid, uid, fd)
    raise SandboxError(f"all {size} sandbox uids from {start} are in use; raise SandboxSettings.uid_range_size")


def current_identity() -> Identity:
    return Identity(os.getuid(), os.getgid())


def chown_tree(path: str, uid: int, gid: int) -> None:
    """Give a folder tree to *uid*, never following symlinks."""
    os.chown(path, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            try:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
            except FileNotFoundError:
                pass
