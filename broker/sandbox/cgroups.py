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
_CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def _v2_base() -> str:
    """The broker's own v2 group (its parent, once it moved into broker-main)."""
    own = _own_path(None).rstrip("/")
    if own.endswith("/broker-main"):
        own = own[: -len("/broker-main")]
    return os.path.join(CGROOT, own.lstrip("/"))


def _enable_v2_controllers(d: str) -> None:
    """Enable memory, pids and cpu for d's children.  cgroup v2 refuses that
    (EBUSY) while d itself holds processes — the broker's own group, usually.
    Then the broker moves itself into a leaf ``broker-main`` beside its
    sandboxes and tries again, as a delegated service manager would."""
    ctl = os.path.join(d, "cgroup.subtree_control")
    try:
        _write(ctl, "+memory +pids +cpu")
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise OSError(exc.errno, f"cannot enable controllers in {d} ({exc.strerror}); give the broker a "
                          "delegated cgroup subtree (systemd: Delegate=yes)") from None
    leaf = os.path.join(d, "broker-main")
    os.makedirs(leaf, exist_ok=True)
    _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
    try:
        _write(ctl, "+memory +pids +cpu")
    except OSError as exc:
        raise OSError(exc.errno, f"cannot enable controllers in {d} even after moving the broker into "
                      f"{leaf} ({exc.strerror}): other processes share the broker's cgroup; run the broker "
                      "in a cgroup of its own (systemd: Delegate=yes)") from None


def _rebalance_cpu(parent: str, version: str) -> None:
    """The sandboxes' parent group competes with its siblings (the broker
    itself, other services) as one: weigh it like as many processes as it
    holds sandboxes, so a loaded machine does not starve them as a block."""
    try:
        n = max(1, sum(1 for e in os.scandir(parent) if e.is_dir()))
        if version == "v2":
            _write(os.path.join(parent, "cpu.weight"), str(min(10000, 100 * n)))
        else:
            _write(os.path.join(parent, "cpu.shares"), str(min(262144, 1024 * n)))
    except OSError:
        pass


class Cgroup:
    """One sandbox's group(s).  ``procs_files`` are what the launcher joins."""

    def __init__(self, name: str, version: str, dirs: list[str], limits: tuple | None = None):
        self.name = name
        self.version = version
        self.dirs = dirs
        self.limits = limits            # (memory, pids, cpu): what ensure() makes the group again with

    def ensure(self) -> "Cgroup":
        """Call before a process joins a group that may have sat empty (a
        kernel restart, a session's next shell command): make it again if a
        sweep removed it meanwhile (sweep_empty runs at every broker start and
        kernelspec kernel start on the machine, and takes any group empty for
        over a minute), and mark it as just used so the next sweep leaves it."""
        if self.limits is not None and not all(os.path.isdir(d) for d in self.dirs):
            self.dirs = Cgroup.create(self.name, *self.limits, self.version).dirs
        for d in self.dirs:
            try:
                os.utime(d)
            except OSError:
                pass
        return self

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    @classmethod
    def create(cls, name: str, memory: int, pids: int, cpu: float, version: str) -> "Cgroup":
        period = 100_000
        quota = max(1000, int(cpu * period))
        if version == "v2":
            own = _v2_base()
            parent = os.path.join(own, PARENT)
            os.makedirs(parent, exist_ok=True)
            _enable_v2_controllers(own)
            _enable_v2_controllers(parent)
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
            _rebalance_cpu(parent, version)
            return cls(name, version, [path], (memory, pids, cpu))
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
                _rebalance_cpu(os.path.dirname(path), version)
        return cls(name, version, dirs, (memory, pids, cpu))

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

    def usage(self) -> tuple[int | None, float | None]:
        """(memory bytes, CPU seconds) charged to the group now; None where
        the hierarchy does not say.  Cheap: one or two small files per
        controller.  v1 without a cpuacct group (the broker makes none):
        the CPU time of the processes alive in the group, from /proc."""
        memory = cpu = None
        try:
            if self.version == "v2":
                with open(os.path.join(self.dirs[0], "memory.current")) as fh:
                    memory = int(fh.read())
                with open(os.path.join(self.dirs[0], "cpu.stat")) as fh:
                    for line in fh:
                        if line.startswith("usage_usec "):
                            cpu = int(line.split()[1]) / 1e6
                            break
                return memory, cpu
            mem = next((x for x in self.dirs if "/memory/" in x), None)
            if mem:
                with open(os.path.join(mem, "memory.usage_in_bytes")) as fh:
                    memory = int(fh.read())
            ticks = 0
            for pid in self.pids():
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        fields = fh.read().rpartition(")")[2].split()
                    ticks += int(fields[11]) + int(fields[12])     # utime, stime
                except (OSError, ValueError, IndexError):
                    continue
            cpu = ticks / _CLK_TCK
        except (OSError, ValueError, IndexError):
            pass
        return memory, cpu

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
            if d.startswith(os.path.join(CGROOT, "cpu") + "/") or self.version == "v2":
                _rebalance_cpu(os.path.dirname(d), self.version)


def remove_named(name: str) -> None:
    """Remove a sandbox group by name in every hierarchy, if it is empty."""
    version = detect()
    if version is None:
        return
    if version == "v2":
        dirs = [os.path.join(_v2_base(), PARENT, name)]
    else:
        dirs = [os.path.join(CGROOT, c, _own_path(c).lstrip("/"), PARENT, name) for c in _V1_CONTROLLERS]
    Cgroup(name, version, [d for d in dirs if os.path.isdir(d)]).remove()


def sweep_empty(min_age: float = 60.0) -> int:
    """Remove sandbox groups left empty by a broker or client that died
    without cleaning up.  Only groups older than *min_age* seconds: a group is
    briefly empty between its creation and the launch that joins it."""
    version = detect()
    if version is None:
        return 0
    if version == "v2":
        parents = [os.path.join(_v2_base(), PARENT)]
    else:
        parents = [os.path.join(CGROOT, c, _own_path(c).lstrip("/"), PARENT) for c in _V1_CONTROLLERS]
    now, removed = time.time(), 0
    for parent in parents:
        try:
            entries = [e for e in os.scandir(parent) if e.is_dir() and e.name.startswith(("k-", "sh-"))]
        except OSError:
            continue
        for e in entries:
            try:
                if now - e.stat().st_mtime < min_age:
                    continue
                with open(os.path.join(e.path, "cgroup.procs")) as fh:
                    if fh.read().strip():
                        continue
                os.rmdir(e.path)
                removed += 1
            except OSError:
                continue
        _rebalance_cpu(parent, version)
    return removed
