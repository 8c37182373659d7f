"""Helpers shared by the ``test_cant_*`` escape corpus (second half).

- :func:`probe` runs code in a kernel and returns the dict the code left in
  ``out`` (printed as one JSON line), asserting the cell itself ran.
- :class:`ConfiguredKernel` starts ``python3-sandbox`` with a traitlets
  ``Config`` (per-test sandbox settings such as a small quota).
- :func:`kernel_tree` / :func:`uid_processes` look at sandbox processes from
  the host with psutil.
- :func:`shell` runs :func:`broker.sandbox.shell.run_shell` synchronously.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import tempfile
import textwrap
import time

import psutil
from jupyter_client.manager import KernelManager

from tests.harness import SandboxKernel

MARK = "@@CANT@@"


def probe(kernel, code: str, timeout: float = 60) -> dict:
    """Run *code* (which fills a dict ``out``) and return ``out``."""
    body = "import json as _cant_json\nout = {}\n" + textwrap.dedent(code) + \
        f"\nprint({MARK!r} + _cant_json.dumps(out, default=repr))\n"
    r = kernel.run(body, timeout=timeout)
    assert r.status == "ok", r
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise AssertionError(f"no result line in {r}")


TRY = textwrap.dedent("""
    def attempt(fn):
        try:
            return ["ok", fn()]
        except BaseException as exc:
            return ["err", type(exc).__name__, getattr(exc, "errno", None), str(exc)]
""")


def refused(result) -> bool:
    return result[0] == "err"


def restart(kernel) -> None:
    """Restart a fixture kernel, keeping its hook mode."""
    was_hooked = kernel.hooked
    kernel.restart()
    if not was_hooked:
        kernel.neutralise_hook()


def recover(kernel) -> None:
    """After an attack: the kernel answers, or was contained and restarts."""
    if not kernel.km.is_alive() or not kernel.answers():
        restart(kernel)
    assert kernel.answers(), "kernel does not answer after the attack (nor after a restart)"


class ConfiguredKernel(SandboxKernel):
    """A sandboxed kernel whose provisioner gets *config* (a traitlets Config)."""

    def __init__(self, config, hooked: bool = True):
        self.km = KernelManager(kernel_name="python3-sandbox", config=config)
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.hooked = True
        if not hooked:
            self.neutralise_hook()


def kernel_tree(kernel) -> list[psutil.Process]:
    """The kernel's launcher process and all its descendants (host view)."""
    root = psutil.Process(kernel.provisioner.pid)
    return [root] + root.children(recursive=True)


def kernel_python(kernel) -> psutil.Process:
    for p in kernel_tree(kernel):
        try:
            if "kernel_profile" in p.cmdline() and "bwrap" not in os.path.basename(p.cmdline()[0]):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("kernel python process not found in the launcher's tree")


def uid_processes(uid: int) -> list[psutil.Process]:
    """Live processes of *uid*.  Zombies are left out: an exited sandbox's
    bwrap is re-parented to the host's init, which reaps it when it likes."""
    found = []
    for p in psutil.process_iter(["uids", "status"]):
        uids = p.info.get("uids")
        if uids and uid in (uids.real, uids.effective, uids.saved) and p.info.get("status") != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def wait_no_processes(uid: int, timeout: float = 3.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        left = uid_processes(uid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def token(prefix: str = "cant") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Canary:
    """A world-readable host file with a secret in it, removed afterwards."""

    def __init__(self, folder: str):
        self.secret = token("CANARY")
        fd, self.path = tempfile.mkstemp(prefix="cant-canary-", dir=folder)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.secret + "\n")
        os.chmod(self.path, 0o644)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# --- shell sandbox ------------------------------------------------------------

class ShellBox:
    """A data folder owned by a leased sandbox uid, for run_shell.

    *helper*: run every command as a session does, through the box's
    long-lived shell sandbox (:class:`broker.sandbox.shell.ShellHelper`, kept
    on the box as ``shell_sandbox``) in a cgroup of the box's own; otherwise
    each command gets a fresh sandbox."""

    def __init__(self, settings=None, helper: bool = False):
        from broker.sandbox import cgroups, identity
        from broker.sandbox.settings import SandboxSettings

        self.settings = settings or SandboxSettings()
        self.ident = identity.lease_uid(os.path.join(self.settings.state_dir, "uids"),
                                        self.settings.uid_range_start, self.settings.uid_range_size)
        self.uid = self.ident.uid
        self.root = tempfile.mkdtemp(prefix="cant-shell-")
        os.chmod(self.root, 0o711)
        self.data = os.path.join(self.root, "data")
        os.mkdir(self.data, 0o700)
        os.chown(self.data, self.uid, self.uid)
        self.helper = helper
        self.shell_sandbox = None
        self.cgroup = None
        self.loop = asyncio.new_event_loop()
        if helper and self.settings.cgroups != "off" and cgroups.detect():
            s = self.settings
            self.cgroup = cgroups.Cgroup.create(f"sh-box-{secrets.token_hex(6)}", s.memory_limit, s.pids_limit,
                                                s.cpu_limit, cgroups.detect())

    def shell(self, command: str, timeout: float = 30, **kwargs):
        """The run_shell coroutine for *command*, in this box's mode (run it
        with :meth:`drive`)."""
        from broker.sandbox.shell import run_shell

        if self.helper:
            kwargs.setdefault("cgroup", self.cgroup)
            kwargs.setdefault("helper_host", self)
        return run_shell(command, self.data, self.settings, timeout=timeout, **kwargs)

    def drive(self, coro):
        """Run *coro* on the box's event loop (a helper belongs to one loop)."""
        return self.loop.run_until_complete(coro)

    def run(self, command: str, timeout: float = 30, **kwargs):
        return self.drive(self.shell(command, timeout, **kwargs))

    def helper_pids(self) -> set[int]:
        """The host pids of the box's shell sandbox between commands: its
        bwrap monitor and the helper (pid 1 inside)."""
        h = self.shell_sandbox
        if h is None or h.proc is None or h.proc.returncode is not None:
            return set()
        try:
            top = psutil.Process(h.proc.pid)
            return {top.pid} | {c.pid for c in top.children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def leftovers(self, timeout: float = 3.0) -> list:
        """Processes of the box's uid other than its idle shell sandbox."""
        keep = self.helper_pids()
        deadline = time.monotonic() + timeout
        while True:
            left = [p for p in uid_processes(self.uid) if p.pid not in keep]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    def close(self) -> None:
        if self.shell_sandbox is not None:
            self.shell_sandbox.close()
            self.drive(asyncio.sleep(0.05))
        if self.cgroup is not None:
            self.cgroup.remove()
        self.loop.close()
        left = wait_no_processes(self.uid)
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        self.ident.release()


def record_cgroups(monkeypatch) -> list:
    """Record every cgroup run_shell creates (to prove each is removed)."""
    from broker.sandbox import cgroups

    made: list = []
    original = cgroups.Cgroup.create.__func__

    def create(cls, *args, **kwargs):
        group = original(cls, *args, **kwargs)
        made.append(group)
        return group

    monkeypatch.setattr(cgroups.Cgroup, "create", classmethod(create))
    return made
