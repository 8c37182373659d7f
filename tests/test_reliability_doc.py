"""The renderer of docs/reliability.md (tests/reliability_doc.py): any keys,
bounds, the hand-written introduction kept, only the generated part replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests import reliability_doc
from tests.broker_server import REPO


def rows_file(tmp_path, rows) -> str:
    path = tmp_path / "figures.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_renders_any_keys_and_keeps_the_introduction(tmp_path):
    page = tmp_path / "reliability.md"
    page.write_text("# Reliability\n\nHand-written | intro.\n\n" + reliability_doc.MARKER + "\nold table\n")
    rows = [
        {"name": "fault: SIGKILL kernel", "at": "2026-12-03T11:00:00Z", "test": "tests/test_faults.py::t",
         "answered_s": 0.5123, "files_intact": True},
        {"name": "load: 50 sessions", "calls": 2000, "errors": 0, "per_call_ms": [1, 2], "odd|key": "a|b",
         "bounds": {"errors": {"max": 0}, "calls": 2000}},
        {"name": "no section here", "nested": {"x": 1}},
    ]
    status = reliability_doc.main([rows_file(tmp_path, rows), str(page)])
    text = page.read_text()
    assert status == 0
    head, generated = text.split(reliability_doc.MARKER)
    assert head == "# Reliability\n\nHand-written | intro.\n\n"
    assert "old table" not in generated
    assert "### fault" in generated and "### load" in generated and "### other" in generated
    assert "answered_s: 0.512" in generated and "files_intact: yes" in generated
    assert "errors: 0 (≤ 0)" in generated and "calls: 2000 (= 2000)" in generated
    assert "odd\\|key: a\\|b" in generated and 'nested: {"x":1}' in generated
    assert "`tests/test_faults.py::t`" in generated and "3 rows recorded" in generated
    # Run again: the same page, not a second table.
    assert reliability_doc.main([rows_file(tmp_path, rows), str(page)]) == 0
    assert page.read_text() == text


def test_missed_bound_fails_and_is_marked(tmp_path):
    page = tmp_path / "r.md"
    rows = [{"name": "load: x", "errors": 3, "bounds": {"errors": {"max": 0}}},
            {"name": "load: y", "ok": False},
            {"name": "load: z", "seconds": 1, "bounds": {"fds_after": {"max": 10}}}]
    r = subprocess.run([sys.executable, "-m", "tests.reliability_doc", rows_file(tmp_path, rows), str(page)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert "errors=3 > 0" in r.stderr and "marked not ok" in r.stderr and "fds_after: not recorded" in r.stderr
    text = page.read_text()
    assert text.startswith("# Reliability") and text.count("✗") == 3 and "| ✗ errors=3 > 0 |" in text
    assert "3 missed a bound" in r.stdout


def test_no_rows_and_bad_arguments(tmp_path):
    page = tmp_path / "r.md"
    assert reliability_doc.main([str(tmp_path / "missing.jsonl"), str(page)]) == 0
    assert "No figures were recorded" in page.read_text()
    assert reliability_doc.main(["only-one"]) == 2


def test_docs_page_has_its_marker():
    with open(os.path.join(REPO, "docs", "reliability.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.count(reliability_doc.MARKER) == 1
