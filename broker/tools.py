"""The seed's eight tools: argument validation and result shaping.

One place, shared by every surface (REST now; MCP or others later).  The
parameter names, defaults and maxima are the contract from the product we
reproduce (see docs/api.md).  Every result is a dict with ``status``
(``success``, ``error`` or ``timeout``), ``markdown`` ready to show to a model
or a person, and the structured fields.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

from broker.changes import Changed
from broker.errors import InvalidArgument, NotFound
from broker.files import FileError, guess_type, is_image, normalise
from broker.sandbox.shell import run_shell

MAX_CODE = 20_000


@dataclass
class Param:
    name: str
    type: str                      # string | integer | boolean
    description: str
    required: bool = False
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None

    def schema(self) -> dict:
        s: dict = {"type": self.type, "description": self.description}
        if self.default is not None:
            s["default"] = self.default
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        if self.max_length is not None:
            s["maxLength"] = self.max_length
        return s

    def allowed(self) -> str:
        if self.type == "integer":
            return f"an integer from {self.minimum} to {self.maximum}"
        if self.type == "boolean":
            return "true or false"
        if self.max_length:
            return f"a string of at most {self.max_length:,} characters"
        return "a string"

    def check(self, value):
        where = f"{self.name!r}"
        if self.type == "string":
            if not isinstance(value, str):
                raise InvalidArgument(f"{where} must be {self.allowed()}; got {type(value).__name__}",
                                      self.name, self.allowed())
            if self.max_length is not None and len(value) > self.max_length:
                raise InvalidArgument(f"{where} is {len(value):,} characters long; at most {self.max_length:,} "
                                      "are allowed", self.name, self.allowed())
            if self.required and not value.strip():
                raise InvalidArgument(f"{where} must not be empty", self.name, self.allowed())
            return value
        if self.type == "integer":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    isinstance(value, float) and not value.is_integer()):
                raise InvalidArgument(f"{where} must be {self.allowed()}; got {value!r}", self.name, self.allowed())
            value = int(value)
            if (self.minimum is not None and value < self.minimum) or (
                    self.maximum is not None and value > self.maximum):
                raise InvalidArgument(f"{where} is {value}; it must be {self.allowed()}", self.name, self.allowed())
            return value
        if self.type == "boolean":
            if not isinstance(value, bool):
                raise InvalidArgument(f"{where} must be true or false; got {value!r}", self.name, self.allowed())
            return value
        raise AssertionError(self.type)


@dataclass
class Tool:
    name: str
    description: str
    params: list[Param] = field(default_factory=list)

    def validate(self, args) -> dict:
        if not isinstance(args, dict):
            raise InvalidArgument(f"the body of {self.name} must be a JSON object with the fields "
                                  f"{', '.join(p.name for p in self.params)}")
        known = {p.name: p for p in self.params}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise InvalidArgument(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                                  f"for {self.name}; known fields: {', '.join(known)}", unknown[0],
                                  ", ".join(known))
        out = {}
        for p in self.params:
            if p.name not in args or args[p.name] is None:
                if p.required:
                    raise InvalidArgument(f"{p.name!r} is required for {self.name} ({p.allowed()})",
                                          p.name, p.allowed())
                out[p.name] = p.default
            else:
                out[p.name] = p.check(args[p.name])
        return out


def _timeout(default, maximum):
    return Param("timeoutSeconds", "integer", f"Execution timeout in seconds (default {default}, maximum {maximum}).",
                 default=default, minimum=1, maximum=maximum)


TOOLS: dict[str, Tool] = {t.name: t for t in [
    Tool("ExecutePythonCode", "Runs Python code in the session's sandboxed kernel. Images show inline as "
         "markdown; data files return as download links.", [
        Param("pythonCode", "string", "Python code to run (up to 20,000 characters).", required=True,
              max_length=MAX_CODE),
        _timeout(120, 900)]),
    Tool("GeneratePdfReport", "Runs Python code that creates a PDF file and returns a download link for it.", [
        Param("pythonCode", "string", "Python code that creates a PDF file.", required=True, max_length=MAX_CODE),
        Param("expectedOutputFilename", "string", "Path where the code saves the PDF (for example report.pdf "
              "or /mnt/data/report.pdf).", required=True, max_length=1024),
        Param("saveAsFilename", "string", "Download file name (for example daily_summary.pdf).", required=True,
              max_length=255),
        _timeout(180, 900)]),
    Tool("RunShellCommand", "Runs a shell command in a fresh sandbox over the session's /mnt/data.", [
        Param("command", "string", "Shell command to run (bash; ; and && both chain commands).", required=True,
              max_length=MAX_CODE),
        Param("explanation", "string", "Description logged with the command.", max_length=2000),
        Param("isBackground", "boolean", "Must be false: background jobs are not supported.", default=False),
        _timeout(120, 240)]),
    Tool("ReadSessionFile", "Reads a file from /mnt/data.", [
        Param("path", "string", "File path, relative to /mnt/data or starting with /mnt/data/.", required=True,
              max_length=1024),
        Param("offset", "integer", "Byte offset to start reading at.", default=0, minimum=0, maximum=2**40),
        Param("maxBytes", "integer", "Most bytes to return (default 1 MiB, maximum 16 MiB).", default=1 << 20,
              minimum=1, maximum=16 << 20)]),
    Tool("SearchSessionFiles", "Searches text files in /mnt/data with a grep-style regular expression.", [
        Param("pattern", "string", "Regular expression (Python syntax, like grep -E).", required=True,
              max_length=1000),
        Param("path", "string", "Folder to search below (default: all of /mnt/data).", default="", max_length=1024),
        Param("glob", "string", "Only files whose name matches this glob (for example *.log).", max_length=200),
        Param("ignoreCase", "boolean", "Case-insensitive match.", default=False),
        Param("maxResults", "integer", "Most matching lines to return (default 100, maximum 1000).", default=100,
              minimum=1, maximum=1000)]),
    Tool("ListSessionFiles", "Lists the files in /mnt/data with size, modified time and type.", [
        Param("path", "string", "Folder to list below (default: all of /mnt/data).", default="", max_length=1024)]),
    Tool("GetSessionFile", "Returns a download link for a file in /mnt/data.", [
        Param("path", "string", "File path, relative to /mnt/data or starting with /mnt/data/.", required=True,
              max_length=1024),
        Param("saveAsFilename", "string", "Download file name (default: the file's own name).", max_length=255)]),
    Tool("UploadFileToSession", "Uploads a file (base64 content) into /mnt/data.", [
        Param("path", "string", "Destination path, relative to /mnt/data or starting with /mnt/data/.",
              required=True, max_length=1024),
        Param("content", "string", "The file's bytes, base64-encoded.", required=True),
        Param("overwrite", "boolean", "Replace an existing file (default true).", default=True)]),
]}

INSTALL_RE = re.compile(
    r"(^|[;&|(`\s])(sudo\s+)?(pip3?(\.\d+)?|python3?(\.\d+)?\s+-m\s+pip|conda|mamba|micromamba|uv\s+pip|uv|"
    r"poetry|apt-get|apt|npm|gem)\s+(install|add)\b")
PACKAGE_MESSAGE = ("Package installation is unavailable: the sandbox has no network and cannot install packages. "
                   "Preinstalled: pandas, numpy, scipy, matplotlib, seaborn, reportlab, pillow, openpyxl, xlrd, "
                   "odfpy, pyyaml, lxml, h5py, netCDF4, xarray, python-docx, python-pptx, pypdf, beautifulsoup4, "
                   "markdown, tabulate.")


def get_tool(name: str) -> Tool:
    tool = TOOLS.get(name)
    if tool is None:
        raise NotFound(f"no tool {name!r}; the tools are: {', '.join(TOOLS)}")
    return tool


# -- markdown -------------------------------------------------------------------

def _fence(text: str, lang: str = "text") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(result: dict) -> str:
    parts = []
    if result.get("stdout"):
        parts.append(_fence(result["stdout"]))
    if result.get("stderr"):
        parts.append("stderr:\n" + _fence(result["stderr"]))
    if result.get("result"):
        parts.append(_fence(result["result"]))
    err = result.get("error")
    if err:
        head = f"**{err['ename']}**: {err['evalue']}" if err.get("evalue") else f"**{err['ename']}**"
        parts.append(head)
        if err.get("traceback"):
            parts.append(_fence(err["traceback"]))
    for img in result.get("images", []):
        parts.append(f"![{img['name']}]({img['url']})")
    files = result.get("files", [])
    if files:
        parts.append("\n".join(f"- [{f['name']}]({f['url']}) ({_human(f['size'])})" for f in files))
    if result.get("notice"):
        parts.append(f"_{result['notice']}_")
    if not parts:
        parts.append("_(no output)_" if result.get("status") == "success" else f"_{result.get('status')}_")
    return "\n\n".join(parts)


# -- the calls --------------------------------------------------------------------

class ToolContext:
    """What a tool call needs: the session, link building, and options."""

    def __init__(self, session, links, inline_images: str = "url"):
        self.session = session
        self.links = links
        self.inline_images = inline_images

    def file_entry(self, path: str, size: int, name: str | None = None) -> dict:
        name = name or os.path.basename(path)
        return {"name": name, "path": f"/mnt/data/{path}", "size": size, "type": guess_type(name),
                "url": self.links.file(self.session.id, path, name if name != os.path.basename(path) else "")}

    def image_entry(self, path: str, blob: bytes, mime: str) -> dict:
        entry = self.file_entry(path, len(blob))
        entry["type"] = mime
        if self.inline_images == "data":
            entry["url"] = f"data:{mime};base64,{base64.b64encode(blob).decode()}"
        return entry


def _changed_files(ctx: ToolContext, files, changes: list[Changed]) -> tuple[list, list, set]:
    """Files the call created or changed: images inline, the rest as links.
    Returns (images, links, sha256 of each inline image)."""
    images, links, digests = [], [], set()
    max_image = ctx.session.manager.executor.max_image_bytes
    for c in changes:
        if is_image(c.path) and c.size <= max_image:
            try:
                blob, _, _ = files.read(c.path, limit=c.size)
            except FileError:
                continue
            digests.add(hashlib.sha256(blob).hexdigest())
            images.append(ctx.image_entry(c.path, blob, guess_type(c.path)))
        else:
            links.append(ctx.file_entry(c.path, c.size))
    return images, links, digests


def _files_changed(changes: list[Changed]) -> dict:
    """The exact count and total size of what a call changed, however long the lists shown."""
    return {"count": len(changes), "bytes": sum(c.size for c in changes)}


async def _run_python(ctx: ToolContext, code: str, timeout: int) -> dict:
    s = ctx.session
    kernel = await s.ensure_kernel()
    files = s.files
    tracker = s.changes
    rec = tracker.begin()
    try:
        outcome = await s.manager.executor.run(kernel, code, timeout)
    finally:
        s.touch()
        changes = tracker.end(rec)
    # Image files the code saved (savefig) or changed.
    images, links, seen = _changed_files(ctx, files, changes)
    saved_images = {img["path"] for img in images}
    # Images the code displayed (plt.show, IPython.display): written to
    # /mnt/data/outputs so they can be downloaded like any file.
    for n, img in enumerate(outcome.images, 1):
        digest = hashlib.sha256(img["data"]).hexdigest()
        # A figure saved with savefig and then shown is reported once, as the
        # saved file (the kernel marks the display with where it was saved).
        if digest in seen or saved_images.intersection(img.get("saved_as", [])):
            continue
        seen.add(digest)
        ext = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/svg+xml": "svg",
               "image/webp": "webp"}[img["mime"]]
        path = f"outputs/image-{outcome.execution_count or 0}-{n}.{ext}"
        try:
            files.write(path, img["data"])
        except FileError as exc:
            outcome.notice += f" An image could not be saved to /mnt/data ({exc.message}); it is inlined instead."
            entry = ctx.image_entry(path, img["data"], img["mime"])
            entry["url"] = f"data:{img['mime']};base64,{base64.b64encode(img['data']).decode()}"
            images.append(entry)
            continue
        images.append(ctx.image_entry(path, img["data"], img["mime"]))
    return {
        "status": outcome.status, "stdout": outcome.stdout, "stderr": outcome.stderr, "result": outcome.result,
        "error": outcome.error, "images": images, "files": links, "execution_count": outcome.execution_count,
        "duration_ms": outcome.duration_ms, "notice": outcome.notice.strip(), "truncated": outcome.truncated,
        "kernel_restarted": outcome.kernel_restarted, "outputs": outcome.outputs,
        "files_changed": _files_changed(changes),
    }


async def execute_python(ctx: ToolContext, args: dict) -> dict:
    async with ctx.session.lock:
        return await _run_python(ctx, args["pythonCode"], args["timeoutSeconds"])


async def generate_pdf(ctx: ToolContext, args: dict) -> dict:
    expected = _path_arg(args["expectedOutputFilename"], "expectedOutputFilename")
    save_as = args["saveAsFilename"].strip()
    if "/" in save_as or "\\" in save_as or save_as in (".", "..") or "\x00" in save_as:
        raise InvalidArgument("'saveAsFilename' must be a file name without folders (for example daily_summary.pdf)",
                              "saveAsFilename", "a file name such as report.pdf")
    if not save_as.lower().endswith(".pdf"):
        save_as += ".pdf"
    async with ctx.session.lock:
        result = await _run_python(ctx, args["pythonCode"], args["timeoutSeconds"])
    result["pdf"] = None
    if result["status"] != "success":
        return result
    files = ctx.session.files
    try:
        head, st, rel = files.read(expected, limit=5)
    except FileError as exc:
        result["status"] = "error"
        result["error"] = {"ename": "PdfNotCreated", "traceback": "",
                           "evalue": f"the code ran but {args['expectedOutputFilename']!r} was not created: {exc.message}"}
        return result
    if not head.startswith(b"%PDF-"):
        result["status"] = "error"
        result["error"] = {"ename": "NotAPdf", "traceback": "",
                           "evalue": f"{args['expectedOutputFilename']!r} exists but is not a PDF (it does not start with %PDF-)"}
        return result
    entry = ctx.file_entry(rel, st.st_size, save_as)
    entry["type"] = "application/pdf"
    try:
        blob, _, _ = files.read(rel, limit=st.st_size)
        entry["sha256"] = hashlib.sha256(blob).hexdigest()
    except FileError:
        pass
    result["pdf"] = entry
    result["files"] = [f for f in result["files"] if f["path"] != entry["path"]]
    result["files"].insert(0, entry)
    return result


def _path_arg(value: str, name: str) -> str:
    try:
        rel = normalise(value)
    except FileError as exc:
        raise InvalidArgument(f"{name!r}: {exc.message}", name, "a path inside /mnt/data") from None
    if not rel:
        raise InvalidArgument(f"{name!r} must name a file inside /mnt/data", name, "a path inside /mnt/data")
    return rel


async def run_shell_command(ctx: ToolContext, args: dict) -> dict:
    if args["isBackground"]:
        raise InvalidArgument("'isBackground' must be false: background jobs are not supported; run the command "
                              "in the foreground with a timeoutSeconds of at most 240", "isBackground", "false")
    cmd = args["command"]
    if INSTALL_RE.search(cmd):
        result = {"status": "error", "stdout": "", "stderr": "", "exit_code": None, "files": [], "images": [],
                  "error": {"ename": "PackageInstallationUnavailable", "evalue": PACKAGE_MESSAGE, "traceback": ""},
                  "files_changed": {"count": 0, "bytes": 0},
                  "duration_ms": 0, "notice": "", "truncated": {}}
        return result
    s = ctx.session
    async with s.lock:
        await s.ensure_kernel()      # the kernel's uid owns /mnt/data; the shell runs as that uid
        files = s.files
        tracker = s.changes
        rec = tracker.begin()
        try:
            settings = s.kernel.provisioner
            r = await run_shell(cmd, s.data_dir, settings, timeout=args["timeoutSeconds"],
                                output_limit=s.manager.shell_output_limit, cgroup=s.shell_cgroup(settings))
        finally:
            s.touch()
            changes = tracker.end(rec)
    images, links, _ = _changed_files(ctx, files, changes)
    notice = ""
    status = "success" if r.exit_code == 0 else "error"
    error = None
    if r.timed_out:
        status = "timeout"
        notice = f"The command exceeded its timeout of {args['timeoutSeconds']} s and was killed with all its processes."
        error = {"ename": "TimeoutError", "evalue": f"Command exceeded timeoutSeconds={args['timeoutSeconds']}",
                 "traceback": ""}
    elif r.truncated:
        notice = f"Output passed the {s.manager.shell_output_limit} byte limit; the command was stopped and the rest dropped."
    elif r.exit_code != 0:
        why = f"killed by signal {r.signal}" if r.signal else f"exited with status {r.exit_code}"
        error = {"ename": "CommandFailed", "evalue": f"the command {why}", "traceback": ""}
    stdout, stderr = r.stdout, r.stderr
    if r.truncated:
        stdout += "\n[output truncated]\n"
    return {"status": status, "stdout": stdout, "stderr": stderr, "exit_code": r.exit_code, "error": error,
            "images": images, "files": links, "files_changed": _files_changed(changes),
            "duration_ms": r.duration_ms, "notice": notice,
            "truncated": {"output": True} if r.truncated else {}, "explanation": args.get("explanation")}


async def read_file(ctx: ToolContext, args: dict) -> dict:
    rel = _path_arg(args["path"], "path")
    data, st, rel = ctx.session.files.read(rel, limit=args["maxBytes"], offset=args["offset"])
    truncated = args["offset"] + len(data) < st.st_size
    try:
        text = data.decode("utf-8")
        encoding, content = "utf-8", text
    except UnicodeDecodeError:
        encoding, content = "base64", base64.b64encode(data).decode()
    entry = ctx.file_entry(rel, st.st_size)
    result = {"status": "success", "path": f"/mnt/data/{rel}", "size": st.st_size, "encoding": encoding,
              "content": content, "offset": args["offset"], "truncated": truncated, "type": guess_type(rel),
              "url": entry["url"]}
    if encoding == "utf-8":
        md = _fence(content)
    elif is_image(rel):
        md = f"![{os.path.basename(rel)}]({entry['url']})"
    else:
        md = f"Binary file ({_human(st.st_size)}): [{os.path.basename(rel)}]({entry['url']})"
    if truncated:
        md += f"\n\n_Showing bytes {args['offset']}–{args['offset'] + len(data)} of {st.st_size}._"
    result["markdown"] = md
    return result


async def search_files(ctx: ToolContext, args: dict) -> dict:
    path = normalise(args["path"] or "")
    matches, truncated = ctx.session.files.search(args["pattern"], path, ignore_case=args["ignoreCase"],
                                                  max_results=args["maxResults"], glob=args.get("glob"))
    for m in matches:
        m["path"] = f"/mnt/data/{m['path']}"
    lines = [f"{m['path'][len('/mnt/data/'):]}:{m['line']}:{m['text']}" for m in matches]
    md = _fence("\n".join(lines)) if lines else "_No matches._"
    if truncated:
        md += f"\n\n_Stopped at {args['maxResults']} matches._"
    return {"status": "success", "matches": matches, "count": len(matches), "truncated": truncated, "markdown": md}


async def list_files(ctx: ToolContext, args: dict) -> dict:
    infos = ctx.session.files.list(normalise(args["path"] or ""))
    files = []
    for i in infos:
        d = i.as_dict()
        d["path"] = f"/mnt/data/{i.path}"
        d["url"] = ctx.links.file(ctx.session.id, i.path)
        files.append(d)
    if files:
        rows = ["| name | size | modified | type |", "|---|---:|---|---|"]
        rows += [f"| {f['name']} | {_human(f['size'])} | {f['modified']} | {f['type']} |" for f in files]
        md = "\n".join(rows)
    else:
        md = "_/mnt/data is empty._"
    return {"status": "success", "files": files, "count": len(files), "markdown": md}


async def get_file(ctx: ToolContext, args: dict) -> dict:
    rel = _path_arg(args["path"], "path")
    info = ctx.session.files.stat(rel)
    name = (args.get("saveAsFilename") or "").strip() or os.path.basename(rel)
    if "/" in name:
        raise InvalidArgument("'saveAsFilename' must be a file name without folders", "saveAsFilename", "a file name")
    entry = ctx.file_entry(info.path, info.size, name)
    return {"status": "success", "name": name, "path": entry["path"], "size": info.size, "type": info.type,
            "url": entry["url"], "markdown": f"[{name}]({entry['url']}) ({_human(info.size)})"}


async def upload_file(ctx: ToolContext, args: dict) -> dict:
    rel = _path_arg(args["path"], "path")
    try:
        data = base64.b64decode(args["content"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("'content' must be base64-encoded bytes", "content", "base64 text") from None
    r = ctx.session.files.write(rel, data, overwrite=args["overwrite"])
    ctx.session.touch()
    entry = ctx.file_entry(r["path"], r["size"])
    return {"status": "success", "path": entry["path"], "size": r["size"], "sha256": r["sha256"], "url": entry["url"],
            "markdown": f"Uploaded [{os.path.basename(rel)}]({entry['url']}) ({_human(r['size'])}) to {entry['path']}"}


HANDLERS = {
    "ExecutePythonCode": execute_python,
    "GeneratePdfReport": generate_pdf,
    "RunShellCommand": run_shell_command,
    "ReadSessionFile": read_file,
    "SearchSessionFiles": search_files,
    "ListSessionFiles": list_files,
    "GetSessionFile": get_file,
    "UploadFileToSession": upload_file,
}


def record(session, name: str, args: dict, result: dict, started: str, ended: str) -> None:
    """Add a tool call to the session's transcript."""
    t = session.transcript
    if name in ("ExecutePythonCode", "GeneratePdfReport"):
        extra = {"duration_ms": result.get("duration_ms"), "timeoutSeconds": args["timeoutSeconds"],
                 "images": [i["path"] for i in result.get("images", [])],
                 "files": [f["path"] for f in result.get("files", [])]}
        if result.get("notice"):
            extra["notice"] = result["notice"]
        if name == "GeneratePdfReport":
            extra["expectedOutputFilename"] = args["expectedOutputFilename"]
            extra["saveAsFilename"] = args["saveAsFilename"]
            pdf = result.get("pdf")
            if pdf:
                extra["pdf"] = {"path": pdf["path"], "saveAsFilename": pdf["name"], "size": pdf["size"],
                                "sha256": pdf.get("sha256")}
        outputs = result.get("outputs", [])
        if result.get("status") == "timeout":
            outputs = outputs + [{"output_type": "error", "ename": "TimeoutError",
                                  "evalue": result["error"]["evalue"], "traceback": [result.get("notice", "")]}]
        t.add_code(args["pythonCode"], outputs, tool=name, status=result["status"],
                   execution_count=result.get("execution_count"), started=started, ended=ended, extra=extra)
    elif name == "RunShellCommand":
        t.add_shell(args["command"], result, started, ended, args.get("explanation"))
    elif name == "UploadFileToSession":
        t.add_event("uploads", {"path": result["path"], "size": result["size"], "sha256": result["sha256"]})
    elif name == "GetSessionFile":
        t.add_event("downloads", {"path": result["path"], "name": result["name"], "size": result["size"]})


async def call_tool(ctx: ToolContext, name: str, raw_args) -> dict:
    from broker.transcripts import now_iso

    tool = get_tool(name)
    args = tool.validate(raw_args)
    ctx.session.touch()
    started = now_iso()
    result = await HANDLERS[name](ctx, args)
    try:
        record(ctx.session, name, args, result, started, now_iso())
    except Exception:  # the call itself succeeded; a transcript problem must not hide it
        import logging

        logging.getLogger("broker").exception("could not record %s in the transcript", name)
    result.pop("outputs", None)  # nbformat outputs are for the transcript, not the caller
    result["tool"] = name
    if "markdown" not in result:
        result["markdown"] = render(result)
    return result
