"""Memory admission control and the order in which the OOM killer picks.

Every session may use up to ``SandboxSettings.memory_limit`` (2 GiB by
default), and ``max_sessions`` of them add up to far more than the machine
has.  Two things keep the service up when they all ask at once:

* **Admission.**  A new session (and a kernel for the warm pool) is only
  started while the memory available to the broker is at least
  ``Admission.min_available_memory``.  Available means the smaller of the
  host's ``MemAvailable`` (/proc/meminfo) and the room left under the memory
  limit of the broker's own cgroup or any of its ancestors (the kernels'
  groups sit under it, so their use counts).  Below it, creating a session
  answers 503 with ``Retry-After``; sessions that exist keep working.
* **OOM order.**  The broker lowers its own ``oom_score_adj`` (to
  ``Admission.broker_oom_score_adj``, -900 by default; only root may lower
  it) and every sandbox process (kernels and shell commands) starts with
  ``oom_score_adj`` 1000 (broker/sandbox/bwrap.py), so when the host runs
  out after all, the kernels go first and the broker, holding every other
  session, stays.

Nothing here imports tornado; the web layer maps :class:`MemoryLow` to 503.
"""

from __future__ import annotations

import os
import re

from traitlets import Integer, TraitError, Unicode, validate
from traitlets.config import LoggingConfigurable

from broker.errors import MemoryLow
from broker.sandbox.settings import parse_size

CGROOT = "/sys/fs/cgroup"
_UNLIMITED = 1 << 60      # cgroup v1 reports "no limit" as a number near 2**63


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, ...)."""
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _inactive_file(stat_path: str, key: str) -> int:
    """Reclaimable page cache of a group (counted in its usage, but freed on demand)."""
    try:
        with open(stat_path) as fh:
            for line in fh:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def _own_groups() -> list[tuple[str, str]]:
    """(version, folder) of the broker's memory cgroup and each ancestor, innermost first."""
    try:
        with open("/proc/self/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    v1 = v2 = None
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            v1 = path
        elif ctrls == "":
            v2 = path
    if v1 is not None and os.path.isdir(os.path.join(CGROOT, "memory")):
        version, root, rel = "v1", os.path.join(CGROOT, "memory"), v1
    elif v2 is not None and os.path.exists(os.path.join(CGROOT, "cgroup.controllers")):
        version, root, rel = "v2", CGROOT, v2
    else:
        return []
    out = []
    rel = rel.strip("/")
    while True:
        out.append((version, os.path.join(root, rel) if rel else root))
        if not rel:
            return out
        rel = os.path.dirname(rel)


def cgroup_room() -> tuple[int, str] | None:
    """The least room (limit minus non-reclaimable use) under any memory
    limit on the broker's cgroup or its ancestors, and that group's folder;
    None when no group has a limit."""
    best = None
    for version, d in _own_groups():
        if version == "v1":
            limit = _read_int(os.path.join(d, "memory.limit_in_bytes"))
            usage = _read_int(os.path.join(d, "memory.usage_in_bytes"))
            cache = _inactive_file(os.path.join(d, "memory.stat"), "total_inactive_file")
        else:
            limit = _read_int(os.path.join(d, "memory.max"))
            usage = _read_int(os.path.join(d, "memory.current"))
            cache = _inactive_file(os.path.join(d, "memory.stat"), "inactive_file")
        if limit is None or usage is None or limit >= _UNLIMITED:
            continue
        room = max(0, limit - max(0, usage - cache))
        if best is None or room < best[0]:
            best = (room, d)
    return best


def available_memory() -> tuple[int, str]:
    """Bytes the broker may still use, and where that figure comes from."""
    info = meminfo()
    avail = info.get("MemAvailable", info.get("MemFree", 0))
    where = "MemAvailable in /proc/meminfo"
    room = cgroup_room()
    if room is not None and room[0] < avail:
        avail, where = room[0], f"room under the memory limit of cgroup {room[1]}"
    return avail, where


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


_THRESHOLD_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")


class Admission(LoggingConfigurable):
    """Refuses new sessions and pool kernels while memory is short; sets the OOM order."""

    min_available_memory = Unicode("10%", config=True, help="""Memory that must be available before a
        new session or a pool kernel starts: a size ('1G', '512M', bytes) or a share of the machine's RAM
        ('10%'). Available is the smaller of MemAvailable (/proc/meminfo) and the room under the memory
        limit of the broker's own cgroup or its ancestors. Below it, creating a session answers 503
        with Retry-After and the pool is not refilled; existing sessions keep working. '0' turns the
        check off.""")
    retry_after = Integer(30, min=1, config=True, help="""Seconds a client refused for lack of memory is
        told to wait (the Retry-After header of the 503).""")
    broker_oom_score_adj = Integer(-900, min=-1000, max=1000, config=True, help="""oom_score_adj the broker
        sets on itself at start-up (root only: lowering it needs CAP_SYS_RESOURCE), so the host's OOM killer
        picks kernels (oom_score_adj 1000) and shell commands before the broker. 0 leaves it unchanged.""")

    @validate("min_available_memory")
    def _check_threshold(self, proposal):
        value = str(proposal["value"])
        m = _THRESHOLD_RE.fullmatch(value)
        if m:
            if float(m.group(1)) > 100:
                raise TraitError(f"Admission.min_available_memory {value!r}: a share of RAM is at most 100%")
            return value
        try:
            parse_size(value)
        except TraitError:
            raise TraitError(f"Admission.min_available_memory {value!r}: use a size such as '1G' or '512M', "
                             "or a share of RAM such as '10%'") from None
        return value

    @property
    def threshold(self) -> int:
        """The setting in bytes."""
        m = _THRESHOLD_RE.fullmatch(self.min_available_memory)
        if m:
            return int(meminfo().get("MemTotal", 0) * float(m.group(1)) / 100)
        return parse_size(self.min_available_memory)

    def shortfall(self) -> str | None:
        """Why a new kernel may not start now, or None when it may."""
        need = self.threshold
        if need <= 0:
            return None
        avail, where = available_memory()
        if avail >= need:
            return None
        return (f"not enough memory to start a session: {_gib(avail)} available ({where}), below the "
                f"{_gib(need)} the broker keeps free (Admission.min_available_memory = "
                f"{self.min_available_memory!r}); existing sessions keep working: retry in "
                f"{self.retry_after} s, or delete idle sessions")

    def check(self) -> None:
        """Raise :class:`MemoryLow` (503, Retry-After) when a new session may not start."""
        why = self.shortfall()
        if why is not None:
            self.log.warning("refused a new session: %s", why)
            raise MemoryLow(why, self.retry_after)

    def allows(self) -> bool:
        """May a pool kernel start now?  Says why in the log when not."""
        why = self.shortfall()
        if why is not None:
            self.log.warning("pool not refilled: %s", why)
            return False
        return True

    def protect_broker(self) -> int | None:
        """Lower this process's oom_score_adj (see broker_oom_score_adj); returns the value now set,
        or None when it could not be changed."""
        if not self.broker_oom_score_adj:
            return None
        try:
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write(str(self.broker_oom_score_adj))
            with open("/proc/self/oom_score_adj") as fh:
                return int(fh.read())
        except OSError as exc:
            # Expected without root; as root it means no CAP_SYS_RESOURCE (a container): say so.
            log = self.log.warning if os.geteuid() == 0 else self.log.info
            log("oom_score_adj of the broker left unchanged (%s); kernels still start with 1000", exc)
            return None
