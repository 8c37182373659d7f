"""The /mnt/data disk quota: a loop-mounted ext4 image per data folder.

``<folder>.img`` beside the folder holds the data; it is mounted on the folder
``nosuid,nodev,noexec`` (so a dropped ``.so`` cannot be loaded from it, and no
device node or setuid file works there).  The image is sparse: it costs only
what is written.  Root only; without root the per-file RLIMIT_FSIZE applies.
"""

from __future__ import annotations

import os
import subprocess

from broker.errors import SandboxError

MOUNT_OPTIONS = "loop,nosuid,nodev,noexec"


def image_path(folder: str) -> str:
    return folder.rstrip("/") + ".img"


def is_mounted(folder: str) -> bool:
    return os.path.ismount(folder)


def ensure(folder: str, size: int, uid: int, gid: int, tools: dict) -> bool:
    """Mount the quota image on *folder* (creating it if needed).

    Returns True if this call mounted it.  A folder that already has files
    but no image is left alone (its files would be hidden) and False is
    returned: the caller logs that only the per-file limit applies.
    """
    if is_mounted(folder):
        return False
    img = image_path(folder)
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(img):
        if os.listdir(folder):
            return False
        fd = os.open(img, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        r = subprocess.run([tools["mkfs.ext4"], "-q", "-F", "-m", "0", "-E",
                            f"root_owner={uid}:{gid},lazy_itable_init=1,lazy_journal_init=1", img],
                           capture_output=True, text=True)
        if r.returncode != 0:
            os.unlink(img)
            raise SandboxError(f"mkfs.ext4 failed for the /mnt/data image {img}: {r.stderr.strip()}")
        fresh = True
    else:
        fresh = False
    r = subprocess.run([tools["mount"], "-o", MOUNT_OPTIONS, img, folder], capture_output=True, text=True)
    if r.returncode != 0:
        raise SandboxError(f"mounting the /mnt/data image {img} on {folder} failed: {r.stderr.strip()}")
    if fresh:
        try:
            os.rmdir(os.path.join(folder, "lost+found"))
        except OSError:
            pass
    return True


def unmount(folder: str, tools: dict | None = None) -> None:
    if not is_mounted(folder):
        return
    umount = (tools or {}).get("umount", "umount")
    r = subprocess.run([umount, folder], capture_output=True, text=True)
    if r.returncode != 0:
        # Busy: a process still has a file open.  Detach lazily so the
        # mount goes away when it closes.
        subprocess.run([umount, "-l", folder], capture_output=True, text=True)


RUNTIME_OPTIONS = "nosuid,nodev,noexec,nosymfollow,size=1m,nr_inodes=64"


def mount_runtime(folder: str, uid: int, gid: int, tools: dict) -> bool:
    """Mount a small tmpfs with ``nosymfollow`` on the kernel's socket folder.

    The kernel must be able to create its sockets there, so it can also put
    a symlink where a socket should be; the broker (root) would then connect
    to whatever the link names.  On a ``nosymfollow`` mount no symlink is
    ever followed, by anyone.  Returns True if this call mounted it.
    """
    if is_mounted(folder):
        return False
    os.makedirs(folder, mode=0o700, exist_ok=True)
    opts = f"{RUNTIME_OPTIONS},mode=0700,uid={uid},gid={gid}"
    r = subprocess.run([tools["mount"], "-t", "tmpfs", "-o", opts, "broker-rt", folder],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SandboxError(f"mounting the kernel's runtime folder {folder} (tmpfs, nosymfollow) failed: "
                           f"{r.stderr.strip()}; Linux 5.10 or newer is needed for nosymfollow")
    return True
