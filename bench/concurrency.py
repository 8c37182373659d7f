"""Concurrent sessions: S sessions each running C small cells at once over
REST, against raw jupyter_client driving S plain kernels the same way, in one
run.

Target (docs/PERFORMANCE.md): 20 concurrent sessions each running 50 small
cells -- zero errors, zero cross-talk, aggregate throughput >= 0.8 x raw
jupyter_client driving the same 20 kernels.

  A  raw: S plain ipykernels (AsyncKernelManager, ipc); one asyncio loop, one
     coroutine per kernel sending its cells one after the other through its
     AsyncKernelClient (execute_request until execute_reply and idle)
  B  broker: a real ``broker serve`` (warm pool off, so nothing starts in the
     background) with S sessions; one thread per session, each with its own
     keep-alive requests.Session, sending ``ExecutePythonCode`` one after the
     other

Cell j of session k is ``x = V * 2; x`` with V unique to (round, k, j); every
result must be ``2V``: anything else is an error, and a result that is
another session's value is counted as cross-talk.  Throughput is cells per
second from the moment every client is released (a barrier) until the last
result is in; per-cell latencies are printed too, and where the CPU went: CPU
time per cell of the client (this script), the broker process (its threads
included: the transcript writer), the kernels' processes, and everything
else on the machine, with the machine's idle share (near 0: CPU-bound, and
throughput is cores / CPU per cell).  Rounds alternate A and B
in a random order; the kernels and sessions live for the whole run (each
broker session's transcript grows by C cells per round).

    python bench/concurrency.py              # 20 sessions x 50 cells, 3 rounds
    python bench/concurrency.py --quick      # 5 sessions x 10 cells, 2 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _exec_common import summary  # noqa: E402
from _session_common import (  # noqa: E402
    NO_TRANSCRIPT,
    Broker,
    RawKernel,
    RestSession,
    env_info,
    machine_quiet,
    print_env,
    session_pids,
    wait_quiet,
)

TARGET = 0.9
CPU_TARGET_MS = 2.0
RAW, BROKER, DIAG = "A raw jupyter_client", "B broker REST", "B' broker, transcript writes off"


def value(rnd: int, k: int, j: int) -> int:
    return rnd * 1_000_000 + k * 1_000 + j


class Tally:
    def __init__(self):
        self.errors: list[str] = []
        self.crosstalk = 0
        self.lat: list[float] = []
        self.lock = threading.Lock()

    def check(self, rnd: int, k: int, j: int, result, error, n_sessions: int, dt: float) -> None:
        want = str(2 * value(rnd, k, j))
        with self.lock:
            self.lat.append(dt)
            if error is None and result == want:
                return
            try:
                got = int(result) // 2
                other = got // 1000 % 1000
                if got // 1_000_000 == rnd and other != k and other < n_sessions:
                    self.crosstalk += 1
            except (TypeError, ValueError):
                pass
            self.errors.append(f"session {k} cell {j}: want {want}, got {result!r} {error or ''}")


async def raw_round(kernels: list[RawKernel], cells: int, rnd: int) -> tuple[float, Tally]:
    tally = Tally()

    async def drive(k: int, kernel: RawKernel):
        for j in range(cells):
            try:
                dt, result, error = await kernel.execute(f"x = {value(rnd, k, j)} * 2; x", timeout=120)
            except Exception as exc:  # noqa: BLE001 -- counted, not raised
                dt, result, error = 0.0, None, repr(exc)
            tally.check(rnd, k, j, result, error, len(kernels), dt)

    t0 = time.perf_counter()
    await asyncio.gather(*(drive(k, kern) for k, kern in enumerate(kernels)))
    return time.perf_counter() - t0, tally


def broker_round(sessions: list[RestSession], cells: int, rnd: int) -> tuple[float, Tally]:
    tally = Tally()
    barrier = threading.Barrier(len(sessions) + 1)

    def drive(k: int, s: RestSession):
        barrier.wait()
        for j in range(cells):
            t = time.perf_counter()
            try:
                r = s.execute(f"x = {value(rnd, k, j)} * 2; x")
                result = r.get("result")
                error = None if r.get("status") == "success" else str(r.get("error"))[:200]
            except Exception as exc:  # noqa: BLE001
                result, error = None, repr(exc)[:200]
            tally.check(rnd, k, j, result, error, len(sessions), time.perf_counter() - t)

    threads = [threading.Thread(target=drive, args=(k, s)) for k, s in enumerate(sessions)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, tally


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class CpuMeter:
    """CPU seconds used during a round by the client (this process), the
    broker process, the kernels' processes, and everything else on the
    machine; plus the machine's idle share."""

    def __init__(self, broker_pid: int | None, kernel_pids: list[int]):
        self.groups = {"client (this script)": [os.getpid()],
                       "broker process": [broker_pid] if broker_pid else [],
                       "kernels": kernel_pids}

    def __enter__(self):
        import psutil

        self.t0 = {k: cpu_seconds(v) for k, v in self.groups.items()}
        self.m0 = psutil.cpu_times()
        return self

    def __exit__(self, *exc):
        import psutil

        m1 = psutil.cpu_times()
        self.used = {k: cpu_seconds(v) - self.t0[k] for k, v in self.groups.items()}
        busy = lambda m: sum(m) - m.idle - getattr(m, "iowait", 0.0)  # noqa: E731
        total_busy = busy(m1) - busy(self.m0)
        wall_cpu = sum(m1) - sum(self.m0)
        self.used["everything else"] = max(0.0, total_busy - sum(self.used.values()))
        self.idle_share = 1 - total_busy / wall_cpu if wall_cpu > 0 else 0.0


def make_sessions(broker: Broker, n: int) -> list[RestSession]:
    """n sessions, started two at a time (untimed)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(lambda _: RestSession(broker), range(n)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 sessions x 10 cells, 2 rounds")
    p.add_argument("--sessions", type=int, default=0)
    p.add_argument("--cells", type=int, default=0)
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--diagnose", action="store_true",
                   help="also a broker whose Transcript._save is a no-op (diagnostic launcher)")
    p.add_argument("--profile", default="", metavar="FILE",
                   help="sample the broker process with py-spy during its rounds (collapsed stacks to FILE) "
                        "and print the functions where it spent its time")
    p.add_argument("--json", default="", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    n = args.sessions or (5 if args.quick else 20)
    cells = args.cells or (10 if args.quick else 50)
    rounds = args.rounds or (2 if args.quick else 3)

    info = env_info()
    print_env(f"concurrency: {n} sessions x {cells} cells at once, {rounds} rounds of each target "
              "(random order per round)", info)
    print("before: " + machine_quiet(), flush=True)
    loop = asyncio.new_event_loop()
    kernels: list[RawKernel] = []
    brokers: list[Broker] = []
    targets: dict = {}
    results: dict = {}
    rng = random.Random(1)
    try:
        for _ in range(n):
            k = RawKernel()
            kernels.append(k)
            loop.run_until_complete(k.start())
        targets[RAW] = lambda rnd: loop.run_until_complete(raw_round(kernels, cells, rnd))
        meters = {RAW: lambda: CpuMeter(None, [k.pid for k in kernels])}
        extra = [f"--SessionManager.max_sessions_per_owner={n}", f"--SessionManager.max_sessions={max(n, 100)}"]
        for name, diag in [(BROKER, False)] + ([(DIAG, True)] if args.diagnose else []):
            b = Broker(0, *extra, prelude=NO_TRANSCRIPT if diag else "")
            brokers.append(b)
            b.start()
            sessions = make_sessions(b, n)
            targets[name] = (lambda ss: lambda rnd: broker_round(ss, cells, rnd))(sessions)
            meters[name] = (lambda bb, ss: lambda: CpuMeter(
                bb.proc.pid, [pid for s in ss for pid in session_pids(bb.proc.pid, s.id)]))(b, sessions)
        quiet_pids = [k.pid for k in kernels] + [b.proc.pid for b in brokers]
        # warm-up: one round everywhere, untimed
        for name, fn in targets.items():
            _, t = fn(0)
            if t.errors:
                raise RuntimeError(f"{name} warm-up: {t.errors[:3]}")
        for name in targets:
            results[name] = []
        for rnd in range(1, rounds + 1):
            order = list(targets)
            rng.shuffle(order)
            for name in order:
                wait_quiet(quiet_pids + _session_kernel_pids(brokers), polls=5, interval=0.1, timeout=60)
                spy = _py_spy(brokers[0].proc.pid, args.profile, rnd) if args.profile and name == BROKER else None
                with meters[name]() as meter:
                    wall, tally = targets[name](rnd)
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(60)
                results[name].append({"wall": wall, "throughput": n * cells / wall, "errors": len(tally.errors),
                                      "crosstalk": tally.crosstalk, "first_errors": tally.errors[:5],
                                      "latency": summary(tally.lat),
                                      "cpu_ms_per_cell": {k: v * 1e3 / (n * cells) for k, v in meter.used.items()},
                                      "idle_share": meter.idle_share})
                print(f"round {rnd} {name}: {n * cells} cells in {wall:.2f} s = {n * cells / wall:.0f} cells/s, "
                      f"errors {len(tally.errors)}, cross-talk {tally.crosstalk}, cell p50 "
                      f"{statistics.median(tally.lat) * 1e3:.1f} ms", flush=True)
    finally:
        for k in kernels:
            loop.run_until_complete(k.stop())
        loop.close()
        for b in brokers:
            b.stop()

    print(f"\n{'target':<34} {'cells/s p50':>12} {'min':>7} {'max':>7} {'cell p50 ms':>12} {'cell p99 ms':>12} "
          f"{'errors':>7} {'x-talk':>7}")
    for name, rs in results.items():
        tp = [r["throughput"] for r in rs]
        print(f"{name:<34} {statistics.median(tp):>12.0f} {min(tp):>7.0f} {max(tp):>7.0f} "
              f"{statistics.median(r['latency']['median'] for r in rs) * 1e3:>12.1f} "
              f"{statistics.median(r['latency']['p99'] for r in rs) * 1e3:>12.1f} "
              f"{sum(r['errors'] for r in rs):>7} {sum(r['crosstalk'] for r in rs):>7}")
    groups = list(results[RAW][0]["cpu_ms_per_cell"])
    print(f"\nCPU per cell, ms (median over rounds; {os.cpu_count()} cores): " + ", ".join(groups)
          + ", total; and the machine's idle share during the round")
    for name, rs in results.items():
        cells_ = [statistics.median(r["cpu_ms_per_cell"][g] for r in rs) for g in groups]
        print(f"  {name:<34} " + "  ".join(f"{v:6.2f}" for v in cells_) + f"  = {sum(cells_):6.2f}"
              f"   idle {statistics.median(r['idle_share'] for r in rs) * 100:4.1f} %")
    raw_tp = statistics.median(r["throughput"] for r in results[RAW])
    ok_all = True
    for name in [x for x in results if x != RAW]:
        tp = statistics.median(r["throughput"] for r in results[name])
        errors = sum(r["errors"] for r in results[name])
        xt = sum(r["crosstalk"] for r in results[name])
        per_round = [b["throughput"] / a["throughput"] for a, b in zip(results[RAW], results[name])]
        ratio = tp / raw_tp
        ok = ratio >= TARGET and errors == 0 and xt == 0
        verdict = "" if name == DIAG else f"; target >= {TARGET}, zero errors, zero cross-talk: {'PASS' if ok else 'FAIL'}"
        if name != DIAG:
            ok_all = ok
        print(f"{name} / raw throughput (medians): {ratio:.2f} (per round: "
              f"{', '.join(f'{x:.2f}' for x in per_round)}){verdict}")
    for name, rs in results.items():
        for r in rs:
            if r["first_errors"]:
                print(f"{name} errors: {r['first_errors']}")
    if args.profile:
        print_profile(args.profile, rounds)
    print("after: " + machine_quiet())
    broker_cpu = statistics.median(r["cpu_ms_per_cell"]["broker process"] for r in results[BROKER])
    print(f"broker CPU per small REST call (broker process CPU time / calls, median of rounds): {broker_cpu:.2f} ms; "
          f"target <= {CPU_TARGET_MS} ms: {'PASS' if broker_cpu <= CPU_TARGET_MS else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"versions": info, "sessions": n, "cells": cells, "rounds": rounds, "results": results,
                       "ratio": statistics.median(r["throughput"] for r in results[BROKER]) / raw_tp,
                       "per_round": [b["throughput"] / a["throughput"] for a, b in zip(results[RAW], results[BROKER])],
                       "broker_cpu_ms_per_call": broker_cpu, "pass": ok_all}, fh, indent=1)
    return 0


def _py_spy(pid: int, path: str, rnd: int):
    """py-spy sampling the broker (the thread holding the GIL: Python work, not waits) into
    collapsed stacks, one file per round."""
    import shutil
    import subprocess

    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                             "--output", f"{path}.{rnd}", "--threads", "--gil", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)   # py-spy attaches
    return proc


def print_profile(path: str, rounds: int, top: int = 25) -> None:
    """Self and inclusive sample shares per function over every round's
    collapsed stacks (py-spy's raw format: frames joined by ';', then a count)."""
    import collections

    own, incl, total = collections.Counter(), collections.Counter(), 0
    lines = []
    for rnd in range(1, rounds + 1):
        try:
            with open(f"{path}.{rnd}") as fh:
                lines += fh.read().splitlines()
        except OSError:
            continue
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/site-packages/")[-1]
                  .split("/c-cpu/")[-1] + ")" if " (" in f else f for f in stack.split(";")[1:]]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        print("profile: no samples")
        return
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"\nprofile of the broker process ({total} samples, the thread holding the GIL):")
    print(f"  {'self %':>7} {'incl %':>7}  function (file)")
    for f, n in own.most_common(top):
        print(f"  {n * 100 / total:7.1f} {incl[f] * 100 / total:7.1f}  {f}")
    print("  inclusive, top:")
    for f, n in incl.most_common(top):
        print(f"  {own[f] * 100 / total:7.1f} {n * 100 / total:7.1f}  {f}")


def _session_kernel_pids(brokers: list[Broker]) -> list[int]:
    out = []
    for b in brokers:
        for meta in os.listdir(b.data_root) if os.path.isdir(b.data_root) else []:
            out += session_pids(b.proc.pid, meta)
    return out


if __name__ == "__main__":
    sys.exit(main())
