"""``1+1`` in a session holding 20,000 files against the same in an empty
session, interleaved in one run: the cost of a call must not grow with the
files in /mnt/data.

Target (issue 8): p50 ratio full / empty <= 1.2.

One real ``broker serve`` (warm pool off), two sessions over REST (keep-alive
requests.Session each):

  empty   a session whose /mnt/data is empty
  full    a session whose /mnt/data holds --files files (default 20,000, in
          20 folders of 1,000, written by one ExecutePythonCode call before
          measuring; that call's own time and its ``files_changed`` are
          printed too)

Each round runs ``1+1`` (ExecutePythonCode) once in each session, in a random
order, timed from the client (request sent to response read); --warmup rounds
first, not counted.  With --diagnose, a second broker with
``--ChangeTracking.method=walk`` (the fallback: one walk of the folder per
call) is measured the same way, for comparison.

    python bench/files_scaling.py            # 200 rounds
    python bench/files_scaling.py --quick    # 30 rounds
    python bench/files_scaling.py --diagnose # + the walk fallback
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _exec_common import summary, table  # noqa: E402
from _session_common import Broker, RestSession, env_info, machine_quiet, print_env  # noqa: E402

TARGET = 1.2
FILL = """
import os
for d in range({folders}):
    os.makedirs(f'/mnt/data/set{{d:02d}}', exist_ok=True)
    for i in range({per}):
        with open(f'/mnt/data/set{{d:02d}}/f{{i:05d}}.csv', 'w') as fh:
            fh.write('a,b\\n1,2\\n')
"""


def timed(s: RestSession, code: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = s.execute(code)
    dt = time.perf_counter() - t0
    if r.get("status") != "success":
        raise RuntimeError(f"{code!r} failed: {r.get('error')}")
    return dt, r


def measure(label: str, n: int, warmup: int, files: int, extra: list[str], seed: int) -> dict:
    b = Broker(0, *extra).start()
    try:
        empty, full = RestSession(b), RestSession(b)
        folders = max(1, files // 1000)
        fill_s, r = timed(full, FILL.format(folders=folders, per=files // folders))
        fill = {"seconds": fill_s, "files_changed": r.get("files_changed"), "result_bytes": len(json.dumps(r))}
        print(f"{label}: filling 'full' took {fill_s:.2f} s; files_changed {r.get('files_changed')}", flush=True)
        targets = {"empty": empty, "full": full}
        times: dict[str, list[float]] = {k: [] for k in targets}
        rng = random.Random(seed)
        for i in range(warmup + n):
            order = list(targets)
            rng.shuffle(order)
            for name in order:
                dt, r = timed(targets[name], "1+1")
                if r.get("files_changed", {}).get("count", 0):
                    raise RuntimeError(f"1+1 reported changed files: {r.get('files_changed')}")
                if i >= warmup:
                    times[name].append(dt)
        empty.delete()
        full.delete()
        return {"fill": fill, "times": times}
    finally:
        b.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="30 rounds instead of 200")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--diagnose", action="store_true", help="also a broker with ChangeTracking.method=walk")
    p.add_argument("--json", default="", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    n = args.rounds or (30 if args.quick else 200)
    warmup = 5 if args.quick else 20
    print_env(f"files_scaling: 1+1 in an empty session and in one holding {args.files} files, {n} rounds "
              f"interleaved in a random order ({warmup} warm-up rounds first)", env_info())
    print(machine_quiet(), flush=True)

    runs = {"inotify (default)": measure("inotify", n, warmup, args.files, [], 1)}
    if args.diagnose:
        runs["walk (fallback)"] = measure("walk", n, warmup, args.files, ["--ChangeTracking.method=walk"], 2)

    verdict = 0
    out = {}
    for label, run in runs.items():
        stats = {k: summary(v) for k, v in run["times"].items()}
        ratio = stats["full"]["median"] / stats["empty"]["median"]
        ratio99 = stats["full"]["p99"] / stats["empty"]["p99"]
        print(f"\n[{label}]")
        print(table([("1+1, empty session", stats["empty"]),
                     (f"1+1, session with {args.files} files", stats["full"])]))
        line = f"p50 ratio full/empty: {ratio:.2f} (p99 ratio {ratio99:.2f})"
        if label.startswith("inotify"):
            ok = ratio <= TARGET
            verdict = 0 if ok else 1
            line += f"; target <= {TARGET}: {'met' if ok else 'NOT met'}"
        print(line)
        out[label] = {"stats": stats, "ratio_p50": ratio, "ratio_p99": ratio99, "fill": run["fill"],
                      "times": run["times"]}
    print(machine_quiet())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env_info(), "n": n, "files": args.files, "runs": out}, fh, indent=1)
    return verdict


if __name__ == "__main__":
    sys.exit(main())
