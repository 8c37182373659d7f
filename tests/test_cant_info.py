"""Escape corpus, information leaks (research/sandbox.md §6 I1-I8).

A secret is put in this test process's environment before the module's
kernels start; no process of any sandbox may show it.  Every case also
proves the kernel still answers afterwards.
"""

from __future__ import annotations

import os
import socket
import stat
import time

import psutil
import pytest

from broker.sandbox.provisioner import kernel_env
from broker.sandbox.settings import SandboxSettings
from tests.cant_support import TRY, kernel_python, kernel_tree, probe, refused, token

HOST_SECRET_VAR = "BROKER_CANT_HOST_SECRET"
HOST_SECRET = token("HOST-ENV-SECRET")
SECRET_SET_AT: list[float] = []

# What ipykernel / IPython / the boot script add to the kernel's allow-listed
# environment once it runs (never anything from the host).
KERNEL_ADDED_ENV = {"BROKER_SANDBOX_LANDLOCK_ABI", "JPY_PARENT_PID", "CLICOLOR", "CLICOLOR_FORCE", "FORCE_COLOR", "GIT_PAGER",
                    "PAGER", "PWD", "TERM", "PYDEVD_USE_FRAME_EVAL"}


@pytest.fixture(scope="module", autouse=True)
def host_secret_env():
    """Module-scoped and autouse, so it is set before the module's kernels
    (module-scoped fixtures requested later) are started."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HOST_SECRET_VAR, HOST_SECRET)
        mp.setenv("AWS_SECRET_ACCESS_KEY", HOST_SECRET)
        SECRET_SET_AT.append(time.time())
        yield


def _started_after_secret(kernel) -> None:
    created = psutil.Process(kernel.provisioner.pid).create_time()
    assert SECRET_SET_AT and created >= SECRET_SET_AT[0] - 1, "kernel started before the secret was set"


ENV_PROBE = TRY + """
import os
out["environ"] = dict(os.environ)
out["self"] = attempt(lambda: open("/proc/self/environ", "rb").read().decode("latin-1"))
procs = {}
for pid in os.listdir("/proc"):
    if pid.isdigit():
        procs[pid] = {f: attempt(lambda f=f: open(f"/proc/{pid}/{f}", "rb").read().decode("latin-1"))
                      for f in ("environ", "cmdline")}
out["procs"] = procs
out["pid1_environ"] = procs.get("1", {}).get("environ")
"""


def test_cant_see_host_environment(kernel):
    assert os.environ[HOST_SECRET_VAR] == HOST_SECRET
    _started_after_secret(kernel)
    result = probe(kernel, ENV_PROBE)
    # Positive control: reading environ files works and shows the allow-list.
    assert result["self"][0] == "ok" and "IPYTHONDIR=/tmp/.ipython" in result["self"][1], result["self"]
    assert HOST_SECRET not in repr(result), "a host environment variable reached the sandbox"
    assert HOST_SECRET_VAR not in repr(result) and "AWS_SECRET_ACCESS_KEY" not in repr(result)
    pid1 = result["pid1_environ"]
    if pid1[0] == "ok":  # pid 1 is the boot script's init: not dumpable, so normally unreadable
        names = {kv.split("=", 1)[0] for kv in pid1[1].split("\0") if kv}
        assert names <= set(kernel_env()) | {"PWD"}, names
    # Host side: every process of the sandbox (launcher, bwrap, kernel) has a
    # scrubbed environment, so nothing inside could ever read the secret.
    for p in kernel_tree(kernel):
        env = p.environ()
        assert HOST_SECRET_VAR not in env and HOST_SECRET not in repr(env), (p, env)
    assert kernel.answers()


def test_cant_have_environment_beyond_allow_list(kernel):
    result = probe(kernel, ENV_PROBE)
    allowed = kernel_env()
    extra = set(result["environ"]) - set(allowed) - KERNEL_ADDED_ENV
    assert not extra, f"kernel environment has variables outside the allow-list: {sorted(extra)}"
    for k, v in allowed.items():
        assert result["environ"].get(k) == v, (k, result["environ"].get(k), v)
    # The environment the kernel was started with (before ipykernel added its
    # own) is exactly the allow-list plus bwrap's PWD.
    initial = {kv.split("=", 1)[0] for kv in result["self"][1].split("\0") if kv}
    assert initial <= set(allowed) | {"PWD"}, sorted(initial - set(allowed))
    assert result["environ"]["PATH"] == "/usr/bin:/bin" and result["environ"]["HOME"] == "/tmp"
    assert kernel.answers()


def test_cant_see_host_processes(kernel):
    host_pid = os.getpid()
    launcher = kernel.provisioner.pid
    result = probe(kernel, TRY + f"""
import os
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["me"] = os.getpid()
out["cmdlines"] = [open(f"/proc/{{p}}/cmdline", "rb").read().decode("latin-1") for p in out["pids"]]
out["kill_host"] = attempt(lambda: os.kill({host_pid}, 0))
out["kill_launcher"] = attempt(lambda: os.kill({launcher}, 0))
out["stat_host"] = attempt(lambda: os.stat("/proc/{host_pid}"))
""")
    assert set(result["pids"]) <= {1, 2} and result["me"] in result["pids"], result["pids"]
    host_total = len(psutil.pids())
    assert host_total > 10, "the host should have more processes than the sandbox shows"
    assert not any("pytest" in c for c in result["cmdlines"]), result["cmdlines"]
    if host_pid > 2:
        assert refused(result["kill_host"]) and result["kill_host"][1] == "ProcessLookupError", result
        assert refused(result["stat_host"]), result
    if launcher > 2:
        assert refused(result["kill_launcher"]), result
    assert kernel.answers()


def test_cant_see_sys(kernel):
    result = probe(kernel, TRY + """
import os
out["exists"] = os.path.exists("/sys")
out["list"] = attempt(lambda: os.listdir("/sys"))
paths = ["/sys/fs/cgroup", "/sys/kernel", "/sys/fs/cgroup/memory/release_agent", "/sys/kernel/uevent_helper",
         "/sys/firmware", "/sys/class/net", "/sys/block"]
out["paths"] = {p: os.path.exists(p) for p in paths}
out["open_release_agent"] = attempt(lambda: os.open("/sys/fs/cgroup/memory/release_agent", os.O_WRONLY))
out["mounts"] = [l.split()[4] for l in open("/proc/self/mountinfo")]
""")
    assert os.path.isdir("/sys/kernel"), "the host has /sys (so hiding it means something)"
    assert not result["exists"] or (result["list"][0] == "ok" and result["list"][1] == []), result
    assert not any(result["paths"].values()), result["paths"]
    assert refused(result["open_release_agent"]), result
    assert not [m for m in result["mounts"] if m == "/sys" or m.startswith("/sys/")], result["mounts"]
    assert kernel.answers()


PROC_WRITABLE_TARGETS = ["/proc/sys/kernel/core_pattern", "/proc/sys/kernel/hostname",
                         "/proc/sys/kernel/modprobe", "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger",
                         "/proc/sys/fs/suid_dumpable", "/proc/1/oom_score_adj"]


def test_cant_write_core_pattern(kernel):
    with open("/proc/sys/kernel/core_pattern") as fh:
        before = fh.read()
    # Opened for writing only, never written: if the open succeeded the test
    # fails without having changed anything on the host.
    result = probe(kernel, TRY + f"""
import os
out["open"] = {{p: attempt(lambda p=p: os.close(os.open(p, os.O_WRONLY))) for p in {PROC_WRITABLE_TARGETS!r}}}
out["read"] = attempt(lambda: open("/proc/sys/kernel/core_pattern").read())
""")
    assert result["read"][0] == "ok", result  # /proc/sys is there, just not writable
    for path, got in result["open"].items():
        assert refused(got), f"{path} is writable from the sandbox"
    with open("/proc/sys/kernel/core_pattern") as fh:
        assert fh.read() == before
    assert kernel.answers()


def test_cant_open_host_devices(kernel):
    result = probe(kernel, TRY + """
import os, stat
out["dev"] = sorted(os.listdir("/dev"))
kinds = {}
for root, dirs, files in os.walk("/dev"):
    for name in dirs + files:
        p = os.path.join(root, name)
        try:
            kinds[p] = os.lstat(p).st_mode
        except OSError:
            pass
out["kinds"] = kinds
out["open"] = {p: attempt(lambda p=p: os.close(os.open(p, os.O_RDONLY)))
               for p in ("/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/vda", "/dev/sda",
                         "/dev/nvme0n1", "/dev/loop0", "/dev/loop-control", "/dev/mapper/control",
                         "/dev/console", "/dev/tty1", "/dev/kvm", "/dev/fuse", "/dev/net/tun", "/dev/cpu/0/msr")}
out["null"] = attempt(lambda: os.close(os.open("/dev/null", os.O_RDWR)))
""")
    assert result["null"][0] == "ok", result
    for path, got in result["open"].items():
        assert refused(got), f"{path} opened in the sandbox"
    blocks = [p for p, mode in result["kinds"].items() if stat.S_ISBLK(mode)]
    assert not blocks, f"block devices in the sandbox: {blocks}"
    chars = {p for p, mode in result["kinds"].items() if stat.S_ISCHR(mode)}
    allowed = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx",
               "/dev/pts/ptmx"}
    assert chars <= allowed, f"unexpected character devices: {sorted(chars - allowed)}"
    # The host does have such devices: hiding them is the sandbox's doing.
    assert os.path.exists("/dev/kmsg") and any(
        stat.S_ISBLK(os.stat(os.path.join("/dev", n)).st_mode) for n in os.listdir("/dev")
        if os.path.exists(os.path.join("/dev", n)))
    assert kernel.answers()


def test_cant_read_other_kernels_connection_key(kernel, sandbox_kernel):
    other = sandbox_kernel
    own_key = kernel.km.session.key.decode()
    other_key = other.km.session.key.decode()
    assert own_key != other_key and len(other_key) >= 32
    cf = other.km.connection_file
    targets = [p for p in (cf, os.path.join(other.provisioner.rt_dir, "k-1"), other.provisioner.rt_dir,
                           os.path.dirname(cf)) if p]
    result = probe(kernel, TRY + f"""
import os, socket
out["own"] = open("/run/sandbox/kernel.json").read()
out["read"] = {{p: attempt(lambda p=p: open(p).read()) for p in {targets!r}}}
out["list"] = {{p: attempt(lambda p=p: os.listdir(p)) for p in {targets!r} + ["/run/kernel", "/run/sandbox"]}}
def connect(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    finally:
        s.close()
out["connect_other"] = attempt(lambda: connect({os.path.join(other.provisioner.rt_dir, "k-1")!r}))
blobs = []
for root in ("/run", "/run/sandbox", "/run/kernel", "/tmp", "/mnt/data", "/dev/shm"):
    for base, dirs, files in os.walk(root):
        for name in files:
            try:
                with open(os.path.join(base, name), "rb") as fh:
                    blobs.append(fh.read(1 << 20).decode("latin-1"))
            except OSError:
                pass
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for f in ("cmdline", "environ"):
            try:
                blobs.append(open(f"/proc/{{pid}}/{{f}}", "rb").read().decode("latin-1"))
            except OSError:
                pass
out["found_other"] = any({other_key!r} in b for b in blobs)
out["found_own"] = any({own_key!r} in b for b in blobs)
""")
    # Positive control: the search does find this kernel's own key.
    assert own_key in result["own"] and result["found_own"], "the key search is blind"
    assert other_key not in result["own"]
    assert result["found_other"] is False, "another kernel's HMAC key is readable"
    for path, got in result["read"].items():
        assert refused(got), f"{path} readable from another kernel"
    for path, got in result["list"].items():
        if path in (other.provisioner.rt_dir, cf):
            assert refused(got), (path, got)
        elif not refused(got):  # a folder name the sandbox also has (its own /tmp, say)
            assert os.path.basename(cf) not in got[1], (path, got)
    assert sorted(result["list"]["/run/kernel"][1]) == [f"k-{i}" for i in range(1, 6)], result["list"]
    assert refused(result["connect_other"]), result["connect_other"]
    assert other_key not in repr(result)
    assert kernel.answers() and other.answers()


def test_cant_learn_or_change_hostname(kernel):
    host = socket.gethostname()
    result = probe(kernel, TRY + """
import os, socket
out["gethostname"] = socket.gethostname()
out["uname"] = os.uname().nodename
out["proc"] = open("/proc/sys/kernel/hostname").read().strip()
out["set"] = attempt(lambda: socket.sethostname("pwned"))
out["after"] = socket.gethostname()
""")
    assert result["gethostname"] == result["uname"] == result["proc"] == "sandbox", result
    assert refused(result["set"]) and result["set"][1] == "PermissionError", result
    assert result["after"] == "sandbox"
    if host != "sandbox":
        assert host not in repr(result)
    assert socket.gethostname() == host
    assert kernel.answers()


def test_cant_run_as_root(kernel):
    result = probe(kernel, """
import os
out["ids"] = [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
out["Uid"] = status["Uid"].split()
out["Gid"] = status["Gid"].split()
out["CapEff"] = status["CapEff"].strip()
out["CapPrm"] = status["CapPrm"].strip()
out["CapBnd"] = status["CapBnd"].strip()
""")
    assert result["ids"][:4] == [1000, 1000, 1000, 1000], result
    assert result["Uid"] == ["1000"] * 4 and result["Gid"] == ["1000"] * 4, result
    assert result["CapEff"] == result["CapPrm"] == "0000000000000000", result
    # From the host: the kernel process and everything around it run as the
    # kernel's own unprivileged uid from the sandbox range, never as root.
    settings = SandboxSettings()
    lo, hi = settings.uid_range_start, settings.uid_range_start + settings.uid_range_size
    py = kernel_python(kernel)
    uids, gids = py.uids(), py.gids()
    assert 0 not in uids and 0 not in gids, (uids, gids)
    assert all(lo <= u < hi for u in uids), uids
    assert py.uids().real != os.getuid()
    for p in kernel_tree(kernel):
        assert 0 not in p.uids(), f"{p.name()} (pid {p.pid}) runs with uid 0: {p.uids()}"
    assert kernel.answers()
