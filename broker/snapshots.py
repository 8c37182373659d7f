"""Sessions that outlive their host: snapshots of session folders in S3-compatible storage.

Off by default (``Snapshots.enabled``).  When on, the broker writes one tar per
session (``meta.json``, ``transcript.ipynb`` and the files of ``/mnt/data``;
not the kernel's memory) to ``<prefix><owner>/<session id>.tar``:

- on idle: a session changed since its last snapshot and idle for
  ``idle_seconds``;
- on a schedule: a session changed and not snapshotted for ``interval``;
- at shutdown: every session changed since its last snapshot.

A broker asked for a session it does not hold, whose snapshot exists under the
caller's owner, restores it (:meth:`Snapshots.restore`): a fresh kernel, the
files as of the snapshot, a ``notice`` on the next code call saying so, and
the router's override map re-pointed at this broker through HAProxy's runtime
API (``router_runtime_api``).

Who holds a session is kept in the object's metadata: ``holder`` (a broker
name), ``generation`` (one more at each restore elsewhere) and ``lease-until``
(renewed by the holder at each pass).  A restore is refused while another
broker's lease runs; a holder whose copy has been restored elsewhere (a higher
generation) never writes over it and drops its stale copy.  Owners never read
each other's snapshots because every key is under the owner's prefix and the
broker looks only under the caller's; that rests on the broker's credentials
and this key layout (docs/scale.md: per-owner S3 credentials are the stronger
option).

The blocking work (tar, S3) runs in a worker thread, never on the event loop.
The tar is built from directory file descriptors with ``O_NOFOLLOW`` so that a
symlink swapped in by the sandboxed code cannot make the broker read a file
outside the session's folder; it holds regular files, folders and symlinks only.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import tarfile
import tempfile
import time
from urllib.parse import quote

import boto3
import botocore.exceptions
from botocore.config import Config
from traitlets import Bool, Float, Unicode
from traitlets.config import LoggingConfigurable

from broker.errors import BrokerError
from broker.ids import ID_RE
from broker.router import RuntimeApi, runtime_addresses

SNAPSHOT_STATE = "snapshot.json"      # per session: the generation this broker holds
TOP_FILES = ("meta.json", "transcript.ipynb")


class SessionElsewhere(BrokerError):
    status = 409
    reason = "session_elsewhere"


class SnapshotStoreUnavailable(BrokerError):
    status = 503
    reason = "snapshot_store_unavailable"


class Snapshots(LoggingConfigurable):
    """Snapshots of sessions in S3-compatible object storage (docs/scale.md)."""

    enabled = Bool(False, config=True, help="""Snapshot each session's folder (files, transcript, metadata) to
        S3-compatible storage on idle, on a schedule and at shutdown, and restore a session this broker
        does not hold from its snapshot. Credentials come from the usual boto3 sources (AWS_ACCESS_KEY_ID /
        AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance or pod role).""")
    endpoint_url = Unicode("", config=True, help="""S3 endpoint (e.g. https://minio.example:9000); empty for
        AWS S3 itself (or AWS_ENDPOINT_URL_S3).""")
    bucket = Unicode("", config=True, help="Bucket holding the snapshots (required when enabled).")
    prefix = Unicode("broker-snapshots/", config=True, help="""Key prefix; each session's tar is
        <prefix><owner>/<session id>.tar (the owner URL-quoted).""")
    region = Unicode("", config=True, help="S3 region; empty for boto3's default (AWS_REGION, the profile).")
    interval = Float(300.0, min=1, config=True, help="""Seconds after which a changed session is snapshotted
        again even while in use (the schedule).""")
    idle_seconds = Float(60.0, min=0.5, config=True, help="""Seconds without a call after which a changed
        session is snapshotted (on idle).""")
    check_interval = Float(5.0, min=0.1, config=True, help="Seconds between passes over the sessions.")
    lease_seconds = Float(900.0, min=2, config=True, help="""How long a snapshot's holder keeps its claim
        without renewing it (renewed at every pass). Another broker restores the session only once the
        lease has run out, so a broker that is alive never has its session taken: keep it well above
        check_interval.""")
    router_runtime_api = Unicode("", config=True, help="""The router's runtime API (HAProxy stats socket:
        unix path or HOST:PORT, several separated by commas; a host name that resolves to several addresses,
        such as a headless Service over the router replicas, means each of them). After a restore the
        broker re-points the session at itself in the override map there. Empty: not updated.""")
    router_map_file = Unicode("/etc/haproxy/broker-overrides.map", config=True, help="""The override map's
        path as the router knows it (RouterConfigApp.map_file).""")

    def __init__(self, manager, **kwargs):
        super().__init__(parent=manager, **kwargs)
        self.manager = manager
        self._task: asyncio.Task | None = None
        self._client = None
        self._restoring: dict[tuple[str, str], asyncio.Lock] = {}
        self._snapped: dict[str, float] = {}      # session id -> last_activity at its last snapshot
        self._renewed: dict[str, float] = {}      # session id -> time of the last lease renewal
        if self.enabled and not self.bucket:
            raise ValueError("Snapshots.bucket: required when Snapshots.enabled is true")

    # -- storage ------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url or None,
                                        region_name=self.region or None,
                                        # Checksums only where the API requires them: S3-compatible
                                        # stores differ in the newer default ones (CRC32 on every
                                        # PUT and GET) and in what copy_object keeps of them.
                                        config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                      request_checksum_calculation="when_required",
                                                      response_checksum_validation="when_required"))
        return self._client

    def key(self, owner: str, sid: str) -> str:
        return f"{self.prefix}{quote(owner, safe='')}/{sid}.tar"

    @property
    def me(self) -> str:
        return self.manager.broker_name or "broker"

    def head(self, owner: str, sid: str) -> dict | None:
        """The snapshot's metadata ({holder, generation, lease-until, taken}), or None."""
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self.key(owner, sid))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        m = r.get("Metadata", {})
        return {"holder": m.get("holder", ""), "generation": int(m.get("generation", "0") or 0),
                "lease-until": float(m.get("lease-until", "0") or 0), "taken": float(m.get("taken", "0") or 0),
                "owner": m.get("owner", "")}

    def _meta(self, owner: str, generation: int, lease_until: float, taken: float) -> dict:
        return {"holder": self.me, "generation": str(generation), "lease-until": f"{lease_until:.3f}",
                "taken": f"{taken:.3f}", "owner": quote(owner, safe="")}

    # -- per-session state on disk ------------------------------------------------------
    def generation(self, s) -> int:
        try:
            with open(os.path.join(s.dir, SNAPSHOT_STATE)) as fh:
                return int(json.load(fh).get("generation", 0))
        except (OSError, ValueError, AttributeError):
            return 0

    def _set_generation(self, s, generation: int) -> None:
        tmp = os.path.join(s.dir, f".{SNAPSHOT_STATE}.tmp")
        with open(tmp, "w") as fh:
            json.dump({"generation": generation}, fh)
        os.replace(tmp, os.path.join(s.dir, SNAPSHOT_STATE))

    # -- taking snapshots ------------------------------------------------------------
    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await self.pass_once()
            except Exception:     # keep snapshotting whatever one pass met
                self.log.exception("snapshot pass failed")

    async def pass_once(self, final: bool = False) -> list[str]:
        """Snapshot what is due (everything changed when *final*), renew the
        other leases; returns the ids snapshotted."""
        now = time.time()
        done = []
        for s in list(self.manager.sessions.values()):
            if s.deleted or not s.owner:
                continue
            last = self._snapped.get(s.id)
            changed = last is None or s.last_activity > last
            due = final or (changed and (now - s.last_activity >= self.idle_seconds
                                         or now - (last or s.created) >= self.interval))
            try:
                if due and changed and not s.lock.locked():
                    if await self.snapshot(s, release=final):
                        done.append(s.id)
                elif final or now - self._renewed.get(s.id, 0) >= self.lease_seconds / 3:
                    await asyncio.to_thread(self._renew, s, final)
            except SessionElsewhere as exc:
                self.log.warning("%s: dropping this broker's stale copy", exc.message)
                await self.manager.forget(s)
            except (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                self.log.warning("session %s: snapshot failed: %s", s.id, exc)
        return done

    async def snapshot(self, s, release: bool = False) -> bool:
        if s._transcript is not None:
            await s.transcript.flush()
        activity = s.last_activity
        t0 = time.monotonic()
        size = await asyncio.to_thread(self._snapshot, s, release)
        self._snapped[s.id] = activity
        self.log.info("session %s snapshotted in %.2f s (%d bytes)", s.id, time.monotonic() - t0, size)
        return True

    def _check_holder(self, s) -> tuple[int, dict | None]:
        mine = self.generation(s)
        head = self.head(s.owner, s.id)
        if head is not None and (head["generation"] > mine or
                                 (head["generation"] == mine and head["holder"] not in (self.me, ""))):
            raise SessionElsewhere(f"session {s.id} was restored on broker {head['holder'] or '?'} "
                                   f"(generation {head['generation']}, this broker holds {mine})")
        return mine, head

    def _snapshot(self, s, release: bool) -> int:
        generation, _ = self._check_holder(s)
        now = time.time()
        with tempfile.TemporaryFile() as tmp:
            with tarfile.open(fileobj=tmp, mode="w") as tar:
                for name in TOP_FILES:
                    _add_file(tar, s.dir, name, name)
                _add_tree(tar, s.data_dir, "data")
            size = tmp.tell()
            tmp.seek(0)
            lease = 0 if release else time.time() + self.lease_seconds
            self.client.upload_fileobj(tmp, self.bucket, self.key(s.owner, s.id), ExtraArgs={
                "Metadata": self._meta(s.owner, generation, lease, now),
                "ContentType": "application/x-tar"})
        self._renewed[s.id] = now
        return size

    def _renew(self, s, release: bool) -> None:
        generation, head = self._check_holder(s)
        if head is None:
            return      # nothing stored yet: the first snapshot claims it
        now = time.time()
        key = self.key(s.owner, s.id)
        self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                MetadataDirective="REPLACE", ContentType="application/x-tar",
                                Metadata=self._meta(s.owner, generation, 0 if release else now + self.lease_seconds,
                                                    head["taken"]))
        self._renewed[s.id] = now

    async def shutdown(self) -> None:
        """Snapshot every changed session and release the leases (another broker may take them at once)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.enabled:
            await self.pass_once(final=True)

    # -- restoring ------------------------------------------------------------------
    async def restore(self, sid: str, owner: str):
        """The session *sid* of *owner*, restored from its snapshot; None when
        there is none.  Raises SessionElsewhere while another broker holds it."""
        if not self.enabled or not ID_RE.match(sid) or not owner:
            return None
        key = (owner, sid)
        lock = self._restoring.setdefault(key, asyncio.Lock())
        async with lock:
            s = self.manager.sessions.get(sid)
            if s is not None:
                return s if s.owner == owner and not s.deleted else None
            t0 = time.monotonic()
            try:
                fetched = await asyncio.to_thread(self._fetch, owner, sid)
            except (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                self.log.warning("session %s: restore from its snapshot failed: %s", sid, exc)
                raise SnapshotStoreUnavailable(f"session {sid} is not on this broker and its snapshot could not be "
                                               f"read ({type(exc).__name__}); retry shortly") from None
            if fetched is None:
                return None
            path, head = fetched
            try:
                s = await self.manager.adopt(sid, owner, lambda s: self._unpack(s, path, head))
            finally:
                os.unlink(path)
            self._snapped[sid] = s.last_activity
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(head["taken"]))
            s.kernel_state = True
            s._kernel_notice = (f"This session was restored on broker {self.me} from its snapshot of {when}: "
                                "its previous host stopped, so variables, imports and functions defined before "
                                "are gone; files in /mnt/data are as they were at that snapshot.")
            s.save()
            self.log.info("session %s restored from its snapshot in %.2f s", sid, time.monotonic() - t0)
            await asyncio.to_thread(self._repoint, sid)
            return s

    def _fetch(self, owner: str, sid: str) -> tuple[str, dict] | None:
        head = self.head(owner, sid)
        if head is None:
            return None
        if head["holder"] not in (self.me, "") and head["lease-until"] > time.time():
            raise SessionElsewhere(
                f"session {sid} is held by broker {head['holder']} (its lease runs until "
                f"{time.strftime('%H:%M:%S UTC', time.gmtime(head['lease-until']))}); send its requests there")
        fd, path = tempfile.mkstemp(prefix=".restore-", dir=self.manager.data_root)
        try:
            with os.fdopen(fd, "wb") as fh:
                # One GET (not ranged parts): one consistent version even while the holder renews its lease.
                body = self.client.get_object(Bucket=self.bucket, Key=self.key(owner, sid))["Body"]
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    fh.write(chunk)
        except BaseException:
            os.unlink(path)
            raise
        # Claim it before anything else: one more generation, held by this broker.
        generation = head["generation"] + 1
        key = self.key(owner, sid)
        self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                MetadataDirective="REPLACE", ContentType="application/x-tar",
                                Metadata=self._meta(owner, generation, time.time() + self.lease_seconds,
                                                    head["taken"]))
        head["generation"] = generation
        return path, head

    def _unpack(self, s, path: str, head: dict) -> dict:
        """Into the new session's folder (its kernel started, /mnt/data in place); returns meta.json's content."""
        st = os.stat(s.data_dir)
        uid, gid = st.st_uid, st.st_gid
        meta = {}
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name == "meta.json" and m.isfile():
                    meta = json.load(tar.extractfile(m))
                elif m.name == "transcript.ipynb" and m.isfile():
                    with open(os.path.join(s.dir, "transcript.ipynb"), "wb") as out:
                        out.write(tar.extractfile(m).read())
            members = [r for r in (_relative(m) for m in tar.getmembers() if m.name.startswith("data/")) if r]
            # Files and folders through the "data" filter (nothing outside the folder, no devices);
            # symlinks last and as they were (an absolute one points into the sandbox's own view),
            # so that nothing is ever written through one.
            tar.extractall(s.data_dir, members=[m for m in members if not m.issym()], filter="data")
            for m in members:
                if m.issym() and _safe_name(m.name):
                    target = os.path.join(s.data_dir, m.name)
                    parent = os.path.realpath(os.path.dirname(target))
                    if os.path.isdir(parent) and (parent + "/").startswith(os.path.realpath(s.data_dir) + "/"):
                        try:
                            os.symlink(m.linkname, target)
                        except FileExistsError:
                            pass
        if os.geteuid() == 0:
            for root, dirs, files in os.walk(s.data_dir):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
        self._set_generation(s, head["generation"])
        return meta

    def _repoint(self, sid: str) -> None:
        wanted = [a.strip() for a in self.router_runtime_api.split(",") if a.strip()]
        for address in (one for a in wanted for one in runtime_addresses(a)):
            try:
                RuntimeApi(address, self.router_map_file).set_override(sid, self.me)
            except OSError as exc:
                self.log.warning("could not re-point session %s at this broker on router %s: %s", sid, address, exc)


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _relative(m: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = m.name[len("data/"):]
    if not name:
        return None
    m = m.replace(name=name, deep=False)
    return m


def _add_file(tar: tarfile.TarFile, folder: str, name: str, arcname: str) -> None:
    try:
        fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, OSError):
        return
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if stat.S_ISREG(st.st_mode):
            tar.addfile(_info(arcname, st, tarfile.REGTYPE), fh)


def _info(arcname: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    info.type = kind
    info.mode = st.st_mode & 0o777
    info.mtime = int(st.st_mtime)
    info.size = st.st_size if kind == tarfile.REGTYPE else 0
    return info


def _add_tree(tar: tarfile.TarFile, top: str, arcname: str) -> None:
    """The folder tree under *top*, walked through directory descriptors
    without following any symlink."""
    try:
        dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        _walk(tar, dfd, arcname)
    finally:
        os.close(dfd)


def _walk(tar: tarfile.TarFile, dfd: int, arcname: str) -> None:
    for name in sorted(os.listdir(dfd)):
        if name == "lost+found":
            continue
        path = f"{arcname}/{name}"
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            info = _info(path, st, tarfile.SYMTYPE)
            info.linkname = os.readlink(name, dir_fd=dfd)
            tar.addfile(info)
        elif stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue    # replaced under us
            try:
                tar.addfile(_info(path, os.fstat(sub), tarfile.DIRTYPE))
                _walk(tar, sub, path)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as fh:
                fst = os.fstat(fd)
                if stat.S_ISREG(fst.st_mode):
                    info = _info(path, fst, tarfile.REGTYPE)
                    tar.addfile(info, _Exactly(fh, fst.st_size))


class _Exactly(io.RawIOBase):
    """A file cut (or zero-padded) to the size stat gave: a file growing or
    shrinking while it is read must not break the tar."""

    def __init__(self, fh, size: int):
        self.fh, self.left = fh, size

    def readable(self):
        return True

    def read(self, n=-1):
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.fh.read(n) or b""
        if len(data) < n:
            data += b"\0" * (n - len(data))
        self.left -= len(data)
        return data
