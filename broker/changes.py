"""What a call changed in a session's /mnt/data, from the kernel's own reports.

A tool call must say which files it created or changed.  Walking the whole
folder before and after each call costs time in proportion to the files the
session holds (167 ms per call with 20,000 files).  Instead the Linux kernel
tells us: one **inotify** instance, shared by every session of the broker,
watches each directory of each session's data folder, and its events are read
as they come (``loop.add_reader``), so the kernel's queue does not fill while
a cell writes thousands of files.

- :class:`ChangeTracking` (the configurable, owned by the SessionManager)
  holds the inotify descriptor and the map from watch descriptor to
  (session, directory);
- :class:`ChangeTracker` is one session's tree of watched directories;
- a :class:`Recording` is one call: from :meth:`ChangeTracker.begin` to
  :meth:`ChangeTracker.end` it collects the paths that were created,
  written, or moved into place.  At the end those paths, and only those, are
  looked at (``fstatat`` through a safely opened parent), so a file created
  and deleted within the call, or moved away, is not reported, and a moved
  file is reported under its new path.

Why inotify and not fanotify: ``FAN_MARK_FILESYSTEM`` would need no watch per
directory, but it needs CAP_SYS_ADMIN and a file system per session (the
quota image exists only as root with quota on), and it reports file handles
that must be resolved with ``open_by_handle_at``.  inotify works in every mode
the broker runs in (root or not, quota image or plain folder) with one code
path; directories cost one watch each (about 1 KB of kernel memory), capped
per session by ``max_watches``.

When the events cannot be trusted -- the kernel's queue overflowed
(IN_Q_OVERFLOW), a session has more directories than ``max_watches`` or the
system's watch limit is reached, a call changes more than ``max_changes``
paths, or inotify is unavailable -- the call falls back to **one** walk of
the folder at its end, reporting every regular file whose ``ctime`` is not
older than the call's start (the ctime of a file cannot be set by the code
that writes it), and the broker log says so.  The walk also places the
watches again, so the next call is cheap again.

Writes made while no call is recording (uploads through the REST API,
display images the broker saves) are not reported by the next call: a call
reports what happened during it.  Not reported either, as inotify does not
see them: writes through a shared memory map of an existing file
(``numpy.memmap`` in ``r+`` mode) and metadata-only changes (``touch`` of an
existing file, ``chmod``).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
import struct
import time
from dataclasses import dataclass, field

from traitlets import CaselessStrEnum, Integer
from traitlets.config import LoggingConfigurable

from broker.files import SessionFiles

IN_MODIFY = 0x00000002
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

# What a watch reports.  Not IN_CLOSE_WRITE: a database opened read-write and
# only read (sqlite) would show as changed by every call.  IN_EXCL_UNLINK:
# no events for writes to files already unlinked (temporary files).
WATCH_MASK = (IN_CREATE | IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_DELETE_SELF
              | IN_MOVE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK)

CLOCK_REALTIME_COARSE = 5     # Linux; the clock file timestamps are taken from
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name, NUL-padded)
_READ_SIZE = 256 << 10
MAX_OPEN_RECORDINGS = 16        # calls of one session recording at once (WebSocket clients may queue several)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class WatchUnavailable(OSError):
    """A directory could not be watched (limits, or it vanished)."""


@dataclass(eq=False)
class Recording:
    """The paths one call touched, in the order first seen."""
    tracker: "ChangeTracker"
    started_ns: int
    paths: dict = field(default_factory=dict)   # relative path -> None (an ordered set)
    moved_dirs: set = field(default_factory=set)  # folders moved into place (for the walk: see _walk_changes)
    lost: str = ""                              # why the events cannot be trusted (then: walk)
    method: str = "inotify"


@dataclass
class Changed:
    path: str       # relative to /mnt/data
    size: int


class _Dir:
    """One watched directory: its watch descriptor, name and place in the tree."""
    __slots__ = ("wd", "name", "parent", "children")

    def __init__(self, wd: int, name: str, parent: "_Dir | None"):
        self.wd = wd
        self.name = name
        self.parent = parent
        self.children: dict[str, _Dir] = {}

    def path(self) -> str | None:
        """Relative to the root; None for a directory cut off from it."""
        parts = []
        d = self
        while d.parent is not None:
            parts.append(d.name)
            d = d.parent
        if d.name != "":        # the root is named ""; anything else is an orphan
            return None
        return "/".join(reversed(parts))

    def detach(self) -> None:
        if self.parent is not None and self.parent.children.get(self.name) is self:
            del self.parent.children[self.name]
        self.parent = None
        self.name = "\0"        # an orphan until it is attached again


class ChangeTracking(LoggingConfigurable):
    """Finds what each call changed in a session's /mnt/data (see broker/changes.py)."""

    method = CaselessStrEnum(["inotify", "walk"], default_value="inotify", config=True, help="""How a call's
        changes to /mnt/data are found. 'inotify': the Linux kernel reports them as they happen (one inotify
        instance for all sessions, one watch per directory), so the cost of a call does not grow with the files
        a session holds. 'walk': one walk of the whole folder at the end of each call, reporting files whose
        change time is not older than the call's start (also the fallback when inotify cannot be trusted).""")
    max_watches = Integer(10_000, min=1, config=True, help="""Directories watched per session (each costs about
        1 KB of kernel memory). A session with more falls back to one walk of its folder per call.""")
    max_changes = Integer(100_000, min=1, config=True, help="""Paths one call may touch before the change
        tracker stops remembering them (bounding its memory) and finds that call's changes with one walk of
        the folder at the end instead. Every change is still reported.""")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirs: dict[int, tuple[ChangeTracker, _Dir]] = {}
        self._trackers: set[ChangeTracker] = set()
        self._unavailable = ""

    # -- the shared inotify instance ---------------------------------------------------
    def _ensure_fd(self) -> int | None:
        if self._fd is None and not self._unavailable and self.method == "inotify":
            fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                # EMFILE: fs.inotify.max_user_instances reached (the broker needs one).
                self._unavailable = os.strerror(ctypes.get_errno())
                self.log.warning("inotify is unavailable (%s): each call finds its changes with one walk of "
                                 "/mnt/data", self._unavailable)
                return None
            self._fd = fd
        if self._fd is not None:
            # Read as the events come, on the loop the calls run on (an
            # in-process user may run several loops one after the other).
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:     # a synchronous caller: drained at begin and end only
                loop = None
            if loop is not None and loop is not self._loop:
                if self._loop is not None and not self._loop.is_closed():
                    self._loop.remove_reader(self._fd)
                loop.add_reader(self._fd, self.drain)
                self._loop = loop
        return self._fd

    def close(self) -> None:
        for t in list(self._trackers):
            t.close()
        if self._fd is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        self._dirs.clear()

    def tracker(self, root: str) -> "ChangeTracker":
        t = ChangeTracker(self, root)
        self._trackers.add(t)
        return t

    def _add_watch(self, dfd: int) -> int:
        # Through the descriptor, never a path: a directory swapped for a
        # symbolic link after it was opened is not followed.
        wd = _libc.inotify_add_watch(self._fd, f"/proc/self/fd/{dfd}".encode(), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise WatchUnavailable(err, os.strerror(err))
        return wd

    def _rm_watch(self, wd: int) -> None:
        self._dirs.pop(wd, None)
        if self._fd is not None:
            _libc.inotify_rm_watch(self._fd, wd)   # EINVAL if already gone: nothing to do

    def drain(self) -> None:
        """Read and apply every queued event (also called by the event loop
        whenever the descriptor is readable)."""
        fd = self._fd
        while fd is not None:
            try:
                buf = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            self._apply(buf)

    def _apply(self, buf: bytes) -> None:
        off, n = 0, len(buf)
        dirs = self._dirs
        while off < n:
            wd, mask, _cookie, ln = _EVENT.unpack_from(buf, off)
            name = buf[off + 16: off + 16 + ln].rstrip(b"\0")
            off += 16 + ln
            if mask & IN_Q_OVERFLOW:
                self.log.warning("the inotify queue overflowed: calls in progress find their changes with one "
                                 "walk of /mnt/data, and every session's watches are placed again")
                for t in self._trackers:
                    t.invalidate("the inotify queue overflowed")
                continue
            hit = dirs.get(wd)
            if hit is None:
                continue
            tracker, d = hit
            try:
                tracker._event(d, mask, os.fsdecode(name))
            except Exception:  # one session's odd tree must not stop the others' events
                self.log.exception("change tracking for %s failed; falling back to a walk", tracker.root)
                tracker.invalidate("an event could not be applied")


class ChangeTracker:
    """One session's watched tree and its calls in progress."""

    def __init__(self, owner: ChangeTracking, root: str):
        self.owner = owner
        self.root = root
        self.log = owner.log
        self._files = SessionFiles(root)
        self._root_id: tuple[int, int] | None = None
        self._rootdir: _Dir | None = None
        self._nodes: dict[int, _Dir] = {}
        self._recordings: list[Recording] = []
        self._stale = "not built yet"
        self._degraded = ""          # set when inotify cannot serve this session at all

    # -- calls ----------------------------------------------------------------------------
    def begin(self) -> Recording:
        """Start recording one call's changes."""
        rec = Recording(self, time.clock_gettime_ns(CLOCK_REALTIME_COARSE))
        self.owner._ensure_fd()
        self.owner.drain()          # events from before the call are not its changes
        try:
            st = os.stat(self.root)
            if (st.st_dev, st.st_ino) != self._root_id:
                # First call, or the folder is another one now (the quota image
                # was mounted again, e.g. after a broker or kernel restart).
                self._stale = self._stale or "the data folder was mounted again"
        except OSError as exc:
            self._stale = f"the data folder is not there ({exc.strerror})"
        if self._stale and not self._degraded and self.owner._fd is not None:
            self._rebuild()
        if self._stale or self._degraded or self.owner._fd is None:
            rec.lost = self._degraded or self._stale or self.owner._unavailable or "ChangeTracking.method is walk"
        if len(self._recordings) >= MAX_OPEN_RECORDINGS:
            # WebSocket executions that never reached idle (their kernel died):
            # the oldest stops collecting, and walks if it ever ends.
            old = self._recordings[0]
            old.lost = old.lost or "too many executions in progress"
            old.paths.clear()
            del self._recordings[0]
        self._recordings.append(rec)
        return rec

    def end(self, rec: Recording) -> list[Changed]:
        """The regular files the call created or changed, sorted by path."""
        self.owner.drain()          # the kernel's writes are done: their events are queued
        self.discard(rec)
        if rec.lost:
            rec.method = "walk"
            if self.owner.method == "inotify" and not self._degraded and not self.owner._unavailable:
                self.log.warning("changes in %s found by a walk: %s", self.root, rec.lost)
            return self._walk_changes(rec.started_ns, rec.moved_dirs)
        return self._stat(sorted(rec.paths))

    def discard(self, rec: Recording) -> None:
        try:
            self._recordings.remove(rec)
        except ValueError:
            pass

    def close(self) -> None:
        self._clear()
        self._recordings.clear()
        self.owner._trackers.discard(self)

    def invalidate(self, why: str) -> None:
        """The events may have missed something: calls in progress walk at
        their end, and the next call places the watches again."""
        self._stale = self._stale or why
        for rec in self._recordings:
            rec.lost = rec.lost or why

    # -- events -----------------------------------------------------------------------------
    def _mark(self, path: str) -> None:
        for rec in self._recordings:
            if rec.lost:
                continue
            rec.paths[path] = None
            if len(rec.paths) > self.owner.max_changes:
                rec.lost = f"the call touched more than {self.owner.max_changes} paths (ChangeTracking.max_changes)"
                rec.paths.clear()

    def _unmark(self, path: str) -> None:
        for rec in self._recordings:
            rec.paths.pop(path, None)

    def _event(self, d: _Dir, mask: int, name: str) -> None:
        if mask & IN_IGNORED:
            self._forget(d)
            return
        if mask & (IN_UNMOUNT | IN_DELETE_SELF | IN_MOVE_SELF) and d is self._rootdir:
            self.invalidate("the data folder was unmounted, moved or deleted")
            return
        if not name:
            return
        base = d.path()
        if base is None:        # a directory moved away and not (yet) seen again
            return
        path = f"{base}/{name}" if base else name
        if mask & IN_ISDIR:
            if mask & IN_MOVED_TO:
                for rec in self._recordings:
                    if len(rec.moved_dirs) < self.owner.max_watches:
                        rec.moved_dirs.add(path)
            if mask & (IN_CREATE | IN_MOVED_TO):
                # Whatever is under it now is new to the call (its contents may
                # have been written before the watch was placed).
                self._add_subtree(d, name, path)
            elif mask & (IN_MOVED_FROM | IN_DELETE):
                child = d.children.get(name)
                if child is not None:
                    child.detach()
            return
        if mask & (IN_CREATE | IN_MODIFY | IN_MOVED_TO):
            self._mark(path)
        elif mask & (IN_DELETE | IN_MOVED_FROM):
            self._unmark(path)

    def _forget(self, d: _Dir) -> None:
        d.detach()
        if self._nodes.get(d.wd) is d:
            del self._nodes[d.wd]
            if self.owner._dirs.get(d.wd, (None, None))[1] is d:
                del self.owner._dirs[d.wd]

    # -- watches ----------------------------------------------------------------------------
    def _clear(self) -> None:
        for wd in list(self._nodes):
            self.owner._rm_watch(wd)
        self._nodes.clear()
        self._rootdir = None
        self._root_id = None

    def _rebuild(self) -> None:
        """Place every watch again from a walk of the directories (first call,
        after an overflow, after the folder was mounted again)."""
        self._clear()
        why, self._stale = self._stale, ""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self._stale = f"the data folder cannot be opened ({exc.strerror})"
            return
        try:
            st = os.fstat(fd)
            self._root_id = (st.st_dev, st.st_ino)
            self._rootdir, _ = self._watch(fd, "", None)
            if self._rootdir is not None:
                self._watch_below(fd, self._rootdir, "", record=False)
        except WatchUnavailable as exc:
            self._degrade(exc)
        finally:
            os.close(fd)
        if why != "not built yet" and not self._degraded:
            self.log.info("change tracking for %s placed again (%s): %d directories watched", self.root, why,
                          len(self._nodes))

    def _degrade(self, exc: OSError) -> None:
        if exc.errno == errno.ENOSPC:
            why = "the system's inotify watch limit (fs.inotify.max_user_watches) is reached"
        elif exc.errno == errno.EMLINK:
            why = f"the folder has more than {self.owner.max_watches} directories (ChangeTracking.max_watches)"
        else:
            why = f"a directory could not be watched ({exc.strerror})"
        if exc.errno in (errno.ENOSPC, errno.EMLINK):
            self.log.warning("change tracking for %s: %s; each call finds its changes with one walk", self.root,
                             why)
            self._degraded = why
            self._clear()
        else:
            self._stale = why
        for rec in self._recordings:
            rec.lost = rec.lost or why

    def _watch(self, dfd: int, name: str, parent: _Dir | None) -> tuple[_Dir | None, bool]:
        """Watch the directory open as *dfd*, known as *name* in *parent*;
        also says whether it was watched already (then it moved here)."""
        if len(self._nodes) >= self.owner.max_watches:
            raise WatchUnavailable(errno.EMLINK, "too many directories")
        wd = self.owner._add_watch(dfd)
        node = self._nodes.get(wd)
        known = node is not None
        if node is None:
            hit = self.owner._dirs.get(wd)
            if hit is not None and hit[0] is not self:   # cannot happen: one folder per session
                return None, False
            node = _Dir(wd, name, parent)
            self._nodes[wd] = node
            self.owner._dirs[wd] = (self, node)
        else:
            node.detach()     # known already: moved here (its watches below stay valid)
            node.name, node.parent = name, parent
        if parent is not None:
            old = parent.children.get(name)
            if old is not None and old is not node:
                old.detach()
            parent.children[name] = node
        return node, known

    def _add_subtree(self, parent: _Dir, name: str, path: str) -> None:
        """A directory appeared at *path*: watch it and everything below, and
        mark every file in it as touched by the calls in progress."""
        pfd = self._open_dir(parent.path() or "")
        if pfd is None:
            return
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        except OSError:
            return          # gone again, or not a directory any more: later events say what is there
        finally:
            os.close(pfd)
        try:
            node, known = self._watch(fd, name, parent)
            if node is None:
                return
            record = any(not r.lost for r in self._recordings)
            if known and not record:
                return          # a watched directory moved: its tree below is intact
            self._watch_below(fd, node, path, record=record)
        except WatchUnavailable as exc:
            self._degrade(exc)
        finally:
            os.close(fd)

    def _watch_below(self, fd: int, node: _Dir, path: str, record: bool) -> None:
        nodes = {".": node}
        for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
            here = nodes[dirpath]
            if record:
                rel = os.path.normpath(os.path.join(path, dirpath)) if path else os.path.normpath(dirpath)
                rel = "" if rel == "." else rel
                for fn in filenames:
                    self._mark(f"{rel}/{fn}" if rel else fn)
            for sub in dirnames:
                try:
                    sfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except OSError:
                    continue
                try:
                    child, _ = self._watch(sfd, sub, here)
                finally:
                    os.close(sfd)
                if child is not None:
                    nodes[os.path.join(dirpath, sub)] = child

    def _open_dir(self, rel: str) -> int | None:
        """A descriptor of a directory below the root that cannot lead out of it."""
        try:
            return self._files._open(rel, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None

    # -- the answer ---------------------------------------------------------------------------
    def _stat(self, paths: list[str]) -> list[Changed]:
        """Look at the touched paths only: those that are regular files now."""
        out: list[Changed] = []
        by_dir: dict[str, list[str]] = {}
        for p in paths:
            parent, _, name = p.rpartition("/")
            by_dir.setdefault(parent, []).append(name)
        for parent, names in by_dir.items():
            dfd = self._open_dir(parent)
            if dfd is None:
                continue
            try:
                for name in names:
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        out.append(Changed(f"{parent}/{name}" if parent else name, st.st_size))
            finally:
                os.close(dfd)
        out.sort(key=lambda c: c.path)
        return out

    def _walk_changes(self, since_ns: int, moved: set[str] = frozenset()) -> list[Changed]:
        """The fallback: one walk, every regular file changed since *since_ns*
        (ctime: set by the kernel on every write, rename or creation), and
        every file below a folder the events saw moved into place (renaming a
        folder changes its own ctime, not its files')."""
        out: list[Changed] = []
        below: set[str] = set()
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return out
        try:
            for dirpath, _dirnames, filenames, dfd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
                rel = os.path.normpath(dirpath)
                all_new = rel in moved or os.path.dirname(rel) in below
                if all_new:
                    below.add(rel)
                for fn in filenames:
                    try:
                        st = os.stat(fn, dir_fd=dfd, follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode) and (all_new or st.st_ctime_ns >= since_ns):
                        out.append(Changed(fn if rel == "." else f"{rel}/{fn}", st.st_size))
        finally:
            os.close(fd)
        out.sort(key=lambda c: c.path)
        return out
