"""``broker replay``: run a transcript again in a fresh session and compare.

Input files recorded as uploads are taken from ``--files DIR`` and checked by
sha256 first; missing or changed ones are listed in one error before anything
runs.  Each cell is re-run through the tool that made it (ExecutePythonCode,
GeneratePdfReport, RunShellCommand; a WebSocket execution through
ExecutePythonCode), its outputs are compared after normalising what
legitimately changes, and a per-cell report is printed.  The replayed
notebook is written out; the exit status is 0 only when every cell matches.

Normalised before comparing: ANSI codes, memory addresses (0x7f…), dates and
times, durations, execution counts, temporary paths; images are compared by
presence, type and pixel size, not bytes.
"""

from __future__ import annotations

import base64
import copy
import difflib
import hashlib
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field

import nbformat

from broker.errors import BrokerError


class ReplayError(BrokerError):
    """The transcript cannot be replayed as given (bad file, missing inputs)."""

    status = 400
    reason = "replay_error"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ADDR = re.compile(r"0x[0-9a-fA-F]{6,16}")
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?")
_TIME = re.compile(r"\b\d{1,2}:\d{2}:\d{2}(\.\d+)?\b")
_DURATION = re.compile(r"\b\d+(\.\d+)?\s?(ns|µs|us|ms|s|sec|seconds)\b")
_TMP = re.compile(r"/tmp/[A-Za-z0-9_.-]+")
_SESSION_URL = re.compile(r"/api/sessions/[0-9a-f-]{36}/files/[^\s)\"']*")


def normalise_text(text: str) -> str:
    text = _ANSI.sub("", text)
    text = _SESSION_URL.sub("<FILE-URL>", text)
    text = _DATETIME.sub("<DATETIME>", text)
    text = _TIME.sub("<TIME>", text)
    text = _ADDR.sub("0xADDR", text)
    text = _DURATION.sub("<DURATION>", text)
    text = _TMP.sub("/tmp/<TMP>", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _png_size(b64: str):
    try:
        raw = base64.b64decode(b64[:200] + "=" * (-len(b64[:200]) % 4))
        if raw[:8] == b"\x89PNG\r\n\x1a\n":
            return struct.unpack(">II", raw[16:24])
    except (ValueError, struct.error):
        pass
    return None


def summarise(outputs: list) -> list:
    """Outputs reduced to what should be the same on every run."""
    out = []
    streams: dict[str, str] = {}
    for o in outputs:
        t = o.get("output_type")
        if t == "stream":
            streams[o.get("name", "stdout")] = streams.get(o.get("name", "stdout"), "") + o.get("text", "")
        elif t in ("display_data", "execute_result"):
            data = o.get("data", {})
            if "application/vnd.broker.files+json" in data:
                continue
            item = {"type": t}
            for mime, value in sorted(data.items()):
                if mime.startswith("image/") and mime != "image/svg+xml":
                    item[mime] = {"image": True, "size": _png_size(value) if mime == "image/png" else None}
                elif mime == "text/plain" or mime.startswith("text/"):
                    item[mime] = normalise_text(value if isinstance(value, str) else "".join(value))
            out.append(item)
        elif t == "error":
            out.append({"type": "error", "ename": o.get("ename"), "evalue": normalise_text(o.get("evalue", ""))})
    for name in sorted(streams):
        text = normalise_text(streams[name])
        if text:
            out.insert(0, {"type": "stream", "name": name, "text": text})
    return out


def _describe_diff(a: list, b: list) -> str:
    import json

    left = json.dumps(a, indent=1, sort_keys=True).splitlines()
    right = json.dumps(b, indent=1, sort_keys=True).splitlines()
    diff = list(difflib.unified_diff(left, right, "recorded", "replayed", lineterm="", n=1))
    return "\n".join(diff[:40])


@dataclass
class CellReport:
    index: int
    tool: str
    match: bool
    detail: str = ""


@dataclass
class Plan:
    nb: object
    uploads: list = field(default_factory=list)


def _invalid(exc) -> str:
    """A one-line account of a schema error: where, and what is wrong."""
    path = list(getattr(exc, "absolute_path", None) or [])
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
    msg = exc.message
    for key in ("cell_type", "output_type"):
        wrong = [c for c in (getattr(exc, "context", None) or [])
                 if c.validator == "enum" and list(c.relative_path)[-1:] == [key]]
        if wrong:
            allowed = sorted({v for c in wrong for v in c.validator_value})
            msg = f"{key} {wrong[0].instance!r} is not one of {', '.join(allowed)}"
            break
    if len(msg) > 200:
        msg = msg[:200] + "…"
    return f"{where}: {msg}" if where else msg


def load(path: str) -> nbformat.NotebookNode:
    # Read and validate without nbformat.read, which logs the whole invalid
    # notebook before returning it.
    try:
        with open(path, encoding="utf-8") as fh:
            nb = nbformat.convert(nbformat.reader.reads(fh.read()), 4)
    except FileNotFoundError:
        raise ReplayError(f"{path}: no such file") from None
    except Exception as exc:
        raise ReplayError(f"{path} is not a Jupyter notebook (nbformat could not read it: {str(exc)[:200]})") from None
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        raise ReplayError(f"{path} is not a valid nbformat v4 notebook: {_invalid(exc)}") from None
    return nb


def check_inputs(nb, files_dir: str | None) -> list[dict]:
    """The uploads to replay, each with its local file; one error listing every
    missing or changed input."""
    uploads = (nb.metadata.get("broker") or {}).get("uploads", [])
    problems, plan = [], []
    for up in uploads:
        rel = up["path"][len("/mnt/data/"):] if up["path"].startswith("/mnt/data/") else up["path"]
        local = os.path.join(files_dir, rel) if files_dir else None
        if local is None or not os.path.isfile(local):
            problems.append(f"missing: {rel} (expected {up.get('size')} bytes, sha256 {up.get('sha256', '?')[:12]}…)"
                            + ("" if files_dir else " — pass --files DIR"))
            continue
        with open(local, "rb") as fh:
            data = fh.read()
        digest = hashlib.sha256(data).hexdigest()
        if up.get("sha256") and digest != up["sha256"]:
            problems.append(f"changed: {rel} (sha256 {digest[:12]}… but the transcript recorded {up['sha256'][:12]}…)")
            continue
        plan.append({"path": rel, "data": data, "before_cell": up.get("before_cell", 0)})
    if problems:
        raise ReplayError("the transcript's input files are not all available:\n  " + "\n  ".join(problems))
    return plan


def cell_call(cell) -> tuple[str, dict] | None:
    """Which tool re-runs this cell, with which arguments."""
    if cell.cell_type != "code" or not cell.source.strip():
        return None
    meta = cell.metadata.get("broker", {})
    tool = meta.get("tool", "ExecutePythonCode")
    if tool == "RunShellCommand" or (tool not in ("GeneratePdfReport",) and cell.source.startswith("%%bash\n")):
        return "RunShellCommand", {"command": cell.source[len("%%bash\n"):] if cell.source.startswith("%%bash\n")
                                   else cell.source}
    if tool == "GeneratePdfReport":
        return "GeneratePdfReport", {"pythonCode": cell.source,
                                     "expectedOutputFilename": meta["expectedOutputFilename"],
                                     "saveAsFilename": meta["saveAsFilename"],
                                     "timeoutSeconds": meta.get("timeoutSeconds", 180)}
    args = {"pythonCode": cell.source}
    if meta.get("timeoutSeconds"):
        args["timeoutSeconds"] = meta["timeoutSeconds"]
    return "ExecutePythonCode", args


def _expected_status(cell) -> str:
    return cell.metadata.get("broker", {}).get("status", "success")


async def replay(nb, uploads: list, client, out_path: str | None = None, printer=print) -> tuple[list, object]:
    """Re-run every cell through *client* (call(tool, args) -> (result, cell)).

    Returns the per-cell reports and the replayed notebook."""
    replayed = copy.deepcopy(nb)
    reports: list[CellReport] = []
    pending = sorted(uploads, key=lambda u: u["before_cell"])
    for i, cell in enumerate(nb.cells):
        while pending and pending[0]["before_cell"] <= i:
            up = pending.pop(0)
            await client.upload(up["path"], up["data"])
        call = cell_call(cell)
        if call is None:
            continue
        tool, args = call
        result, new_cell = await client.call(tool, args)
        if new_cell is not None:
            replayed.cells[i].outputs = new_cell.outputs
            replayed.cells[i].execution_count = new_cell.execution_count
            replayed.cells[i].metadata = new_cell.metadata
        want, got = summarise(cell.outputs), summarise(new_cell.outputs if new_cell is not None else [])
        detail = ""
        ok = True
        if result.get("status") != _expected_status(cell):
            ok = False
            detail = f"status {result.get('status')!r}, recorded {_expected_status(cell)!r}"
        if tool == "RunShellCommand":
            rec = cell.metadata.get("broker", {}).get("exit_code")
            if rec is not None and result.get("exit_code") != rec:
                ok = False
                detail = (detail + "; " if detail else "") + f"exit code {result.get('exit_code')}, recorded {rec}"
        if want != got:
            ok = False
            detail = (detail + "\n" if detail else "") + _describe_diff(want, got)
        reports.append(CellReport(i, tool, ok, detail))
        printer(f"cell {i:>3} {tool:<18} {'match' if ok else 'MISMATCH'}")
        if not ok:
            for line in detail.splitlines():
                printer(f"      {line}")
    while pending:
        up = pending.pop(0)
        await client.upload(up["path"], up["data"])
    if out_path:
        nbformat.write(replayed, out_path)
    return reports, replayed


class InProcessClient:
    """A fresh session in a private, in-process broker (no HTTP)."""

    def __init__(self, parent=None):
        from broker.links import LinkSigner, Links
        from broker.sessions import SessionManager

        self.tmp = tempfile.mkdtemp(prefix="broker-replay-")
        os.chmod(self.tmp, 0o711)
        self.manager = SessionManager(parent=parent, data_root=os.path.join(self.tmp, "s"))
        self.links = Links("http://replay.invalid", LinkSigner())
        self.session = None

    async def start(self):
        os.makedirs(self.manager.data_root, mode=0o711, exist_ok=True)
        self.session = await self.manager.create("replay")

    async def upload(self, path: str, data: bytes):
        from broker.tools import ToolContext, call_tool

        await call_tool(ToolContext(self.session, self.links), "UploadFileToSession",
                        {"path": path, "content": base64.b64encode(data).decode()})

    async def call(self, tool: str, args: dict):
        from broker.tools import ToolContext, call_tool

        await self.session.transcript.flush()
        n = self.session.transcript.cell_count
        result = await call_tool(ToolContext(self.session, self.links), tool, args)
        await self.session.transcript.flush()
        if self.session.transcript.cell_count <= n:
            return result, None
        return result, self.session.transcript.cells()[n]

    async def close(self):
        import shutil

        await self.manager.shutdown()
        for s in list(self.manager.sessions.values()):
            await self.manager._delete(s)
        shutil.rmtree(self.tmp, ignore_errors=True)


class HttpClient:
    """A fresh session on a running broker."""

    def __init__(self, url: str, token: str):
        import requests

        self.url = url.rstrip("/")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.sid = None

    def _check(self, r):
        if r.status_code >= 400:
            try:
                msg = r.json().get("message")
            except ValueError:
                msg = r.text[:200]
            raise ReplayError(f"broker answered {r.status_code}: {msg}")
        return r

    async def start(self):
        self.sid = self._check(self.http.post(f"{self.url}/api/sessions", timeout=120)).json()["id"]

    async def upload(self, path: str, data: bytes):
        self._check(self.http.put(f"{self.url}/api/sessions/{self.sid}/files/{path}", data=data, timeout=300))

    async def call(self, tool: str, args: dict):
        r = self._check(self.http.post(f"{self.url}/api/sessions/{self.sid}/tools/{tool}", json=args, timeout=1000))
        nb = nbformat.reads(self._check(self.http.get(f"{self.url}/api/sessions/{self.sid}/transcript",
                                                      timeout=60)).text, as_version=4)
        return r.json(), (nb.cells[-1] if nb.cells else None)

    async def close(self):
        if self.sid:
            self.http.delete(f"{self.url}/api/sessions/{self.sid}", timeout=60)
