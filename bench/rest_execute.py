"""REST ExecutePythonCode of ``1+1`` against raw AsyncKernelClient, in one run.

Target (docs/PERFORMANCE.md): broker p50 <= 1.3 x raw AsyncKernelClient (ipc;
a plain ipykernel started by AsyncKernelManager -- the anchor).

  raw AsyncKernelClient (ipc)   execute_request until execute_reply and idle
  broker REST ExecutePythonCode POST /api/sessions/{id}/tools/ExecutePythonCode
                                {"pythonCode": "1+1"} with a keep-alive
                                requests.Session, until the JSON result is read

The broker is a real ``broker serve`` (warm pool off) with one sandboxed
python3-sandbox session.  Two phases, as in ws_execute.py: interleaved in a
random order each round, then back-to-back blocks of 25.  Every call adds a
cell to the session's transcript (rewritten whole each time); ``--diagnose``
adds a broker whose Transcript._save is a no-op (diagnostic launcher, not a
product setting).

    python bench/rest_execute.py            # 300 executes per target and phase
    python bench/rest_execute.py --quick    # 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _exec_common import BrokerProc, RawAnchor, run_blocks, run_interleaved, summary, table, versions  # noqa: E402

TARGET = 1.3
RAW = "raw AsyncKernelClient (ipc)"
REST = "broker REST ExecutePythonCode"
OFF = " (transcript writes off)"


class RestClient:
    def __init__(self, broker: BrokerProc):
        self.http = requests.Session()
        self.http.headers.update(broker.headers)
        r = self.http.post(broker.url + "/api/sessions", timeout=120)
        r.raise_for_status()
        self.url = f"{broker.url}/api/sessions/{r.json()['id']}/tools/ExecutePythonCode"

    def execute_once(self) -> float:
        t0 = time.perf_counter()
        r = self.http.post(self.url, json={"pythonCode": "1+1"}, timeout=60)
        result = r.json()
        elapsed = time.perf_counter() - t0
        if r.status_code != 200 or result.get("result") != "2":
            raise RuntimeError(f"unexpected result: {r.status_code} {str(result)[:300]}")
        return elapsed

    def close(self):
        self.http.close()


def report(title: str, times: dict) -> tuple[dict, list[str]]:
    stats = {name: summary(t) for name, t in times.items()}
    lines = [title, table(list(stats.items())), ""]
    for name in stats:
        if name != RAW:
            r = stats[name]["median"] / stats[RAW]["median"]
            verdict = "" if OFF in name else f"  target <= {TARGET}x: {'PASS' if r <= TARGET else 'FAIL'}"
            lines.append(f"  {name} / raw, p50: {r:.2f}x{verdict}")
    return stats, lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="30 executes per target and phase instead of 300")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--diagnose", action="store_true", help="also a broker with transcript writes disabled")
    p.add_argument("--json", default="", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    n = args.rounds or (30 if args.quick else 300)
    warmup = 10 if args.quick else 30

    loop = asyncio.new_event_loop()
    raw = RawAnchor()
    procs, clients = [], []
    try:
        loop.run_until_complete(raw.start())
        targets = {RAW: raw.execute_once}
        for suffix, off in [("", False)] + ([(OFF, True)] if args.diagnose else []):
            b = BrokerProc(diagnostic_no_transcript=off).start()
            procs.append(b)
            c = RestClient(b)
            clients.append(c)
            targets[REST + suffix] = c.execute_once
        interleaved = run_interleaved(targets, n, warmup, loop)
        back_to_back = run_blocks(targets, n, loop)
    finally:
        for c in clients:
            c.close()
        loop.run_until_complete(raw.stop())
        for proc in procs:
            proc.stop()
        loop.close()

    info = versions()
    print(f"rest_execute: {n} executes per target and phase ({warmup} warm-up rounds first); "
          + ", ".join(f"{k} {v}" for k, v in info.items()))
    s1, lines1 = report("\n[1] interleaved, random order each round", interleaved)
    s2, lines2 = report(f"\n[2] back-to-back, blocks of 25 (the session already holds {n + warmup} cells)",
                        back_to_back)
    print("\n".join(lines1 + lines2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"versions": info, "n": n, "interleaved": {"stats": s1, "times": interleaved},
                       "back_to_back": {"stats": s2, "times": back_to_back}}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
