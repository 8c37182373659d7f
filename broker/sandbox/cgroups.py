"""Per-sandbox cgroups for memory, pids and CPU.

cgroup v2 where the machine runs the unified hierarchy; otherwise the v1
``memory``, ``pids`` and ``cpu`` controllers (this kind of machine has v1).
Each sandbox's group sits under ``<broker's own group>/broker-sandboxes/`` so
that limits an operator puts on the broker also bound its sandboxes.

The launcher writes its own pid into every ``cgroup.procs`` file before it
execs bwrap, so nothing in the sandbox ever runs outside its group.
"""

from __future__ import annotations

import errno
import os
import signal
import time

CGROOT = "/sys/fs/cgroup"
PARENT = "broker-sandboxes"
_V1_CONTROLLERS = ("memory", "pids", "cpu")


def _own_path(controller: str | None) -> str:
    """This process's cgroup path in a v1 hierarchy (by controller) or v2 (None)."""
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if controller is None and ctrls == "":
                return path
            if controller is not None and controller in ctrls.split(","):
                return path
    return "/"


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def detect() -> str | None:
    """'v2', 'v1' or None when no usable writable hierarchy exists."""
    if os.path.exists(os.path.join(CGROOT, "cgroup.controllers")):
        return "v2" if os.access(os.path.join(CGROOT, _own_path(None).lstrip("/")), os.W_OK) else None
    dirs = [os.path.join(CGROOT, c) for c in _V1_CONTROLLERS]
    if all(os.path.isdir(d) for d in dirs[:2]) and all(
            os.access(os.path.join(d, _own_path(c).lstrip("/")), os.W_OK) for d, c in zip(dirs[:2], _V1_CONTROLLERS)):
        return "v1"
    return None


class Cgroup:
    """One sandbox's group(s).  ``procs_files`` are what the launcher joins."""

    def __init__(self, name: str, version: str, dirs: list[str]):
        self.name = name
        self.version = version
        self.dirs = dirs

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    @classmethod
    def create(cls, name: str, memory: int, pids: int, cpu: float, version: str) -> "Cgroup":
        period = 100_000
        quota = max(1000, int(cpu * period))
        if version == "v2":
            own = os.path.join(CGROOT, _own_path(None).lstrip("/"))
            parent = os.path.join(own, PARENT)
            os.makedirs(parent, exist_ok=True)
            for d in (own, parent):
                try:
                    _write(os.path.join(d, "cgroup.subtree_control"), "+memory +pids +cpu")
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot enable controllers in {d} ({exc.strerror}); "
                                  "give the broker a delegated cgroup subtree (systemd: Delegate=yes)") from None
            path = os.path.join(parent, name)
            os.makedirs(path, exist_ok=True)
            _write(os.path.join(path, "memory.max"), str(memory))
            for f, v in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                try:
                    _write(os.path.join(path, f), v)
                except FileNotFoundError:
                    pass
            _write(os.path.join(path, "pids.max"), str(pids))
            _write(os.path.join(path, "cpu.max"), f"{quota} {period}")
            return cls(name, version, [path])
        dirs = []
        for ctl in _V1_CONTROLLERS:
            base = os.path.join(CGROOT, ctl)
            if not os.path.isdir(base):
                continue
            path = os.path.join(base, _own_path(ctl).lstrip("/"), PARENT, name)
            os.makedirs(path, exist_ok=True)
            dirs.append(path)
            if ctl == "memory":
                _write(os.path.join(path, "memory.limit_in_bytes"), str(memory))
                memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
                if os.path.exists(memsw):
                    _write(memsw, str(memory))
            elif ctl == "pids":
                _write(os.path.join(path, "pids.max"), str(pids))
            elif ctl == "cpu":
                _write(os.path.join(path, "cpu.cfs_period_us"), str(period))
                _write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))
        return cls(name, version, dirs)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for f in self.procs_files:
            try:
                with open(f) as fh:
                    found.update(int(x) for x in fh.read().split())
            except OSError:
                pass
        return found

    def kill_all(self, timeout: float = 2.0) -> None:
        """SIGKILL everything still in the group (cgroup.kill on v2)."""
        if self.version == "v2":
            try:
                _write(os.path.join(self.dirs[0], "cgroup.kill"), "1")
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while True:
            left = self.pids()
            if not left or time.monotonic() > deadline:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def memory_events(self) -> dict:
        """OOM kills and the like, for telling a user why a kernel died."""
        d = self.dirs[0] if self.dirs else None
        out: dict = {}
        try:
            if self.version == "v2":
                with open(os.path.join(d, "memory.events")) as fh:
                    for line in fh:
                        k, v = line.split()
                        out[k] = int(v)
            else:
                mem = next((x for x in self.dirs if "/memory/" in x), None)
                if mem:
                    with open(os.path.join(mem, "memory.oom_control")) as fh:
                        for line in fh:
                            k, v = line.split()
                            out[k] = int(v)
                    with open(os.path.join(mem, "memory.failcnt")) as fh:
                        out["failcnt"] = int(fh.read())
        except (OSError, ValueError, TypeError):
            pass
        return out

    def remove(self) -> None:
        self.kill_all()
        for d in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.02)
