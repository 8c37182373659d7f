"""What the fault tests look at from outside a real broker: its kernels and
shell commands (by process tree), the mounts, cgroups and processes a session
leaves on the machine, and the broker's own file descriptors and children.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil

from broker.sandbox import cgroups

from tests.broker_server import BrokerProcess


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def kernel_processes(broker, sid: str) -> list[psutil.Process]:
    """The session's sandboxed kernel: a descendant of the broker running
    kernel_profile whose launcher's arguments name the session."""
    found = []
    for child in psutil.Process(broker.proc.pid).children():
        if sid not in cmdline(child):
            continue
        found += [p for p in descendants(child.pid) if "kernel_profile" in cmdline(p)]
    return found


def processes_named(broker, argv: list[str]) -> list[psutil.Process]:
    """The broker's descendants whose command line is exactly *argv*."""
    out = []
    for p in descendants(broker.proc.pid):
        try:
            if p.cmdline() == argv:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.01, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_tree(pids: list[psutil.Process], sig=signal.SIGKILL) -> None:
    for p in pids:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


# -- what a session may leave on the machine ---------------------------------------------

def mounts_under(*prefixes: str) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return [p for p in points if any(p.startswith(x.rstrip("/") + "/") or p == x for x in prefixes)]


def mounts_naming(sids) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return [p for p in points if any(sid in p for sid in sids)]


def processes_naming(texts) -> list[str]:
    """Processes on the machine whose command line holds one of *texts*
    (session ids, the data root): a sandbox left behind by a dead broker."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if line and any(t in line for t in texts) and p.pid != os.getpid():
            found.append(f"{p.pid}: {line[:200]}")
    return found


def cgroups_naming(sids) -> list[str]:
    """Sandbox cgroups (k-<id>, sh-<id>) of these sessions that still exist."""
    version = cgroups.detect()
    if version is None:
        return []
    if version == "v2":
        parents = [os.path.join(cgroups._v2_base(), cgroups.PARENT)]
    else:
        parents = [os.path.join(cgroups.CGROOT, c, cgroups._own_path(c).lstrip("/"), cgroups.PARENT)
                   for c in cgroups._V1_CONTROLLERS]
    left = []
    for parent in parents:
        for sid in sids:
            for name in (f"k-{sid}", f"sh-{sid}"):
                if os.path.isdir(os.path.join(parent, name)):
                    left.append(os.path.join(parent, name))
    return left


def leftovers(broker, sids) -> dict:
    """Everything these sessions could have left behind, by kind (all empty when clean)."""
    return {"processes": processes_naming(list(sids)), "mounts": mounts_naming(sids),
            "cgroups": cgroups_naming(sids)}


def broker_usage(broker) -> dict:
    """The broker's open descriptors and child processes right now."""
    p = psutil.Process(broker.proc.pid)
    return {"fds": p.num_fds(), "children": len(p.children(recursive=True)), "rss_mib": round(p.memory_info().rss / 2**20, 1)}


class Call(threading.Thread):
    """An HTTP call made in the background; ``result`` or ``error`` once joined."""

    def __init__(self, fn, *args, **kw):
        super().__init__(daemon=True)
        self.fn, self.args, self.kw = fn, args, kw
        self.result = self.error = None
        self.started_at = time.monotonic()
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args, **self.kw)
        except BaseException as exc:  # reported by the test that joins it
            self.error = exc

    def wait(self, timeout: float = 120.0):
        self.join(timeout)
        assert not self.is_alive(), "background call did not finish"
        return self.result


class PatientBroker(BrokerProcess):
    """A broker subprocess given longer to start: these tests start brokers
    again and again, and a loaded machine (a shared CI runner) can take a
    minute to import and check the sandbox."""

    def start(self, wait: float = 240.0) -> "PatientBroker":
        return super().start(wait)
