"""Run every benchmark script in bench/, one after the other.

    python bench/run_all.py            # full runs
    python bench/run_all.py --quick    # smoke runs (--quick is passed to each script)

Each script prints its own table.  Scripts are the ``*.py`` files in this
folder except this one and names starting with ``_``.  The exit status is
non-zero if any script failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def scripts() -> list[str]:
    me = os.path.basename(__file__)
    return sorted(f for f in os.listdir(HERE)
                  if f.endswith(".py") and f != me and not f.startswith("_"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every script")
    args = p.parse_args(argv)
    failed = []
    for name in scripts():
        cmd = [sys.executable, os.path.join(HERE, name)] + (["--quick"] if args.quick else [])
        print(f"==> {name}{' --quick' if args.quick else ''}", flush=True)
        t = time.monotonic()
        rc = subprocess.call(cmd)
        print(f"<== {name}: exit {rc} after {time.monotonic() - t:.0f} s\n", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
