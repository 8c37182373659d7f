"""Sessions: one sandboxed kernel and one data folder each, with an owner.

On disk, under the data root::

    <data_root>/<id>/meta.json        owner, times (written atomically)
    <data_root>/<id>/data/            /mnt/data (a mounted quota image as root)
    <data_root>/<id>/data.img         the quota image
    <data_root>/<id>/transcript.ipynb the session as a notebook
    <data_root>/<id>/kernel.log       the kernel's own stdout and stderr
    <runtime_dir>/<id>/               the kernel's ZeroMQ ipc sockets (short path)

A broker restart loses no files: sessions are read back from the data root
and their kernels start again on first use.  The start-up scan (:meth:`SessionManager.restore`)
also cleans up after a broker that was killed: half-written temporary files
(meta.json, transcripts, uploads) are removed, the cgroups and mounts of
kernels that died with it are removed, a folder whose ``meta.json`` is
missing or unreadable is set aside under ``<data_root>/.quarantine/`` and an
unreadable transcript is set aside next to the session, each with a log line
naming it (docs/reliability.md).  ``meta.json`` also records
whether the session's kernel has run code (``kernel_state``), so that the first
code call in a new kernel (after a broker restart, a kernel that died between
calls, a restart through the Jupyter API) says in its ``notice`` that the
variables are gone and the files kept.  Sessions idle for longer than
the cooldown end (never during an execution); their files are removed at
once or kept for a while under ``<data_root>/.ended/`` (``ended_files``).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time

from traitlets import Enum, Float, Integer, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from broker.admission import Admission, meminfo
from broker.changes import ChangeTracker, ChangeTracking
from broker.errors import DataRootFull, SandboxError, SessionNotFound, ShuttingDown, TooManySessions
from broker.execution import Executor, SessionKernel
from broker.files import SessionFiles
from broker.ids import BROKER_NAME_ALLOWED, BROKER_NAME_RE, ID_RE, default_broker_name, new_id  # noqa: F401 (ID_RE: re-exported)
from broker.sandbox import prereq, volume
from broker.sandbox.settings import ByteSize

# Temporary files of an atomic write (meta.json, the transcript, an upload)
# that a killed broker left behind: never a session's real file.
SESSION_TMP_RE = re.compile(r"^\.(meta\.[0-9a-f]{8}\.json|transcript\.[0-9a-f]{8}\.tmp)$")
UPLOAD_TMP_RE = re.compile(r"^\..*\.upload-[0-9a-f]{12}$", re.S)
QUARANTINE = ".quarantine"      # <data_root>/.quarantine/<id>: folders the start-up scan could not read
ENDED = ".ended"                # <data_root>/.ended/<id>: files of ended sessions kept (ended_files = keep)


def _iso(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _storage_error(exc: OSError, data_root: str) -> Exception:
    """A full data root said as such (507); any other OSError as it is."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DataRootFull(f"the broker's data root {data_root} is full ({exc.strerror}); no session can be "
                            "created until space is freed there")
    return exc


class Session:
    def __init__(self, manager: "SessionManager", sid: str, owner: str, created: float, last_activity: float):
        self.manager = manager
        self.id = sid
        self.owner = owner
        self.created = created
        self.last_activity = last_activity
        self.dir = os.path.join(manager.data_root, sid)
        self.data_dir = os.path.join(self.dir, "data")
        # The kernel's sockets live under the runtime folder, not the data
        # root: a unix socket path is limited to 107 bytes, and the data root
        # may be anywhere.
        self.rt_dir = os.path.join(manager.runtime_dir, sid)
        self.kernel: SessionKernel | None = None
        self.lock = asyncio.Lock()          # one execution at a time
        self._start_lock = asyncio.Lock()
        self.deleted = False
        self.env: dict[str, str] = {}       # allow-listed KERNEL_* variables
        self.hub = None                      # IOPubHub, made on the first WebSocket client
        self._transcript = None
        self._shell_cgroup = None           # reused by every shell command of the session
        # Continuity: has the current kernel run code (a pool's preload does
        # not count)?  And the notice owed to the next code call when the
        # kernel was replaced outside a call.
        self.kernel_state = False
        self._kernel_notice = ""
        self._changes: ChangeTracker | None = None
        self.stop_notice = ""               # set when the broker's shutdown stopped a running call

    # -- state ----------------------------------------------------------------
    @property
    def expires_at(self) -> float:
        return self.last_activity + self.manager.idle_timeout_minutes * 60

    @property
    def state(self) -> str:
        if self.deleted:
            return "deleted"
        if self.kernel is None or not self.kernel.km.has_kernel:
            return "stopped"
        return "busy" if self.lock.locked() else "idle"

    def model(self) -> dict:
        return {"id": self.id, "created": _iso(self.created), "last_activity": _iso(self.last_activity),
                "expires_at": _iso(self.expires_at), "state": self.state}

    def touch(self) -> None:
        self.last_activity = time.time()

    @property
    def files(self) -> SessionFiles:
        st = os.stat(self.data_dir)
        owner = (st.st_uid, st.st_gid) if prereq.is_root() and st.st_uid != 0 else None
        return SessionFiles(self.data_dir, owner=owner, max_upload=self.manager.max_upload_bytes,
                            max_read=self.manager.max_read_bytes)

    @property
    def changes(self) -> ChangeTracker:
        """What each call changes in /mnt/data (made on first use; its watches
        are placed by the first call and follow the folder if it is mounted again)."""
        if self._changes is None:
            self._changes = self.manager.change_tracking.tracker(self.data_dir)
        return self._changes

    def close_changes(self) -> None:
        if self._changes is not None:
            self._changes.close()
            self._changes = None

    def save(self, starting: bool = False) -> None:
        """Write meta.json atomically (temporary file, fsync, rename).  *starting*
        marks a session whose first kernel is still starting: nobody has its id
        yet, so the start-up scan removes it if the broker died meanwhile."""
        meta = {"id": self.id, "owner": self.owner, "created": self.created, "last_activity": self.last_activity,
                "env": self.env, "kernel_state": self.kernel_state, "kernel_notice": self._kernel_notice}
        if starting:
            meta["starting"] = True
        tmp = os.path.join(self.dir, f".meta.{secrets.token_hex(4)}.json")
        try:
            with open(tmp, "w") as fh:
                json.dump(meta, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, os.path.join(self.dir, "meta.json"))
        except BaseException:
            try:
                os.unlink(tmp)      # a full disk leaves the previous meta.json and no temporary file
            except OSError:
                pass
            raise

    # -- kernel -----------------------------------------------------------------
    async def ensure_kernel(self, reason: str = "restore") -> SessionKernel:
        """The session's kernel, started (or, when it died since the last
        call, restarted).  A new kernel replacing one that had run code
        leaves a notice for the next code call (:meth:`kernel_for_code`).
        *reason* is why a kernel starts here, for /metrics."""
        async with self._start_lock:
            restored = self.kernel is None
            if restored:
                self.kernel = SessionKernel(self.manager, self.data_dir, self.rt_dir, self.id, env=self.env,
                                            log_path=os.path.join(self.dir, "kernel.log"),
                                            on_restart=self._kernel_replaced)
            if not self.kernel.km.has_kernel:
                # A state without a kernel object: the kernel that ran the
                # code belonged to an earlier broker (a session read back by
                # restore()).  With one: a restart inside a call failed.
                self._owe_notice("the broker restarted since the last call" if restored else
                                 "the previous kernel stopped and could not be restarted at once")
                await self.kernel.start()
                self.manager.count("kernel_started", reason if restored else "retry")
                self._kernel_replaced()
            elif not await self.kernel.is_alive():
                self._owe_notice(f"the previous kernel stopped between calls ({self.kernel.death_reason()})")
                await self.kernel.restart()
                self.manager.count("kernel_restarted", "died_between_calls")
            return self.kernel

    async def kernel_for_code(self) -> tuple[SessionKernel, str]:
        """The kernel for a call that runs code (ExecutePythonCode,
        GeneratePdfReport), and the notice owed to it: non-empty when the
        kernel is new since code last ran, for a reason the call did not see.
        Marks the kernel as holding state."""
        kernel = await self.ensure_kernel()
        notice, self._kernel_notice = self._kernel_notice, ""
        if notice and self.kernel_state:
            self._save_quietly()
        self.mark_kernel_state()
        return kernel, notice

    def mark_kernel_state(self) -> None:
        """The kernel runs code: from now on it holds state worth a notice when lost."""
        if not self.kernel_state:
            self.kernel_state = True
            self._save_quietly()

    def _owe_notice(self, why: str) -> None:
        """Kept in meta.json too: a notice still owed survives a broker restart."""
        if self.kernel_state and not self._kernel_notice:
            self._kernel_notice = (f"This code ran in a new kernel: {why}, so variables, imports and functions "
                                   "defined before are gone; files in /mnt/data are kept.")
            self._save_quietly()

    def _kernel_replaced(self) -> None:
        """A new kernel (a start or any restart) holds no state yet.  A
        restart inside a call (timeout, crash) is reported by that call."""
        if self.kernel_state:
            self.kernel_state = False
            self._save_quietly()

    def _save_quietly(self) -> None:
        if self.deleted or not self.owner:
            return      # a pooled session's meta.json is written when it is handed out
        try:
            self.save()
        except OSError as exc:
            self.manager.log.warning("session %s: could not write meta.json: %s", self.id, exc)

    @property
    def transcript(self):
        from broker.transcripts import Transcript

        if self._transcript is None:
            self._transcript = Transcript(os.path.join(self.dir, "transcript.ipynb"),
                                          self.manager.transcript_settings, self.id)
        return self._transcript

    def kernel_address(self, channel: str) -> str:
        """The host-side ZeroMQ address of one of the kernel's channels."""
        info = self.kernel.km.get_connection_info()
        return f"{info['transport']}://{info['ip']}-{info[channel + '_port']}"

    async def get_hub(self, settings):
        from jupyter_client.session import Session as JSession

        from broker.channels import IOPubHub

        kernel = await self.ensure_kernel()
        if self.hub is None:
            km = kernel.km
            js = JSession(key=km.session.key, signature_scheme=km.session.signature_scheme, username="broker")
            self.hub = IOPubHub(self, settings, js)
        return self.hub

    @property
    def connections(self) -> int:
        return sum(1 for c in self.hub.listeners.values() if c.attached) if self.hub else 0

    @property
    def execution_state(self) -> str:
        if self.kernel is None or not self.kernel.km.has_kernel:
            return "starting"
        if self.lock.locked():
            return "busy"
        return self.hub.execution_state if self.hub and self.hub.execution_state != "starting" else "idle"

    async def restart_kernel(self) -> None:
        """A restart asked for through the Jupyter API: the next code call is told."""
        kernel = await self.ensure_kernel()
        self._owe_notice(f"the kernel was restarted through the Jupyter API (/api/kernels/{self.id}/restart)")
        await kernel.restart()
        self.manager.count("kernel_restarted", "jupyter_api")

    async def interrupt_kernel(self) -> None:
        kernel = await self.ensure_kernel()
        await kernel.km.interrupt_kernel()

    def shell_cgroup(self, settings):
        """The session's cgroup for shell commands, made on first use."""
        if self._shell_cgroup is None and settings.cgroups != "off":
            from broker.sandbox import cgroups

            version = cgroups.detect()
            if version is not None:
                try:
                    self._shell_cgroup = cgroups.Cgroup.create(f"sh-{self.id}", settings.memory_limit,
                                                               settings.pids_limit, settings.cpu_limit, version)
                except OSError as exc:
                    self.manager.log.warning("shell cgroup not created (%s): a fresh one per command", exc)
        return self._shell_cgroup

    async def stop_kernel(self) -> None:
        if self._shell_cgroup is not None:
            self._shell_cgroup.remove()
            self._shell_cgroup = None
        if self.hub is not None:
            self.hub.close()
            self.hub = None
        if self.kernel is not None:
            await self.kernel.shutdown()
            self.kernel = None


class SessionManager(LoggingConfigurable):
    """Creates, finds, lists, culls and deletes sessions."""

    data_root = Unicode(config=True, help="""Folder holding every session (one sub-folder each). Must be
        on a local file system; sessions and their files survive a broker restart. Default:
        $XDG_DATA_HOME/broker/sessions (~/.local/share/broker/sessions).""")

    @default("data_root")
    def _default_data_root(self):
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        return os.path.join(base, "broker", "sessions")

    runtime_dir = Unicode(config=True, help="""Folder for the kernels' ZeroMQ sockets (one sub-folder per
        session; as root each is a small nosymfollow tmpfs). Kept short: a unix socket path has at most 107
        bytes. Default, one per data root (TAG: 6 hex digits of a hash of data_root's real path):
        /run/broker/TAG as root, else $XDG_RUNTIME_DIR/broker-TAG (or /tmp/broker-<uid>-TAG).""")

    def _ensure_runtime_dir(self) -> None:
        """Create the runtime folder, or check that an existing one is ours
        and private (in a shared /tmp anyone could have made it first)."""
        d = self.runtime_dir
        os.makedirs(d, mode=0o711 if prereq.is_root() else 0o700, exist_ok=True)
        st = os.lstat(d)
        import stat as _stat

        if not _stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise SandboxError(f"runtime folder {d} is not a private folder of this user (owner {st.st_uid}, "
                               f"mode {oct(st.st_mode & 0o777)}); remove it or set SessionManager.runtime_dir")

    @default("runtime_dir")
    def _default_runtime_dir(self):
        # One folder per data root: two brokers on one host (a router's
        # brokers, tests) hold sessions with the same id after a restore
        # elsewhere, and one must never unmount or remove the other's sockets.
        tag = hashlib.sha256(os.path.realpath(self.data_root).encode()).hexdigest()[:6]
        if prereq.is_root():
            return f"/run/broker/{tag}"
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        return os.path.join(xdg, f"broker-{tag}") if xdg else f"/tmp/broker-{os.getuid()}-{tag}"

    idle_timeout_minutes = Float(20, max=60, config=True, help="""Idle cooldown: a session with no call for
        this many minutes ends (its kernel stops; its files go as ended_files says). Every call resets it, and
        a session never ends while an execution runs (REST or WebSocket). min_idle_timeout_minutes (5) to 60.""")
    min_idle_timeout_minutes = Float(5, min=0.001, config=True, help="""The lowest idle_timeout_minutes
        accepted. For tests only: lowering it lets a test see sessions end within seconds. Leave it at 5.""")
    ended_files = Enum(["remove", "keep"], "remove", config=True, help="""What happens to the files of a
        session that ended after its idle cooldown: 'remove' deletes its folder at once; 'keep' moves it to
        <data_root>/.ended/<id>/ (meta.json, transcript.ipynb, the data folder or its quota image data.img)
        for ended_retention_hours, after which the culler removes it. A session deleted by its owner
        (DELETE /api/sessions/{id}) is always removed at once.""")
    ended_retention_hours = Float(24, min=0, config=True, help="""Hours the files of an ended session are
        kept under <data_root>/.ended/ when ended_files = 'keep'; the culler removes them after that.""")
    max_sessions = Integer(100, min=1, config=True, help="Sessions alive at once, all owners together (429 past it).")
    max_sessions_per_owner = Integer(20, min=1, config=True, help="Sessions alive at once for one owner (429 past it).")
    cull_interval = Float(30.0, min=0.1, config=True, help="Seconds between checks for idle sessions.")
    pool_size = Integer(2, min=0, config=True, help="""Kernels kept started and waiting, so that a new session
        is ready at once. Pooled kernels have already run pool_preload. They count toward max_sessions but
        belong to nobody until handed out. 0 turns the pool off.""")
    pool_refill_delay = Float(1.0, min=0, config=True, help="""Seconds after a pooled kernel is handed out before
        its replacement starts, so the new session's first calls do not share the CPU with a kernel start
        (not when requests are already waiting for a pooled kernel).""")
    pool_max_size = Integer(8, min=0, config=True, help="""Kernels the warm pool grows to while sessions are
        taken faster than it refills: every create that finds the pool empty raises its target by one, up to
        this (never below pool_size). It shrinks back to pool_size after pool_shrink_after seconds without a
        hand-out.""")
    pool_shrink_after = Float(120.0, min=0, config=True, help="""Seconds without a session taken from the pool
        after which a pool grown past pool_size shrinks back to it (the surplus kernels are stopped).""")
    pool_refill_parallel = Integer(0, min=0, config=True, help="""Pooled kernels started at once when the pool
        refills. 0: one per CPU this process may run on (a kernel start is CPU-bound; more at once only
        makes each slower).""")
    pool_min_available = ByteSize(1 << 30, config=True, help="""The pool does not start kernels while the
        machine's available memory (MemAvailable in /proc/meminfo) is below this; a create that finds the
        pool empty then starts a kernel of its own.""")
    pool_wait_timeout = Float(60.0, min=0, config=True, help="""Seconds a create that finds the pool empty waits
        for the next pooled kernel (they are handed out in the order asked) before starting a kernel of its
        own.""")
    pool_preload = Unicode("import numpy, pandas, matplotlib, matplotlib.pyplot", config=True, help="""Code each
        pooled kernel runs silently before it is handed out (not in the transcript, no execution count).""")
    max_upload_bytes = ByteSize(128 << 20, config=True, help="Largest file accepted by an upload (413 past it).")
    max_read_bytes = ByteSize(128 << 20, config=True, help="Largest file the broker serves or reads back.")
    shell_output_limit = ByteSize(1 << 20, config=True, help="""Bytes of output (stdout and stderr together) one
        RunShellCommand may produce; past it the command is killed and the output marked truncated.""")

    @validate("idle_timeout_minutes")
    def _check_idle_timeout(self, proposal):
        value = proposal["value"]
        if value < self.min_idle_timeout_minutes:
            raise TraitError(f"SessionManager.idle_timeout_minutes must be at least {self.min_idle_timeout_minutes:g} "
                             f"(SessionManager.min_idle_timeout_minutes) and at most 60, not {value:g}")
        return value

    broker_name = Unicode(config=True, help="""This broker's name, carried by every session id it makes
        (`<name>_<uuid>`) so that a router sends each request to the broker that holds the session
        (docs/scale.md). 1 to 16 lowercase letters and digits, unique among the brokers behind one router.
        Default: on Kubernetes (KUBERNETES_SERVICE_HOST set) the StatefulSet pod's ordinal from the host
        name (`broker-2` -> `b02`); elsewhere empty: plain UUIDs, for a broker on its own. Sessions made
        under another name (or none) keep working.""")

    @default("broker_name")
    def _default_broker_name(self):
        return default_broker_name(socket.gethostname(), bool(os.environ.get("KUBERNETES_SERVICE_HOST")))

    @validate("broker_name")
    def _check_broker_name(self, proposal):
        value = proposal["value"]
        if value and not BROKER_NAME_RE.match(value):
            raise TraitError(f"SessionManager.broker_name {value!r}: use {BROKER_NAME_ALLOWED} "
                             "(it becomes the session ids' prefix, before '_'), or '' for plain UUIDs")
        return value

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sessions: dict[str, Session] = {}
        # Readiness (broker/health.py): did the latest kernel start work?
        self.last_start: tuple[float, bool, str] | None = None
        # broker/snapshots.py's Snapshots when the service turns them on (ServeApp).
        self.snapshots = None
        self._lock = asyncio.Lock()
        self._reserved: dict[str, int] = {}
        self._pool: list[Session] = []
        self._pool_task: asyncio.Task | None = None
        # The pool following demand: kernels being started for it, requests
        # waiting for one (futures, first come first served), the size it
        # aims at (pool_size..pool_max_size) and when it last handed one out.
        self._pool_starting: set[asyncio.Task] = set()
        self._pool_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._pool_target = 0
        self._pool_last_take = time.monotonic()
        self._pool_not_before = 0.0
        self._pool_wake = asyncio.Event()
        self.pool_stats = {"from_pool": 0, "waited": 0, "cold": 0}
        self._closing = False
        self._pool_enabled = False   # the service turns it on (start_background)
        self.executor = Executor(parent=self)
        from broker.transcripts import TranscriptSettings

        self.transcript_settings = TranscriptSettings(parent=self)
        self.change_tracking = ChangeTracking(parent=self)
        self.admission = Admission(parent=self)
        self._cull_task: asyncio.Task | None = None
        # The service's telemetry (broker.metrics.Telemetry); None in-process.
        self.observer = None

    def count(self, event: str, reason: str) -> None:
        """Report a kernel start or restart to the observer, if any."""
        if self.observer is not None:
            getattr(self.observer, event)(reason)

    # -- lifecycle ----------------------------------------------------------------
    def restore(self) -> int:
        """Read back sessions left on disk by an earlier run, and clean up
        after it if it was killed (see the module docstring).  A folder that
        cannot be read back never stops the broker from starting."""
        os.makedirs(self.data_root, mode=0o711, exist_ok=True)
        from broker.sandbox import cgroups

        cgroups.sweep_empty()   # groups of kernels from an earlier run that did not shut down
        n = 0
        for sid in sorted(os.listdir(self.data_root)):
            folder = os.path.join(self.data_root, sid)
            if not ID_RE.match(sid) or not os.path.isdir(folder) or os.path.islink(folder):
                continue
            # Its kernel and shell commands died with the earlier broker
            # (bwrap --die-with-parent); their groups are ours to remove.
            cgroups.remove_named(f"k-{sid}")
            cgroups.remove_named(f"sh-{sid}")
            self._remove_tmp_files(folder)
            meta_path = os.path.join(folder, "meta.json")
            try:
                with open(meta_path) as fh:
                    meta = json.load(fh)
                if not isinstance(meta, dict) or not isinstance(meta.get("owner"), str):
                    raise ValueError("no owner")
                s = Session(self, sid, meta["owner"], float(meta["created"]), float(meta["last_activity"]))
                s.env = {str(k): str(v) for k, v in dict(meta.get("env") or {}).items()}
                s.kernel_state = bool(meta.get("kernel_state"))
                s._kernel_notice = str(meta.get("kernel_notice") or "")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                if isinstance(exc, FileNotFoundError) and self._unused(folder):
                    # Killed between making the folder and writing meta.json.
                    self._remove_dir(Session(self, sid, "", 0, 0))
                    continue
                why = "no meta.json" if isinstance(exc, FileNotFoundError) else f"meta.json unreadable ({exc})"
                self._quarantine(sid, why)
                continue
            if not s.owner or meta.get("starting"):
                # A pooled session nobody took, or one whose first kernel was
                # still starting (its id never reached anyone): nothing to keep.
                self._remove_dir(s)
                continue
            try:
                self._mount(s)
            except (OSError, SandboxError) as exc:
                self._quarantine(sid, f"its /mnt/data image could not be mounted ({exc})")
                continue
            self._check_volume(s)
            self._remove_upload_tmp(s)
            # Imported here as Session.transcript does: broker.transcripts
            # imports nbformat (its jsonschema costs seconds of CPU at import).
            from broker.transcripts import set_aside_if_unreadable

            set_aside_if_unreadable(os.path.join(folder, "transcript.ipynb"), sid, self.log)
            self.sessions[sid] = s
            n += 1
        return n

    @staticmethod
    def _unused(folder: str) -> bool:
        """A session folder with nothing in it worth keeping (no quota image, no files)."""
        data = os.path.join(folder, "data")
        try:
            return set(os.listdir(folder)) <= {"data", "kernel.log"} and not os.listdir(data) \
                and not os.path.ismount(data)
        except FileNotFoundError:
            return set(os.listdir(folder)) <= {"kernel.log"}

    @staticmethod
    def _remove_tmp_files(folder: str) -> None:
        for name in os.listdir(folder):
            if SESSION_TMP_RE.match(name):
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass

    def _remove_upload_tmp(self, s: Session) -> None:
        """An upload is written under a temporary name and renamed when
        whole; a broker killed mid-write leaves only that temporary file."""
        removed = 0
        for top, dirs, files in os.walk(s.data_dir):
            for name in files:
                if UPLOAD_TMP_RE.match(name):
                    try:
                        os.unlink(os.path.join(top, name))
                        removed += 1
                    except OSError:
                        pass
        if removed:
            self.log.warning("session %s: removed %d unfinished upload(s) left by an earlier run", s.id, removed)

    def _check_volume(self, s: Session) -> None:
        if prereq.is_root() and not volume.is_mounted(s.data_dir) and not os.path.exists(volume.image_path(s.data_dir)):
            if os.listdir(s.data_dir):
                self.log.warning("session %s: its /mnt/data quota image %s is missing; its files are in the folder "
                                 "itself and only the per-file limit applies", s.id, volume.image_path(s.data_dir))
            else:
                self.log.warning("session %s: its /mnt/data quota image %s is missing; the files it held are "
                                 "gone and a new, empty one is made at its next kernel start", s.id,
                                 volume.image_path(s.data_dir))

    def _quarantine(self, sid: str, why: str) -> None:
        """Set a session folder the broker cannot use aside, whole, for an operator to look at."""
        folder = os.path.join(self.data_root, sid)
        if prereq.is_root():
            volume.unmount(os.path.join(folder, "data"))
            volume.unmount(os.path.join(self.runtime_dir, sid))
        shutil.rmtree(os.path.join(self.runtime_dir, sid), ignore_errors=True)
        qdir = os.path.join(self.data_root, QUARANTINE)
        os.makedirs(qdir, mode=0o700, exist_ok=True)
        dest = os.path.join(qdir, sid)
        if os.path.exists(dest):
            dest += time.strftime("-%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            os.rename(folder, dest)
        except OSError as exc:
            self.log.error("session folder %s: %s; could not set it aside (%s): skipped", folder, why, exc)
            return
        self.log.warning("session folder %s: %s; set aside as %s", folder, why, dest)

    def _mount(self, s: Session) -> None:
        if prereq.is_root() and os.path.exists(volume.image_path(s.data_dir)):
            st = os.stat(volume.image_path(s.data_dir))
            volume.ensure(s.data_dir, 0, st.st_uid, st.st_gid, prereq.check_root_tools())

    def start_background(self) -> None:
        """Start the idle culler and fill the warm pool (the service does this;
        in-process users such as replay do not)."""
        if self._cull_task is None:
            self._cull_task = asyncio.ensure_future(self._cull_loop())
        self._pool_enabled = True
        self._refill_pool()
        if self.snapshots is not None:
            self.snapshots.start()

    async def _cull_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cull_interval)
            try:
                await self.cull_idle()
                await self.shrink_pool()
            except Exception:  # keep culling whatever one session did
                self.log.exception("culling failed")

    async def cull_idle(self) -> list[str]:
        """End the sessions idle past their cooldown (never one running an
        execution) and remove kept files of ended sessions past their retention.
        Pooled kernels belong to nobody and are never culled."""
        now = time.time()
        culled = []
        for s in list(self.sessions.values()):
            # Never under a running execution: a REST call holds the lock, a
            # WebSocket client's cell shows as the kernel's busy state.
            if s.expires_at <= now and not s.lock.locked() and s.execution_state != "busy" and not self._closing:
                self.log.info("session %s idle since %s: ending it (files: %s)", s.id, _iso(s.last_activity),
                              self.ended_files)
                await self._delete(s, keep=self.ended_files == "keep")
                culled.append(s.id)
        self._remove_expired_ended(now)
        return culled

    def _remove_expired_ended(self, now: float) -> None:
        folder = os.path.join(self.data_root, ENDED)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False) and now - e.stat(follow_symlinks=False).st_mtime \
                        >= self.ended_retention_hours * 3600:
                    self.log.info("files of ended session %s kept for %g h: removing them", e.name,
                                  self.ended_retention_hours)
                    shutil.rmtree(e.path, ignore_errors=True)
            except OSError:
                continue

    @property
    def closing(self) -> bool:
        """True once shutdown() has begun."""
        return self._closing

    async def shutdown(self, grace: float = 0.0) -> None:
        """Stop every kernel; session folders stay for the next run.

        New calls are refused at once (:class:`ShuttingDown`).  Calls still
        running get *grace* seconds to finish; after that their executions
        are interrupted and their shell commands killed, and they answer
        with an error that says so (``stop_notice``).  Then transcripts are
        flushed, kernels stopped and every mount of every session removed."""
        self._closing = True
        if self._cull_task:
            self._cull_task.cancel()
            self._cull_task = None
        tasks = ([self._pool_task] if self._pool_task is not None else []) + list(self._pool_starting)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._wake_waiters()
        pool, self._pool = self._pool, []
        await asyncio.gather(*(self._delete(s) for s in pool), return_exceptions=True)
        if not await self._calls_done(grace):
            busy = [s for s in self.sessions.values() if s.lock.locked()]
            self.log.warning("%d call(s) still running %g s after the stop signal: interrupting them", len(busy),
                             grace)
            for s in busy:
                s.stop_notice = (f"The broker is shutting down: this call was still running {grace:g} s after the "
                                 "stop signal (ServeApp.shutdown_grace) and was stopped; files in /mnt/data are "
                                 "kept. Call again when the broker is back.")
                if s._shell_cgroup is not None:
                    s._shell_cgroup.kill_all()
                if s.kernel is not None and s.kernel.km.has_kernel:
                    try:
                        await s.kernel.km.interrupt_kernel()
                    except Exception as exc:  # the kernel stops below in any case
                        self.log.warning("session %s: interrupt failed: %s", s.id, exc)
            await self._calls_done(5.0)
        await asyncio.gather(*(s._transcript.flush() for s in self.sessions.values() if s._transcript is not None),
                             return_exceptions=True)
        if self.snapshots is not None:
            try:
                await self.snapshots.shutdown()     # before the kernels stop: files as the sessions left them
            except Exception:
                self.log.exception("snapshots at shutdown failed")
        await asyncio.gather(*(s.stop_kernel() for s in self.sessions.values()), return_exceptions=True)
        self.change_tracking.close()
        for s in self.sessions.values():
            if prereq.is_root():
                volume.unmount(s.data_dir)
                volume.unmount(s.rt_dir)
            # Sockets are made again when the kernel next starts.
            shutil.rmtree(s.rt_dir, ignore_errors=True)

    async def _calls_done(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for every session's running call to end."""
        deadline = time.monotonic() + timeout
        while any(s.lock.locked() for s in self.sessions.values()):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # -- operations ------------------------------------------------------------------
    async def create(self, owner: str, env: dict[str, str] | None = None) -> Session:
        if self._closing:
            raise ShuttingDown("the broker is shutting down; create the session again when it is back")
        waiter = None
        async with self._lock:
            owned = sum(1 for s in self.sessions.values() if s.owner == owner) + self._reserved.get(owner, 0)
            if len(self.sessions) + sum(self._reserved.values()) >= self.max_sessions:
                raise TooManySessions(f"the broker holds its maximum of {self.max_sessions} sessions "
                                      "(SessionManager.max_sessions); delete one or wait for idle ones to expire")
            if owned >= self.max_sessions_per_owner:
                raise TooManySessions(f"you hold the maximum of {self.max_sessions_per_owner} sessions per owner "
                                      "(SessionManager.max_sessions_per_owner); delete one first")
            self.admission.check()      # 503 while memory is short (broker/admission.py)
            pooled = self._take_pooled() if not env else None
            if pooled is not None:
                self.pool_stats["from_pool"] += 1
                return self._hand_out(pooled, owner, delay=self.pool_refill_delay)
            # Admission was checked just above; only the pool's own memory floor is left.
            if not env and self._pool_on() and self._pool_memory_ok():
                # Taken faster than it refills: the pool grows, and this
                # request waits for the next pooled kernel (first come, first
                # served) rather than starting a cold one behind the others.
                self._pool_target = min(max(self.pool_max_size, self.pool_size), self._pool_target + 1)
                waiter = asyncio.get_running_loop().create_future()
                self._pool_waiters.append(waiter)
                self._refill_pool()
            self._reserved[owner] = self._reserved.get(owner, 0) + 1
        try:
            if waiter is not None:
                pooled = await self._wait_pooled(waiter)
                if pooled is not None:
                    self.pool_stats["waited"] += 1
                    return self._hand_out(pooled, owner)
            self.pool_stats["cold"] += 1
            s = await self._new_session(owner, env)
            self.sessions[s.id] = s
            return s
        finally:
            self._reserved[owner] -= 1
            self._refill_pool()

    def _hand_out(self, pooled: Session, owner: str, delay: float = 0.0) -> Session:
        now = time.time()
        pooled.owner, pooled.created, pooled.last_activity = owner, now, now
        try:
            pooled.save()
        except OSError as exc:
            pooled.owner = ""
            self._pool.insert(0, pooled)
            raise _storage_error(exc, self.data_root) from None
        self.sessions[pooled.id] = pooled
        self._pool_last_take = time.monotonic()
        # A moment's grace: a new session's first calls usually come at once
        # and should not share the CPU with a kernel start.
        self._refill_pool(delay=delay)
        return pooled

    async def _wait_pooled(self, waiter: asyncio.Future) -> Session | None:
        """The next pooled kernel, or None (the pool could not make one in
        time, or stopped): the caller then starts a kernel of its own."""
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), self.pool_wait_timeout)
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self._pool.append(waiter.result())     # handed to us as we left: back to the pool
            waiter.cancel()
            raise
        if waiter.done() and not waiter.cancelled():
            return waiter.result()
        waiter.cancel()
        return None

    async def _new_session(self, owner: str, env: dict | None, sid: str | None = None) -> Session:
        sid = sid or new_id(self.broker_name)
        now = time.time()
        s = Session(self, sid, owner, now, now)
        s.env = dict(env or {})
        try:
            os.makedirs(s.data_dir, mode=0o700)
            self._ensure_runtime_dir()
            os.makedirs(s.rt_dir, mode=0o700, exist_ok=True)
            os.chmod(s.dir, 0o711)
            s.save(starting=True)
        except OSError as exc:
            self._remove_dir(s)
            raise _storage_error(exc, self.data_root) from None
        try:
            await s.ensure_kernel("pool" if not owner else "new")
            if owner:
                s.save()
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.last_start = (time.time(), False, f"{type(exc).__name__}: {exc}"[:300])
            await s.stop_kernel()
            self._remove_dir(s)
            raise
        self.last_start = (time.time(), True, "")
        return s

    # -- the warm pool ------------------------------------------------------------
    def _take_pooled(self) -> Session | None:
        while self._pool:
            s = self._pool.pop(0)
            if s.kernel is not None and s.kernel.km.has_kernel and s.kernel.provisioner is not None \
                    and s.kernel.provisioner.process is not None and s.kernel.provisioner.process.poll() is None:
                return s
            asyncio.ensure_future(self._delete(s))
        return None

    def _pool_on(self) -> bool:
        return bool(self.pool_size) and self._pool_enabled and not self._closing

    def _pool_memory_ok(self) -> bool:
        """Is the machine's MemAvailable at least pool_min_available?"""
        try:
            avail = meminfo().get("MemAvailable")
        except OSError:
            return True
        return avail is None or avail >= self.pool_min_available

    def _may_refill(self) -> bool:
        """May the pool start a kernel now?  The one place a memory check
        plugs in: not while the machine's available memory is below
        pool_min_available, nor while memory admission is closed
        (broker/admission.py)."""
        return self._pool_memory_ok() and self.admission.allows()

    def _refill_parallel(self) -> int:
        if self.pool_refill_parallel:
            return self.pool_refill_parallel
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)

    def _refill_pool(self, delay: float = 0.0) -> None:
        if not self._pool_on():
            return
        self._pool_target = max(self._pool_target, self.pool_size)
        if delay:
            self._pool_not_before = max(self._pool_not_before, time.monotonic() + delay)
        self._pool_wake.set()
        if self._pool_task is None or self._pool_task.done():
            self._pool_task = asyncio.ensure_future(self._fill_pool())

    def _live_waiters(self) -> int:
        while self._pool_waiters and self._pool_waiters[0].done():
            self._pool_waiters.popleft()
        return sum(1 for w in self._pool_waiters if not w.done())

    def _wake_waiters(self) -> None:
        """Tell every waiting request to start a kernel of its own."""
        while self._pool_waiters:
            w = self._pool_waiters.popleft()
            if not w.done():
                w.set_result(None)

    async def _fill_pool(self) -> None:
        """Keep pool + kernels starting at the target plus the requests
        waiting, starting up to _refill_parallel() kernels at once."""
        while not self._closing:
            self._pool_wake.clear()
            waiting = self._live_waiters()
            starting = len(self._pool_starting)
            missing = self._pool_target + waiting - len(self._pool) - starting
            room = self._refill_parallel() - starting
            used = len(self.sessions) + len(self._pool) + starting + sum(self._reserved.values()) - waiting
            n = min(missing, room, self.max_sessions - used)
            wait_for = None
            if n > 0 and not waiting and time.monotonic() < self._pool_not_before:
                wait_for = self._pool_not_before - time.monotonic()
                n = 0
            if n > 0 and not self._may_refill():
                self.log.warning("warm pool: not starting kernels, available memory is below %s bytes "
                                 "(SessionManager.pool_min_available) or memory admission is closed "
                                 "(Admission.min_available_memory)", self.pool_min_available)
                self._wake_waiters()
                n = 0
                wait_for = 5.0
            for _ in range(max(n, 0)):
                task = asyncio.ensure_future(self._start_pooled())
                self._pool_starting.add(task)
                task.add_done_callback(self._pool_starting.discard)
            if n <= 0 and not self._pool_starting and wait_for is None:
                if self._live_waiters():
                    self._wake_waiters()     # nothing can start (max_sessions): they start their own
                return
            try:
                await asyncio.wait_for(self._pool_wake.wait(), wait_for)
            except asyncio.TimeoutError:
                pass

    async def _start_pooled(self) -> None:
        try:
            await self._start_one_pooled()
        finally:
            # Before waking _fill_pool: it counts the kernels still starting.
            self._pool_starting.discard(asyncio.current_task())
            self._pool_wake.set()

    async def _start_one_pooled(self) -> None:
        s = None
        try:
            s = await self._new_session("", None)
            if self.pool_preload.strip():
                await self._preload(s)
        except BaseException as exc:
            # A kernel started but not pooled (preload failed, or shutdown
            # cancelled us) is nobody's: stop it and unmount its folder.
            if s is not None:
                await self._delete(s)
            if not isinstance(exc, Exception):
                raise
            self.log.warning("could not start a pooled kernel: %s", exc)
            # The first waiting request starts its own (and sees the error).
            if self._live_waiters():
                self._pool_waiters.popleft().set_result(None)
            await asyncio.sleep(5)
            return
        if self._closing:
            await self._delete(s)
            return
        while self._pool_waiters:
            w = self._pool_waiters.popleft()
            if not w.done():
                w.set_result(s)
                break
        else:
            self._pool.append(s)

    async def shrink_pool(self) -> int:
        """Back to pool_size after pool_shrink_after seconds without a
        hand-out: stop the surplus kernels (the newest first).  The pool is
        otherwise never culled."""
        if self._pool_target <= self.pool_size or self._live_waiters() \
                or time.monotonic() - self._pool_last_take < self.pool_shrink_after:
            return 0
        self._pool_target = self.pool_size
        surplus = []
        while len(self._pool) > self.pool_size:
            surplus.append(self._pool.pop())
        await asyncio.gather(*(self._delete(s) for s in surplus), return_exceptions=True)
        return len(surplus)

    async def _preload(self, s: Session) -> None:
        """Run the preload code silently: no execution count, no transcript."""
        kc = s.kernel.client
        msg_id = kc.execute(self.pool_preload, silent=True, store_history=False, allow_stdin=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            reply = await kc.get_shell_msg(timeout=deadline - time.monotonic())
            if reply["parent_header"].get("msg_id") == msg_id:
                if reply["content"].get("status") != "ok":
                    self.log.warning("pool preload failed: %s", reply["content"].get("evalue"))
                return

    async def find(self, sid: str, owner: str) -> Session:
        """Like get(), but a session this broker does not hold is restored
        from its snapshot when snapshots are on and one exists for *owner*."""
        try:
            return self.get(sid, owner)
        except SessionNotFound:
            s = await self.snapshots.restore(sid, owner) if self.snapshots is not None else None
            if s is None:
                raise
            return s

    async def adopt(self, sid: str, owner: str, unpack) -> Session:
        """A session with a given id, as a restore makes it: its folder and a
        fresh kernel, then ``unpack(session)`` (run in a thread) fills the
        folder and returns the old meta.json's content."""
        s = await self._new_session(owner, None, sid=sid)
        try:
            meta = await asyncio.to_thread(unpack, s)
        except BaseException:
            await self._delete(s)
            raise
        s.created = float(meta.get("created") or s.created)
        s.env = dict(meta.get("env") or {})
        s.touch()
        s.save()
        self.sessions[sid] = s
        return s

    async def forget(self, s: Session) -> None:
        """Drop this broker's copy of a session held elsewhere now (its snapshot stays)."""
        await self._delete(s)

    def get(self, sid: str, owner: str) -> Session:
        if self._closing:
            raise ShuttingDown("the broker is shutting down; call again when it is back (the session and its "
                               "files are kept)")
        s = self.sessions.get(sid)
        if s is None or s.owner != owner or s.deleted:
            raise SessionNotFound(sid)
        return s

    def list(self, owner: str) -> list[Session]:
        return sorted((s for s in self.sessions.values() if s.owner == owner), key=lambda s: s.created)

    async def delete(self, sid: str, owner: str) -> None:
        await self._delete(self.get(sid, owner))

    async def _delete(self, s: Session, keep: bool = False) -> None:
        """End a session: its kernel stops and its folder is removed, or with
        *keep* moved to <data_root>/.ended/<id>/ (ended_files = 'keep')."""
        s.deleted = True
        self.sessions.pop(s.id, None)
        s.close_changes()
        try:
            await s.stop_kernel()
            if s._transcript is not None:
                # Kept: everything written first. Removed: nothing written
                # after (a delayed write would re-create the folder).
                await (s._transcript.flush() if keep else s._transcript.discard())
        finally:
            # Even when cancelled (shutdown stops the culler mid-delete): the
            # session is already gone from the table, so nothing else would
            # unmount and remove its folder.
            if keep and s.owner and self._keep_ended(s):
                return
            self._remove_dir(s)

    def _keep_ended(self, s: Session) -> bool:
        if prereq.is_root():
            volume.unmount(s.data_dir)
            volume.unmount(s.rt_dir)
        shutil.rmtree(s.rt_dir, ignore_errors=True)
        dest = os.path.join(self.data_root, ENDED, s.id)
        try:
            os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
            os.rename(s.dir, dest)
            os.utime(dest)      # the retention counts from the end
        except OSError as exc:
            self.log.error("session %s: could not keep its files in %s (%s); removing them", s.id, dest, exc)
            return False
        return True

    def _remove_dir(self, s: Session) -> None:
        if prereq.is_root():
            volume.unmount(s.data_dir)
            volume.unmount(s.rt_dir)
        shutil.rmtree(s.dir, ignore_errors=True)
        shutil.rmtree(s.rt_dir, ignore_errors=True)
