"""The Azure Container Apps dynamic sessions API (code-interpreter pools),
mapped onto broker sessions, so that Azure's clients (LangChain's
SessionsPythonREPLTool, Semantic Kernel's SessionsPythonTool, AutoGen, the
``az`` CLI, plain HTTP) work against the broker unchanged.

The pool management endpoint is ``<broker>/azure``.  Each request names a
session with the ``identifier`` query parameter; an unknown identifier starts
a session, as Azure does.  Identifiers belong to the token's owner: the map
(owner, identifier) -> session id is kept in ``<data_root>/.azure-identifiers.json``
so that it survives a restart, and every lookup also checks the session's
owner.  Code runs through the one tool layer (``ExecutePythonCode``); files go
through the session's safe resolver, as the REST file endpoints do.

Two API generations share the URLs and differ in shape:

* ``2024-02-02-preview`` (and ``2024-08-02-preview``): ``POST code/execute``
  with a ``properties`` envelope, ``POST files/upload``, ``GET files``,
  ``GET files/content/{name}``; results as ``{"properties": {...}}``;
* ``2024-10-02-preview`` onwards (``2025-10-02-preview``): ``POST executions``,
  ``POST files``, ``GET files``, ``GET files/{name}``,
  ``GET files/{name}/content``, ``DELETE files/{name}``, ``GET|DELETE session``.

Errors leave as Azure's ``{"error": {"code", "message", "target"}}`` with an
``x-ms-error-code`` header.  docs/azure.md has the mapping table.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import binascii
import datetime
import json
import math
import os
import re
import secrets
import uuid

from tornado import httputil

from broker.errors import BrokerError, InvalidArgument, NotFound
from broker.files import FileError, FileTooLarge, guess_type, normalise
from broker.tools import TOOLS, ToolContext, call_tool
from broker.web import files as rest_files
from broker.web.base import BaseHandler

API_PROPERTIES = ("2024-02-02-preview", "2024-08-02-preview")
API_RESOURCES = ("2024-10-02-preview", "2025-02-02-preview", "2025-10-02-preview")
API_VERSIONS = API_PROPERTIES + API_RESOURCES
# The service's own rule (the identifier parameter of the data-plane REST
# specification): 4 to 128 characters of this set.
IDENTIFIER_RE = re.compile(r"""[a-zA-Z0-9_|}{\[\]:";'<>?/.,@#$%^&*()\-+=!~`]{4,128}""")
IDENTIFIER_ALLOWED = ("4 to 128 characters: letters, digits and _ | } { [ ] : \" ; ' < > ? / . , @ # $ % ^ & * ( ) "
                      "- + = ! ~ `")
# Our tool's field names, as an Azure client calls them.
FIELD_NAMES = {"pythonCode": "code", "timeoutSeconds": "timeoutInSeconds"}
MULTIPART_SLACK = 1 << 20


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _pascal(reason: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in reason.split("_"))


class Identifiers:
    """(owner, identifier) -> session, persisted under the data root."""

    def __init__(self, sessions):
        self.sessions = sessions
        self.path = os.path.join(sessions.data_root, ".azure-identifiers.json")
        self._map: dict[str, dict[str, str]] | None = None
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _load(self) -> dict[str, dict[str, str]]:
        if self._map is None:
            try:
                with open(self.path) as fh:
                    data = json.load(fh)
                self._map = {str(o): {str(i): str(s) for i, s in m.items()} for o, m in data.items()}
            except FileNotFoundError:
                self._map = {}
            except (OSError, ValueError, AttributeError) as exc:
                self.sessions.log.warning("ignoring unreadable %s: %s", self.path, exc)
                self._map = {}
        return self._map

    def _save(self) -> None:
        live = self.sessions.sessions
        kept = {owner: {i: sid for i, sid in m.items() if sid in live and live[sid].owner == owner}
                for owner, m in self._load().items()}
        self._map = {owner: m for owner, m in kept.items() if m}
        tmp = os.path.join(os.path.dirname(self.path), f".azure-identifiers.{secrets.token_hex(4)}.json")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self._map, fh)
        os.replace(tmp, self.path)

    def find(self, owner: str, identifier: str):
        sid = self._load().get(owner, {}).get(identifier)
        s = self.sessions.sessions.get(sid) if sid else None
        # The owner check again: a map entry alone never hands out a session.
        return s if s is not None and s.owner == owner and not s.deleted else None

    async def session(self, owner: str, identifier: str):
        """The identifier's session, started when the identifier is new."""
        s = self.find(owner, identifier)
        if s is not None:
            return s
        key = (owner, identifier)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                s = self.find(owner, identifier)
                if s is None:
                    s = await self.sessions.create(owner)
                    self._load().setdefault(owner, {})[identifier] = s.id
                    self._save()
                return s
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]

    async def delete(self, owner: str, identifier: str) -> bool:
        s = self.find(owner, identifier)
        self._load().get(owner, {}).pop(identifier, None)
        if s is not None:
            await self.sessions.delete(s.id, owner)
        self._save()
        return s is not None


class AzureHandler(BaseHandler):
    """Auth as everywhere else; api-version and identifier as Azure takes
    them; errors in Azure's shape."""

    def initialize(self, identifiers: Identifiers):
        self.identifiers = identifiers

    def prepare(self):
        super().prepare()
        version = self.get_query_argument("api-version", "")
        if version not in API_VERSIONS:
            what = f"is {version!r}, which" if version else "is missing; it"
            raise InvalidArgument(f"query parameter 'api-version' {what} must be one of {', '.join(API_VERSIONS)}",
                                  "api-version", ", ".join(API_VERSIONS))
        self.api_version = version

    @property
    def resources(self) -> bool:
        """True for the 2024-10-02-preview generation and later."""
        return self.api_version in API_RESOURCES

    @property
    def identifier(self) -> str:
        ident = self.get_query_argument("identifier", "")
        if not IDENTIFIER_RE.fullmatch(ident):
            what = f"is {len(ident)} characters long or has a character outside the set" if ident else "is missing"
            raise InvalidArgument(f"query parameter 'identifier' {what}; it must be {IDENTIFIER_ALLOWED}",
                                  "identifier", IDENTIFIER_ALLOWED)
        return ident

    async def session(self):
        s = await self.identifiers.session(self.current_user, self.identifier)
        s.touch()
        return s

    def file_resource(self, path: str, size: int, mtime: float, kind: str = "file") -> dict:
        """One file as the chosen generation describes it (*path* relative to /mnt/data)."""
        directory, name = os.path.split(path)
        if self.resources:
            return {"name": name, "directory": directory, "type": kind,
                    "contentType": guess_type(name) if kind == "file" else "application/octet-stream",
                    "sizeInBytes": size, "lastModifiedAt": _iso(mtime)}
        return {"properties": {"filename": path, "size": size, "lastModifiedTime": _iso(mtime)}}

    # -- errors in Azure's shape -------------------------------------------------------
    def _azure_error(self, status: int, code: str, message: str, target: str | None = None) -> None:
        self.clear()
        self.set_default_headers()
        self.set_status(status)
        self.set_header("x-ms-error-code", code)
        if status == 401:
            self.set_header("WWW-Authenticate", "Bearer")
        error = {"code": code, "message": message}
        if target:
            error["target"] = target
        self.finish(json.dumps({"error": error}))

    def _handle_request_exception(self, e):
        if isinstance(e, BrokerError):
            if self._finished:
                return
            if e.status >= 500:
                self.log_exception(type(e), e, e.__traceback__)
            self._azure_error(e.status, _pascal(e.reason), e.message, getattr(e, "field", None))
            return
        super()._handle_request_exception(e)

    def write_error(self, status_code, **kwargs):
        message = "internal error (see the broker's log)" if status_code >= 500 else self._reason
        self._azure_error(status_code, _pascal(self._reason.lower().replace(" ", "_")), message)


# -- code ---------------------------------------------------------------------------------

def _result_value(text: str | None):
    """The last expression's repr as JSON, the way the service turns it: bool,
    int, float and string literals become JSON values, anything else its repr."""
    if not text:
        return ""
    if text in ("True", "False"):
        return text == "True"
    if text[0] not in "'\"-.0123456789" or len(text) > 100_000:
        return text        # not a literal the service parses (and never a long parse)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return text
    if isinstance(value, float) and not math.isfinite(value):
        return text
    return value


class ExecuteHandler(AzureHandler):
    """POST code/execute (``{"properties": {...}}`` in and out) and POST
    executions (the request and the execution resource at top level)."""

    def initialize(self, identifiers: Identifiers, envelope: bool):
        super().initialize(identifiers)
        self.envelope = envelope

    def _request(self) -> tuple[str, int | None]:
        body = self.json_body()
        if not isinstance(body, dict):
            raise InvalidArgument("the body must be a JSON object", "body", "a JSON object")
        props = body.get("properties", body if not self.envelope else None)
        if not isinstance(props, dict):
            raise InvalidArgument('the body must be {"properties": {"code": ..., "codeInputType": "inline", '
                                  '"executionType": "synchronous"}}', "properties", "a JSON object")
        code = props.get("code")
        if not isinstance(code, str) or not code.strip():
            raise InvalidArgument("'code' is required: the Python code to run, as a string", "code", "a string")
        input_type = str(props.get("codeInputType") or "inline").lower()
        if input_type == "inlinebase64":
            try:
                code = base64.b64decode(code, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                raise InvalidArgument("'code' must be base64-encoded UTF-8 text when codeInputType is InlineBase64",
                                      "code", "base64 text") from None
        elif input_type not in ("inline", "inlinetext"):
            raise InvalidArgument(f"'codeInputType' is {props.get('codeInputType')!r}; it must be Inline, "
                                  "InlineText or InlineBase64", "codeInputType", "Inline, InlineText, InlineBase64")
        execution_type = str(props.get("executionType") or "synchronous").lower()
        if execution_type != "synchronous":
            raise InvalidArgument(f"'executionType' is {props.get('executionType')!r}; only Synchronous is supported "
                                  "(the broker answers when the code has finished)", "executionType", "Synchronous")
        timeout = props.get("timeoutInSeconds")
        return code, timeout

    async def post(self):
        code, timeout = self._request()
        args = {"pythonCode": code}
        if timeout is not None:
            args["timeoutSeconds"] = timeout
        try:
            TOOLS["ExecutePythonCode"].validate(args)
        except InvalidArgument as exc:
            field = FIELD_NAMES.get(exc.field, exc.field)
            message = exc.message
            for ours, theirs in FIELD_NAMES.items():
                message = message.replace(f"'{ours}'", f"'{theirs}'")
            raise InvalidArgument(message, field, exc.allowed) from None
        s = await self.session()
        r = await call_tool(ToolContext(s, self.links, "data"), "ExecutePythonCode", args)
        ok = r["status"] == "success"
        stderr = r.get("stderr") or ""
        err = r.get("error")
        if err:
            detail = err.get("traceback") or f"{err.get('ename')}: {err.get('evalue')}"
            detail = detail.replace("timeoutSeconds=", "timeoutInSeconds=")    # the field as the client sent it
            stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + detail.rstrip("\n") + "\n"
        result = self._image(s, r.get("images") or []) or _result_value(r.get("result"))
        ms = int(r.get("duration_ms") or 0)
        if self.envelope:
            self.write_json({"$id": "1", "properties": {
                "$id": "2", "status": "Success" if ok else "Failure", "stdout": r.get("stdout") or "",
                "stderr": stderr, "result": result, "executionTimeInMilliseconds": ms}})
            return
        execution_id = str(uuid.uuid4())
        self.set_header("operation-id", execution_id)
        body = {"id": execution_id, "identifier": self.identifier, "executionType": "Synchronous",
                "status": "Succeeded" if ok else "Failed",
                "result": {"stdout": r.get("stdout") or "", "stderr": stderr, "executionResult": result,
                           "executionTimeInMilliseconds": ms}}
        if err:
            body["error"] = {"error": {"code": "Timeout" if r["status"] == "timeout" else err.get("ename") or "Error",
                                       "message": (err.get("evalue") or "").replace("timeoutSeconds=", "timeoutInSeconds=")}}
        self.write_json(body)

    @staticmethod
    def _image(s, images: list) -> dict | None:
        """The first PNG the code showed or saved, as the service returns a
        displayed figure."""
        for img in images:
            if img.get("type") != "image/png":
                continue
            url = img.get("url") or ""
            if url.startswith("data:"):
                data = url.partition(",")[2]
            else:
                try:
                    blob, _, _ = s.files.read(img["path"], limit=s.manager.executor.max_image_bytes)
                except FileError:
                    continue
                data = base64.b64encode(blob).decode()
            return {"type": "image", "format": "png", "base64_data": data}
        return None


# -- files -----------------------------------------------------------------------------------

class FilesHandler(AzureHandler):
    """GET files (list), POST files (2024-10-02-preview on) and POST
    files/upload (2024-02-02-preview): multipart field ``file``."""

    def initialize(self, identifiers: Identifiers, legacy_upload: bool = False):
        super().initialize(identifiers)
        self.legacy_upload = legacy_upload

    def prepare(self):
        super().prepare()
        if self.request.method == "POST":
            cap = self.sessions.max_upload_bytes + MULTIPART_SLACK
            length = int(self.request.headers.get("Content-Length", 0) or 0)
            if length > cap:
                raise FileTooLarge(f"upload of {length} bytes is over the {self.sessions.max_upload_bytes} byte "
                                   "limit (SessionManager.max_upload_bytes)")

    def _folder(self) -> str:
        try:
            return normalise(self.get_query_argument("path", ""))
        except FileError as exc:
            raise InvalidArgument(f"query parameter 'path': {exc.message}", "path", "a folder inside /mnt/data") \
                from None

    async def get(self):
        if self.legacy_upload:
            raise NotFound("files/upload takes POST; list files with GET files")
        s = await self.session()
        folder = self._folder()
        recursive = self.get_query_argument("recursive", "false").lower() == "true" or not self.resources
        entries, dirs = [], {}
        for info in s.files.list(folder):
            rel = info.path[len(folder) + 1:] if folder else info.path
            if not recursive and "/" in rel:
                top = rel.split("/", 1)[0]
                dirs[top] = max(dirs.get(top, 0.0), info.modified)
                continue
            entries.append(self.file_resource(rel, info.size, info.modified))
        entries += [self.file_resource(d, 4096, mtime, "directory") for d, mtime in sorted(dirs.items())]
        self.write_json({"$id": "1", "value": entries} if not self.resources else {"value": entries})

    async def post(self):
        if not self.legacy_upload and not self.resources:
            raise NotFound(f"upload with POST files/upload for api-version {self.api_version}, or use "
                           f"api-version {API_RESOURCES[-1]} with POST files")
        s = await self.session()
        args, files = {}, {}
        body, ctype = self.request.body, self.request.headers.get("Content-Type", "")
        first = body[:80].split(b"\r\n", 1)[0]
        if not ctype.startswith("multipart/form-data") and first.startswith(b"--") and len(first) > 2:
            # Semantic Kernel leaves its JSON Content-Type on the shared HTTP
            # client, so its multipart uploads arrive labelled application/json;
            # the service reads them anyway, by the boundary on the first line.
            httputil.parse_multipart_form_data(first[2:], body, args, files)
        else:
            httputil.parse_body_arguments(ctype, body, args, files)
        uploads = [f for fs in files.values() for f in fs]
        if not uploads:
            raise InvalidArgument("the multipart upload has no file part (send the file in a field named 'file')",
                                  "file", "a multipart/form-data file part")
        folder = self._folder()
        made = []
        for f in uploads:
            # The part's file name is the destination (Semantic Kernel sends
            # /mnt/data/name); the path parameter is the folder it goes in.
            try:
                name = normalise(f["filename"] or "")
            except FileError as exc:
                raise InvalidArgument(f"file name {f['filename']!r}: {exc.message}", "file",
                                      "a file name inside /mnt/data") from None
            if not name:
                raise InvalidArgument("the file part has no file name", "file", "a file name such as data.csv")
            rel = f"{folder}/{name}" if folder else name
            r = s.files.write(rel, f["body"])
            s.transcript.add_event("uploads", {"path": f"/mnt/data/{r['path']}", "size": r["size"],
                                               "sha256": r["sha256"]})
            made.append(self.file_resource(r["path"], r["size"], s.files.stat(r["path"]).modified))
        s.touch()
        if self.resources:
            self.write_json(made[0])
        else:
            self.write_json({"$id": "1", "value": made})


class FileHandler(AzureHandler, rest_files.FileHandler):
    """GET files/content/{name} (2024-02-02-preview), GET files/{name}/content
    and GET|DELETE files/{name} (2024-10-02-preview on).  Downloads stream
    through the REST download code."""

    allow_signed = False

    def _target(self, name: str) -> tuple[str, bool]:
        """(path relative to /mnt/data, whether the content is wanted)."""
        content = False
        if not self.resources and name.startswith("content/"):
            name, content = name[len("content/"):], True
        elif self.resources and name.endswith("/content"):
            name, content = name[:-len("/content")], True
        folder = self.get_query_argument("path", "")
        try:
            rel = normalise(f"{folder.rstrip('/')}/{name}" if folder else name)
        except FileError as exc:
            raise InvalidArgument(f"file name {name!r}: {exc.message}", "name", "a file inside /mnt/data") from None
        return rel, content

    def _session(self, sid):
        return self._azure_session

    async def get(self, name):
        rel, content = self._target(name)
        self._azure_session = s = await self.session()
        if content:
            await super().get(s.id, rel)
            return
        info = s.files.stat(rel)
        self.write_json(self.file_resource(info.path, info.size, info.modified) if self.resources else
                        {"$id": "1", "value": [self.file_resource(info.path, info.size, info.modified)]})

    async def delete(self, name):
        rel, _ = self._target(name)
        s = await self.session()
        s.files.delete(rel)
        s.touch()
        self.set_status(204)
        self.finish()

    async def post(self, name):
        raise NotFound(f"no such operation: POST files/{name}")

    async def put(self, name):
        raise NotFound(f"no such operation: PUT files/{name}")


class SessionHandler(AzureHandler):
    """GET session (its times) and DELETE session (release it, files and all)."""

    async def get(self):
        s = self.identifiers.find(self.current_user, self.identifier)
        if s is None:
            raise NotFound(f"no session with identifier {self.identifier!r}")
        self.write_json({"identifier": self.identifier, "createdAt": _iso(s.created),
                         "lastAccessedAt": _iso(s.last_activity), "expireAt": _iso(s.expires_at), "etag": s.id})

    async def delete(self):
        # 204 also for an identifier never used: clients release sessions
        # they may not have started (LangChain's close()).
        await self.identifiers.delete(self.current_user, self.identifier)
        self.set_status(204)
        self.finish()


class UnknownHandler(AzureHandler):
    def prepare(self):
        BaseHandler.prepare(self)
        raise NotFound(f"no such operation: {self.request.method} {self.request.path}; the supported ones are "
                       "POST code/execute, POST executions, GET|POST files, POST files/upload, "
                       "GET files/content/{name}, GET|DELETE files/{name}, GET files/{name}/content, "
                       "GET|DELETE session")


def routes(state, prefix: str = "/azure") -> list:
    ids = {"identifiers": Identifiers(state.sessions)}
    return [
        (rf"{prefix}/code/execute/?", ExecuteHandler, {**ids, "envelope": True}),
        (rf"{prefix}/executions/?", ExecuteHandler, {**ids, "envelope": False}),
        (rf"{prefix}/files/?", FilesHandler, ids),
        (rf"{prefix}/files/upload/?", FilesHandler, {**ids, "legacy_upload": True}),
        (rf"{prefix}/files/(?P<name>.+)", FileHandler, ids),
        (rf"{prefix}/session/?", SessionHandler, ids),
        (rf"{prefix}(/.*)?", UnknownHandler, ids),
    ]
