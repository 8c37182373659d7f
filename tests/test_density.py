"""The density settings (SandboxSettings.memory_merge, fixed_layout) reach a
real sandboxed kernel, the kernel cannot change its personality itself, and
the default kernel does not carry debugpy (docs/benchmarks.md, "Shell
commands and idle density"; docs/security.md, "Density settings")."""

from __future__ import annotations

import os

import pytest
from traitlets.config import Config

from broker.sandbox import prereq
from tests.harness import SandboxKernel

PROBE = """
import ctypes, sys
print("PERSONALITY", open("/proc/self/personality").read().strip())
stat = {}
try:
    for line in open("/proc/self/ksm_stat"):
        k, _, v = line.partition(" ")
        stat[k] = v.strip()
except OSError:
    pass
print("MERGE_ANY", stat.get("ksm_merge_any", "absent"))
libc = ctypes.CDLL(None, use_errno=True)
print("SET_PERSONALITY", libc.personality(0x0040000), ctypes.get_errno())
print("DEBUGPY", "debugpy" in sys.modules)
"""


def _values(stdout: str) -> dict:
    return dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)


@pytest.mark.skipif(not prereq.is_root(), reason="KSM and the launch's pre-exec step are set up as root")
@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/ksm/run"), reason="no KSM in this kernel")
def test_density_settings_reach_the_kernel_and_cannot_be_changed_inside():
    c = Config()
    c.SandboxProvisioner.memory_merge = True
    c.SandboxProvisioner.fixed_layout = True
    with open("/sys/kernel/mm/ksm/run") as fh:
        run_before = fh.read().strip()
    k = SandboxKernel(config=c)
    try:
        r = k.run(PROBE)
        assert r.status == "ok", r
        v = _values(r.stdout)
        assert int(v["PERSONALITY"], 16) & 0x0040000, r.stdout      # ADDR_NO_RANDOMIZE
        assert v["MERGE_ANY"] in ("yes", "absent"), r.stdout        # ksm_stat from Linux 6.1, merge_any 6.4+
        assert v["SET_PERSONALITY"] == "-1 1", r.stdout             # EPERM: seccomp refuses personality changes
        assert v["DEBUGPY"] == "False", r.stdout
        with open("/sys/kernel/mm/ksm/run") as fh:
            assert fh.read().strip() == "1", "the broker (root) turns ksmd on for memory_merge"
    finally:
        k.shutdown()
        if run_before != "1":
            with open("/sys/kernel/mm/ksm/run", "w") as fh:
                fh.write(run_before)
    plain = SandboxKernel()
    try:
        v = _values(plain.run(PROBE).stdout)
        assert not int(v["PERSONALITY"], 16) & 0x0040000, "address randomisation is on by default"
        assert v["MERGE_ANY"] in ("no", "absent")
    finally:
        plain.shutdown()
