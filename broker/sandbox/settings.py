"""Every sandbox setting and limit, as traits.

The limits table (what each limit is, its default, what enforces it) is
also in ``docs/security.md``; keep them in step.
"""

from __future__ import annotations

import re

from traitlets import Bool, CaselessStrEnum, Float, Integer, TraitError, Unicode, validate
from traitlets.config import LoggingConfigurable

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value) -> int:
    """Bytes from an int or a string such as ``"2G"``, ``"256MiB"``, ``"512m"``."""
    if isinstance(value, bool):
        raise TraitError("a size must be a number of bytes or a string like '2G'")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.I)
    if not m:
        raise TraitError(f"{value!r} is not a size: use bytes or a number with K, M, G or T (e.g. '2G')")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class ByteSize(Integer):
    """An integer number of bytes that also accepts '2G'-style strings."""

    info_text = "a size in bytes, or a string such as '2G' or '256M'"

    def validate(self, obj, value):
        return super().validate(obj, parse_size(value))

    def from_string(self, s):
        return parse_size(s)


GiB = 1 << 30
MiB = 1 << 20


class SandboxSettings(LoggingConfigurable):
    """Limits and mechanics of every sandbox (kernels and shell commands)."""

    # --- limits ------------------------------------------------------------
    memory_limit = ByteSize(2 * GiB, config=True, help="""Memory for one kernel, page cache and
        its tmpfs pages included (cgroup memory limit). The kernel is killed by the OOM killer
        past it and the broker restarts it.""")
    pids_limit = Integer(256, min=16, config=True, help="""Processes and threads in one sandbox
        (cgroup pids.max, and RLIMIT_NPROC for the sandbox's own uid when running as root).""")
    cpu_limit = Float(1.0, min=0.01, config=True, help="""CPU cores one sandbox may use
        (cgroup CPU quota). Wall-clock timeouts are per execution, not here.""")
    data_quota = ByteSize(1 * GiB, config=True, help="""Size of /mnt/data. As root the data folder
        is a loop-mounted ext4 image of this size (nosuid, nodev, noexec); without root only the
        per-file limit applies (see file_size_limit).""")
    tmp_size = ByteSize(256 * MiB, config=True, help="Size of the sandbox's /tmp (tmpfs, counted as memory).")
    shm_size = ByteSize(64 * MiB, config=True, help="Size of the sandbox's /dev/shm (tmpfs, counted as memory).")
    address_space_limit = ByteSize(0, config=True, help="""RLIMIT_AS for the kernel: a large
        allocation fails with MemoryError instead of an OOM kill. 0 means memory_limit + 2 GiB
        (numpy, OpenBLAS and threads reserve much more address space than they use).""")
    file_size_limit = ByteSize(0, config=True, help="RLIMIT_FSIZE: the largest file a sandbox may write. 0 means data_quota.")
    open_files_limit = Integer(1024, min=64, config=True, help="RLIMIT_NOFILE for a sandbox.")

    # --- mechanics ---------------------------------------------------------
    bwrap = Unicode("bwrap", config=True, help="The bubblewrap executable (name on PATH or absolute path).")
    uid_range_start = Integer(3_000_000, min=1000, config=True, help="""As root, each sandbox runs
        as its own unprivileged host uid (and gid) taken from [uid_range_start,
        uid_range_start + uid_range_size). The range must not hold real users.""")
    uid_range_size = Integer(10_000, min=1, config=True, help="How many uids the broker may use for sandboxes.")
    state_dir = Unicode("/run/broker", config=True, help="""Root-owned folder for uid leases and
        the mount-staging point (only used when running as root).""")
    cgroups = CaselessStrEnum(["auto", "required", "off"], default_value="auto", config=True,
        help="""Per-sandbox cgroups for memory, pids and CPU. 'auto' uses them where the broker
        can create them (v2 or v1 controllers) and otherwise logs a warning and relies on
        rlimits; 'required' refuses to start a sandbox without them.""")
    quota = CaselessStrEnum(["auto", "loop", "off"], default_value="auto", config=True,
        help="""How /mnt/data's size is capped. 'loop' (the default as root, for folders the broker
        creates): a loop-mounted ext4 image; 'off': only RLIMIT_FSIZE.""")
    shell_helper = Bool(True, config=True, help="""Run a session's shell commands in one long-lived
        shell sandbox per session (started on its first command, same walls), whose pid 1 forks each
        command, instead of a fresh sandbox per command: about 2x faster per command. Between two
        commands every process of the last one is killed and /tmp and /dev/shm are emptied; see
        docs/shell.md. False: a fresh bwrap sandbox per command.""")
    memory_merge = Bool(False, config=True, help="""Let the kernel merge identical memory pages
        of kernels (KSM): each kernel is started with PR_SET_MEMORY_MERGE (Linux 6.4 or later), and
        as root the broker turns the host's ksmd on (/sys/kernel/mm/ksm/run = 1, a host-wide
        setting it leaves on; only processes that asked are scanned). Pages are merged only while
        identical and copied again on the first write, so no kernel sees or changes another's data;
        ksmd costs CPU (see ksm_pages_to_scan and docs/benchmarks.md).""")
    ksm_pages_to_scan = Integer(0, min=0, config=True, help="""With memory_merge as root: set the
        host's /sys/kernel/mm/ksm/pages_to_scan (pages ksmd scans per wake-up, every
        sleep_millisecs, 20 ms by default) to this; 0 leaves the host's value (100).""")
    fixed_layout = Bool(False, config=True, help="""Start kernels with address-space randomisation
        off (personality ADDR_NO_RANDOMIZE), so that kernels which imported the same libraries hold
        more identical pages for memory_merge to share. The sandbox already runs arbitrary code
        and exposes no other process to it, so randomisation protects nothing inside it.""")
    landlock = Bool(True, config=True, help="Apply Landlock inside the sandbox where the kernel supports it (best effort).")
    seccomp_profile = Unicode("kernel", config=True, help="The seccomp profile for kernels (a file in seccomp/).")
    figure_autoshow = Bool(True, config=True, help="""Show matplotlib figures left open at the end of a
        cell, as Jupyter's inline backend does (each once; a figure saved with savefig and left open is
        reported as the saved file). False: only plt.show() or display(fig) show a figure. Passed to
        the kernel as BROKER_FIGURE_AUTOSHOW=1/0.""")

    @validate("uid_range_start")
    def _valid_uid(self, proposal):
        value = proposal["value"]
        if value + self.uid_range_size > 2**32 - 2:
            raise TraitError(f"uid_range_start {value} + uid_range_size must stay below 2**32-2")
        return value

    def rlimits(self, own_uid: bool) -> dict[str, int]:
        """prlimit's limits for a sandbox.  RLIMIT_NPROC counts per real uid,
        host-wide: set only when the sandbox has a uid of its own (root)."""
        limits = {"as": self.effective_address_space, "fsize": self.effective_file_size,
                  "nofile": self.open_files_limit, "core": 0}
        if own_uid:
            limits["nproc"] = self.pids_limit
        return limits

    def profile_env(self) -> dict[str, str]:
        """Variables the kernel profile (kernel_profile/startup.py) reads."""
        return {"BROKER_FIGURE_AUTOSHOW": "1" if self.figure_autoshow else "0"}

    @property
    def effective_address_space(self) -> int:
        return self.address_space_limit or self.memory_limit + 2 * GiB

    @property
    def effective_file_size(self) -> int:
        return self.file_size_limit or self.data_quota
