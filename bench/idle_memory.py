"""Memory of N idle sessions with pandas and matplotlib imported, against N
raw plain ipykernels with the same imports, in one run; and how many such
sessions fit in this machine's RAM.

Targets (docs/PERFORMANCE.md): first round >= 150 idle sessions held on
this 24 GiB machine, each with pandas and matplotlib imported; second round
(issue 12) >= 400 by the fall in MemAvailable, moonshot 500.

  A  raw: N plain ipykernels (AsyncKernelManager, ipc), each running
     ``import numpy, pandas, matplotlib, matplotlib.pyplot``
  B  broker: a real ``broker serve`` (warm pool off, so that exactly N
     kernels run) with N sessions, each running the same import through
     ExecutePythonCode (what the pool's preload runs)

The groups are measured one after the other, each alone (PSS divides a shared
page among everything that maps it: with both groups alive the figures would
depend on the other group).  Once every kernel has been idle (no CPU tick)
for 1 s, each session's or kernel's process tree is read with psutil's
``memory_full_info``: RSS, PSS and USS summed over the tree.  A session's tree
is every process in its kernel cgroup (``broker-sandboxes/k-<session id>``):
the outer bwrap and the kernel.  A raw kernel's tree is its process and its
children (none).  Also: the session's cgroup memory usage (page cache and
tmpfs included), the growth of the broker process's own USS, and MemAvailable
before and after (everything the machine lost, per session).

Fit in RAM (MemTotal of this machine), three ways:
  by PSS:      MemTotal / (PSS + broker growth), per session (sharing as at N)
  marginal:    (MemTotal - the shared pages, once) / (USS + broker growth + the
               memory outside processes: MemAvailable drop - PSS - broker growth)
  by MemAvailable: MemTotal / (MemAvailable drop / N)
The verdict uses the smallest of the three.

    python bench/idle_memory.py              # N = 20
    python bench/idle_memory.py --quick      # N = 5
    python bench/idle_memory.py --count 30

Density options (issue 12), each a broker variant measured alone, one after
the other, in the same run (B only; A with --with-raw):

  base           the broker as configured by default
  freeze         the same import followed by ``gc.freeze()``
  merge          SandboxSettings.memory_merge (KSM, PR_SET_MEMORY_MERGE)
  merge+fixed    merge and SandboxSettings.fixed_layout (no address randomisation)
  merge+fixed+freeze

    python bench/idle_memory.py --count 10 --variants base,freeze,merge,merge+fixed,merge+fixed+freeze

For merge variants the bench sets ksmd's pages_to_scan (--ksm-pages, through
SandboxSettings.ksm_pages_to_scan), waits until ksmd finished two full scans
after the last session settled (at most --ksm-wait s), and reports the pages
merged and ksmd's CPU time: while merging, and per second once merged (its
steady cost at that scan rate).  The host's KSM settings are restored at the
end (merged pages are unmerged between variants).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _session_common import (  # noqa: E402
    Broker,
    RawKernel,
    RestSession,
    env_info,
    machine_quiet,
    meminfo,
    print_env,
    session_cgroup_memory,
    session_pids,
    wait_quiet,
)

IMPORT = "import numpy, pandas, matplotlib, matplotlib.pyplot"
TARGET = 150
TARGET2 = 400
MiB = 1 << 20


def tree_memory(pids: list[int]) -> dict:
    out = {"rss": 0, "pss": 0, "uss": 0, "procs": 0}
    for pid in pids:
        try:
            m = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out["rss"] += m.rss
        out["pss"] += m.pss
        out["uss"] += m.uss
        out["procs"] += 1
    return out


def own_memory(pid: int) -> dict:
    m = psutil.Process(pid).memory_full_info()
    return {"rss": m.rss, "pss": m.pss, "uss": m.uss}


def settle(pids: list[int]) -> None:
    wait_quiet(pids, polls=10, interval=0.1, timeout=120)
    time.sleep(1.0)


def measure_raw(n: int) -> dict:
    loop = asyncio.new_event_loop()
    kernels: list[RawKernel] = []
    avail0 = meminfo()["MemAvailable"]
    try:
        for i in range(n):
            k = RawKernel()
            kernels.append(k)
            loop.run_until_complete(k.start())
            _, _, err = loop.run_until_complete(k.execute(IMPORT))
            if err:
                raise RuntimeError(f"raw kernel {i}: {err}")
        trees = []
        for k in kernels:
            p = psutil.Process(k.pid)
            trees.append([k.pid] + [c.pid for c in p.children(recursive=True)])
        settle([pid for t in trees for pid in t])
        per = [tree_memory(t) for t in trees]
        avail1 = meminfo()["MemAvailable"]
    finally:
        for k in kernels:
            loop.run_until_complete(k.stop())
        loop.close()
    return {"per": per, "avail_drop": avail0 - avail1}


KSM = "/sys/kernel/mm/ksm"
VARIANTS = {
    "base": ([], ""),
    "freeze": ([], "; import gc; gc.freeze()"),
    "merge": (["--SandboxProvisioner.memory_merge=True"], ""),
    "merge+fixed": (["--SandboxProvisioner.memory_merge=True", "--SandboxProvisioner.fixed_layout=True"], ""),
    "merge+fixed+freeze": (["--SandboxProvisioner.memory_merge=True", "--SandboxProvisioner.fixed_layout=True"],
                           "; import gc; gc.freeze()"),
    "fixed+freeze": (["--SandboxProvisioner.fixed_layout=True"], "; import gc; gc.freeze()"),
}


def ksm_read(name: str) -> int:
    with open(os.path.join(KSM, name)) as fh:
        return int(fh.read())


def ksm_write(name: str, value) -> None:
    with open(os.path.join(KSM, name), "w") as fh:
        fh.write(str(value))


def ksmd_cpu() -> float:
    """ksmd's CPU seconds so far."""
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "ksmd":
            t = p.cpu_times()
            return t.user + t.system
    return 0.0


def ksm_settle(max_wait: float) -> dict:
    """Wait for two full ksmd scans (and pages_sharing to stop growing)."""
    t0, cpu0, scans0 = time.monotonic(), ksmd_cpu(), ksm_read("full_scans")
    last = -1
    while time.monotonic() - t0 < max_wait:
        time.sleep(2)
        sharing = ksm_read("pages_sharing")
        if ksm_read("full_scans") >= scans0 + 2 and sharing == last:
            break
        last = sharing
    merged = {"merge_seconds": time.monotonic() - t0, "ksmd_cpu_merging": ksmd_cpu() - cpu0}
    c1 = ksmd_cpu()
    time.sleep(10)
    merged["ksmd_cpu_per_s_steady"] = (ksmd_cpu() - c1) / 10
    merged.update({k: ksm_read(k) for k in ("pages_shared", "pages_sharing", "pages_unshared", "full_scans")})
    return merged


def cgroup_anon(broker_pid: int, sid: str) -> int:
    """The session's kernel cgroup's anonymous memory (v1 memory.stat rss, v2 anon)."""
    from _session_common import _cgroup_paths
    paths = _cgroup_paths(broker_pid)
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        own = paths.get("", "/").rstrip("/").removesuffix("/broker-main")
        f, key = os.path.join("/sys/fs/cgroup", own.lstrip("/"), "broker-sandboxes", f"k-{sid}", "memory.stat"), "anon"
    else:
        f, key = (os.path.join("/sys/fs/cgroup/memory", paths.get("memory", "/").lstrip("/"), "broker-sandboxes",
                               f"k-{sid}", "memory.stat"), "rss")
    try:
        with open(f) as fh:
            for line in fh:
                k, v = line.split()
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def measure_broker(n: int, variant: str = "base", ksm_pages: int = 5000, ksm_wait: float = 240) -> dict:
    extra, suffix = VARIANTS[variant]
    merge = any("memory_merge" in a for a in extra)
    if merge:
        extra = extra + [f"--SandboxProvisioner.ksm_pages_to_scan={ksm_pages}"]
    broker = Broker(0, f"--SessionManager.max_sessions_per_owner={n}",
                    f"--SessionManager.max_sessions={max(n, 100)}", *extra).start()
    try:
        time.sleep(1.0)
        own0 = own_memory(broker.proc.pid)
        avail0 = meminfo()["MemAvailable"]
        http = broker.http()
        sessions = []
        for i in range(n):
            s = RestSession(broker, http)
            sessions.append(s)
            r = s.execute(IMPORT + suffix)
            if r.get("status") != "success":
                raise RuntimeError(f"session {i}: {str(r)[:300]}")
        trees = [session_pids(broker.proc.pid, s.id) for s in sessions]
        if not all(trees):
            raise RuntimeError("could not find every session's kernel cgroup")
        settle([pid for t in trees for pid in t] + [broker.proc.pid])
        ksm = ksm_settle(ksm_wait) if merge else {}
        per = [tree_memory(t) for t in trees]
        for s, m in zip(sessions, per):
            m["cgroup"] = session_cgroup_memory(broker.proc.pid, s.id) or 0
            m["cgroup_anon"] = cgroup_anon(broker.proc.pid, s.id)
        own1 = own_memory(broker.proc.pid)
        avail1 = meminfo()["MemAvailable"]
        http.close()
    finally:
        broker.stop()   # SIGTERM: the broker stops every kernel and unmounts; the folder is removed
    return {"per": per, "avail_drop": avail0 - avail1, "broker_before": own0, "broker_after": own1,
            "variant": variant, "ksm": ksm}


def verdict(by_avail: float, by_cgroup: float) -> str:
    """PASS/FAIL by the fall in MemAvailable, unless the session's own
    cgroups disagree by more than a quarter (other processes moved
    MemAvailable meanwhile: no verdict)."""
    if by_cgroup > 0 and abs(by_avail - by_cgroup) / by_cgroup > 0.25:
        return (f"NO VERDICT (the two differ by {abs(by_avail - by_cgroup) / by_cgroup:.0%}: something else on the "
                "machine moved MemAvailable; by the cgroups alone: "
                f"{'PASS' if by_cgroup >= TARGET2 else 'FAIL'})")
    return "PASS" if by_avail >= TARGET2 else "FAIL"


def variant_lines(n: int, results: list[dict], total: int) -> list[str]:
    lines = [f"\ndensity options: {n} idle sessions each, measured alone one after the other (MiB per session; "
             "fit = sessions per MemTotal)",
             f"{'variant':<20} {'PSS':>7} {'USS':>7} {'cg anon':>8} {'cg all':>7} {'MemAvail':>9} "
             f"{'fit MemAv':>10} {'fit PSS':>8} {'fit cg':>7}  KSM"]
    for res in results:
        per = res["per"]
        f = fit(res, n, total)
        pss = statistics.mean(m["pss"] for m in per)
        uss = statistics.mean(m["uss"] for m in per)
        anon = statistics.mean(m["cgroup_anon"] for m in per)
        cg = statistics.mean(m["cgroup"] for m in per)
        k = res.get("ksm") or {}
        ksm = (f"saved {k['pages_sharing'] * 4096 / MiB / n:.1f} MiB/session, {k['merge_seconds']:.0f} s and "
               f"{k['ksmd_cpu_merging']:.1f} s CPU to merge, then {k['ksmd_cpu_per_s_steady'] * 100:.1f} % of a core"
               if k else "")
        lines.append(f"{res['variant']:<20} {pss / MiB:>7.1f} {uss / MiB:>7.1f} {anon / MiB:>8.1f} {cg / MiB:>7.1f} "
                     f"{f['avail_drop_per_session'] / MiB:>9.1f} {f['by_memavailable']:>10.0f} {f['by_pss']:>8.0f} "
                     f"{total / (cg + f['broker_per_session']):>7.0f}  {ksm}")
    lines.append("(MemAvail: the fall in MemAvailable per session, which other processes on a shared machine also "
                 "move; cg: the session's kernel cgroup memory, a cross-check that only counts the session)")
    for res in results:
        f = fit(res, n, total)
        cg = total / (statistics.mean(m["cgroup"] for m in res["per"]) + f["broker_per_session"])
        lines.append(f"second-round target >= {TARGET2} sessions, {res['variant']}: by the fall in MemAvailable "
                     f"{f['by_memavailable']:.0f}, by the sessions' cgroups {cg:.0f}: {verdict(f['by_memavailable'], cg)}")
    return lines


def med(per: list[dict], key: str) -> float:
    return statistics.median(m[key] for m in per)


def fit(res: dict, n: int, total: int) -> dict:
    per = res["per"]
    pss, uss = statistics.mean(m["pss"] for m in per), statistics.mean(m["uss"] for m in per)
    broker = 0.0
    if "broker_after" in res:
        broker = max(0.0, (res["broker_after"]["uss"] - res["broker_before"]["uss"]) / n)
    drop = res["avail_drop"] / n
    shared_once = sum(m["pss"] - m["uss"] for m in per)
    outside = max(0.0, drop - pss - broker)
    out = {"by_pss": total / (pss + broker),
           "marginal": (total - shared_once) / (uss + broker + outside),
           "by_memavailable": total / drop if drop > 0 else float("inf"),
           "broker_per_session": broker, "avail_drop_per_session": drop, "outside_per_session": outside,
           "shared_once": shared_once}
    out["verdict_fit"] = min(out["by_pss"], out["marginal"], out["by_memavailable"])
    return out


def report(n: int, raw: dict, brk: dict, total: int) -> tuple[dict, list[str]]:
    lines = [f"\nper session / kernel (process tree), MiB: median [min - max] over {n}"]
    rows = [("A raw plain ipykernel", raw), ("B broker session", brk)]
    keys = ["rss", "pss", "uss"] + (["cgroup"] if brk["per"] and "cgroup" in brk["per"][0] else [])
    head = f"{'':<24}" + "".join(f"{k.upper() if k != 'cgroup' else 'cgroup mem':>26}" for k in keys) + f"{'procs':>7}"
    lines.append(head)
    for name, res in rows:
        cells = []
        for k in keys:
            if k not in res["per"][0]:
                cells.append(f"{'':>26}")
                continue
            v = [m[k] / MiB for m in res["per"]]
            cells.append(f"{statistics.median(v):>9.1f} [{min(v):6.1f} - {max(v):6.1f}]")
        lines.append(f"{name:<24}" + "".join(cells) + f"{res['per'][0]['procs']:>7}")
    r_b = {k: med(brk["per"], k) / med(raw["per"], k) for k in ("rss", "pss", "uss")}
    lines.append("ratio B/A (medians): " + ", ".join(f"{k.upper()} {v:.2f}" for k, v in r_b.items()))
    fits = {"A": fit(raw, n, total), "B": fit(brk, n, total)}
    b = brk
    lines.append(f"broker process: USS {b['broker_before']['uss'] / MiB:.1f} -> {b['broker_after']['uss'] / MiB:.1f} MiB "
                 f"(RSS {b['broker_before']['rss'] / MiB:.1f} -> {b['broker_after']['rss'] / MiB:.1f}): "
                 f"{fits['B']['broker_per_session'] / MiB:.2f} MiB per session")
    lines.append(f"MemAvailable drop per session: A {fits['A']['avail_drop_per_session'] / MiB:.1f} MiB, "
                 f"B {fits['B']['avail_drop_per_session'] / MiB:.1f} MiB (memory outside the processes: "
                 f"A {fits['A']['outside_per_session'] / MiB:.1f}, B {fits['B']['outside_per_session'] / MiB:.1f} MiB)")
    lines.append(f"\nfit in MemTotal {total / (1 << 30):.1f} GiB:      {'by PSS':>8} {'marginal':>9} {'by MemAvail':>12}")
    for key, label in (("A", "A raw plain ipykernels"), ("B", "B broker sessions")):
        f = fits[key]
        lines.append(f"  {label:<30} {f['by_pss']:>8.0f} {f['marginal']:>9.0f} {f['by_memavailable']:>12.0f}")
    v = fits["B"]["verdict_fit"]
    lines.append(f"target >= {TARGET} sessions: smallest estimate {v:.0f}: {'PASS' if v >= TARGET else 'FAIL'}")
    m = fits["B"]["by_memavailable"]
    cg = total / (statistics.mean(x["cgroup"] for x in brk["per"]) + fits["B"]["broker_per_session"])
    lines.append(f"second-round target >= {TARGET2} sessions by the fall in MemAvailable: {m:.0f}, by the sessions' "
                 f"kernel cgroups {cg:.0f}: {verdict(m, cg)}")
    return {"ratio_b_a": r_b, "fits": fits}, lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 sessions instead of 20")
    p.add_argument("--count", type=int, default=0, help="sessions (and raw kernels); default 20, --quick 5")
    p.add_argument("--broker-first", action="store_true", help="measure the broker's group first")
    p.add_argument("--json", default="", help="also write the raw figures to this file")
    p.add_argument("--variants", default="", help=f"comma-separated density variants ({', '.join(VARIANTS)})")
    p.add_argument("--with-raw", action="store_true", help="with --variants: also measure raw kernels (A)")
    p.add_argument("--ksm-pages", type=int, default=5000, help="ksmd pages_to_scan for merge variants")
    p.add_argument("--ksm-wait", type=float, default=240, help="longest wait for ksmd to merge (s)")
    args = p.parse_args(argv)
    n = args.count or (5 if args.quick else 20)
    if not 1 <= n <= 100:
        p.error("--count: 1 to 100 (bounded: every kernel holds ~100 MiB)")
    if args.variants:
        return run_variants(args, n)

    info = env_info()
    total = meminfo()["MemTotal"]
    print_env(f"idle_memory: {n} idle sessions against {n} raw kernels, each after `{IMPORT}`", info)
    print("before: " + machine_quiet(), flush=True)
    if args.broker_first:
        brk = measure_broker(n)
        raw = measure_raw(n)
    else:
        raw = measure_raw(n)
        brk = measure_broker(n)
    summary_, lines = report(n, raw, brk, total)
    print("\n".join(lines))
    print("after: " + machine_quiet())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"versions": info, "count": n, "mem_total": total, "raw": raw, "broker": brk, **summary_},
                      fh, indent=1)
    return 0


def run_variants(args, n: int) -> int:
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        print(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
        return 2
    info = env_info()
    total = meminfo()["MemTotal"]
    print_env(f"idle_memory: density variants {names}, {n} idle sessions each, after `{IMPORT}`", info)
    print("before: " + machine_quiet(), flush=True)
    saved = {k: ksm_read(k) for k in ("run", "pages_to_scan", "sleep_millisecs")}
    results = []
    try:
        raw = measure_raw(n) if args.with_raw else None
        for v in names:
            if saved["run"] != 2:
                ksm_write("run", 2)     # unmerge what an earlier variant merged
                time.sleep(1)
                ksm_write("run", 0)
            results.append(measure_broker(n, v, args.ksm_pages, args.ksm_wait))
            print("\n".join(variant_lines(n, results[-1:], total)[2:3]), flush=True)
    finally:
        if saved["run"] != 1:
            ksm_write("run", 2)
            time.sleep(1)
        for k in ("pages_to_scan", "sleep_millisecs", "run"):
            ksm_write(k, saved[k])
    lines = variant_lines(n, results, total)
    if raw:
        f = fit(raw, n, total)
        lines.append(f"A raw plain ipykernels: PSS {statistics.mean(m['pss'] for m in raw['per']) / MiB:.1f} MiB, "
                     f"MemAvailable fall {f['avail_drop_per_session'] / MiB:.1f} MiB per kernel")
    print("\n".join(lines))
    print("after: " + machine_quiet())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"versions": info, "count": n, "mem_total": total, "raw": raw, "variants": results}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
