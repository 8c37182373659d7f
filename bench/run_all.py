"""Run every benchmark script in bench/, print the table, write docs/benchmarks.md.

    python bench/run_all.py                 # full runs, then docs/benchmarks.md
    python bench/run_all.py --quick         # smoke runs (--quick is passed to each script)
    python bench/run_all.py --only concurrency,burst
    python bench/run_all.py --no-doc        # print only

Scripts are the ``*.py`` files in this folder except this one and names
starting with ``_``.  Each runs with ``--json bench/results/<name>.json``; its
output is shown as it runs and kept in ``bench/results/<name>.log``.  At the
end a table of every script's verdict lines (the lines saying PASS, FAIL or
naming a target) is printed, with the four figures of issue 12 on top (broker
CPU per small REST call and 20 x 50 throughput against raw jupyter_client,
RunShellCommand against a bare bwrap, idle sessions in 24 GiB, a burst of
session creates), and written into docs/benchmarks.md between the markers
``<!-- run_all:begin -->`` and ``<!-- run_all:end -->`` with the machine, the
versions and the date (scripts not run this time are shown from their latest
log in bench/results).  Everything else in that file (the hand-written
sections: how each figure is measured, profiles, earlier runs) is kept.  The
exit status is non-zero if any script failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DOC = os.path.join(REPO, "docs", "benchmarks.md")
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"
VERDICT = re.compile(r"PASS|FAIL|target|[Tt]arget", re.ASCII)


def scripts() -> list[str]:
    me = os.path.basename(__file__)
    return sorted(f for f in os.listdir(HERE)
                  if f.endswith(".py") and f != me and not f.startswith("_"))


def run(name: str, quick: bool) -> tuple[int, list[str], float]:
    """Run one script, echoing its output; returns (exit status, lines, seconds)."""
    stem = name[:-3]
    cmd = [sys.executable, os.path.join(HERE, name), "--json", os.path.join(RESULTS, stem + ".json")]
    if quick:
        cmd.append("--quick")
    print(f"==> {name}{' --quick' if quick else ''}", flush=True)
    t = time.monotonic()
    lines: list[str] = []
    with open(os.path.join(RESULTS, stem + ".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
    secs = time.monotonic() - t
    print(f"<== {name}: exit {rc} after {secs:.0f} s\n", flush=True)
    return rc, lines, secs


def load(stem: str) -> dict | None:
    try:
        with open(os.path.join(RESULTS, stem + ".json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def verdicts(lines: list[str], keep: int = 8) -> list[str]:
    out = [ln.strip() for ln in lines if VERDICT.search(ln)
           and not re.match(r"\s*(Target:|usage|target\s{2,}|\S+: \d+ \S+ per target)", ln)]
    return out[-keep:]


def headline(runs: dict) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, verdict) for the four figures of issue 12."""
    rows = []
    c = load("concurrency") if "concurrency.py" in runs else None
    if c and "ratio" in c:
        per_round = ", ".join(f"{x:.2f}" for x in c.get("per_round", []))
        rows.append((f"20 sessions × 50 cells ({c['sessions']} × {c['cells']} here), throughput vs raw jupyter_client",
                     f"**{c['ratio']:.2f}×** (rounds: {per_round})", "≥ 0.9×",
                     "met" if c["ratio"] >= 0.9 else "**missed**"))
        cpu = c["broker_cpu_ms_per_call"]
        rows.append(("broker CPU per small REST call (broker process CPU time / calls)", f"**{cpu:.2f} ms**",
                     "≤ 2 ms", "met" if cpu <= 2.0 else "**missed**"))
    # The default path's verdicts only (shell_command also prints the
    # fresh-sandbox path, shell_helper off, for comparison).
    for stem, figure, wanted, target in (
            ("shell_command", "`RunShellCommand` of `echo hi` over REST vs a bare bwrap (default: shell helper)",
             r"^REST RunShellCommand / bare", "≤ 2×"),
            ("idle_memory", "idle sessions in 24 GiB (pandas + matplotlib imported)",
             r"^second-round target", "≥ 400")):
        if stem + ".py" in runs:
            v = [ln for ln in verdicts(runs[stem + ".py"][1], keep=50) if re.search(wanted, ln)]
            met = bool(v) and all(ln.endswith("PASS") for ln in v)
            rows.append((figure, "<br>".join(v) or "(no verdict line)", target, "met" if met else "**missed**"))
    b = load("burst") if "burst.py" in runs else None
    if b and b.get("results", {}).get("first", {}).get("ready"):
        f = b["results"]["first"]
        s = b["results"].get("second", {})
        second = (f"; a second burst, the pool grown: p50 {s['ready']['median'] * 1e3:.0f} ms, "
                  f"p99 {s['ready']['p99'] * 1e3:.0f} ms") if s.get("ready") else ""
        rows.append((f"burst of {b['count']} `POST /api/sessions` + first cell, default pool {b['pool']}",
                     f"ready p50 **{f['ready']['median'] * 1e3:.0f} ms**, p99 **{f['ready']['p99'] * 1e3:.0f} ms**, "
                     f"errors {f['errors']}{second}", "p50 ≤ 100 ms, p99 ≤ 2 s, no errors",
                     "met" if f.get("pass") else "**missed**"))
    return rows


def machine() -> str:
    sys.path.insert(0, HERE)
    from _session_common import env_info

    info = env_info()
    return ", ".join(f"{k} {v}" for k, v in info.items())


def render(runs: dict, quick: bool) -> str:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [BEGIN, f"## Latest `make bench` run ({date}{', --quick' if quick else ''})", "",
           f"Machine and versions: {machine()}.", "",
           "Rendered by `bench/run_all.py` from each script's output (the sections after this one are "
           "hand-written and say how each figure is measured).", ""]
    rows = headline(runs)
    if rows:
        out += ["| issue 12 figure | measured (same run as its anchor) | target | |", "|---|---|---|---|"]
        out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        out.append("")
    out += ["| script | exit | time | verdict lines |", "|---|---|---|---|"]
    for name, (rc, lines, secs) in runs.items():
        v = "<br>".join(x.replace("|", "/") for x in verdicts(lines)) or "(no verdict line)"
        out.append(f"| `{name}` | {rc} | {f'{secs:.0f} s' if secs else ''} | {v} |")
    out += ["", END]
    return "\n".join(out)


def write_doc(block: str) -> None:
    with open(DOC) as fh:
        text = fh.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        # After the introduction, before the first section.
        i = text.find("\n## ")
        text = text[:i + 1] + block + "\n\n" + text[i + 1:] if i >= 0 else text + "\n" + block + "\n"
    with open(DOC, "w") as fh:
        fh.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every script")
    p.add_argument("--only", default="", help="comma-separated script names (without .py) to run")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    chosen = scripts()
    if args.only:
        want = {x.strip().removesuffix(".py") for x in args.only.split(",") if x.strip()}
        chosen = [s for s in chosen if s[:-3] in want]
    runs = {name: run(name, args.quick) for name in chosen}
    failed = [n for n, (rc, _, _) in runs.items() if rc != 0]
    # Scripts not run this time keep their latest results (bench/results/<name>.log).
    for name in scripts():
        log = os.path.join(RESULTS, name[:-3] + ".log")
        if name not in runs and os.path.exists(log):
            with open(log) as fh:
                runs[name] = ("earlier run", fh.read().splitlines(), 0.0)
    runs = dict(sorted(runs.items()))
    block = render(runs, args.quick)
    print(block)
    if not args.no_doc:
        write_doc(block)
        print(f"wrote {os.path.relpath(DOC, REPO)}")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
