"""One shell command in a fresh sandbox.

Each command gets its own bwrap with the *shell* seccomp profile (exec and
fork allowed; no network, no namespaces, none of the kernel attack surface),
the same ``/mnt/data`` as the session's kernel, cwd ``/mnt/data``, its own
cgroup, rlimits, a byte cap on output and a wall-clock deadline after which
the whole process tree is killed.

The toolbox is the host's ``/usr`` (read-only) plus what Debian reaches
through ``/etc/alternatives`` (``awk``, ``which``), and ``python``/``python3``
in ``/run/sandbox/bin``: small scripts that run the kernel's own interpreter,
so a script behaves as it does in ``ExecutePythonCode``.  The kernel's
virtualenv ``bin`` folder is not on ``PATH`` (its console scripts are not
tools for the sandbox), and ``pip`` lists what is installed but refuses to
install.  See ``docs/shell.md``.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import os
import shlex
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from broker.kernelspec import kernel_json
from broker.sandbox import bwrap as bw
from broker.sandbox import cgroups, prereq
from broker.sandbox.identity import Identity, current_identity
from broker.sandbox.provisioner import python_paths
from broker.sandbox.settings import SandboxSettings

SANDBOX_BIN = "/run/sandbox/bin"

SHELL_ENV = {
    "PATH": f"{SANDBOX_BIN}:/usr/local/bin:/usr/bin:/bin",
    "HOME": "/mnt/data",
    "USER": "sandbox",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TMPDIR": "/tmp",
    "TERM": "dumb",
    "MPLBACKEND": "Agg",
    "MPLCONFIGDIR": "/tmp/.config/matplotlib",
    "XDG_CACHE_HOME": "/tmp/.cache",
    # As in the kernel (python -I): no user site-packages, no __pycache__
    # folders appearing in /mnt/data next to a script's modules.
    "PYTHONNOUSERSITE": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    # pip in the sandbox only lists and shows; never look for an index.
    "PIP_NO_INDEX": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}

# Host paths a shell needs besides /usr, bound read-only where they exist:
# Debian's alternatives (awk, which, pager ... point there; every target is
# under /usr, already visible) and file(1)'s local magic.
SHELL_RO_PATHS = ("/etc/alternatives", "/etc/magic", "/etc/magic.mime")

INSTALL_REFUSAL = ("PackageInstallationUnavailable: package installation is unavailable: the sandbox has no "
                   "network and cannot install packages. The kernel's libraries are preinstalled; "
                   "`pip list` shows them.")

_PYTHON = """#!/bin/sh
# python in the shell sandbox: the kernel's interpreter and libraries.
case "$1" in
  -m) case "$2" in pip|pip3) shift 2; exec {bin}/pip "$@";; ensurepip) echo {msg} >&2; exit 1;; esac;;
  -mpip|-mpip3) shift; exec {bin}/pip "$@";;
esac
exec {python} "$@"
"""

_PIP = """#!/bin/sh
# pip in the shell sandbox: lists and shows what is installed; never installs.
for arg in "$@"; do
  case "$arg" in
    -*) ;;
    install|download|wheel|uninstall) echo {msg} >&2; exit 1;;
    *) break;;
  esac
done
exec {python} -m pip "$@"
"""


def kernel_python() -> str:
    """The kernel's interpreter: the python3-sandbox kernelspec's argv[0]."""
    return kernel_json()["argv"][0]


@functools.lru_cache(maxsize=4)
def _toolbox(python: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """The programs and links of /run/sandbox/bin for *python*."""
    fmt = {"bin": SANDBOX_BIN, "python": shlex.quote(python), "msg": shlex.quote(INSTALL_REFUSAL)}
    programs = {f"{SANDBOX_BIN}/python3": _PYTHON.format(**fmt).encode(),
                f"{SANDBOX_BIN}/pip": _PIP.format(**fmt).encode()}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    links = {f"{SANDBOX_BIN}/python": "python3", f"{SANDBOX_BIN}/{version}": "python3",
             f"{SANDBOX_BIN}/pip3": "pip"}
    return programs, links


def shell_ro_paths() -> list[str]:
    """Everything a shell sandbox binds read-only besides /usr and the /etc basics."""
    return python_paths() + [p for p in SHELL_RO_PATHS if os.path.exists(p)]


@dataclass
class ShellResult:
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    duration_ms: int
    signal: int | None = None


async def _read_capped(stream: asyncio.StreamReader, budget: list[int], sink: bytearray, over: asyncio.Event,
                       report: Callable[[bytes], None] | None = None):
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            if report:
                report(b"")
            return
        room = budget[0]
        if room > 0:
            sink += chunk[:room]
            if report:
                report(chunk[:room])
        budget[0] = room - len(chunk)
        if budget[0] < 0:
            over.set()


def _identity_for(data_dir: str, as_root: bool) -> Identity:
    """The uid a shell over *data_dir* runs as: its owner (the kernel's) as root."""
    if not as_root:
        return current_identity()
    st = os.stat(data_dir)
    if st.st_uid == 0:
        raise PermissionError(f"{data_dir} is owned by root; a shell sandbox never runs as root")
    return Identity(st.st_uid, st.st_gid)


def _launch(command: list[str], data_dir: str, settings: SandboxSettings, ident: Identity,
            cgroup: "cgroups.Cgroup | None", extra_programs: dict[str, bytes] | None = None) -> bw.Launch:
    """The launch of one shell sandbox running *command* (bwrap argv, fds, env)."""
    # Imported after prereq.check_all below has run, not at the top: pyseccomp
    # raises at import when libseccomp is missing, and the broker must answer
    # with prereq's clear error naming the package instead.
    import broker_seccomp

    bwrap_path = prereq.check_all(settings.bwrap)
    as_root = prereq.is_root()
    programs, links = _toolbox(kernel_python())
    spec = bw.SandboxSpec(
        command=command,
        data_dir=data_dir,
        env=dict(SHELL_ENV),
        ro_paths=shell_ro_paths(),
        programs={**programs, **(extra_programs or {})},
        symlinks=links,
        tmp_size=settings.tmp_size,
        shm_size=settings.shm_size,
        seccomp_fd=broker_seccomp.profile_fd("shell"),
    )
    return bw.launch(spec, bwrap=bwrap_path, uid=ident.uid, gid=ident.gid, as_root=as_root,
                     rlimits=settings.rlimits(own_uid=as_root), procs_files=cgroup.procs_files if cgroup else [],
                     stage_dir=os.path.join(settings.state_dir, "stage"), tools=prereq.launch_tools())


async def run_shell(command: str, data_dir: str, settings: SandboxSettings, *, timeout: float,
                    output_limit: int = 1 << 20, ident: Identity | None = None,
                    cgroup: "cgroups.Cgroup | None" = None,
                    progress: Callable[[dict], None] | None = None,
                    helper_host: object | None = None) -> ShellResult:
    """Run *command* with ``bash -c`` in a sandbox over *data_dir*.

    *progress*, if given, is called with ``{"type": "status", "state":
    "running"}`` once the command started, then ``{"type": "stdout"|"stderr",
    "text": ...}`` for each chunk of output as it is read (within the output
    cap); it must not block.

    *cgroup*: a group to run in and leave (emptied) for the next command; by
    default a fresh one is made and removed.  Reusing one matters: on cgroup
    v1 the first process to join a new group waits ~10 ms in the kernel.

    *helper_host*: an object that outlives this call (the session kernel's
    provisioner) on which the session's :class:`ShellHelper` is kept, as
    ``shell_sandbox``: with it (and ``shell_helper`` on in *settings*) the
    command is forked by the session's long-lived shell sandbox instead of
    getting a fresh one.  Whoever owns the host closes the helper."""
    prereq.check_all(settings.bwrap)
    as_root = prereq.is_root()
    if ident is None:
        ident = _identity_for(data_dir, as_root)
    if (helper_host is not None and getattr(settings, "shell_helper", False)
            and (cgroup is not None or settings.cgroups == "off")
            and len(command.encode("utf-8", "surrogateescape")) < HELPER_MAX_COMMAND):
        helper = getattr(helper_host, "shell_sandbox", None)
        if helper is None or helper.closed or helper.ident.uid != ident.uid or helper.data_dir != data_dir:
            if helper is not None:
                helper.close()
            helper = ShellHelper(data_dir, settings, ident, cgroup)
            helper_host.shell_sandbox = helper
        return await helper.run(command, timeout=timeout, output_limit=output_limit, progress=progress)
    own_cgroup = cgroup is None
    version = cgroups.detect() if settings.cgroups != "off" and own_cgroup else None
    if version:
        cgroup = cgroups.Cgroup.create(f"sh-{uuid.uuid4().hex[:12]}", settings.memory_limit,
                                       settings.pids_limit, settings.cpu_limit, version)
    elif cgroup is not None:
        cgroup.ensure()         # the session's group sat empty since its last command
    launch = _launch(["/bin/bash", "--noprofile", "--norc", "-c", command], data_dir, settings, ident, cgroup)
    start = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *launch.argv, env=launch.env, pass_fds=launch.pass_fds, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True, cwd="/")
    finally:
        launch.close_fds()
    out, err, over, readers = _start_readers(proc.stdout, proc.stderr, output_limit, progress)
    waiter = asyncio.ensure_future(proc.wait())
    over_task = asyncio.ensure_future(over.wait())
    timed_out = False
    try:
        done, _ = await asyncio.wait({waiter, over_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            timed_out = not over.is_set()
            _kill(proc.pid, cgroup)
            await waiter
        await asyncio.wait_for(readers, timeout=5)
    except asyncio.TimeoutError:
        _kill(proc.pid, cgroup)
    finally:
        over_task.cancel()
        if cgroup and own_cgroup:
            # The group empties a moment after its last process exits; remove
            # it off the caller's path.
            asyncio.get_running_loop().run_in_executor(None, cgroup.remove)
        elif cgroup:
            # A group the caller reuses: nothing of this command may stay in it.
            cgroup.kill_all()
    code = proc.returncode
    return _result(code, out, err, timed_out, over.is_set(), start)


def _start_readers(stdout, stderr, output_limit: int, progress: Callable[[dict], None] | None):
    """Read a command's two streams into buffers under one output budget
    (``over`` is set when it is spent); returns (out, err, over, readers)."""
    out, err = bytearray(), bytearray()
    budget = [output_limit]
    over = asyncio.Event()
    if progress:
        progress({"type": "status", "state": "running"})
    readers = asyncio.gather(_read_capped(stdout, budget, out, over, _reporter(progress, "stdout")),
                             _read_capped(stderr, budget, err, over, _reporter(progress, "stderr")))
    return out, err, over, readers


def _result(code: int | None, out: bytearray, err: bytearray, timed_out: bool, truncated: bool,
            start: float) -> ShellResult:
    """*code*: asyncio's returncode (negative: killed by that signal)."""
    sig = -code if code is not None and code < 0 else None
    return ShellResult(exit_code=code if sig is None else None, stdout=out.decode("utf-8", "replace"),
                       stderr=err.decode("utf-8", "replace"), timed_out=timed_out, truncated=truncated,
                       duration_ms=int((time.monotonic() - start) * 1000), signal=sig)


HELPER_PATH = "/run/sandbox/shell-helper.py"
HELPER_MAX_COMMAND = 128 << 10      # one SOCK_SEQPACKET message; longer commands get a sandbox of their own
_HELPER_SOURCE = (Path(__file__).with_name("shell_helper.py")).read_bytes()


class ShellHelperError(RuntimeError):
    pass


class ShellHelper:
    """A session's long-lived shell sandbox, whose pid 1 (``shell_helper.py``)
    forks each command on request.

    Started on the first command with exactly the walls a per-command sandbox
    has (bwrap flags, shell seccomp profile, the session's uid, its shell
    cgroup, rlimits), then reused: a command costs a message on a socketpair
    and a ``posix_spawn`` instead of a bwrap launch and a cgroup join.  When a
    command ends (or is killed at its deadline or output cap) the helper kills
    every other process of the sandbox and empties /tmp and /dev/shm before
    it answers; if the helper dies (or quits because something of a command
    would outlive it), the next command starts a fresh one."""

    def __init__(self, data_dir: str, settings: SandboxSettings, ident: Identity,
                 cgroup: "cgroups.Cgroup | None"):
        self.data_dir = data_dir
        self.settings = settings
        self.ident = ident
        self.cgroup = cgroup
        self.proc: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.closed = False
        self.starts = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drainer: asyncio.Future | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    @property
    def alive(self) -> bool:
        return self.sock is not None and self.proc is not None and self.proc.returncode is None

    async def _start(self) -> None:
        self._stop()
        if self.cgroup is not None:
            self.cgroup.ensure()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            launch = _launch([kernel_python(), "-I", "-S", HELPER_PATH, str(theirs.fileno())], self.data_dir,
                             self.settings, self.ident, self.cgroup, {HELPER_PATH: _HELPER_SOURCE})
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *launch.argv, env=launch.env, pass_fds=[*launch.pass_fds, theirs.fileno()],
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE, start_new_session=True, cwd="/")
            finally:
                launch.close_fds()
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.loop = asyncio.get_running_loop()
        self.starts += 1
        try:
            hello = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(ours, 16), timeout=30)
        except asyncio.TimeoutError:
            hello = b""
        if hello != b"H":
            self._stop()
            why = b""
            try:
                why = await asyncio.wait_for(self.proc.stderr.read(4000), timeout=2)
            except (asyncio.TimeoutError, AttributeError):
                pass
            raise ShellHelperError(f"the shell sandbox did not start: {why.decode('utf-8', 'replace').strip()}")
        # Its stderr (a line when it quits on purpose) is read and dropped, so
        # the pipe never fills.
        self._drainer = asyncio.ensure_future(self._drain(self.proc))

    @staticmethod
    async def _drain(proc) -> None:
        try:
            while await proc.stderr.read(4096):
                pass
        except Exception:       # noqa: BLE001 - best effort
            pass

    async def _recv(self) -> bytes:
        try:
            return await asyncio.get_running_loop().sock_recv(self.sock, 4096)
        except (OSError, AttributeError):
            return b""

    async def _begin(self, command: str) -> tuple[int, int]:
        """Hand *command* to a live helper (starting one, or a fresh one if
        the old one died in between); the read ends of its stdout, stderr."""
        if self.loop is not asyncio.get_running_loop():
            self._stop()            # started from another event loop: its pipes are not ours
        for attempt in range(2):
            if not self.alive:
                await self._start()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                socket.send_fds(self.sock, [b"R" + command.encode("utf-8", "surrogateescape")], [out_w, err_w])
                reply = await self._recv()
            except OSError:
                reply = b""
            finally:
                os.close(out_w)
                os.close(err_w)
            if reply == b"S":
                return out_r, err_r
            os.close(out_r)
            os.close(err_r)
            if reply[:1] == b"F":
                raise ShellHelperError(f"the command could not start: {reply[1:].decode('utf-8', 'replace')}")
            self._stop()
        raise ShellHelperError("the shell sandbox ended before it could run the command")

    async def run(self, command: str, *, timeout: float, output_limit: int = 1 << 20,
                  progress: Callable[[dict], None] | None = None) -> ShellResult:
        """One command at a time (a second caller waits for the first)."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            return await self._run(command, timeout, output_limit, progress)

    async def _run(self, command: str, timeout: float, output_limit: int,
                   progress: Callable[[dict], None] | None) -> ShellResult:
        if self.closed:
            raise ShellHelperError("this shell helper is closed")
        start = time.monotonic()
        out_r, err_r = await self._begin(command)
        loop = asyncio.get_running_loop()
        transports = []
        streams = []
        for fd in (out_r, err_r):
            reader = asyncio.StreamReader()
            transport, _ = await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r),
                                                        os.fdopen(fd, "rb", 0))
            transports.append(transport)
            streams.append(reader)
        out, err, over, readers = _start_readers(streams[0], streams[1], output_limit, progress)
        ended = asyncio.ensure_future(self._recv())
        over_task = asyncio.ensure_future(over.wait())
        timed_out = False
        try:
            done, _ = await asyncio.wait({ended, over_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if ended not in done:
                timed_out = not over.is_set()
                self._kill_command()
                try:
                    await asyncio.wait_for(asyncio.shield(ended), timeout=5)
                except asyncio.TimeoutError:
                    self._stop()        # the helper does not answer: end the whole sandbox
            try:
                await asyncio.wait_for(readers, timeout=5)
            except asyncio.TimeoutError:
                self._stop()
        finally:
            over_task.cancel()
            for t in transports:
                t.close()
        reply = ended.result() if ended.done() and not ended.cancelled() else b""
        if not ended.done():
            ended.cancel()
        if reply[:1] == b"E":
            code = os.waitstatus_to_exitcode(int(reply[1:]))
        else:
            # The helper died under the command (an OOM kill, say): the whole
            # sandbox went with it.  The next command gets a fresh one.
            self._stop()
            code = -signal.SIGKILL
        return _result(code, out, err, timed_out, over.is_set(), start)

    def _kill_command(self) -> None:
        try:
            self.sock.send(b"K")
        except (OSError, AttributeError):
            self._stop()

    def _stop(self) -> None:
        """End the helper's sandbox (closing its socket ends the helper; the
        bwrap monitor is killed too, and pid 1's death ends the namespace)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.closed = True
        self._stop()


def _reporter(progress: Callable[[dict], None] | None, name: str) -> Callable[[bytes], None] | None:
    """Chunks of one stream as text events; a UTF-8 sequence split across two
    reads is held back until it is whole (b"" flushes the rest)."""
    if progress is None:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def report(chunk: bytes) -> None:
        text = decoder.decode(chunk, final=not chunk)
        if text:
            progress({"type": name, "text": text})
    return report


def _kill(pid: int, cgroup) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if cgroup:
        cgroup.kill_all()
