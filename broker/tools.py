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
import logging
import os
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from broker import results
from broker.changes import Changed
from broker.errors import InvalidArgument, NotFound
from broker.files import FileError, guess_type, is_image, normalise
from broker.results import human
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

    @property
    def summary(self) -> str:
        """The description's first sentence (a one-line title for listings)."""
        return self.description.split(". ", 1)[0].rstrip(".") + "."

    def input_schema(self) -> dict:
        """The JSON Schema of the arguments (OpenAPI and MCP show this one)."""
        return {"type": "object", "additionalProperties": False,
                "required": [p.name for p in self.params if p.required],
                "properties": {p.name: p.schema() for p in self.params}}

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


# What a model needs to know, said once here and shown by every surface (the
# OpenAPI document, MCP, the Azure-compatible API): where files live, how
# results come back, what is installed, what is blocked and what to use
# instead, and the limits.
PREINSTALLED = ("pandas, numpy, scipy, matplotlib, seaborn, reportlab, pillow, openpyxl, xlrd, odfpy, pyyaml, "
                "lxml, h5py, netCDF4, xarray, python-docx, python-pptx, pypdf, beautifulsoup4, markdown, tabulate")
FILES_NOTE = ("Files live in /mnt/data, the working directory: uploaded files are there, and files saved there "
              "come back as download links.")
RESULTS_NOTE = ("Answers are bounded (about 8,000 characters of markdown): long output keeps its head and tail with "
                "a count of what was cut, and the whole text is saved under /mnt/data/outputs/ (the notice says "
                "where; read it with ReadSessionFile or SearchSessionFiles); many new files are summarised by "
                "folder with exact counts.")
BLOCKED_NOTE = ("No network access and no package installation. Python cannot start processes (subprocess, "
                "os.system, !commands are refused): use RunShellCommand for shell work. Nothing outside /mnt/data "
                "is writable except /tmp.")

TOOLS: dict[str, Tool] = {t.name: t for t in [
    Tool("ExecutePythonCode", "Runs Python code in the session's sandboxed IPython kernel; variables and imports "
         "persist between calls. " + FILES_NOTE + " The answer shows, in the order the code produced them, "
         "printed output, the last expression's value, rich displays (display(df) as a markdown table, Markdown, "
         "HTML as text, LaTeX, JSON) and errors. Images show inline as markdown: matplotlib figures left open are "
         "shown at the end of the code (plt.show() is optional; plt.close() hides a figure; a figure saved with "
         "savefig is reported once, as the saved file). Preinstalled: " + PREINSTALLED + ". " + BLOCKED_NOTE
         + " " + RESULTS_NOTE + " Timeout: 120 s by default, at most 900 s; at the timeout the code is "
         "interrupted and the kernel kept (or restarted if it does not stop).", [
        Param("pythonCode", "string", "Python code to run (up to 20,000 characters).", required=True,
              max_length=MAX_CODE),
        _timeout(120, 900)]),
    Tool("GeneratePdfReport", "Runs Python code that creates a PDF file (for example with reportlab or "
         "matplotlib's PdfPages) at expectedOutputFilename in /mnt/data, checks that it is a PDF, and returns a "
         "download link named saveAsFilename. The code runs in the same kernel as ExecutePythonCode (its "
         "variables are available) with the same libraries and limits. Timeout: 180 s by default, at most 900 s.", [
        Param("pythonCode", "string", "Python code that creates a PDF file.", required=True, max_length=MAX_CODE),
        Param("expectedOutputFilename", "string", "Path where the code saves the PDF (for example report.pdf "
              "or /mnt/data/report.pdf).", required=True, max_length=1024),
        Param("saveAsFilename", "string", "Download file name (for example daily_summary.pdf).", required=True,
              max_length=255),
        _timeout(180, 900)]),
    Tool("RunShellCommand", "Runs a bash command in the session's shell sandbox over its /mnt/data (the working "
         "directory; use relative paths); nothing of the previous command survives (its processes are killed, "
         "/tmp is emptied). The usual command-line tools are there (coreutils, grep, sed, awk, "
         "find, xargs, sort, uniq, jq, sqlite3, zip/unzip, tar, gzip, diff); python and python3 are the kernel's "
         "interpreter with the same libraries. ; and && both chain commands. No network and no package "
         "installation (pip, apt-get and the like are refused); no background jobs. New or changed files come back "
         "as links, images inline. " + RESULTS_NOTE + " Timeout: 120 s by default, at most 240 s; the whole "
         "process tree is killed at the timeout.", [
        Param("command", "string", "Shell command to run (bash; ; and && both chain commands).", required=True,
              max_length=MAX_CODE),
        Param("explanation", "string", "Description logged with the command.", max_length=2000),
        Param("isBackground", "boolean", "Must be false: background jobs are not supported.", default=False),
        _timeout(120, 240)]),
    Tool("ReadSessionFile", "Reads a file from /mnt/data: text as UTF-8, anything else as base64 (images also "
         "inline). One answer holds about 8,000 characters of text; next_offset says where to read on (call again "
         "with offset). For a whole large file, use GetSessionFile's download link.", [
        Param("path", "string", "File path, relative to /mnt/data or starting with /mnt/data/.", required=True,
              max_length=1024),
        Param("offset", "integer", "Byte offset to start reading at.", default=0, minimum=0, maximum=2**40),
        Param("maxBytes", "integer", "Most bytes to return (default 1 MiB, maximum 16 MiB).", default=1 << 20,
              minimum=1, maximum=16 << 20)]),
    Tool("SearchSessionFiles", "Searches text files in /mnt/data with a grep-style regular expression (Python "
         "syntax) and returns path:line:text for each matching line; binary files and files over 16 MiB are "
         "skipped. count is exact up to maxResults; a long answer lists the first matches and says how many.", [
        Param("pattern", "string", "Regular expression (Python syntax, like grep -E).", required=True,
              max_length=1000),
        Param("path", "string", "Folder to search below (default: all of /mnt/data).", default="", max_length=1024),
        Param("glob", "string", "Only files whose name matches this glob (for example *.log).", max_length=200),
        Param("ignoreCase", "boolean", "Case-insensitive match.", default=False),
        Param("maxResults", "integer", "Most matching lines to return (default 100, maximum 1000).", default=100,
              minimum=1, maximum=1000)]),
    Tool("ListSessionFiles", "Lists the files in /mnt/data (or below path) with size, modified time, type and a "
         "download link. Past 100 files the answer is a summary by folder with exact counts and sizes; list a "
         "folder with path to see its files.", [
        Param("path", "string", "Folder to list below (default: all of /mnt/data).", default="", max_length=1024)]),
    Tool("GetSessionFile", "Returns a signed download link for a file in /mnt/data (optionally under another "
         "file name); the link works without a token until it expires.", [
        Param("path", "string", "File path, relative to /mnt/data or starting with /mnt/data/.", required=True,
              max_length=1024),
        Param("saveAsFilename", "string", "Download file name (default: the file's own name).", max_length=255)]),
    Tool("UploadFileToSession", "Uploads a file (base64 content) into /mnt/data, where code and shell commands "
         "can read it. Folders are created as needed; 128 MB at most by default.", [
        Param("path", "string", "Destination path, relative to /mnt/data or starting with /mnt/data/.",
              required=True, max_length=1024),
        Param("content", "string", "The file's bytes, base64-encoded.", required=True),
        Param("overwrite", "boolean", "Replace an existing file (default true).", default=True)]),
]}

INSTALL_RE = re.compile(
    r"(^|[;&|(`\s])(sudo\s+)?(pip3?(\.\d+)?|python3?(\.\d+)?\s+-m\s+pip|conda|mamba|micromamba|uv\s+pip|uv|"
    r"poetry|apt-get|apt|npm|gem)\s+(install|add)\b")
PACKAGE_MESSAGE = ("Package installation is unavailable: the sandbox has no network and cannot install packages. "
                   "Preinstalled: " + PREINSTALLED + ".")


def get_tool(name: str) -> Tool:
    tool = TOOLS.get(name)
    if tool is None:
        raise NotFound(f"no tool {name!r}; the tools are: {', '.join(TOOLS)}")
    return tool


# -- the calls --------------------------------------------------------------------

_RESULT_SETTINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class ToolContext:
    """What a tool call needs: the session, link building, and options."""

    def __init__(self, session, links, inline_images: str = "url", progress=None):
        self.session = session
        self.links = links
        self.inline_images = inline_images
        self.progress = progress    # called with progress events while code runs (see call_tool)

    @property
    def results(self) -> results.ResultSettings:
        """The result budget, configured like the session manager (the app's
        configuration), made once per manager."""
        manager = self.session.manager
        settings = _RESULT_SETTINGS.get(manager)
        if settings is None:
            settings = _RESULT_SETTINGS[manager] = results.ResultSettings(parent=manager)
        return settings

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
    kernel, new_kernel = await s.kernel_for_code()   # new_kernel: the notice owed when the kernel is new
    files = s.files
    tracker = s.changes
    rec = tracker.begin()
    try:
        outcome = await s.manager.executor.run(kernel, code, timeout, progress=ctx.progress)
    finally:
        s.touch()
        changes = tracker.end(rec)
    # Image files the code saved (savefig) or changed.
    images, links, seen = _changed_files(ctx, files, changes)
    saved_images = {img["path"]: img for img in images}
    shown: dict[int, dict | None] = {}    # id(output) -> the image entry it shows, for the markdown's order
    shown_digests: dict[str, dict] = {}
    # Images the code displayed (plt.show, IPython.display): written to
    # /mnt/data/outputs so they can be downloaded like any file.
    for n, img in enumerate(outcome.images, 1):
        digest = hashlib.sha256(img["data"]).hexdigest()
        # A figure saved with savefig and then shown is reported once, as the
        # saved file (the kernel marks the display with where it was saved).
        same = next((saved_images[p] for p in img.get("saved_as", []) if p in saved_images), None)
        if same is not None:
            shown[id(img["output"])] = same
            continue
        if digest in seen:
            shown[id(img["output"])] = shown_digests.get(digest)   # None: a saved file, listed after the outputs
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
        else:
            entry = ctx.image_entry(path, img["data"], img["mime"])
        images.append(entry)
        shown[id(img["output"])] = shown_digests[digest] = entry
    if s.stop_notice and outcome.status != "success":
        outcome.status, outcome.error = "error", {"ename": "BrokerShuttingDown", "evalue": s.stop_notice,
                                                  "traceback": ""}
    return {
        "status": outcome.status, "stdout": outcome.stdout, "stderr": outcome.stderr, "result": outcome.result,
        "error": outcome.error, "images": images, "files": links, "execution_count": outcome.execution_count,
        "duration_ms": outcome.duration_ms,
        "notice": " ".join(filter(None, (new_kernel, outcome.notice.strip(), s.stop_notice))),
        "truncated": outcome.truncated,
        "kernel_restarted": outcome.kernel_restarted, "outputs": outcome.outputs, "_shown": shown,
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
                                output_limit=s.manager.shell_output_limit, cgroup=s.shell_cgroup(settings),
                                progress=ctx.progress, helper_host=settings)
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
    elif s.stop_notice:
        status, notice = "error", s.stop_notice
        error = {"ename": "BrokerShuttingDown", "evalue": s.stop_notice, "traceback": ""}
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
    entry = ctx.file_entry(rel, st.st_size)
    result = {"status": "success", "path": f"/mnt/data/{rel}", "size": st.st_size, "offset": args["offset"],
              "type": guess_type(rel), "url": entry["url"]}
    result.update(results.read_view(data, args["offset"], st.st_size, entry, is_image(rel), ctx.results))
    return result


async def search_files(ctx: ToolContext, args: dict) -> dict:
    path = normalise(args["path"] or "")
    matches, stopped = ctx.session.files.search(args["pattern"], path, ignore_case=args["ignoreCase"],
                                                max_results=args["maxResults"], glob=args.get("glob"))
    for m in matches:
        m["path"] = f"/mnt/data/{m['path']}"
    return {"status": "success", **results.search_view(matches, stopped, args["maxResults"], ctx.results)}


async def list_files(ctx: ToolContext, args: dict) -> dict:
    files = ctx.session.files
    where = normalise(args["path"] or "")
    infos = files.list(where)
    entries = []
    for i in infos:
        d = i.as_dict()
        d["path"] = f"/mnt/data/{i.path}"
        entries.append(d)

    def link(entry: dict) -> None:
        if "url" not in entry:
            entry["url"] = ctx.links.file(ctx.session.id, entry["path"][len("/mnt/data/"):])

    view = results.listing_view(entries, where, len(infos) >= files.max_list, ctx.results, link)
    return {"status": "success", **view}


async def get_file(ctx: ToolContext, args: dict) -> dict:
    rel = _path_arg(args["path"], "path")
    info = ctx.session.files.stat(rel)
    name = (args.get("saveAsFilename") or "").strip() or os.path.basename(rel)
    if "/" in name:
        raise InvalidArgument("'saveAsFilename' must be a file name without folders", "saveAsFilename", "a file name")
    entry = ctx.file_entry(info.path, info.size, name)
    return {"status": "success", "name": name, "path": entry["path"], "size": info.size, "type": info.type,
            "url": entry["url"], "markdown": f"[{name}]({entry['url']}) ({human(info.size)})"}


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
            "markdown": f"Uploaded [{os.path.basename(rel)}]({entry['url']}) ({human(r['size'])}) to {entry['path']}"}


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


def _guarded(progress):
    def report(event: dict) -> None:
        nonlocal progress
        if progress is None:
            return
        try:
            progress(event)
        except Exception:
            logging.getLogger("broker").exception("progress callback failed; no more progress for this call")
            progress = None
    return report


async def call_tool(ctx: ToolContext, name: str, raw_args, progress=None) -> dict:
    """Validate and run one tool call.  *progress*, if given, is called with
    an event dict as output happens (Python: :class:`broker.execution.Progress`;
    shell: :func:`broker.sandbox.shell.run_shell`); it must not block, and
    one that raises is dropped without disturbing the call."""
    from broker.transcripts import now_iso

    tool = get_tool(name)
    observer = ctx.session.manager.observer     # metrics and the call log; None in-process
    t0 = time.monotonic()
    try:
        args = tool.validate(raw_args)
        if progress is not None:
            ctx.progress = _guarded(progress)
        ctx.session.touch()
        started = now_iso()
        result = await HANDLERS[name](ctx, args)
    except BaseException as exc:
        if observer is not None:
            outcome = "rejected" if isinstance(exc, Exception) else "cancelled"
            observer.tool_call(ctx.session, name, outcome, time.monotonic() - t0)
        raise
    if observer is not None:
        observer.tool_call(ctx.session, name, str(result.get("status") or "success"), time.monotonic() - t0, result)
    try:
        record(ctx.session, name, args, result, started, now_iso())
    except Exception:  # the call itself succeeded; a transcript problem must not hide it
        import logging

        logging.getLogger("broker").exception("could not record %s in the transcript", name)
    shown = result.pop("_shown", None) or {}
    raw = result.pop("outputs", None) or []   # the executor's outputs are for the transcript
    result["tool"] = name
    if name in RUN_TOOLS:
        if name == "RunShellCommand":
            shaped = results.shell_blocks(result.get("stdout") or "", result.get("stderr") or "", result.get("error"))
        else:
            shaped = results.python_blocks(raw, shown, result.get("error"))
        full = {"stdout": result.get("stdout") or "", "stderr": result.get("stderr") or ""}
        # No await between the handler's release of the session lock and
        # here: the next call of the session cannot start in between, so the
        # whole texts written now are never counted among its new files.
        results.shape_run(result, shaped, ctx.results, _saver(ctx, name, result), full)
    elif "markdown" not in result:
        result["markdown"] = "_(no output)_"
    return result


RUN_TOOLS = ("ExecutePythonCode", "GeneratePdfReport", "RunShellCommand")


def _saver(ctx: ToolContext, name: str, result: dict):
    """Where the whole text of a cut output goes: /mnt/data/outputs/, named
    after the cell (``cell-<execution count>-stdout.txt``) or the shell call."""
    if name == "RunShellCommand":
        now = time.time()
        stem = f"shell-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{int(now * 1000) % 1000:03d}"
    else:
        stem = f"cell-{result.get('execution_count') or 0}"

    def save(key: str, text: str) -> str | None:
        path = f"outputs/{stem}-{key}.txt"
        try:
            ctx.session.files.write(path, text.encode("utf-8", "replace"))
        except FileError:
            return None
        return f"/mnt/data/{path}"

    return save
