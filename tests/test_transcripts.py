"""Session transcripts: the nbformat v4 notebook every session keeps at
``<data_root>/<id>/transcript.ipynb``, served by GET /api/sessions/{id}/transcript
and printed by ``broker transcript``.

Everything runs against a real ``broker serve`` on loopback with real
sandboxed kernels.  See docs/transcripts.md for the format checked here.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import threading

import nbformat
import pytest

from tests.transcript_helpers import KernelSocket, broker_cli, fetch_transcript, start_broker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXECUTION_KEYS = {"iopub.status.busy", "iopub.execute_input", "shell.execute_reply", "iopub.status.idle"}
NOTICE_RE = r"\[transcript: output truncated, (\d+) more characters not kept\]"
CSV = b"region,units\nnorth,12\nsouth,7\neast,30\nwest,1\n"

PDF_CODE = """\
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas
c = canvas.Canvas('/mnt/data/report.pdf', pagesize=A4)
c.drawString(72, 770, 'Units by region')
c.save()
print('pdf written')
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    # Every change written at once (no write_delay), so that the test of atomic
    # replacement sees a new version of the file per call.
    b = start_broker(str(tmp_path_factory.mktemp("tx-broker")), "--TranscriptSettings.write_delay=0")
    yield b
    b.stop()


@pytest.fixture
def sid(broker):
    s = broker.create_session()
    yield s
    broker.delete_session(s)


def _ts(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _stderr(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")


def _on_disk(broker, sid):
    return os.path.join(broker.data_root, sid, "transcript.ipynb")


# -- every tool, every upload path, a WebSocket execution --------------------------------

def test_every_tool_is_recorded_in_a_valid_notebook(broker, sid):
    b64 = base64.b64encode(CSV).decode()
    up = broker.tool(sid, "UploadFileToSession", {"path": "inputs/sales.csv", "content": b64})
    assert up["status"] == "success"
    raw = b"raw bytes by PUT\n"
    r = broker.put(f"/api/sessions/{sid}/files/raw/put.txt", data=raw)
    assert r.status_code == 201, r.text
    multi = b"multipart bytes\n"
    r = broker.post(f"/api/sessions/{sid}/files", files={"file": ("multi.txt", multi)}, data={"path": "forms/"})
    assert r.status_code == 201, r.text

    frame = broker.run(sid, "import pandas as pd\n"
                            "df = pd.read_csv('inputs/sales.csv')\n"
                            "print('rows', len(df))\n"
                            "df.sort_values('units', ascending=False)")
    assert frame["status"] == "success", frame
    chart = broker.run(sid, "import matplotlib.pyplot as plt\n"
                            "plt.bar(df['region'], df['units'])\n"
                            "plt.show()")
    assert chart["status"] == "success" and len(chart["images"]) == 1, chart
    err = broker.run(sid, "df['missing']")
    assert err["status"] == "error", err
    pipe = broker.shell(sid, "tail -n +2 inputs/sales.csv | cut -d, -f2 | sort -n | tail -1")
    assert pipe["status"] == "success" and pipe["stdout"] == "30\n", pipe
    fail = broker.tool(sid, "RunShellCommand", {"command": "echo going; exit 3", "explanation": "fails on purpose"})
    assert fail["status"] == "error" and fail["exit_code"] == 3, fail
    pdf = broker.tool(sid, "GeneratePdfReport", {"pythonCode": PDF_CODE, "expectedOutputFilename": "report.pdf",
                                                 "saveAsFilename": "units.pdf"})
    assert pdf["status"] == "success", pdf

    cells_before_read_tools = len(fetch_transcript(broker, sid)[1].cells)
    assert broker.tool(sid, "ReadSessionFile", {"path": "inputs/sales.csv"})["content"] == CSV.decode()
    assert broker.tool(sid, "SearchSessionFiles", {"pattern": "south"})["count"] == 1
    assert broker.tool(sid, "ListSessionFiles", {})["count"] >= 5
    got = broker.tool(sid, "GetSessionFile", {"path": "/mnt/data/report.pdf", "saveAsFilename": "units.pdf"})
    assert got["status"] == "success"
    r = broker.get(f"/api/sessions/{sid}/files/inputs/sales.csv")
    assert r.status_code == 200 and r.content == CSV

    # A WebSocket execution (as JupyterLab runs a cell), which also writes a file.
    with KernelSocket(broker, sid) as ks:
        ws = ks.execute("import matplotlib.pyplot as plt\n"
                        "open('ws_out.txt', 'w').write('from the socket')\n"
                        "print('ws says', int(df['units'].sum()))\n"
                        "plt.plot([1, 3, 2]); plt.show()")
        assert ws.reply["content"]["status"] == "ok", ws.iopub
        assert ws.stdout == "ws says 50\n"
        # A REST call while the socket is connected is recorded once, as its tool.
        assert broker.run(sid, "print('rest while connected')")["status"] == "success"

    resp, nb = fetch_transcript(broker, sid)
    assert resp.headers["Content-Type"] == "application/x-ipynb+json"
    assert resp.headers["Content-Disposition"] == f'attachment; filename="session-{sid}.ipynb"'
    nbformat.validate(nb)
    assert nb.nbformat == 4
    # The file on disk is the same notebook, and valid too.
    disk = nbformat.read(_on_disk(broker, sid), as_version=4)
    nbformat.validate(disk)
    assert disk == nb

    assert nb.metadata.kernelspec.name == "python3-sandbox"
    assert nb.metadata.language_info.name == "python"
    meta = nb.metadata.broker
    assert meta.session == sid
    _ts(meta.created)

    # Read-only file tools add no cells.
    assert cells_before_read_tools == 6
    cells = nb.cells
    assert len(cells) == 8, [c.metadata.broker.tool for c in cells]
    c_frame, c_chart, c_err, c_pipe, c_fail, c_pdf, c_ws, c_rest = cells
    assert [c.metadata.broker.tool for c in cells] == [
        "ExecutePythonCode", "ExecutePythonCode", "ExecutePythonCode", "RunShellCommand", "RunShellCommand",
        "GeneratePdfReport", "websocket", "ExecutePythonCode"]
    assert [c.metadata.broker.status for c in cells] == [
        "success", "success", "error", "success", "error", "success", "success", "success"]
    for c in cells:
        assert c.cell_type == "code"
        assert set(c.metadata.execution) == EXECUTION_KEYS, c.metadata.execution
        ex = {k: _ts(v) for k, v in c.metadata.execution.items()}
        assert ex["iopub.status.busy"] <= ex["iopub.execute_input"] <= ex["shell.execute_reply"] \
            <= ex["iopub.status.idle"]
    for a, b in zip(cells, cells[1:]):
        assert _ts(a.metadata.execution["iopub.status.idle"]) <= _ts(b.metadata.execution["iopub.status.busy"])

    # Execution counts: the kernel's own, shared by REST and WebSocket executions; none for shell cells.
    py = [c_frame, c_chart, c_err, c_pdf, c_ws, c_rest]
    counts = [c.execution_count for c in py]
    assert counts == list(range(counts[0], counts[0] + len(py))), counts
    assert c_pipe.execution_count is None and c_fail.execution_count is None
    assert [c.execution_count for c in (c_frame, c_chart)] == [frame["execution_count"], chart["execution_count"]]

    # Python tool cells: source, outputs, timing and the call's arguments.
    for c in (c_frame, c_chart, c_err, c_rest):
        assert {"tool", "status", "duration_ms", "timeoutSeconds", "images", "files"} <= set(c.metadata.broker)
        assert c.metadata.broker.timeoutSeconds == 120
        assert isinstance(c.metadata.broker.duration_ms, int) and c.metadata.broker.duration_ms >= 0
    assert c_frame.source.startswith("import pandas as pd")
    assert _stdout(c_frame) == "rows 4\n"
    [res] = [o for o in c_frame.outputs if o.output_type == "execute_result"]
    assert res.execution_count == c_frame.execution_count
    assert "<table" in res.data["text/html"]
    assert res.data["text/plain"].splitlines()[1].split() == ["2", "east", "30"]

    [img] = [o for o in c_chart.outputs if o.output_type == "display_data"]
    assert base64.b64decode(img.data["image/png"]).startswith(PNG_MAGIC)
    assert c_chart.metadata.broker.images == [chart["images"][0]["path"]]

    [e] = c_err.outputs
    assert e.output_type == "error" and e.ename == "KeyError" and "missing" in e.evalue
    assert e.traceback

    # Shell cells: %%bash + the command, exit_code, output streams.
    assert c_pipe.source == "%%bash\ntail -n +2 inputs/sales.csv | cut -d, -f2 | sort -n | tail -1"
    assert c_pipe.metadata.broker.exit_code == 0
    assert _stdout(c_pipe) == "30\n"
    assert c_fail.source == "%%bash\necho going; exit 3"
    assert c_fail.metadata.broker.exit_code == 3
    assert c_fail.metadata.broker.explanation == "fails on purpose"
    assert _stdout(c_fail) == "going\n"
    for c in (c_pipe, c_fail):
        assert isinstance(c.metadata.broker.duration_ms, int)

    # The PDF cell: the call's arguments and the PDF's identity.
    b = c_pdf.metadata.broker
    assert b.expectedOutputFilename == "report.pdf" and b.saveAsFilename == "units.pdf"
    assert b.timeoutSeconds == 180
    pdf_path = os.path.join(broker.data_dir(sid), "report.pdf")
    with open(pdf_path, "rb") as fh:
        pdf_bytes = fh.read()
    assert b.pdf == {"path": "/mnt/data/report.pdf", "saveAsFilename": "units.pdf", "size": len(pdf_bytes),
                     "sha256": hashlib.sha256(pdf_bytes).hexdigest()}
    assert _stdout(c_pdf) == "pdf written\n"

    # The WebSocket execution is a code cell like any other, without the broker's files notice.
    assert c_ws.source.startswith("import matplotlib.pyplot as plt\nopen('ws_out.txt'")
    assert _stdout(c_ws) == "ws says 50\n"
    kinds = [o.output_type for o in c_ws.outputs]
    assert kinds == ["stream", "display_data"], kinds
    ws_png = base64.b64decode(c_ws.outputs[1].data["image/png"])
    assert ws_png.startswith(PNG_MAGIC)
    assert not any("application/vnd.broker.files+json" in o.get("data", {}) for o in c_ws.outputs)
    assert c_ws.execution_count == ws.of_type("execute_input")[0]["content"]["execution_count"]
    assert _stdout(c_rest) == "rest while connected\n"

    # Uploads (tool, raw PUT, multipart), each with size and sha256, before the first cell.
    ups = meta.uploads
    assert [u.path for u in ups] == ["/mnt/data/inputs/sales.csv", "/mnt/data/raw/put.txt",
                                     "/mnt/data/forms/multi.txt"]
    for u, data in zip(ups, (CSV, raw, multi)):
        assert u.size == len(data)
        assert u.sha256 == hashlib.sha256(data).hexdigest()
        assert u.before_cell == 0
        _ts(u.time)
    # Downloads: the GetSessionFile link and the token download, after the PDF cell.
    downs = meta.downloads
    assert [(d.path, d.name) for d in downs] == [("/mnt/data/report.pdf", "units.pdf"),
                                                 ("/mnt/data/inputs/sales.csv", "sales.csv")]
    assert downs[0].size == len(pdf_bytes) and downs[1].size == len(CSV)
    assert [d.before_cell for d in downs] == [6, 6]


def test_failed_and_silent_websocket_executions(broker, sid):
    with KernelSocket(broker, sid) as ks:
        bad = ks.execute("print('before'); raise ValueError('from the socket')")
        assert bad.reply["content"]["status"] == "error"
        quiet = ks.execute("x = 41", silent=True)
        assert quiet.reply["content"]["status"] == "ok"
        ok = ks.execute("x = 1\nx + 1")
        assert ok.reply["content"]["status"] == "ok"
    nb = fetch_transcript(broker, sid)[1]
    nbformat.validate(nb)
    # A silent execution (what frontends send for completions and widgets) is not recorded.
    assert len(nb.cells) == 2, [c.source for c in nb.cells]
    err_cell, ok_cell = nb.cells
    assert err_cell.metadata.broker == {"tool": "websocket", "status": "error"}
    assert _stdout(err_cell) == "before\n"
    [e] = [o for o in err_cell.outputs if o.output_type == "error"]
    assert e.ename == "ValueError" and e.evalue == "from the socket"
    assert ok_cell.metadata.broker == {"tool": "websocket", "status": "success"}
    [res] = ok_cell.outputs
    assert res.output_type == "execute_result" and res.data["text/plain"] == "2"
    assert res.execution_count == ok_cell.execution_count == err_cell.execution_count + 1


def test_timeout_is_recorded_as_an_error_output(broker, sid):
    r = broker.tool(sid, "ExecutePythonCode", {"pythonCode": "import time\nprint('start', flush=True)\n"
                                                             "time.sleep(30)", "timeoutSeconds": 2})
    assert r["status"] == "timeout"
    nb = fetch_transcript(broker, sid)[1]
    nbformat.validate(nb)
    [cell] = nb.cells
    assert cell.metadata.broker.status == "timeout"
    assert cell.metadata.broker.timeoutSeconds == 2
    assert cell.metadata.broker.notice
    assert _stdout(cell) == "start\n"
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert errors[-1].ename == "TimeoutError"


# -- very large output -----------------------------------------------------------------

@pytest.fixture(scope="module")
def small_broker(tmp_path_factory):
    """Transcripts keep 2000 characters per output and images up to 1000 bytes;
    the executor keeps 32 MB of stdout, so several MB reach the transcript."""
    b = start_broker(str(tmp_path_factory.mktemp("tx-small")), "--TranscriptSettings.max_output_chars=2000",
                     "--TranscriptSettings.max_image_bytes=1000", "--Executor.max_stream_bytes=32M")
    yield b
    b.stop()


def _notice_count(text: str) -> int:
    import re

    m = re.search(NOTICE_RE, text)
    assert m, text[-300:]
    return int(m.group(1))


def test_large_output_is_truncated_with_a_visible_notice(small_broker):
    b = small_broker
    sid = b.create_session()
    try:
        n = 4_000_000
        r = b.run(sid, f"print('x' * {n})\n'y' * {n}", timeout_seconds=300)
        assert r["status"] == "success", {k: v for k, v in r.items() if k not in ("stdout", "result")}
        # The tool result is bounded; the whole stdout is in the file its notice names.
        t = r["truncated"]["stdout"]
        assert t["chars"] == n + 1 and len(r["stdout"]) < 64 << 10 and t["file"] in r["notice"]
        assert os.path.getsize(os.path.join(b.data_dir(sid), t["file"][len("/mnt/data/"):])) == n + 1
        with KernelSocket(b, sid) as ks:
            ws = ks.execute(f"print('z' * {3 * 1000 * 1000})")
            assert ws.reply["content"]["status"] == "ok"
        chart = b.run(sid, "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()")
        assert chart["status"] == "success" and chart["images"]

        size = os.path.getsize(_on_disk(b, sid))
        assert size < 100_000, size                # several MB printed, a small file kept
        resp, nb = fetch_transcript(b, sid)
        nbformat.validate(nb)
        assert len(resp.content) < 100_000
        big, ws_cell, chart_cell = nb.cells

        [out, res] = big.outputs
        assert out.output_type == "stream" and out.text.startswith("x" * 2000)
        assert out.text[2000:].startswith("\n[transcript: output truncated,")
        assert _notice_count(out.text) == n + 1 - 2000
        text = res.data["text/plain"]
        assert text.startswith("'" + "y" * 1999)
        assert _notice_count(text) == n + 2 - 2000

        ws_text = _stdout(ws_cell)
        assert ws_text.startswith("z" * 2000) and len(ws_text) < 2200
        assert _notice_count(ws_text) == 3 * 1000 * 1000 + 1 - 2000

        # An image over max_image_bytes is dropped with a notice a reader can see.
        [disp] = chart_cell.outputs
        assert "image/png" not in disp.data
        assert "[transcript: image/png image larger than 1000 bytes not kept]" in disp.data["text/plain"]
    finally:
        b.delete_session(sid)


# -- the file is never half-written ---------------------------------------------------------

def test_transcript_is_replaced_atomically_while_read_concurrently(broker, sid):
    """A reader polls transcript.ipynb while a dozen large executions rewrite
    it (each version is 100 KB - 1.3 MB).  Every read must be a whole, valid
    notebook.  The reader also keeps every version it saw open: at the end
    each still has exactly the bytes first read, in its own inode, which holds
    only if new versions are written elsewhere and renamed over the old file
    (an in-place rewrite would change what the open descriptors see)."""
    path = _on_disk(broker, sid)
    broker.run(sid, "print('first')")
    fetch_transcript(broker, sid)   # the endpoint waits for the file to hold every change
    stop = threading.Event()
    seen = {"reads": 0, "bad": [], "versions": {}}   # sha256 -> (fd, inode, bytes)

    def read_all(fd: int) -> bytes:
        chunks, off = [], 0
        while True:
            chunk = os.pread(fd, 1 << 20, off)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            off += len(chunk)

    def reader():
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                seen["bad"].append("missing")
                continue
            keep = False
            try:
                data = read_all(fd)
                seen["reads"] += 1
                try:
                    nbformat.validate(nbformat.reads(data.decode(), as_version=4))
                except Exception as exc:  # noqa: BLE001 - any failure is a half-written file
                    seen["bad"].append(f"{len(data)} bytes: {str(exc)[:200]}")
                    continue
                digest = hashlib.sha256(data).hexdigest()
                if digest not in seen["versions"]:
                    seen["versions"][digest] = (fd, os.fstat(fd).st_ino, data)
                    keep = True
            finally:
                if not keep:
                    os.close(fd)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for i in range(12):
            r = broker.run(sid, f"print('{i}' * 100_000)")
            assert r["status"] == "success"
    finally:
        stop.set()
        t.join(30)
    try:
        assert not seen["bad"], seen["bad"][:5]
        assert seen["reads"] > 50, seen["reads"]
        versions = list(seen["versions"].values())
        assert len(versions) >= 5, "the reader did not overlap the writes"
        assert len({ino for _, ino, _ in versions}) == len(versions), "two versions shared one inode"
        for fd, ino, data in versions:
            assert os.fstat(fd).st_ino == ino
            assert read_all(fd) == data, "a version changed after it was read: rewritten in place"
    finally:
        for fd, _, _ in seen["versions"].values():
            os.close(fd)
    # The final version holds every execution, and no temporary file is left beside it.
    fetch_transcript(broker, sid)
    nb = nbformat.read(path, as_version=4)
    assert len(nb.cells) == 13
    leftovers = [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".transcript")]
    assert leftovers == []


def test_a_write_that_fails_midway_leaves_the_old_transcript(tmp_path, monkeypatch):
    """The write goes to a temporary file that is renamed only when complete:
    a failure halfway (disk full, a crash) leaves the previous version whole,
    and no temporary file behind; the next write catches up."""
    from broker import transcripts
    from broker.transcripts import Transcript, TranscriptSettings

    path = str(tmp_path / "transcript.ipynb")
    t = Transcript(path, TranscriptSettings(), "00000000-0000-4000-8000-000000000000")
    t.add_code("print(1)", [{"output_type": "stream", "name": "stdout", "text": "1\n"}], tool="ExecutePythonCode",
               status="success", execution_count=1, started=transcripts.now_iso(), ended=transcripts.now_iso())
    with open(path, "rb") as fh:
        before = fh.read()

    real_fsync = transcripts.os.fsync

    def full_disk(fd):
        # The new version is written to the temporary file; the device then
        # refuses it (ENOSPC), as a full disk does at flush time.
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transcripts.os, "fsync", full_disk)
    with pytest.raises(OSError):
        t.add_code("print(2)", [{"output_type": "stream", "name": "stdout", "text": "2\n"}],
                   tool="ExecutePythonCode", status="success", execution_count=2, started=transcripts.now_iso(),
                   ended=transcripts.now_iso())
    with open(path, "rb") as fh:
        assert fh.read() == before
    nbformat.validate(nbformat.read(path, as_version=4))
    assert sorted(os.listdir(tmp_path)) == ["transcript.ipynb"]

    monkeypatch.setattr(transcripts.os, "fsync", real_fsync)
    t.add_code("print(3)", [{"output_type": "stream", "name": "stdout", "text": "3\n"}], tool="ExecutePythonCode",
               status="success", execution_count=3, started=transcripts.now_iso(), ended=transcripts.now_iso())
    # The next successful write carries the cell whose write failed: nothing is lost.
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert [c.source for c in nb.cells] == ["print(1)", "print(2)", "print(3)"]


# -- broker transcript ------------------------------------------------------------------------

def test_cli_writes_the_notebook_the_endpoint_serves(broker, sid, tmp_path):
    broker.run(sid, "print('hello from the cli test')")
    broker.shell(sid, "echo shell | tr a-z A-Z")
    with KernelSocket(broker, sid) as ks:
        ks.execute("21 * 2")
    served_resp, served = fetch_transcript(broker, sid)
    out = tmp_path / "t.ipynb"
    r = broker_cli("transcript", sid, "--data-root", broker.data_root, "-o", str(out))
    assert r.returncode == 0, r.stderr
    written = nbformat.read(str(out), as_version=4)
    nbformat.validate(written)
    assert written == served
    # Byte for byte: the endpoint serves the file's nbformat layout.
    assert out.read_bytes() == served_resp.content
    assert [c.metadata.broker.tool for c in written.cells] == ["ExecutePythonCode", "RunShellCommand", "websocket"]
    # Without -o it goes to standard output.
    r = broker_cli("transcript", sid, "--data-root", broker.data_root)
    assert r.returncode == 0, r.stderr
    assert nbformat.reads(r.stdout, as_version=4) == served


def test_cli_errors(broker, tmp_path):
    r = broker_cli("transcript", "00000000-0000-4000-8000-000000000000", "--data-root", broker.data_root)
    assert r.returncode == 1
    assert "no transcript for session 00000000-0000-4000-8000-000000000000" in r.stderr
    r = broker_cli("transcript", "not-a-session", "--data-root", broker.data_root)
    assert r.returncode == 2 and "usage: broker transcript SESSION_ID" in r.stderr


def test_transcript_is_private_to_its_owner(broker, sid):
    r = broker.get(f"/api/sessions/{sid}/transcript", owner="bob")
    assert r.status_code == 404
    r = broker.get(f"/api/sessions/{sid}/transcript", owner=None)
    assert r.status_code == 401


def test_transcript_continues_after_a_broker_restart(tmp_path_factory):
    b = start_broker(str(tmp_path_factory.mktemp("tx-restart")))
    try:
        sid = b.create_session()
        b.run(sid, "print('before the restart')")
        b.restart()
        b.run(sid, "print('after the restart')")
        nb = fetch_transcript(b, sid)[1]
        nbformat.validate(nb)
        assert [_stdout(c) for c in nb.cells] == ["before the restart\n", "after the restart\n"]
        assert nb.metadata.broker.session == sid
    finally:
        b.stop()


def test_transcript_cells_live_in_the_file_not_in_memory(tmp_path):
    """A long session's transcript does not grow the broker: recorded cells
    are kept only until written, and each write copies the cells already in
    the file.  The file keeps nbformat's layout (indent 1, sorted keys), and a
    transcript read back (a broker restarted) goes on from where it was."""
    import tracemalloc

    from broker.transcripts import Transcript, TranscriptSettings, now_iso

    path = str(tmp_path / "transcript.ipynb")
    sid = "00000000-0000-4000-8000-000000000000"
    t = Transcript(path, TranscriptSettings(), sid)
    text = "x" * 10_000 + "\n"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            t.add_code(f"print({i})", [{"output_type": "stream", "name": "stdout", "text": text}],
                       tool="ExecutePythonCode", status="success", execution_count=i + 1,
                       started=now_iso(), ended=now_iso())
            t.add_event("uploads", {"path": f"/mnt/data/f{i}"})
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    size = os.path.getsize(path)
    assert size > 2_000_000
    assert held < size / 10, f"the transcript object holds {held} bytes for a {size}-byte file"
    raw = open(path, encoding="utf-8").read()
    assert raw == json.dumps(json.loads(raw), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    nb = nbformat.reads(raw, as_version=4)
    nbformat.validate(nb)
    assert len(nb.cells) == t.cell_count == 200 and nb.cells[199].source == "print(199)"
    assert [u["before_cell"] for u in nb.metadata.broker.uploads][:3] == [1, 2, 3]
    assert t.to_json() == raw

    again = Transcript(path, TranscriptSettings(), sid)
    again.add_code("print('after')", [], tool="ExecutePythonCode", status="success", execution_count=1,
                   started=now_iso(), ended=now_iso())
    again.add_event("downloads", {"path": "/mnt/data/out.csv"})
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert [c.source for c in nb.cells][-2:] == ["print(199)", "print('after')"]
    assert len(nb.metadata.broker.uploads) == 200
    assert nb.metadata.broker.downloads[0]["before_cell"] == 201
    assert [c.source for c in again.cells()] == [c.source for c in nb.cells]
