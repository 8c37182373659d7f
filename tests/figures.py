"""Figures that reliability and load tests measure, for docs/reliability.md.

A test calls ``record("fault: SIGKILL kernel mid-execution", calls=20,
errors=0, seconds=1.4, ...)``.  When the environment variable
``BROKER_FIGURES_FILE`` names a file, one JSON line per call is appended to
it; otherwise the call does nothing, so plain ``make test`` writes nothing.
``make reliability`` sets the variable, runs the tests (short and long
versions) and renders the lines into the table of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import time

ENV = "BROKER_FIGURES_FILE"


def record(name: str, **figures) -> None:
    """Append one row of figures named *name* (keys and values JSON-able)."""
    path = os.environ.get(ENV)
    if not path:
        return
    row = {"name": name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], **figures}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=False, default=str) + "\n")


def load(path: str) -> list[dict]:
    """Every row recorded in *path*, in order; a missing file is no rows."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
