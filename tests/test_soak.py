"""The soak (issue 11 item 7): a few sessions making mixed calls in a loop for
at least ten minutes against one real broker, checking that nothing fails and
that the broker's memory, file descriptors and child processes stay flat.

Marked ``long``: not part of ``make test``; ``make reliability`` runs it.
BROKER_SOAK_SECONDS changes its length (600 by default).
"""

from __future__ import annotations

import os
import secrets
import threading
import time

import psutil
import pytest

from tests.fault_helpers import PatientBroker, broker_usage
from tests.figures import record

SECONDS = float(os.environ.get("BROKER_SOAK_SECONDS", "600"))

pytestmark = [pytest.mark.long, pytest.mark.reliability, pytest.mark.timeout(int(SECONDS) + 900)]
SESSIONS = 3


def one_round(b, sid: str, n: int) -> None:
    """One of each kind of call, each carrying a nonce that must come back."""
    nonce = secrets.token_hex(6)
    r = b.run(sid, f"x = '{nonce}'\nprint(x)")
    assert r["status"] == "success" and r["stdout"] == f"{nonce}\n", r
    r = b.shell(sid, f"echo {nonce} > n{n % 5}.txt && cat n{n % 5}.txt")
    assert r["status"] == "success" and r["stdout"] == f"{nonce}\n", r
    body = os.urandom(4096) + nonce.encode()
    assert b.put(f"/api/sessions/{sid}/files/up{n % 5}.bin", data=body).status_code == 201
    got = b.get(f"/api/sessions/{sid}/files/up{n % 5}.bin")
    assert got.status_code == 200 and got.content == body
    r = b.tool(sid, "SearchSessionFiles", {"pattern": nonce})
    assert nonce in str(r), r
    r = b.tool(sid, "ListSessionFiles", {})
    assert "up" in str(r)
    if n % 10 == 0:
        r = b.run(sid, "import pandas as pd, matplotlib.pyplot as plt\n"
                       "pd.DataFrame({'a': range(50)}).plot(); plt.show()")
        assert r["status"] == "success" and r["images"], r


def test_soak(tmp_path):
    b = PatientBroker(str(tmp_path / "soak"), "--SessionManager.pool_size=1")
    b.start()
    try:
        sids = [b.create_session() for _ in range(SESSIONS)]
        errors: list[str] = []
        counts = [0] * SESSIONS
        stop = time.monotonic() + SECONDS
        samples: list[dict] = []

        def worker(i: int) -> None:
            n = 0
            while time.monotonic() < stop and not errors:
                try:
                    one_round(b, sids[i], n)
                except Exception as exc:  # counted and reported below
                    errors.append(f"session {i} round {n}: {exc!r}"[:500])
                    return
                n += 1
                counts[i] = n

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(SESSIONS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            if time.monotonic() - t0 >= min(60, SECONDS / 5) and (not samples or time.monotonic() - samples[-1]["t"] >= 30):
                samples.append(dict(broker_usage(b), t=time.monotonic()))
        for t in threads:
            t.join()
        assert not errors, errors
        time.sleep(2)
        end = broker_usage(b)
        first = samples[0] if samples else end
        rss_growth = end["rss_mib"] - first["rss_mib"]
        rounds = sum(counts)
        assert end["fds"] <= first["fds"] + 5, (first, end)
        assert end["children"] <= first["children"] + 2, (first, end)
        assert rss_growth <= max(40, first["rss_mib"] * 0.25), (first, end)
        for sid in sids:
            b.delete_session(sid)
        psutil.wait_procs([], timeout=1)
        record("long: soak, mixed calls in a loop", seconds=round(time.monotonic() - t0), sessions=SESSIONS,
               rounds=rounds, calls=rounds * 6, errors=len(errors),
               fds_first=first["fds"], fds_end=end["fds"], children_first=first["children"],
               children_end=end["children"], rss_first_mib=first["rss_mib"], rss_end_mib=end["rss_mib"],
               bounds={"errors": 0, "seconds": {"min": min(600, SECONDS)},
                       "fds_end": {"max": first["fds"] + 5}, "children_end": {"max": first["children"] + 2}})
    finally:
        b.stop()
