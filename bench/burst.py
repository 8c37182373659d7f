"""A burst of simultaneous session creates, each followed by a first cell,
with the default warm pool.

Target (issue 12, docs/PERFORMANCE.md): a burst of 20 simultaneous
``POST /api/sessions`` with the default pool, each then running ``1+1``:
"ready" (from the release of the burst until the session's first cell has
answered ``2``) p50 <= 100 ms, p99 <= 2 s, no errors.

A real ``broker serve`` with the pool's default settings (pool_size,
pool_max_size, preload: whatever ``SessionManager`` defaults to) starts and
fills its pool (full and quiet, as bench/session_ready.py waits).  Then N
threads, each with its own keep-alive HTTP connection (opened before), are
released together by a barrier; each POSTs and runs ``1+1``.  Per request:
the POST's time and the ready time, all of them printed sorted (the pooled
ones answer in milliseconds, the others when the next pooled kernel is
ready).  The sessions are deleted, and a second
burst follows once the pool, grown by the first burst's misses, is full
again: what a burst costs when the pool has followed demand.  The anchor,
for scale: one raw plain ipykernel start (AsyncKernelManager, ipc) in the
same run, before the bursts.

    python bench/burst.py            # 20 at once, two bursts
    python bench/burst.py --quick    # 8 at once, two bursts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _exec_common import summary  # noqa: E402
from _session_common import (  # noqa: E402
    Broker,
    RawKernel,
    RestSession,
    env_info,
    machine_quiet,
    print_env,
    wait_pool_full,
)

P50_MS, P99_MS = 100.0, 2000.0


def defaults() -> dict:
    from broker.sessions import SessionManager

    return {k: getattr(SessionManager, k).default_value for k in ("pool_size", "pool_max_size")}


def burst(broker: Broker, n: int) -> list[dict]:
    barrier = threading.Barrier(n + 1)
    out: list[dict] = [{} for _ in range(n)]
    t0 = [0.0]

    def one(i: int):
        http = broker.http()
        http.get(broker.url + "/api/sessions", timeout=30)   # the connection is open before the burst
        barrier.wait()
        rec = out[i]
        try:
            s = RestSession(broker, http)
            rec["post"] = time.perf_counter() - t0[0]
            r = s.execute("1+1")
            rec["ready"] = time.perf_counter() - t0[0]
            rec["id"] = s.id
            if r.get("result") != "2":
                rec["error"] = f"first cell: {str(r)[:200]}"
        except Exception as exc:  # noqa: BLE001 -- counted, not raised
            rec["error"] = repr(exc)[:300]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return out


def delete_all(broker: Broker, recs: list[dict]) -> None:
    http = broker.http()
    for r in recs:
        if r.get("id"):
            http.delete(f"{broker.url}/api/sessions/{r['id']}", timeout=120)


def report(name: str, recs: list[dict]) -> dict:
    ready = [r["ready"] for r in recs if "ready" in r]
    post = [r["post"] for r in recs if "post" in r]
    errors = [r["error"] for r in recs if "error" in r]
    res = {"n": len(recs), "errors": len(errors), "first_errors": errors[:3],
           "ready": summary(ready) if ready else None, "post": summary(post) if post else None,
           "ready_ms": sorted(round(x * 1e3, 1) for x in ready)}
    if ready:
        ok = (not errors and res["ready"]["median"] * 1e3 <= P50_MS and res["ready"]["p99"] * 1e3 <= P99_MS)
        res["pass"] = ok
        print(f"{name}: ready p50 {res['ready']['median'] * 1e3:.0f} ms, p99 {res['ready']['p99'] * 1e3:.0f} ms; "
              f"POST p50 {res['post']['median'] * 1e3:.0f} ms, p99 {res['post']['p99'] * 1e3:.0f} ms; "
              f"errors {len(errors)}; target p50 <= {P50_MS:.0f} ms, p99 <= {P99_MS:.0f} ms: "
              f"{'PASS' if ok else 'FAIL'}")
        print(f"  ready, ms, sorted: {', '.join(f'{x:.0f}' for x in res['ready_ms'])}", flush=True)
    for e in errors[:3]:
        print(f"  error: {e}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 creates at once instead of 20")
    p.add_argument("--count", type=int, default=0, help="creates at once (default 20)")
    p.add_argument("--json", default="", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    n = args.count or (8 if args.quick else 20)
    info = env_info()
    pool = defaults()
    print_env(f"burst: {n} simultaneous POST /api/sessions + a first 1+1 each, default pool {pool}", info)
    print("before: " + machine_quiet(), flush=True)

    loop = asyncio.new_event_loop()
    raw = RawKernel()
    t = time.perf_counter()
    loop.run_until_complete(raw.start())
    raw_start = time.perf_counter() - t
    loop.run_until_complete(raw.stop())
    loop.close()
    print(f"anchor: one raw plain ipykernel start -> ready {raw_start * 1e3:.0f} ms", flush=True)

    results = {}
    b = Broker(pool["pool_size"], f"--SessionManager.max_sessions_per_owner={max(n, 20)}",
               f"--SessionManager.max_sessions={max(2 * n + pool['pool_max_size'], 100)}")
    try:
        b.start()
        wait_pool_full(b, pool["pool_size"])
        recs = burst(b, n)
        results["first"] = report(f"burst 1 (pool of {pool['pool_size']}, full)", recs)
        delete_all(b, recs)
        grown = min(pool["pool_max_size"], pool["pool_size"] + n)
        try:
            waited = wait_pool_full(b, grown, timeout=300)
            print(f"the pool grew to {len(b.unowned_sessions())} kernels (full and quiet after {waited:.0f} s)",
                  flush=True)
        except RuntimeError as exc:
            print(f"the pool did not reach {grown} kernels: {exc}")
        recs = burst(b, n)
        results["second"] = report(f"burst 2 (pool grown by burst 1, up to pool_max_size {pool['pool_max_size']})",
                                   recs)
        delete_all(b, recs)
    finally:
        b.stop()
    print("after: " + machine_quiet())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"versions": info, "count": n, "pool": pool, "raw_start": raw_start, "results": results,
                       "pass": results.get("first", {}).get("pass", False)}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
