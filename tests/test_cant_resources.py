"""Escape corpus, resource exhaustion (research/sandbox.md §4 and §6 R1-R7).

Each case pushes one limit, asserts the limit held (with the number the
limit predicts, so an unlimited sandbox fails the test), and proves the
kernel answers afterwards, or was contained and restarts.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
from traitlets.config import Config

from broker.sandbox.settings import GiB, MiB, SandboxSettings
from tests.cant_support import ConfiguredKernel, kernel_python, recover

DEFAULTS = SandboxSettings()

SMALL_QUOTA = 32 * MiB
SMALL_FSIZE = 8 * MiB


@pytest.fixture(scope="module", params=["hook", "no-hook"])
def small_kernel(request):
    """A kernel with a 32 MiB /mnt/data and an 8 MiB file-size limit."""
    c = Config()
    c.SandboxProvisioner.data_quota = "32M"
    c.SandboxProvisioner.file_size_limit = "8M"
    k = ConfiguredKernel(c, hooked=request.param == "hook")
    assert k.provisioner.data_quota == SMALL_QUOTA and k.provisioner.file_size_limit == SMALL_FSIZE
    yield k
    k.shutdown()


# --- memory -------------------------------------------------------------------

def test_cant_allocate_past_memory_limits(kernel):
    r = kernel.run("x = bytearray(6 << 30)\nprint('ALLOCATED', len(x))")
    assert "ALLOCATED" not in r.stdout, r
    assert r.ename == "MemoryError" or r.dead, r
    recover(kernel)
    r = kernel.run("print(len(bytearray(64 << 20)))")  # ordinary allocations still work
    assert r.stdout.strip() == str(64 << 20), r


def _cgroup_file(group, controller: str, name: str) -> str:
    for d in group.dirs:
        if group.version == "v2" or f"/{controller}/" in d:
            path = os.path.join(d, name)
            if os.path.exists(path):
                with open(path) as fh:
                    return fh.read().strip()
    raise AssertionError(f"no {name} in {group.dirs}")


def test_cant_escape_memory_cgroup():
    """Below RLIMIT_AS but above the cgroup: the OOM killer contains the
    kernel (only the kernel), and it restarts."""
    c = Config()
    c.SandboxProvisioner.memory_limit = "256M"
    k = ConfiguredKernel(c)
    try:
        group = k.provisioner._cgroup
        assert group is not None, "no cgroup: the memory limit would be RLIMIT_AS only"
        limit_file = "memory.max" if group.version == "v2" else "memory.limit_in_bytes"
        assert int(_cgroup_file(group, "memory", limit_file)) == 256 * MiB
        r = k.run("""
            chunks = []
            for i in range(1024):
                chunks.append(b"x" * (1 << 20))   # 1 GiB, every page touched
            print("SURVIVED", len(chunks))
        """, timeout=120)
        assert "SURVIVED" not in r.stdout, r
        assert r.dead or r.ename == "MemoryError", r
        if r.dead:
            assert group.memory_events().get("oom_kill", 0) >= 1, group.memory_events()
        if group.version == "v1":
            assert int(_cgroup_file(group, "memory", "memory.max_usage_in_bytes")) <= 256 * MiB
        recover(k)
        assert k.provisioner._cgroup is group  # same cgroup after the restart
    finally:
        k.shutdown()


# --- processes ------------------------------------------------------------------

def test_cant_spawn_unbounded_threads(kernel):
    r = kernel.run("""
        import threading
        stop = threading.Event()
        started, error = [], None
        try:
            for i in range(2000):
                t = threading.Thread(target=stop.wait, daemon=True)
                t.start()
                started.append(t)
        except BaseException as exc:
            error = repr(exc)
        stop.set()
        for t in started:
            t.join()
        print("THREADS", len(started), error)
    """, timeout=120)
    assert r.status == "ok", r
    words = r.stdout.split()
    count = int(words[words.index("THREADS") + 1])
    assert count < DEFAULTS.pids_limit, r.stdout
    assert "can't start new thread" in r.stdout or "Resource temporarily unavailable" in r.stdout, r.stdout
    assert kernel.answers()
    r = kernel.run("import threading; t = threading.Thread(target=print, args=('T-OK',)); t.start(); t.join()")
    assert r.stdout.strip() == "T-OK", r  # threads work again once the bomb is gone


# --- disk -------------------------------------------------------------------------

def test_cant_fill_data_past_quota(small_kernel):
    k = small_kernel
    r = k.run("""
        import os, errno
        chunk = b"q" * (4 << 20)
        written, error = 0, None
        try:
            for i in range(40):          # 160 MiB attempted, in files under the size limit
                with open(f"/mnt/data/fill-{i}", "wb") as fh:
                    fh.write(chunk)
                written += len(chunk)
        except OSError as exc:
            error = exc.errno
        print("FILL", written, error)
    """)
    assert r.status == "ok", r
    _, written, err = r.stdout.split()
    assert err == "28", r.stdout  # ENOSPC
    assert int(written) <= SMALL_QUOTA
    usage = shutil.disk_usage(k.data_dir)
    assert usage.total <= SMALL_QUOTA and usage.free < 4 * MiB, usage
    r = k.run("""
        import glob, os
        for p in glob.glob("/mnt/data/fill-*"):
            os.unlink(p)
        open("/mnt/data/after-fill.txt", "w").write("room again")
        print(open("/mnt/data/after-fill.txt").read())
    """)
    assert r.stdout.strip() == "room again", r
    os.unlink(os.path.join(k.data_dir, "after-fill.txt"))
    recover(k)


def test_cant_exhaust_inodes_past_quota(small_kernel):
    k = small_kernel
    inodes = os.statvfs(k.data_dir).f_files
    r = k.run("""
        import os
        os.makedirs("/mnt/data/many", exist_ok=True)
        made, error = 0, None
        try:
            for i in range(100000):
                open(f"/mnt/data/many/{i}", "w").close()
                made += 1
        except OSError as exc:
            error = exc.errno
        print("MADE", made, error)
    """, timeout=120)
    assert r.status == "ok", r
    _, made, err = r.stdout.split()
    assert err == "28", r.stdout
    assert int(made) <= inodes < 100000, (made, inodes)
    r = k.run("import shutil; shutil.rmtree('/mnt/data/many'); open('/mnt/data/x', 'w').close(); print('OK')",
              timeout=120)
    assert r.stdout.strip() == "OK", r
    os.unlink(os.path.join(k.data_dir, "x"))
    recover(k)


def test_cant_write_file_over_size_limit(small_kernel):
    k = small_kernel
    r = k.run("""
        import os
        error = None
        try:
            with open("/mnt/data/huge", "wb") as fh:
                for i in range(20):
                    fh.write(b"h" * (1 << 20))
                    fh.flush()
        except OSError as exc:
            error = exc.errno
        print("SIZE", os.path.getsize("/mnt/data/huge"), error)
        os.unlink("/mnt/data/huge")
    """)
    assert r.status == "ok", r
    _, size, err = r.stdout.split()
    assert err == "27", r.stdout  # EFBIG: RLIMIT_FSIZE (Python ignores SIGXFSZ)
    assert int(size) == SMALL_FSIZE, r.stdout
    recover(k)


TMPFS_FILL = """
import os, errno
chunk = b"t" * (16 << 20)
written, error, i = 0, None, 0
try:
    while written < 2 * {size}:          # bounded: twice the cap
        with open(f"{folder}/fill-{{i}}", "wb") as fh:
            for _ in range(4):
                fh.write(chunk)
                written += len(chunk)
        i += 1
except OSError as exc:
    error = exc.errno
for name in os.listdir("{folder}"):
    if name.startswith("fill-"):
        os.unlink(f"{folder}/" + name)
print("FILL", written, error)
"""


@pytest.mark.parametrize("folder,size", [("/tmp", DEFAULTS.tmp_size), ("/dev/shm", DEFAULTS.shm_size)],
                         ids=["tmp", "dev-shm"])
def test_cant_fill_tmpfs(kernel, folder, size):
    r = kernel.run(TMPFS_FILL.format(folder=folder, size=size), timeout=120)
    assert r.status == "ok", r
    _, written, err = r.stdout.split()
    assert err == "28", r.stdout  # ENOSPC at the tmpfs size
    assert 0.9 * size <= int(written) <= size, (written, size)
    assert kernel.km.is_alive()
    r = kernel.run(f"open('{folder}/small', 'w').write('ok'); print(open('{folder}/small').read())")
    assert r.stdout.strip() == "ok", r
    assert kernel.answers()


# --- descriptors -------------------------------------------------------------------

def test_cant_exhaust_file_descriptors(kernel):
    r = kernel.run("""
        import os, resource
        fds, error = [], None
        try:
            for i in range(20000):
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            error = exc.errno
        for fd in fds:
            os.close(fd)
        print("FDS", len(fds), error, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    """)
    assert r.status == "ok", r
    _, count, err, hard = r.stdout.split()
    assert err == "24", r.stdout  # EMFILE
    assert int(hard) == DEFAULTS.open_files_limit
    assert int(count) < DEFAULTS.open_files_limit
    # Raising the soft limit past the hard one is refused too.
    r = kernel.run("""
        import resource
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
            print("RAISED")
        except (ValueError, OSError) as exc:
            print("REFUSED", type(exc).__name__)
    """)
    assert r.stdout.startswith("REFUSED"), r
    assert kernel.answers()


# --- CPU and time -------------------------------------------------------------------

def _run_and_interrupt(kernel, code: str, marker: str):
    """Start *code* (which creates /mnt/data/<marker> when it is running),
    interrupt it through the control channel, and time the interrupt."""
    host_marker = os.path.join(kernel.data_dir, marker)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("run", kernel.run(code, timeout=60)), daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not os.path.exists(host_marker):
        assert time.monotonic() < deadline, "the code never started"
        time.sleep(0.02)
    time.sleep(0.2)
    start = time.monotonic()
    kernel.km.interrupt_kernel()
    t.join(30)
    elapsed = time.monotonic() - start
    os.unlink(host_marker)
    return box.get("run"), elapsed


def test_cant_spin_cpu_past_interrupt(kernel):
    r, elapsed = _run_and_interrupt(kernel, """
        open("/mnt/data/.spin", "w").close()
        while True:
            pass
    """, ".spin")
    assert r is not None, "the spinning cell never finished"
    assert r.ename == "KeyboardInterrupt", r
    assert elapsed < 5, f"interrupt took {elapsed:.1f} s"
    assert kernel.answers()


def test_cant_sleep_past_interrupt(kernel):
    r, elapsed = _run_and_interrupt(kernel, """
        import time
        open("/mnt/data/.sleep", "w").close()
        time.sleep(1e9)
    """, ".sleep")
    assert r is not None, "the sleeping cell never finished"
    assert r.ename == "KeyboardInterrupt", r
    assert elapsed < 5, f"interrupt took {elapsed:.1f} s"
    assert kernel.answers()


# --- the limits themselves --------------------------------------------------------------

def _proc_limits(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/limits") as fh:
        next(fh)
        for line in fh:
            name, rest = line[:26].strip(), line[26:].split()
            out[name] = tuple(-1 if v == "unlimited" else int(v) for v in rest[:2])
    return out


def test_cant_run_without_cgroup_limits(kernel):
    group = kernel.provisioner._cgroup
    assert group is not None, "the kernel runs without a cgroup"
    settings = kernel.provisioner
    if group.version == "v2":
        assert int(_cgroup_file(group, "memory", "memory.max")) == settings.memory_limit
        assert _cgroup_file(group, "pids", "pids.max") == str(settings.pids_limit)
        quota, period = _cgroup_file(group, "cpu", "cpu.max").split()
    else:
        assert int(_cgroup_file(group, "memory", "memory.limit_in_bytes")) == settings.memory_limit
        assert _cgroup_file(group, "pids", "pids.max") == str(settings.pids_limit)
        quota = _cgroup_file(group, "cpu", "cpu.cfs_quota_us")
        period = _cgroup_file(group, "cpu", "cpu.cfs_period_us")
    assert int(quota) / int(period) == pytest.approx(settings.cpu_limit)
    assert settings.memory_limit == 2 * GiB and settings.pids_limit == 256
    # The kernel process itself is in every one of those groups.
    py = kernel_python(kernel)
    for procs in group.procs_files:
        with open(procs) as fh:
            assert str(py.pid) in fh.read().split(), f"kernel pid {py.pid} not in {procs}"
    with open(f"/proc/{py.pid}/cgroup") as fh:
        lines = fh.read()
    assert group.name in lines, lines
    # And the rlimits on the kernel process, read from the host.
    limits = _proc_limits(py.pid)
    assert limits["Max address space"] == (settings.effective_address_space,) * 2
    assert limits["Max file size"] == (settings.effective_file_size,) * 2
    assert limits["Max open files"] == (settings.open_files_limit,) * 2
    assert limits["Max processes"] == (settings.pids_limit,) * 2
    assert limits["Max core file size"] == (0, 0)
    assert kernel.answers()
