"""Memory overcommit does not take the service down (broker/admission.py).

* Admission: with ``Admission.min_available_memory`` set above what the
  machine has available, creating a session answers 503 with Retry-After and
  a message naming the available memory and the setting; the pool is not
  refilled; a session that already exists keeps working, files and all.
  (The threshold is raised instead of exhausting the host: other work shares
  this machine and must never meet the host's OOM killer.)
* OOM order: kernels and shell commands run with oom_score_adj 1000 and
  cannot lower it; the broker runs with -900 (as root).
* Many sessions fill their memory at once: each small cgroup limit is hit
  together, every one of those kernels is killed inside its own cgroup, and
  the broker, a bystander session's variables and every session's files
  survive; the killed sessions work again on their next call.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from traitlets import TraitError

from broker import admission
from broker.admission import Admission
from broker.errors import MemoryLow
from tests.broker_server import BrokerProcess
from tests.figures import record

pytestmark = pytest.mark.reliability


# -- the figures admission works from ------------------------------------------------------

def test_available_memory_is_meminfo_or_tighter_cgroup():
    avail, where = admission.available_memory()
    info = admission.meminfo()
    assert 0 < avail <= info["MemTotal"]
    # MemAvailable moves; the figure is within a generous band of a fresh reading, or a cgroup's room.
    room = admission.cgroup_room()
    if room is not None and room[0] < info["MemAvailable"] * 0.9:
        assert "cgroup" in where
    else:
        assert abs(avail - admission.meminfo()["MemAvailable"]) < info["MemTotal"] * 0.2
        assert "MemAvailable" in where


@pytest.mark.parametrize("value, expect", [("10%", lambda total: total // 10), ("1G", lambda _: 1 << 30),
                                           ("512M", lambda _: 512 << 20), ("0", lambda _: 0),
                                           ("100%", lambda total: total)])
def test_threshold_setting(value, expect):
    a = Admission(min_available_memory=value)
    total = admission.meminfo()["MemTotal"]
    assert abs(a.threshold - expect(total)) <= 1


@pytest.mark.parametrize("value", ["lots", "150%", "-1G", "1 parsec", "%"])
def test_threshold_setting_refuses_nonsense(value):
    with pytest.raises(TraitError, match="min_available_memory"):
        Admission(min_available_memory=value)


def test_check_refuses_with_the_figures_and_the_setting():
    a = Admission(min_available_memory="100%", retry_after=7)
    with pytest.raises(MemoryLow) as e:
        a.check()
    assert e.value.status == 503 and e.value.retry_after == 7
    assert "Admission.min_available_memory" in e.value.message and "GiB available" in e.value.message
    assert not a.allows()
    assert Admission(min_available_memory="0").allows()
    Admission(min_available_memory="1M").check()


# -- against a real broker ----------------------------------------------------------------------

def _kernel_children(b: BrokerProcess) -> int:
    return len(psutil.Process(b.proc.pid).children(recursive=True))


def test_low_memory_refuses_new_sessions_keeps_existing(tmp_path):
    work = str(tmp_path / "adm")
    b = BrokerProcess(work, "--SessionManager.pool_size=0")
    b.start()
    try:
        sid = b.create_session()
        b.run(sid, "open('/mnt/data/kept.txt', 'w').write('still here')")
    finally:
        b.stop()
    # The same data root, now with a threshold above what the machine has, and a pool to fill.
    low = BrokerProcess(work, "--Admission.min_available_memory=100%", "--Admission.retry_after=9",
                        "--SessionManager.pool_size=2", data_root=b.data_root, name="low")
    low.start()
    try:
        t0 = time.monotonic()
        for path in ("/api/sessions", "/api/kernels"):
            r = low.post(path, json={} if "kernels" in path else None)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.headers.get("Retry-After") == "9"
            body = r.json()
            assert body["reason"] == "memory_low"
            assert "Admission.min_available_memory" in body["message"] and "available" in body["message"]
        refused_in = time.monotonic() - t0
        # The pool was not filled: no kernel started at all.
        time.sleep(3)
        assert _kernel_children(low) == 0
        assert "pool not refilled" in low.log_tail(200)
        # The session from before works, with its files.
        out = low.run(sid, "print(open('/mnt/data/kept.txt').read())")
        assert out["stdout"].strip() == "still here"
        assert low.shell(sid, "cat /mnt/data/kept.txt")["stdout"].strip() == "still here"
        record("admission: threshold above available memory", creates_refused=2, status=503,
               retry_after=9, refuse_seconds=round(refused_in, 2), pool_kernels_started=0,
               existing_session_works=True)
    finally:
        low.stop()


# -- OOM order ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A broker whose kernels have a small memory limit, so filling one is an OOM inside its cgroup."""
    b = BrokerProcess(str(tmp_path_factory.mktemp("oom")), "--SandboxSettings.memory_limit=256M",
                      "--SessionManager.pool_size=0", "--SessionManager.max_sessions_per_owner=10")
    b.start()
    yield b
    b.stop()


def can_lower_oom_score() -> bool:
    """CAP_SYS_RESOURCE (bit 24) in our effective set: lowering oom_score_adj is allowed."""
    with open("/proc/self/status") as fh:
        eff = next(int(line.split()[1], 16) for line in fh if line.startswith("CapEff:"))
    return bool(eff >> 24 & 1)


def _adj(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as fh:
        return int(fh.read())


def test_oom_order_broker_protected_kernels_first(small):
    sid = small.create_session()
    try:
        if can_lower_oom_score():
            assert _adj(small.proc.pid) == -900
        else:   # no CAP_SYS_RESOURCE (this container, or not root): said in the log, kernels still first
            assert _adj(small.proc.pid) <= 0
            if os.geteuid() == 0:
                assert "oom_score_adj of the broker left unchanged" in small.log_tail(400)
        kernels = psutil.Process(small.proc.pid).children(recursive=True)
        assert kernels and all(_adj(p.pid) == 1000 for p in kernels if p.is_running())
        assert small.run(sid, "print(open('/proc/self/oom_score_adj').read())")["stdout"].strip() == "1000"
        assert small.shell(sid, "cat /proc/self/oom_score_adj")["stdout"].strip() == "1000"
    finally:
        small.delete_session(sid)


def test_cant_lower_oom_score_adj(small):
    """A kernel or a shell command that tries to make itself the OOM killer's last choice is refused:
    never below the broker's own score; not at all when the broker holds CAP_SYS_RESOURCE (then the
    1000 its launcher set is also the floor, oom_score_adj_min).  Without that capability the kernel
    may take itself down to 0, the broker's own score, and no further (docs/admission.md)."""
    sid = small.create_session()
    floor = 1000 if can_lower_oom_score() else max(0, _adj(small.proc.pid))
    try:
        out = small.run(sid, "import errno\nfor v in ('-1000', '-1', '0'):\n    try:\n"
                             "        open('/proc/self/oom_score_adj', 'w').write(v)\n        print('set', v)\n"
                             "    except OSError as e:\n        print('refused', v, errno.errorcode[e.errno])\n"
                             "print(open('/proc/self/oom_score_adj').read())")
        lines = out["stdout"].strip().splitlines()
        assert lines[0].startswith("refused -1000") and lines[1].startswith("refused -1"), out
        assert int(lines[-1]) >= floor, out
        sh = small.shell(sid, "echo -1000 > /proc/self/oom_score_adj; echo 0 > /proc/self/oom_score_adj; "
                              "cat /proc/self/oom_score_adj")
        assert "Permission denied" in sh["stderr"] and int(sh["stdout"].strip().splitlines()[-1]) >= floor, sh
        # The session still works.
        assert small.run(sid, "print(6 * 7)")["stdout"].strip() == "42"
    finally:
        small.delete_session(sid)


@pytest.mark.slow
def test_many_sessions_fill_memory_at_once(small):
    n = 4
    bystander = small.create_session()
    small.run(bystander, "x = 42\nopen('/mnt/data/by.txt', 'w').write('bystander')")
    sids = [small.create_session() for _ in range(n)]
    for i, sid in enumerate(sids):
        small.run(sid, f"open('/mnt/data/mine.txt', 'w').write('session {i}')")
    broker_rss = psutil.Process(small.proc.pid).memory_info().rss
    t0 = time.monotonic()

    def fill(sid):
        # 1 GiB touched, far past the 256M limit (but under the address-space limit): the cgroup's OOM killer.
        return small.tool_response(sid, "ExecutePythonCode",
                                   {"pythonCode": "blocks = []\nfor _ in range(64):\n"
                                                  "    blocks.append(b'x' * (16 << 20))\nprint('survived')",
                                    "timeoutSeconds": 120})

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(fill, sids))
    seconds = time.monotonic() - t0
    killed = 0
    for r in answers:
        assert r.status_code == 200, r.text
        res = r.json()
        assert "survived" not in res.get("stdout", ""), res
        text = repr(res).lower()
        assert "memory" in text, res
        killed += 1
    # The broker is alive and answers; the bystander kept its kernel and variables.
    assert small.proc.poll() is None
    assert small.get("/api/sessions").status_code == 200
    assert small.run(bystander, "print(x)")["stdout"].strip() == "42"
    assert small.shell(bystander, "cat /mnt/data/by.txt")["stdout"] == "bystander"
    # Every filled session works again, files intact.
    for i, sid in enumerate(sids):
        out = small.run(sid, "print(open('/mnt/data/mine.txt').read())")
        assert out["stdout"].strip() == f"session {i}", out
    record("memory: sessions fill their memory at once", sessions=n, memory_limit_mib=256, killed=killed,
           broker_survived=True, bystander_state_kept=True, files_kept=n + 1, seconds=round(seconds, 1),
           broker_rss_mib=round(broker_rss / 2**20, 1),
           broker_rss_after_mib=round(psutil.Process(small.proc.pid).memory_info().rss / 2**20, 1))
    for sid in [bystander, *sids]:
        small.delete_session(sid)
