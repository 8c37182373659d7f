"""WebSocket execute of ``1+1``: the broker against raw AsyncKernelClient and
against Jupyter Kernel Gateway, in one run.

Targets (docs/PERFORMANCE.md), each a ratio of medians in the same run:

- broker p50 <= 1.15 x raw AsyncKernelClient (ipc; a plain ipykernel started
  by AsyncKernelManager -- the anchor);
- broker at least 5 x faster than Kernel Gateway (p50).

Targets measured:

  raw AsyncKernelClient (ipc)   a plain ipykernel over ipc
  broker WebSocket v1           /api/kernels/{id}/channels, v1.kernel.websocket.jupyter.org
  broker WebSocket legacy       the same, legacy JSON text frames (what jupyter_server's gateway relay uses)
  Kernel Gateway v1 / legacy    Jupyter Kernel Gateway 3 from PyPI (installed into the venv if
                                missing), KG_AUTH_TOKEN, the plain python3 kernelspec

Each broker target is its own ``broker serve`` (warm pool off) with one
sandboxed python3-sandbox kernel.  Every WebSocket client is websocket-client.
One execute is timed from sending the request until its execute_reply and its
idle status have both arrived.

Two phases:

1. interleaved: each round runs every target once, in a random order -- a
   broker execute follows other work, as when a person runs cells;
2. back-to-back (raw and broker only): blocks of 25 executes in a row on one
   target -- a client firing cells as fast as replies come.

Every broker execution adds a cell to the session's transcript, which is
rewritten whole after each one; the table's "p50 first50 / last50" columns
show the trend as the session grows.  ``--diagnose`` adds the same broker
targets on a broker whose Transcript._save is a no-op (a diagnostic launcher,
not a product setting) to show what that rewrite costs.

    python bench/ws_execute.py            # 300 executes per target and phase
    python bench/ws_execute.py --quick    # 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _exec_common import (  # noqa: E402
    BrokerProc,
    KernelGatewayProc,
    RawAnchor,
    WSClient,
    run_blocks,
    run_interleaved,
    summary,
    table,
    versions,
)

TARGET_RAW = 1.15
TARGET_KG = 5.0
RAW = "raw AsyncKernelClient (ipc)"
OFF = " (transcript writes off)"


def report(title: str, times: dict, kg: bool) -> tuple[dict, list[str]]:
    stats = {name: summary(t) for name, t in times.items()}
    lines = [title, table(list(stats.items())), ""]
    raw_p50 = stats[RAW]["median"]
    for name in stats:
        if name.startswith("broker"):
            r = stats[name]["median"] / raw_p50
            verdict = "" if OFF in name else f"  target <= {TARGET_RAW}x: {'PASS' if r <= TARGET_RAW else 'FAIL'}"
            lines.append(f"  {name} / raw, p50: {r:.2f}x{verdict}")
    if kg:
        pairs = (("broker WebSocket v1", "Kernel Gateway v1"), ("broker WebSocket legacy", "Kernel Gateway legacy"))
        for b, k in pairs:
            r = stats[k]["median"] / stats[b]["median"]
            lines.append(f"  {k} / {b}, p50: broker {r:.1f}x faster  target >= {TARGET_KG}x: "
                         f"{'PASS' if r >= TARGET_KG else 'FAIL'}")
    return stats, lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="30 executes per target and phase instead of 300")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--no-kg", action="store_true", help="skip Kernel Gateway")
    p.add_argument("--diagnose", action="store_true", help="also brokers with transcript writes disabled")
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
        variants = [("", False)] + ([(OFF, True)] if args.diagnose else [])
        for suffix, off in variants:
            for v1, name in ((True, "broker WebSocket v1"), (False, "broker WebSocket legacy")):
                b = BrokerProc(diagnostic_no_transcript=off).start()
                procs.append(b)
                c = WSClient(b.ws_url(b.create_kernel()), b.token, v1)
                clients.append(c)
                targets[name + suffix] = c.execute_once
        fast = dict(targets)
        if not args.no_kg:
            kg = KernelGatewayProc()
            procs.append(kg.start())
            kg_kid = kg.create_kernel()
            for v1, name in ((True, "Kernel Gateway v1"), (False, "Kernel Gateway legacy")):
                c = WSClient(kg.ws_url(kg_kid), kg.token, v1)
                clients.append(c)
                targets[name] = c.execute_once
        interleaved = run_interleaved(targets, n, warmup, loop)
        back_to_back = run_blocks(fast, n, loop)
    finally:
        for c in clients:
            try:
                c.close()
            except Exception:
                pass
        loop.run_until_complete(raw.stop())
        for proc in procs:
            proc.stop()
        loop.close()

    info = versions()
    print(f"ws_execute: {n} executes per target and phase ({warmup} warm-up rounds first); "
          + ", ".join(f"{k} {v}" for k, v in info.items()))
    s1, lines1 = report("\n[1] interleaved, random order each round", interleaved, not args.no_kg)
    s2, lines2 = report("\n[2] back-to-back, blocks of 25 (after phase 1: the sessions already hold "
                        f"{n + warmup} cells)", back_to_back, False)
    print("\n".join(lines1 + lines2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"versions": info, "n": n, "interleaved": {"stats": s1, "times": interleaved},
                       "back_to_back": {"stats": s2, "times": back_to_back}}, fh, indent=1)
    # A missed target is reported, not an error: run_all treats only crashes as failures.
    return 0


if __name__ == "__main__":
    sys.exit(main())
