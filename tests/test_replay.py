"""``broker replay``: a recorded transcript re-run in a fresh session, cell by
cell, with a per-cell report and an exit status; and transcripts run by plain
Jupyter tools (nbclient, papermill) with the python3-sandbox kernelspec.

The transcripts are recorded by a real ``broker serve``; ``broker replay`` is
the real CLI in a subprocess (in-process mode, and once against a running
broker with --url/--token).
"""

from __future__ import annotations

import base64
import copy
import glob
import json
import os
import re

import nbformat
import psutil
import pytest

from broker.replay import summarise
from tests.transcript_helpers import broker_cli, fetch_transcript, start_broker, ws_execute

KERNEL = "python3-sandbox"
SALES = b"region,units\nnorth,12\nsouth,7\neast,30\nwest,1\nnorth,5\n"
NOTES = b"quarterly review\n"
REPORT_LINE = re.compile(r"^cell +(\d+) (\S+) +(match|MISMATCH)$")
SUMMARY = re.compile(r"^(\d+) of (\d+) cells match; replayed notebook: (.+)$")

# The recorded session: a DataFrame, a chart, an error, a shell pipeline, a
# PDF, output that changes on every run (times, addresses, a temp path) and
# a WebSocket execution.
FRAME = ("import pandas as pd\n"
         "df = pd.read_csv('sales.csv')\n"
         "print('rows', len(df))\n"
         "df.groupby('region', as_index=False)['units'].sum()")
CHART = ("import matplotlib.pyplot as plt\n"
         "fig, ax = plt.subplots(figsize=(5, 3))\n"
         "ax.bar(df['region'], df['units'])\n"
         "plt.show()")
ERROR = "df['no_such_column']"
PIPE = "tail -n +2 sales.csv | cut -d, -f1 | sort | uniq -c | sort -rn | head -2"
PDF = ("from reportlab.pdfgen import canvas\n"
       "c = canvas.Canvas('/mnt/data/summary.pdf')\n"
       "c.drawString(72, 720, 'total units: %d' % df['units'].sum())\n"
       "c.save()\n"
       "print('report ready')")
VOLATILE = ("import datetime, tempfile, time\n"
            "t0 = time.perf_counter()\n"
            "print('run at', datetime.datetime.now().isoformat())\n"
            "print('object', object())\n"
            "print('scratch', tempfile.mkdtemp())\n"
            "print('took %d ms' % ((time.perf_counter() - t0) * 1000))")
WS = "print('total', int(df['units'].sum()))"
TOOLS = ["ExecutePythonCode", "ExecutePythonCode", "ExecutePythonCode", "RunShellCommand", "GeneratePdfReport",
         "ExecutePythonCode", "ExecutePythonCode"]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = start_broker(str(tmp_path_factory.mktemp("replay-broker")))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def recorded(broker, tmp_path_factory):
    """(transcript path, folder with the uploaded inputs)."""
    base = tmp_path_factory.mktemp("recorded")
    sid = broker.create_session()
    try:
        broker.tool(sid, "UploadFileToSession", {"path": "sales.csv", "content": base64.b64encode(SALES).decode()})
        r = broker.put(f"/api/sessions/{sid}/files/docs/notes.txt", data=NOTES)
        assert r.status_code == 201
        assert broker.run(sid, FRAME)["status"] == "success"
        assert broker.run(sid, CHART)["images"]
        assert broker.run(sid, ERROR)["status"] == "error"
        assert broker.shell(sid, PIPE)["stdout"].split() == ["2", "north", "1", "west"]
        pdf = broker.tool(sid, "GeneratePdfReport", {"pythonCode": PDF, "expectedOutputFilename": "summary.pdf",
                                                     "saveAsFilename": "summary.pdf"})
        assert pdf["status"] == "success", pdf
        assert broker.run(sid, VOLATILE)["status"] == "success"
        ws = ws_execute(broker, sid, WS)
        assert ws.stdout == "total 55\n"
        _, nb = fetch_transcript(broker, sid)
    finally:
        broker.delete_session(sid)
    assert [c.metadata.broker.tool for c in nb.cells] == TOOLS[:-1] + ["websocket"]
    path = base / "session.ipynb"
    nbformat.write(nb, str(path))
    files = base / "inputs"
    (files / "docs").mkdir(parents=True)
    (files / "sales.csv").write_bytes(SALES)
    (files / "docs" / "notes.txt").write_bytes(NOTES)
    return path, files


def _report(stdout: str):
    """{cell index: (tool, verdict)} and the summary line's numbers and path."""
    cells, summary = {}, None
    for line in stdout.splitlines():
        m = REPORT_LINE.match(line)
        if m:
            cells[int(m.group(1))] = (m.group(2), m.group(3))
        m = SUMMARY.match(line)
        if m:
            summary = (int(m.group(1)), int(m.group(2)), m.group(3))
    return cells, summary


def _tamper(src, dest, change) -> str:
    nb = nbformat.read(str(src), as_version=4)
    change(nb)
    nbformat.write(nb, str(dest))
    return str(dest)


# -- replays that match ----------------------------------------------------------------

def test_replay_in_process_every_cell_matches(recorded, tmp_path):
    src, files = recorded
    out = tmp_path / "replayed.ipynb"
    r = broker_cli("replay", str(src), "--files", str(files), "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    cells, summary = _report(r.stdout)
    assert cells == {i: (tool, "match") for i, tool in enumerate(TOOLS)}, r.stdout
    assert summary == (7, 7, str(out))
    assert r.stdout.splitlines()[-1] == f"7 of 7 cells match; replayed notebook: {out}"

    replayed = nbformat.read(str(out), as_version=4)
    nbformat.validate(replayed)
    recorded_nb = nbformat.read(str(src), as_version=4)
    assert [c.source for c in replayed.cells] == [c.source for c in recorded_nb.cells]
    for old, new in zip(recorded_nb.cells, replayed.cells):
        assert summarise(new.outputs) == summarise(old.outputs)
        # New outputs from a new run, not a copy of the recorded ones.
        assert new.metadata.execution != old.metadata.execution
    # The WebSocket cell was re-run through ExecutePythonCode.
    assert replayed.cells[6].metadata.broker.tool == "ExecutePythonCode"
    assert replayed.cells[4].metadata.broker.pdf["saveAsFilename"] == "summary.pdf"
    # The volatile cell really printed something different, and still matched.
    assert replayed.cells[5].outputs[0].text != recorded_nb.cells[5].outputs[0].text


def test_replay_against_a_running_broker(recorded, broker, tmp_path):
    src, files = recorded
    before = {s["id"] for s in broker.get("/api/sessions").json()}
    out = tmp_path / "via-url.ipynb"
    r = broker_cli("replay", str(src), "--files", str(files), "--url", broker.url, "--token",
                   broker.owners["alice"], "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    cells, summary = _report(r.stdout)
    assert cells == {i: (tool, "match") for i, tool in enumerate(TOOLS)}, r.stdout
    assert summary == (7, 7, str(out))
    nbformat.validate(nbformat.read(str(out), as_version=4))
    # The fresh session it used is deleted afterwards.
    assert {s["id"] for s in broker.get("/api/sessions").json()} == before


def test_replay_with_token_from_environment_and_default_output(recorded, broker, tmp_path):
    src, files = recorded
    copy_src = tmp_path / "again.ipynb"
    copy_src.write_bytes(src.read_bytes())
    r = broker_cli("replay", str(copy_src), "--files", str(files), "--url", broker.url,
                   env={"BROKER_TOKEN": broker.owners["alice"]})
    assert r.returncode == 0, r.stdout + r.stderr
    default_out = tmp_path / "again.replayed.ipynb"
    assert _report(r.stdout)[1] == (7, 7, str(default_out))
    nbformat.validate(nbformat.read(str(default_out), as_version=4))


def test_replay_with_a_wrong_token_is_a_clear_error(recorded, broker):
    src, files = recorded
    r = broker_cli("replay", str(src), "--files", str(files), "--url", broker.url, "--token", "not-a-token")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("broker replay: broker answered 401"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_replay_against_an_unreachable_broker_is_a_clear_error(recorded):
    from tests.broker_server import free_port

    src, files = recorded
    r = broker_cli("replay", str(src), "--files", str(files), "--url", f"http://127.0.0.1:{free_port()}",
                   "--token", "t")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("broker replay: ConnectionError: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- replays that do not match -----------------------------------------------------------

def test_tampered_recorded_output_is_a_mismatch_on_that_cell(recorded, tmp_path):
    src, files = recorded

    def change(nb):
        [out] = [o for o in nb.cells[3].outputs if o.output_type == "stream"]
        assert out.text.split() == ["2", "north", "1", "west"]
        out.text = out.text.replace("north", "south")

    tampered = _tamper(src, tmp_path / "tampered.ipynb", change)
    r = broker_cli("replay", tampered, "--files", str(files), "-o", str(tmp_path / "out.ipynb"))
    assert r.returncode == 1, r.stdout + r.stderr
    cells, summary = _report(r.stdout)
    assert cells[3] == ("RunShellCommand", "MISMATCH"), r.stdout
    assert all(v == "match" for i, (_, v) in cells.items() if i != 3), r.stdout
    assert summary[:2] == (6, 7)
    # The report says what differs, under the cell's line.
    lines = r.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("cell   3 "))
    detail = []
    for ln in lines[at + 1:]:
        if not ln.startswith("      "):
            break
        detail.append(ln)
    text = "\n".join(detail)
    assert "south" in text and "north" in text, r.stdout
    assert "--- recorded" in text and "+++ replayed" in text


def test_changed_code_is_a_mismatch_on_that_cell(recorded, tmp_path):
    src, files = recorded

    def change(nb):
        nb.cells[6].source = "print('total', int(df['units'].sum()) + 1)"

    tampered = _tamper(src, tmp_path / "edited.ipynb", change)
    r = broker_cli("replay", tampered, "--files", str(files), "-o", str(tmp_path / "out.ipynb"))
    assert r.returncode == 1, r.stdout + r.stderr
    cells, summary = _report(r.stdout)
    assert cells[6] == ("ExecutePythonCode", "MISMATCH")
    assert [i for i, (_, v) in cells.items() if v != "match"] == [6]
    assert summary[:2] == (6, 7)
    assert "total 56" in r.stdout and "total 55" in r.stdout


def test_changed_input_makes_the_cells_that_use_it_mismatch(recorded, tmp_path):
    """Different input data (its new sha256 recorded, so the input check
    passes): the cells computing from it print something else."""
    import hashlib

    src, files = recorded
    other = tmp_path / "inputs"
    (other / "docs").mkdir(parents=True)
    new_sales = SALES.replace(b"east,30", b"east,31")
    (other / "sales.csv").write_bytes(new_sales)
    (other / "docs" / "notes.txt").write_bytes(NOTES)

    def change(nb):
        up = nb.metadata.broker.uploads[0]
        assert up.path == "/mnt/data/sales.csv"
        up.sha256 = hashlib.sha256(new_sales).hexdigest()
        up.size = len(new_sales)

    tampered = _tamper(src, tmp_path / "new-input.ipynb", change)
    r = broker_cli("replay", tampered, "--files", str(other), "-o", str(tmp_path / "out.ipynb"))
    assert r.returncode == 1, r.stdout + r.stderr
    cells, summary = _report(r.stdout)
    # The grouped sums (cell 0) and the total (cell 6) change; the rest still match.
    assert sorted(i for i, (_, v) in cells.items() if v == "MISMATCH") == [0, 6], r.stdout
    assert summary[:2] == (5, 7)


# -- inputs checked before anything runs ----------------------------------------------------

def _replay_processes(marker: str) -> list:
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + (p.info["cwd"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if marker in text:
            found.append(p.pid)
    return found


def test_missing_and_changed_inputs_are_one_error_before_anything_runs(recorded, tmp_path):
    src, _ = recorded
    files = tmp_path / "inputs"
    files.mkdir()
    (files / "sales.csv").write_bytes(SALES + b"south,1\n")      # changed; docs/notes.txt missing
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "never.ipynb"
    r = broker_cli("replay", str(src), "--files", str(files), "-o", str(out), env={"TMPDIR": str(scratch)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""                            # no cell ran, no report
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "broker replay: the transcript's input files are not all available:"
    assert len(lines) == 3, r.stderr
    assert any(ln.strip().startswith("changed: sales.csv (sha256 ") and "the transcript recorded" in ln
               for ln in lines[1:]), r.stderr
    assert any(ln.strip().startswith(f"missing: docs/notes.txt (expected {len(NOTES)} bytes") for ln in lines[1:])
    assert "Traceback" not in r.stderr
    # No session was made: the in-process broker's private folder (under
    # TMPDIR) was never created, no kernel runs from it, no output was written.
    assert os.listdir(scratch) == []
    assert _replay_processes(str(scratch)) == []
    assert not out.exists()


def test_without_files_every_input_is_reported_missing(recorded, tmp_path):
    src, _ = recorded
    r = broker_cli("replay", str(src), "-o", str(tmp_path / "never.ipynb"))
    assert r.returncode == 2
    assert r.stdout == ""
    assert "missing: sales.csv" in r.stderr and "missing: docs/notes.txt" in r.stderr
    assert "pass --files DIR" in r.stderr


def test_input_problems_create_no_session_on_a_running_broker(recorded, broker, tmp_path):
    src, _ = recorded
    files = tmp_path / "empty"
    files.mkdir()
    before = {s["id"] for s in broker.get("/api/sessions").json()}
    dirs_before = set(os.listdir(broker.data_root))
    r = broker_cli("replay", str(src), "--files", str(files), "--url", broker.url, "--token",
                   broker.owners["alice"])
    assert r.returncode == 2
    assert "missing: sales.csv" in r.stderr and "missing: docs/notes.txt" in r.stderr
    assert {s["id"] for s in broker.get("/api/sessions").json()} == before
    # No session folder of alice's appeared either (the broker's warm pool may
    # start owner-less ones on its own).
    for d in set(os.listdir(broker.data_root)) - dirs_before:
        meta = os.path.join(broker.data_root, d, "meta.json")
        if os.path.exists(meta):
            with open(meta) as fh:
                assert json.load(fh).get("owner") != "alice", d


# -- not a (valid) notebook -----------------------------------------------------------------

def _png(path):
    import ipykernel

    logo = os.path.join(os.path.dirname(ipykernel.__file__), "resources", "logo-32x32.png")
    with open(logo, "rb") as fh:
        path.write_bytes(fh.read())


def _invalid_cell_type(path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    d = nbformat.writes(nb).replace('"cell_type": "code"', '"cell_type": "bogus"')
    path.write_text(d)


def _no_source(path):
    nb = json.loads(nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])))
    del nb["cells"][0]["source"]
    path.write_text(json.dumps(nb))


def _bad_output(path):
    cell = nbformat.v4.new_code_cell("print(1)", outputs=[nbformat.v4.new_output("stream", text="1\n")])
    nb = json.loads(nbformat.writes(nbformat.v4.new_notebook(cells=[cell])))
    nb["cells"][0]["outputs"][0]["output_type"] = "printout"
    path.write_text(json.dumps(nb))


BAD_FILES = {
    "image.png": (_png, "is not a Jupyter notebook"),
    "random.json": (lambda p: p.write_text('{"rows": [1, 2, 3], "name": "not a notebook"}'),
                    "is not a Jupyter notebook"),
    "list.json": (lambda p: p.write_text("[1, 2, 3]"), "is not a Jupyter notebook"),
    "empty.ipynb": (lambda p: p.write_text(""), "is not a Jupyter notebook"),
    "truncated.ipynb": (lambda p: p.write_text('{"cells": [{"cell_type": "code", "sou'),
                        "is not a Jupyter notebook"),
    "bogus-cell.ipynb": (_invalid_cell_type,
                         "is not a valid nbformat v4 notebook: cells[0]: cell_type 'bogus' is not one of code, "
                         "markdown, raw"),
    "no-source.ipynb": (_no_source, "is not a valid nbformat v4 notebook: cells[0]: 'source' is a required property"),
    "bad-output.ipynb": (_bad_output, "is not a valid nbformat v4 notebook: cells[0].outputs[0]: output_type "
                                      "'printout' is not one of display_data, error, execute_result, stream"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_not_a_valid_notebook_is_a_clear_error(name, tmp_path):
    make, expected = BAD_FILES[name]
    path = tmp_path / name
    make(path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = broker_cli("replay", str(path), env={"TMPDIR": str(scratch)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    # One line, naming the file and what is wrong; no traceback, no schema dump.
    assert r.stderr.startswith(f"broker replay: {path} {expected}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert len(r.stderr) < 400, r.stderr
    assert os.listdir(scratch) == []


def test_missing_transcript_and_usage(tmp_path):
    r = broker_cli("replay", str(tmp_path / "nope.ipynb"))
    assert r.returncode == 2 and r.stderr.strip() == f"broker replay: {tmp_path / 'nope.ipynb'}: no such file"
    r = broker_cli("replay")
    assert r.returncode == 2 and "usage: broker replay TRANSCRIPT.ipynb" in r.stderr


# -- plain Jupyter tools run transcripts ------------------------------------------------------

@pytest.fixture(scope="module")
def python_only(broker, tmp_path_factory):
    """A transcript of Python cells only (no uploads, nothing from a shell)."""
    sid = broker.create_session()
    try:
        broker.run(sid, "import pandas as pd\n"
                        "df = pd.DataFrame({'service': ['api', 'web', 'db'], 'errors': [3, 0, 7]})\n"
                        "print(df['errors'].sum())\n"
                        "df")
        broker.run(sid, "import matplotlib.pyplot as plt\n"
                        "plt.figure(figsize=(4, 3)); plt.bar(df['service'], df['errors']); plt.show()")
        broker.run(sid, "df.to_csv('/mnt/data/errors.csv', index=False)\n"
                        "print(open('/mnt/data/errors.csv').read())")
        ws_execute(broker, sid, "print('worst', df.sort_values('errors').iloc[-1]['service'])")
        _, nb = fetch_transcript(broker, sid)
    finally:
        broker.delete_session(sid)
    path = tmp_path_factory.mktemp("py-only") / "python-only.ipynb"
    nbformat.write(nb, str(path))
    return path


def _assert_same_outputs(recorded, executed):
    assert len(recorded.cells) == len(executed.cells)
    for old, new in zip(recorded.cells, executed.cells):
        assert summarise(new.outputs) == summarise(old.outputs), (old.source, new.outputs)


def test_nbclient_runs_a_python_only_transcript(python_only, tmp_path):
    from nbclient import NotebookClient

    recorded = nbformat.read(str(python_only), as_version=4)
    assert recorded.metadata.kernelspec.name == KERNEL
    nb = copy.deepcopy(recorded)
    # No kernel_name given: nbclient takes python3-sandbox from the transcript's metadata.
    client = NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert client.kernel_name == KERNEL
    nbformat.validate(nb)
    _assert_same_outputs(recorded, nb)
    assert any("image/png" in o.get("data", {}) for o in nb.cells[1].outputs)
    assert nb.cells[3].outputs[0].text == "worst db\n"


def test_papermill_runs_a_python_only_transcript(python_only, tmp_path):
    import papermill as pm

    out = tmp_path / "pm-out.ipynb"
    pm.execute_notebook(str(python_only), str(out), progress_bar=False, start_timeout=120, cwd=str(tmp_path))
    done = nbformat.read(str(out), as_version=4)
    nbformat.validate(done)
    assert done.metadata.kernelspec.name == KERNEL
    assert done.metadata.papermill.exception is not True
    _assert_same_outputs(nbformat.read(str(python_only), as_version=4), done)


def test_nbclient_skips_shell_cells_with_a_note(broker, tmp_path):
    from nbclient import NotebookClient

    sid = broker.create_session()
    try:
        broker.run(sid, "open('/mnt/data/log.txt', 'w').write('a\\nb\\nc\\n')\nprint('written')")
        broker.shell(sid, "wc -l < log.txt")
        broker.run(sid, "print(len(open('/mnt/data/log.txt').read().splitlines()))")
        _, recorded = fetch_transcript(broker, sid)
    finally:
        broker.delete_session(sid)
    assert recorded.cells[1].source == "%%bash\nwc -l < log.txt"
    assert recorded.cells[1].outputs[0].text == "3\n"
    nb = copy.deepcopy(recorded)
    # Without allow_errors: a failing cell would raise CellExecutionError.
    NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.validate(nb)
    first, shell, last = nb.cells
    assert first.outputs[0].text == "written\n"
    [note] = shell.outputs
    assert note.output_type == "stream" and note.name == "stderr"
    assert note.text.startswith("[sandbox] shell cell skipped: this kernel cannot start processes.")
    assert "RunShellCommand" in note.text
    assert last.outputs[0].text == "3\n"

    # papermill too.
    src, out = tmp_path / "shell.ipynb", tmp_path / "shell-out.ipynb"
    nbformat.write(recorded, str(src))
    import papermill as pm

    pm.execute_notebook(str(src), str(out), progress_bar=False, start_timeout=120, cwd=str(tmp_path))
    done = nbformat.read(str(out), as_version=4)
    assert done.cells[1].outputs[0].text.startswith("[sandbox] shell cell skipped")
    assert done.cells[2].outputs[0].text == "3\n"

    # broker replay runs the same cell for real, through RunShellCommand.
    r = broker_cli("replay", str(src), "-o", str(tmp_path / "shell-replayed.ipynb"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _report(r.stdout)[0] == {0: ("ExecutePythonCode", "match"), 1: ("RunShellCommand", "match"),
                                    2: ("ExecutePythonCode", "match")}


def test_replayed_kernels_are_gone_afterwards(recorded, tmp_path):
    """The in-process replay stops its kernel and removes its private folder."""
    import shutil
    import tempfile

    src, files = recorded
    # Short: the kernel's unix sockets live below it.
    scratch = tempfile.mkdtemp(prefix="rp", dir="/tmp")
    try:
        r = broker_cli("replay", str(src), "--files", str(files), "-o", str(tmp_path / "o.ipynb"),
                       env={"TMPDIR": scratch})
        assert r.returncode == 0, r.stdout + r.stderr
        assert glob.glob(os.path.join(scratch, "broker-replay-*")) == []
        assert _replay_processes(scratch) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
