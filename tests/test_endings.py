"""Predictable endings (issue 11 item 6), against a real broker whose idle
cooldown is a few seconds (SessionManager.min_idle_timeout_minutes lowered,
as only tests should):

- an idle session ends after its cooldown, not before;
- never while an execution runs, over REST or the WebSocket;
- with ended_files = 'keep' its files wait under <data_root>/.ended/ for
  ended_retention_hours, then the culler removes them;
- the warm pool is never culled.
"""

from __future__ import annotations

import os
import time

import pytest
from traitlets import TraitError
from traitlets.config import Config

from broker.sandbox import prereq
from broker.sessions import SessionManager

from tests.fault_helpers import Call, PatientBroker, kernel_processes, wait_for
from tests.figures import record
from tests.gateway_helpers import KernelWS

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

COOLDOWN = 0.06 * 60          # seconds (idle_timeout_minutes = 0.06)
RETENTION = 0.003 * 3600      # seconds (ended_retention_hours = 0.003)


@pytest.fixture(scope="module")
def eb(tmp_path_factory):
    b = PatientBroker(str(tmp_path_factory.mktemp("endings")), "--SessionManager.min_idle_timeout_minutes=0.01",
                      "--SessionManager.idle_timeout_minutes=0.06", "--SessionManager.cull_interval=0.2",
                      "--SessionManager.pool_size=1", "--SessionManager.pool_max_size=1",
                      "--SessionManager.pool_refill_delay=0",
                      "--SessionManager.ended_files=keep", "--SessionManager.ended_retention_hours=0.003")
    b.start()
    yield b
    b.stop()


def pooled_ids(b) -> set[str]:
    owned = set()
    for owner in b.owners:
        owned |= {s["id"] for s in b.get("/api/sessions", owner=owner).json()}
    return {d for d in os.listdir(b.data_root) if len(d) == 36} - owned


def test_idle_timeout_below_the_minimum_is_refused():
    with pytest.raises(TraitError, match=r"idle_timeout_minutes must be at least 5 .*not 1"):
        SessionManager(idle_timeout_minutes=1)
    # Lowered for a test: in any order in a config.
    cfg = Config({"SessionManager": {"idle_timeout_minutes": 0.06, "min_idle_timeout_minutes": 0.01}})
    assert SessionManager(config=cfg).idle_timeout_minutes == 0.06


def test_endings(eb):
    """One test, so that its waits overlap: the pool and a long REST and a
    long WebSocket execution are watched through the same cooldowns."""
    long = 3 * COOLDOWN
    rest = eb.create_session()
    rest_call = Call(eb.run, rest, f"import time; time.sleep({long}); print('rest done')", timeout_seconds=120)
    ws_sid = eb.create_session()
    ws = KernelWS(f"ws://127.0.0.1:{eb.port}/api/kernels/{ws_sid}/channels", eb.owners["alice"]).connect()
    try:
        ws.wait_ready()
        ws_call = Call(ws.run, f"import time; time.sleep({long}); print('ws done')", timeout=120)
        idle = eb.create_session()
        assert eb.put(f"/api/sessions/{idle}/files/kept.txt", data=b"kept").status_code == 201
        last_idle_call = time.monotonic()
        # The pool's kernel (refilled after the first create took the first one).
        pool = wait_for(lambda: pooled_ids(eb), timeout=120, interval=0.1, what="the pool to fill")

        # The idle one ends after its cooldown, and not before.
        gone = wait_for(lambda: eb.get(f"/api/sessions/{idle}").status_code == 404 and time.monotonic(),
                        timeout=COOLDOWN + 30, interval=0.1, what="the idle session to end")
        ended_after = gone - last_idle_call
        assert ended_after >= COOLDOWN - 0.5, ended_after
        kept = os.path.join(eb.data_root, ".ended", idle)
        # Its kernel stops first, then the folder moves.
        wait_for(lambda: os.path.isfile(os.path.join(kept, "meta.json")), timeout=60, interval=0.05,
                 what="the ended session's files to be kept")
        assert os.path.exists(os.path.join(kept, "data.img" if prereq.is_root() else "data/kept.txt"))
        assert not os.path.exists(os.path.join(eb.data_root, idle))

        # The executions outlive the cooldown, and their sessions with them.
        r = rest_call.wait()
        assert r["status"] == "success" and r["stdout"] == "rest done\n", r
        ex = ws_call.wait()
        assert ex.reply["content"]["status"] == "ok", ex.reply
        assert eb.get(f"/api/sessions/{rest}").status_code == 200
        assert eb.get(f"/api/sessions/{ws_sid}").status_code == 200
        assert eb.run(rest, "print('still here')")["stdout"] == "still here\n"
    finally:
        ws.close()
    assert eb.run(ws_sid, "print('ws session still here')")["stdout"] == "ws session still here\n"

    pool_kernels = wait_for(lambda: kernel_processes(eb, next(iter(pool))), timeout=120, what="the pooled kernel")
    pool_seen = time.monotonic()

    # Kept files go after their retention.
    wait_for(lambda: not os.path.exists(kept), timeout=RETENTION + 30, interval=0.2, what="kept files to go")
    retained = time.monotonic() - gone

    # The pooled kernel lived through every cooldown above, untouched.
    time.sleep(max(0.0, pool_seen + 2 * COOLDOWN + 0.5 - time.monotonic()))
    assert pooled_ids(eb) == pool
    assert all(p.is_running() for p in pool_kernels)
    taken = eb.create_session()
    assert taken in pool
    assert eb.run(taken, "print('pooled')")["stdout"] == "pooled\n"
    record("ending: idle cooldown, executions past it, kept files, pool", cooldown_s=COOLDOWN,
           idle_ended_after_s=round(ended_after, 2), rest_execution_s=round(long, 1),
           ws_execution_s=round(long, 1), ended_during_execution=0,
           files_kept_s=round(retained, 1), retention_s=RETENTION, pooled_kernels_culled=0)
    for sid in (rest, ws_sid, taken):
        eb.delete_session(sid)
