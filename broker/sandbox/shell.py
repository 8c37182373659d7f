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
import sys
import time
import uuid
from dataclasses import dataclass
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


async def run_shell(command: str, data_dir: str, settings: SandboxSettings, *, timeout: float,
                    output_limit: int = 1 << 20, ident: Identity | None = None,
                    cgroup: "cgroups.Cgroup | None" = None,
                    progress: Callable[[dict], None] | None = None) -> ShellResult:
    """Run *command* with ``bash -c`` in a fresh sandbox over *data_dir*.

    *progress*, if given, is called with ``{"type": "status", "state":
    "running"}`` once the command started, then ``{"type": "stdout"|"stderr",
    "text": ...}`` for each chunk of output as it is read (within the output
    cap); it must not block.

    *cgroup*: a group to run in and leave (emptied) for the next command; by
    default a fresh one is made and removed.  Reusing one matters: on cgroup
    v1 the first process to join a new group waits ~10 ms in the kernel."""
    import broker_seccomp

    bwrap_path = prereq.check_all(settings.bwrap)
    as_root = prereq.is_root()
    tools = prereq.launch_tools()
    if ident is None:
        if as_root:
            st = os.stat(data_dir)
            ident = Identity(st.st_uid, st.st_gid)
            if ident.uid == 0:
                raise PermissionError(f"{data_dir} is owned by root; a shell sandbox never runs as root")
        else:
            ident = current_identity()
    own_cgroup = cgroup is None
    version = cgroups.detect() if settings.cgroups != "off" and own_cgroup else None
    if version:
        cgroup = cgroups.Cgroup.create(f"sh-{uuid.uuid4().hex[:12]}", settings.memory_limit,
                                       settings.pids_limit, settings.cpu_limit, version)
    elif cgroup is not None:
        cgroup.ensure()         # the session's group sat empty since its last command
    programs, links = _toolbox(kernel_python())
    spec = bw.SandboxSpec(
        command=["/bin/bash", "--noprofile", "--norc", "-c", command],
        data_dir=data_dir,
        env=dict(SHELL_ENV),
        ro_paths=shell_ro_paths(),
        programs=programs,
        symlinks=links,
        tmp_size=settings.tmp_size,
        shm_size=settings.shm_size,
        seccomp_fd=broker_seccomp.profile_fd("shell"),
    )
    launch = bw.launch(spec, bwrap=bwrap_path, uid=ident.uid, gid=ident.gid, as_root=as_root,
                       rlimits=settings.rlimits(own_uid=as_root), procs_files=cgroup.procs_files if cgroup else [],
                       stage_dir=os.path.join(settings.state_dir, "stage"), tools=tools)
    start = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *launch.argv, env=launch.env, pass_fds=launch.pass_fds, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True, cwd="/")
    finally:
        launch.close_fds()
    out, err = bytearray(), bytearray()
    budget = [output_limit]
    over = asyncio.Event()
    if progress:
        progress({"type": "status", "state": "running"})
    readers = asyncio.gather(_read_capped(proc.stdout, budget, out, over, _reporter(progress, "stdout")),
                             _read_capped(proc.stderr, budget, err, over, _reporter(progress, "stderr")))
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
    sig = -code if code is not None and code < 0 else None
    return ShellResult(exit_code=code if sig is None else None, stdout=out.decode("utf-8", "replace"),
                       stderr=err.decode("utf-8", "replace"), timed_out=timed_out, truncated=over.is_set(),
                       duration_ms=int((time.monotonic() - start) * 1000), signal=sig)


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
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if cgroup:
        cgroup.kill_all()
