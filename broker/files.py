"""The one safe way to touch a session's files from the broker.

Everything the broker reads, writes, lists or deletes under a session's
``/mnt/data`` goes through :class:`SessionFiles`.  Code in the sandbox owns
that folder and may plant symlinks, FIFOs or device nodes in it; the broker
runs with more privilege than the sandbox, so it must never follow a link out
of the folder nor block on a FIFO:

- paths are normalised first: relative to ``/mnt/data`` (an absolute
  ``/mnt/data/...`` is accepted), no ``..``, no NUL, bounded length;
- files are opened with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS |
  RESOLVE_NO_XDEV)`` relative to a descriptor of the folder, or, where the
  running kernel lacks openat2, component by component with ``O_NOFOLLOW``;
- only regular files are read (``O_NONBLOCK`` + ``fstat``), so a FIFO or a
  device answers with an error at once;
- writes go to a temporary file in the same folder and are renamed into
  place, so a failed or partial upload never stands as if whole;
- walks use ``os.fwalk`` on descriptors and never follow symlinks.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mimetypes
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass

from broker.errors import BrokerError

MNT = "/mnt/data"
MAX_PATH = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # same number on x86_64 and aarch64
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class FileError(BrokerError):
    status = 400
    reason = "invalid_path"


class FileNotFound(FileError):
    status = 404
    reason = "file_not_found"


class FileTooLarge(FileError):
    status = 413
    reason = "file_too_large"


class NotARegularFile(FileError):
    status = 400
    reason = "not_a_regular_file"


class QuotaExceeded(FileError):
    status = 507
    reason = "quota_exceeded"


def _openat2_available() -> bool:
    how = _OpenHow(os.O_RDONLY | os.O_PATH, 0, RESOLVE_BENEATH)
    fd = _libc.syscall(_SYS_OPENAT2, -100, b"/", ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        os.close(fd)
        return True
    # EXDEV means openat2 exists and refused "/" beneath cwd: available.
    return ctypes.get_errno() == errno.EXDEV


HAVE_OPENAT2 = _openat2_available()


def normalise(path: str) -> str:
    """A safe relative path inside /mnt/data, or FileError saying why not."""
    if not isinstance(path, str):
        raise FileError("path must be a string")
    if "\x00" in path:
        raise FileError("path must not contain NUL characters")
    if len(path) > MAX_PATH:
        raise FileError(f"path is {len(path)} characters; at most {MAX_PATH} are allowed")
    p = path.strip()
    if p.startswith(MNT + "/") or p == MNT:
        p = p[len(MNT):]
    elif p.startswith("/"):
        raise FileError(f"path {path!r} is outside /mnt/data: use a path relative to /mnt/data or one that starts with /mnt/data/")
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if parts:
        # Whitespace around the whole path is dropped, also next to /mnt/data/ or a leading "./":
        # the same file whichever way it is spelt (found by tests/test_fuzz_units.py).
        parts[0] = parts[0].lstrip()
        parts[-1] = parts[-1].rstrip()
        parts = [x for x in parts if x not in ("", ".")]
    if any(x == ".." for x in parts):
        raise FileError(f"path {path!r} must not contain '..'")
    return "/".join(parts)


@dataclass
class FileInfo:
    path: str
    size: int
    modified: float
    type: str

    def as_dict(self) -> dict:
        import datetime

        return {"name": self.path, "path": self.path, "size": self.size,
                "modified": datetime.datetime.fromtimestamp(self.modified, datetime.timezone.utc)
                .isoformat().replace("+00:00", "Z"),
                "type": self.type}


def guess_type(name: str) -> str:
    ctype, _ = mimetypes.guess_type(name)
    if ctype:
        return ctype
    ext = os.path.splitext(name)[1].lower()
    return {".ipynb": "application/x-ipynb+json", ".md": "text/markdown", ".yaml": "application/yaml",
            ".yml": "application/yaml", ".parquet": "application/vnd.apache.parquet",
            ".h5": "application/x-hdf5", ".hdf5": "application/x-hdf5", ".nc": "application/x-netcdf",
            ".pkl": "application/octet-stream", ".r": "text/plain", ".sql": "application/sql",
            ".tsv": "text/tab-separated-values", ".log": "text/plain", ".webp": "image/webp"}.get(
        ext, "application/octet-stream")


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".bmp"}


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class SessionFiles:
    """Safe access to one data folder (the host side of /mnt/data)."""

    def __init__(self, root: str, *, owner: tuple[int, int] | None = None,
                 max_read: int = 128 << 20, max_upload: int = 128 << 20, max_list: int = 10_000):
        self.root = root
        self.owner = owner
        self.max_read = max_read
        self.max_upload = max_upload
        self.max_list = max_list

    # -- opening ------------------------------------------------------------
    def _rootfd(self) -> int:
        return os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def _open(self, rel: str, flags: int, mode: int = 0) -> int:
        root = self._rootfd()
        try:
            if not rel:
                return os.open(".", flags | os.O_CLOEXEC, dir_fd=root) if flags & os.O_DIRECTORY else \
                    os.dup(root)
            if HAVE_OPENAT2:
                how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)
                fd = _libc.syscall(_SYS_OPENAT2, root, rel.encode(), ctypes.byref(how), ctypes.sizeof(how))
                if fd < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), rel)
                return fd
            return self._open_walk(root, rel, flags, mode)
        finally:
            os.close(root)

    @staticmethod
    def _open_walk(root: int, rel: str, flags: int, mode: int) -> int:
        parts = rel.split("/")
        cur = os.dup(root)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
                os.close(cur)
                cur = nxt
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
        finally:
            os.close(cur)

    def _error(self, exc: OSError, rel: str):
        if exc.errno == errno.ENOENT:
            return FileNotFound(f"no file {rel!r} in /mnt/data")
        if exc.errno in (errno.EXDEV, errno.ELOOP):
            return FileError(f"{rel!r} is a symbolic link that leaves /mnt/data or loops; it is not followed")
        if exc.errno == errno.ENOTDIR:
            return FileNotFound(f"{rel!r}: a parent is not a folder")
        if exc.errno == errno.EISDIR:
            return NotARegularFile(f"{rel!r} is a folder")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return QuotaExceeded(f"/mnt/data is full (or the file exceeds the per-file limit): {exc.strerror}")
        return FileError(f"{rel!r}: {exc.strerror}")

    def open_read(self, path: str) -> tuple[int, os.stat_result, str]:
        """An fd for reading a regular file, its stat and the normalised path."""
        rel = normalise(path)
        if not rel:
            raise NotARegularFile("/mnt/data itself is a folder; name a file in it")
        try:
            fd = self._open(rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise self._error(exc, rel) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, socket or device)"
            raise NotARegularFile(f"{rel!r} is {kind}; only regular files can be read")
        return fd, st, rel

    def read(self, path: str, limit: int | None = None, offset: int = 0) -> tuple[bytes, os.stat_result, str]:
        fd, st, rel = self.open_read(path)
        try:
            cap = self.max_read if limit is None else limit
            if offset:
                os.lseek(fd, offset, os.SEEK_SET)
            chunks, left = [], cap
            while left > 0:
                b = os.read(fd, min(left, 1 << 20))
                if not b:
                    break
                chunks.append(b)
                left -= len(b)
            return b"".join(chunks), st, rel
        finally:
            os.close(fd)

    def stat(self, path: str) -> FileInfo:
        fd, st, rel = self.open_read(path)
        os.close(fd)
        return FileInfo(rel, st.st_size, st.st_mtime, guess_type(rel))

    # -- writing ------------------------------------------------------------
    def _parent_fd(self, rel: str, create: bool) -> tuple[int, str]:
        parent, _, name = rel.rpartition("/")
        root = self._rootfd()
        try:
            cur = os.dup(root)
        finally:
            os.close(root)
        try:
            for part in [p for p in parent.split("/") if p]:
                try:
                    nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=cur)
                    if self.owner:
                        os.chown(part, *self.owner, dir_fd=cur, follow_symlinks=False)
                    nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
                os.close(cur)
                cur = nxt
            return cur, name
        except BaseException:
            os.close(cur)
            raise

    def write(self, path: str, chunks, *, overwrite: bool = True) -> dict:
        """Write atomically from an iterable of bytes; returns path, size, sha256."""
        rel = normalise(path)
        if not rel:
            raise FileError("name a file to write, not /mnt/data itself")
        if isinstance(chunks, (bytes, bytearray, memoryview)):
            chunks = [bytes(chunks)]
        try:
            pfd, name = self._parent_fd(rel, create=True)
        except OSError as exc:
            raise self._error(exc, rel) from None
        tmp = f".{name[:80]}.upload-{secrets.token_hex(6)}"
        digest, size = hashlib.sha256(), 0
        try:
            existing = self._existing(name, pfd, rel, allow_dir=False)
            if existing is not None and not overwrite:
                raise FileError(f"{rel!r} already exists (set overwrite to replace it)")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=pfd)
            try:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload:
                        raise FileTooLarge(f"upload is larger than the {self.max_upload} byte limit")
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                os.fsync(fd)
                if self.owner:
                    os.fchown(fd, *self.owner)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except OSError as exc:
            self._unlink_quiet(tmp, pfd)
            raise self._error(exc, rel) from None
        except BaseException:
            self._unlink_quiet(tmp, pfd)
            raise
        finally:
            os.close(pfd)
        return {"path": rel, "size": size, "sha256": digest.hexdigest()}

    @staticmethod
    def _existing(name: str, pfd: int, rel: str, allow_dir: bool) -> os.stat_result | None:
        """The stat of an existing entry that may be replaced or deleted; a
        symbolic link, FIFO, socket or device planted in /mnt/data is refused
        (never followed, replaced or removed through the API)."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise FileError(f"{rel!r} is a symbolic link; links in /mnt/data are not followed, replaced or deleted "
                            "by the broker")
        if stat.S_ISDIR(st.st_mode):
            if allow_dir:
                return st
            raise NotARegularFile(f"{rel!r} is a folder")
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(f"{rel!r} is not a regular file (FIFO, socket or device); it is left alone")
        return st

    @staticmethod
    def _unlink_quiet(name: str, dir_fd: int) -> None:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass

    def delete(self, path: str) -> str:
        rel = normalise(path)
        if not rel:
            raise FileError("/mnt/data itself cannot be deleted")
        try:
            pfd, name = self._parent_fd(rel, create=False)
        except OSError as exc:
            raise self._error(exc, rel) from None
        try:
            st = self._existing(name, pfd, rel, allow_dir=True)
            if st is None:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", rel)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=pfd)  # fd-based, never follows links
            else:
                os.unlink(name, dir_fd=pfd)
        except OSError as exc:
            raise self._error(exc, rel) from None
        finally:
            os.close(pfd)
        return rel

    # -- walking ------------------------------------------------------------
    def walk(self, path: str = ""):
        """(relpath, stat) for every regular file below *path*, links not followed."""
        rel = normalise(path)
        try:
            top = self._open(rel, os.O_RDONLY | os.O_DIRECTORY) if rel else None
        except OSError as exc:
            raise self._error(exc, rel) from None
        root = top if top is not None else os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            count = 0
            for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=root, follow_symlinks=False):
                dirnames.sort()
                for fn in sorted(filenames):
                    try:
                        st = os.stat(fn, dir_fd=dfd, follow_symlinks=False)
                    except OSError:
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    sub = os.path.normpath(os.path.join(dirpath, fn))
                    yield (f"{rel}/{sub}" if rel else sub), st
                    count += 1
                    if count >= self.max_list:
                        return
        finally:
            os.close(root)

    def list(self, path: str = "") -> list[FileInfo]:
        return [FileInfo(p, st.st_size, st.st_mtime, guess_type(p)) for p, st in self.walk(path)]

    def search(self, pattern: str, path: str = "", *, ignore_case: bool = False, max_results: int = 100,
               max_file_size: int = 16 << 20, glob: str | None = None) -> tuple[list[dict], bool]:
        """grep-style search: (matches, truncated).  Binary files are skipped."""
        import fnmatch

        try:
            rx = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise FileError(f"pattern is not a valid regular expression: {exc}") from None
        out: list[dict] = []
        for rel, st in self.walk(path):
            if glob and not fnmatch.fnmatch(os.path.basename(rel), glob) and not fnmatch.fnmatch(rel, glob):
                continue
            if st.st_size > max_file_size:
                continue
            try:
                data, _, _ = self.read(rel, limit=max_file_size)
            except FileError:
                continue
            if b"\x00" in data[:8192]:
                continue
            text = data.decode("utf-8", "replace")
            for i, line in enumerate(text.splitlines(), 1):
                if rx.search(line):
                    out.append({"path": rel, "line": i, "text": line[:500]})
                    if len(out) >= max_results:
                        return out, True
        return out, False
