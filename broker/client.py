"""A small, typed client for the broker's REST API, sync and async.

It speaks only HTTP (httpx) and imports nothing else from ``broker``, so it
can ship on its own.  docs/client.md is the guide; in short::

    from broker.client import Client

    with Client("http://127.0.0.1:8888", token) as broker, broker.create_session() as s:
        r = s.run("print(6 * 7)")                        # a ToolResult
        s.run("import time\\nfor i in range(3): print(i); time.sleep(1)",
              on_event=lambda e: print(e.type, e.data))   # progress as it happens
        s.upload("data.csv", b"x,y\\n1,2\\n")
        print([f.path for f in s.files()])
    # leaving the ``with`` deletes the session it created

``AsyncClient`` and ``AsyncSession`` offer the same methods as coroutines.
Results are dataclasses; every refusal of the broker is an ``ApiError``
subclass carrying the broker's ``message``, ``reason`` and, for a bad
argument, the ``field`` and what is ``allowed``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import IO, Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8888"
ENV_URL = "BROKER_URL"
ENV_TOKEN = "BROKER_TOKEN"
ENV_CONFIG = "BROKER_CONFIG"
DEFAULT_TIMEOUT = 60.0      # seconds for calls that do not run code
TOOL_MARGIN = 60.0          # above a tool's own timeoutSeconds: time for an interrupt and a kernel restart
MAX_TOOL_TIMEOUT = 900


# -- errors -------------------------------------------------------------------------------

class BrokerClientError(Exception):
    """Base class of everything this module raises."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(BrokerClientError):
    """No usable URL or token, or a config file that cannot be read."""


class ConnectionFailed(BrokerClientError):
    """The broker could not be reached, or the connection broke mid-answer."""


class ApiError(BrokerClientError):
    """The broker refused a request.  ``status`` is the HTTP status, ``reason``
    the broker's reason code; for a bad argument ``field`` names it and
    ``allowed`` says what is allowed."""

    def __init__(self, status: int, message: str, reason: str = "", field: str | None = None,
                 allowed: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.field = field
        self.allowed = allowed
        self.body = body or {}

    def __str__(self) -> str:
        return f"{self.message} [{self.status} {self.reason}]" if self.reason else self.message


class InvalidArgument(ApiError):
    """400: a field is missing, of the wrong type, out of range or unknown."""


class Unauthorized(ApiError):
    """401: no token or a wrong one."""


class NotFound(ApiError):
    """404: no such session (or another owner's), tool or file."""


class Conflict(ApiError):
    """409."""


class TooLarge(ApiError):
    """413: an upload or download over the broker's size cap."""


class TooManySessions(ApiError):
    """429: a session limit is reached; the message names which."""


class QuotaExceeded(ApiError):
    """507: the session's /mnt/data is full."""


class ServerError(ApiError):
    """5xx: the broker failed (a missing sandbox piece answers 503)."""


_BY_STATUS = {400: InvalidArgument, 401: Unauthorized, 404: NotFound, 409: Conflict, 413: TooLarge,
              429: TooManySessions, 507: QuotaExceeded}


def api_error(status: int, body: dict | None, text: str = "") -> ApiError:
    """The exception for an error answer (a JSON body or an SSE ``error`` event)."""
    body = body if isinstance(body, dict) else {}
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    message = body.get("message") or text.strip()[:500] or f"HTTP {status}"
    return cls(status, message, body.get("reason", ""), body.get("field"), body.get("allowed"), body)


# -- settings: flags, environment, config file -------------------------------------------

def config_path() -> str:
    """``$BROKER_CONFIG``, else ``$XDG_CONFIG_HOME/broker/client.json``
    (``~/.config/broker/client.json``)."""
    if os.environ.get(ENV_CONFIG):
        return os.environ[ENV_CONFIG]
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "broker", "client.json")


@dataclass(frozen=True)
class Settings:
    url: str
    token: str
    url_from: str        # where each came from, for messages: "argument", "BROKER_URL", a file path, "default"
    token_from: str


def resolve(url: str | None = None, token: str | None = None, config: str | None = None) -> Settings:
    """URL and token: an explicit argument wins, then ``BROKER_URL`` /
    ``BROKER_TOKEN``, then the config file (JSON ``{"url": ..., "token": ...}``),
    then the default URL.  A token is required: the broker is never open."""
    path = config or config_path()
    data: dict = {}
    if config or os.path.exists(path):
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the client config file {path}: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k, ""), str) for k in ("url", "token")):
            raise ConfigError(f"{path}: must be a JSON object like {{\"url\": \"{DEFAULT_URL}\", \"token\": \"...\"}}")

    def pick(given, env, key, fallback):
        if given:
            return given, "argument"
        if os.environ.get(env):
            return os.environ[env], env
        if data.get(key):
            return data[key], path
        return fallback, "default"

    u, u_from = pick(url, ENV_URL, "url", DEFAULT_URL)
    t, t_from = pick(token, ENV_TOKEN, "token", "")
    if not t:
        raise ConfigError(f"no token: pass --token, set {ENV_TOKEN}, or put \"token\" in {path}")
    if not u.startswith(("http://", "https://")):
        raise ConfigError(f"the broker URL {u!r} (from {u_from}) must start with http:// or https://")
    return Settings(u.rstrip("/"), t, u_from, t_from)


# -- results ------------------------------------------------------------------------------

def _build(cls, d: dict):
    """A dataclass from a JSON object: known keys taken, the rest ignored
    (a newer broker may send more)."""
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class SessionInfo:
    id: str
    state: str = ""               # idle | busy | stopped
    created: str = ""
    last_activity: str = ""
    expires_at: str = ""


@dataclass(frozen=True)
class WhoAmI:
    owner: str
    admin: bool = False


@dataclass(frozen=True)
class AdminSession:
    """One session of any owner, as an admin sees it (docs/admin.md)."""
    id: str
    owner: str = ""
    state: str = ""
    created: str = ""
    last_activity: str = ""
    age_seconds: float = 0.0
    idle_seconds: float = 0.0
    memory_bytes: int | None = None     # None: no cgroup (no kernel running, or cgroups off)
    cpu_seconds: float | None = None
    disk_bytes: int = 0
    executing: bool = False


@dataclass(frozen=True)
class FileInfo:
    name: str
    path: str                     # relative to /mnt/data in listings, /mnt/data/... in tool results
    size: int = 0
    type: str = ""
    url: str = ""                 # a signed download link
    modified: str | None = None


@dataclass(frozen=True)
class Upload:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ErrorInfo:
    ename: str
    evalue: str = ""
    traceback: str = ""


@dataclass(frozen=True)
class ToolResult:
    """One tool call's result.  ``raw`` is the whole JSON answer (fields of
    the read and search tools, anything a newer broker adds)."""

    tool: str
    status: str                   # success | error | timeout
    markdown: str = ""
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    error: ErrorInfo | None = None
    images: list[FileInfo] = field(default_factory=list)
    files: list[FileInfo] = field(default_factory=list)
    exit_code: int | None = None
    execution_count: int | None = None
    duration_ms: int | None = None
    notice: str = ""
    pdf: FileInfo | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @classmethod
    def from_json(cls, d: dict) -> "ToolResult":
        err = d.get("error")
        files = d.get("files") if isinstance(d.get("files"), list) else []
        return cls(tool=d.get("tool", ""), status=d.get("status", ""), markdown=d.get("markdown", ""),
                   stdout=d.get("stdout") or "", stderr=d.get("stderr") or "", result=d.get("result"),
                   error=_build(ErrorInfo, err) if isinstance(err, dict) else None,
                   images=[_build(FileInfo, i) for i in d.get("images") or []],
                   files=[_build(FileInfo, f) for f in files], exit_code=d.get("exit_code"),
                   execution_count=d.get("execution_count"), duration_ms=d.get("duration_ms"),
                   notice=d.get("notice") or "", pdf=_build(FileInfo, d["pdf"]) if d.get("pdf") else None, raw=d)


@dataclass(frozen=True)
class Event:
    """One server-sent event of a running tool call.  ``type`` is ``status``,
    ``stdout``, ``stderr``, ``display``, ``image``, ``exception`` or, last,
    ``result`` (then ``result`` holds the ToolResult).  ``data`` is the
    event's JSON; ``received`` the client's ``time.monotonic()`` on arrival."""

    type: str
    data: dict
    received: float = 0.0
    result: ToolResult | None = None

    @property
    def text(self) -> str:
        return self.data.get("text", "") if isinstance(self.data, dict) else ""


class _SSEDecoder:
    """Lines of a text/event-stream to Events (the WHATWG framing: ``event:``,
    ``data:`` lines, a blank line ends an event, ``:`` starts a comment)."""

    def __init__(self):
        self.event, self.data = "", []

    def feed(self, line: str, now: float) -> Event | None:
        if line == "":
            if not self.data:
                self.event = ""
                return None
            name, text = self.event or "message", "\n".join(self.data)
            self.event, self.data = "", []
            return _event(name, text, now)
        if line.startswith(":"):
            return None
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            self.event = value
        elif key == "data":
            self.data.append(value)
        return None


def _event(name: str, text: str, now: float) -> Event:
    try:
        data = json.loads(text)
    except ValueError:
        raise ConnectionFailed(f"the broker sent an event that is not JSON: {text[:200]!r}") from None
    if name == "error":
        raise api_error(int(data.get("status", 500)), data)
    if name == "result":
        return Event(name, data, now, ToolResult.from_json(data))
    return Event(name, data, now)


# -- requests, shared by the sync and async clients -----------------------------------------

def _file_path(path: str) -> str:
    """A /mnt/data path for a URL: relative, each segment quoted.  "." and
    ".." are escaped too, so that they reach the broker (which refuses them)
    instead of being resolved away by URL normalisation into another
    endpoint (files/../../ID would otherwise be the session ID itself)."""
    return "/".join(_segment(seg) for seg in _relative(path).split("/"))


def _segment(text: str) -> str:
    """One URL path segment (a session id, a tool name), quoted whatever it holds."""
    return {".": "%2E", "..": "%2E%2E"}.get(text, quote(text, safe=""))


def _tool_timeout(args: dict) -> float:
    t = args.get("timeoutSeconds")
    return (t if isinstance(t, (int, float)) and t > 0 else MAX_TOOL_TIMEOUT) + TOOL_MARGIN


@dataclass
class _Req:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    json: Any = None
    content: Any = None
    params: dict | None = None
    timeout: float | None = None
    headers: dict | None = None


def _timeout(req: _Req):
    return req.timeout if req.timeout is not None else httpx.USE_CLIENT_DEFAULT


def _check(r: httpx.Response) -> httpx.Response:
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError:
            body = None
        raise api_error(r.status_code, body, r.text)
    return r


def _tool_req(sid: str, tool: str, args: dict, images: str | None) -> _Req:
    return _Req("POST", f"/api/sessions/{_segment(sid)}/tools/{_segment(tool)}",
                lambda r: ToolResult.from_json(r.json()), json=args,
                params={"images": images} if images else None, timeout=_tool_timeout(args))


def _python_args(code: str, timeout: int | None) -> dict:
    return {"pythonCode": code, **({"timeoutSeconds": timeout} if timeout is not None else {})}


def _shell_args(command: str, timeout: int | None, explanation: str | None) -> dict:
    args: dict = {"command": command}
    if timeout is not None:
        args["timeoutSeconds"] = timeout
    if explanation is not None:
        args["explanation"] = explanation
    return args


def _pdf_args(code: str, expected: str, save_as: str, timeout: int | None) -> dict:
    return {"pythonCode": code, "expectedOutputFilename": expected, "saveAsFilename": save_as,
            **({"timeoutSeconds": timeout} if timeout is not None else {})}


def _in_folder(folder: str):
    """Filter for files() below a folder of /mnt/data."""
    top = _relative(folder or "").strip("/")
    return lambda f: not top or _relative(f.path) == top or _relative(f.path).startswith(top + "/")


def _relative(path: str) -> str:
    return path[len("/mnt/data/"):] if path.startswith("/mnt/data/") else path


class _Requests:
    """The requests of the REST API, each with how its answer is read."""

    @staticmethod
    def sessions() -> _Req:
        return _Req("GET", "/api/sessions", lambda r: [_build(SessionInfo, s) for s in r.json()])

    @staticmethod
    def create() -> _Req:
        return _Req("POST", "/api/sessions", lambda r: _build(SessionInfo, r.json()), timeout=180)

    @staticmethod
    def info(sid: str) -> _Req:
        return _Req("GET", f"/api/sessions/{_segment(sid)}", lambda r: _build(SessionInfo, r.json()))

    @staticmethod
    def delete(sid: str) -> _Req:
        return _Req("DELETE", f"/api/sessions/{_segment(sid)}", lambda r: None)

    @staticmethod
    def files(sid: str, path: str) -> _Req:
        keep = _in_folder(path)
        return _Req("GET", f"/api/sessions/{_segment(sid)}/files",
                    lambda r: [f for f in (_build(FileInfo, d) for d in r.json()) if keep(f)])

    @staticmethod
    def download(sid: str, path: str) -> _Req:
        return _Req("GET", f"/api/sessions/{_segment(sid)}/files/{_file_path(path)}", lambda r: r.content,
                    timeout=600)

    @staticmethod
    def upload(sid: str, path: str, data: bytes | IO[bytes]) -> _Req:
        headers, content = None, data
        if not isinstance(data, (bytes, bytearray, memoryview)):
            # A file is sent in chunks, with its length when it has one.
            try:
                headers = {"Content-Length": str(os.fstat(data.fileno()).st_size - data.tell())}
            except (AttributeError, OSError, ValueError):
                pass
            content = iter(lambda: data.read(1 << 20), b"")
        return _Req("PUT", f"/api/sessions/{_segment(sid)}/files/{_file_path(path)}",
                    lambda r: _build(Upload, r.json()), content=content, timeout=600, headers=headers)

    @staticmethod
    def delete_file(sid: str, path: str) -> _Req:
        return _Req("DELETE", f"/api/sessions/{_segment(sid)}/files/{_file_path(path)}", lambda r: None)

    @staticmethod
    def transcript(sid: str) -> _Req:
        return _Req("GET", f"/api/sessions/{_segment(sid)}/transcript", lambda r: r.text)

    @staticmethod
    def whoami() -> _Req:
        return _Req("GET", "/api/whoami", lambda r: _build(WhoAmI, r.json()))

    @staticmethod
    def admin_sessions() -> _Req:
        return _Req("GET", "/api/admin/sessions",
                    lambda r: [_build(AdminSession, d) for d in r.json()["sessions"]])

    @staticmethod
    def admin_end(sid: str) -> _Req:
        return _Req("DELETE", f"/api/admin/sessions/{_segment(sid)}", lambda r: None)


def _http_args(settings: Settings, timeout: float, transport) -> dict:
    kw: dict = {"base_url": settings.url, "timeout": httpx.Timeout(timeout, connect=10.0),
                "headers": {"Authorization": f"Bearer {settings.token}", "User-Agent": "broker.client"}}
    if transport is not None:
        kw["transport"] = transport
    return kw


def _unreachable(url: str, exc: Exception) -> ConnectionFailed:
    if isinstance(exc, httpx.TimeoutException):
        return ConnectionFailed(f"no answer from the broker at {url} in time ({type(exc).__name__})")
    return ConnectionFailed(f"cannot reach the broker at {url}: {exc or type(exc).__name__}")


# -- the sync client ------------------------------------------------------------------------

class Client:
    """A connection to one broker.  ``url``/``token`` default to the
    environment and the config file (see :func:`resolve`)."""

    def __init__(self, url: str | None = None, token: str | None = None, *, config: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, transport: httpx.BaseTransport | None = None):
        self.settings = resolve(url, token, config)
        self.url = self.settings.url
        self._http = httpx.Client(**_http_args(self.settings, timeout, transport))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, req: _Req) -> Any:
        try:
            r = self._http.request(req.method, req.path, json=req.json, content=req.content, params=req.params,
                                   headers=req.headers, timeout=_timeout(req))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        return req.parse(_check(r))

    # sessions
    def sessions(self) -> list[SessionInfo]:
        """The caller's sessions."""
        return self._send(_Requests.sessions())

    def create_session(self) -> "Session":
        """A new session; as a context manager it is deleted on exit."""
        return Session(self, self._send(_Requests.create()).id, owned=True)

    def session(self, sid: str) -> "Session":
        """A handle on an existing session (not deleted on exit)."""
        return Session(self, sid)

    def delete_session(self, sid: str) -> None:
        self._send(_Requests.delete(sid))

    # who am I, and the admin's view (404 NotFound for a token without the admin role)
    def whoami(self) -> WhoAmI:
        return self._send(_Requests.whoami())

    def admin_sessions(self) -> list[AdminSession]:
        """Every session of every owner (admin tokens only)."""
        return self._send(_Requests.admin_sessions())

    def admin_end_session(self, sid: str) -> None:
        """End any owner's session (admin tokens only)."""
        self._send(_Requests.admin_end(sid))

    # tool calls
    def call(self, sid: str, tool: str, args: dict, *, on_event: Callable[[Event], None] | None = None,
             images: str | None = None) -> ToolResult:
        """Call a tool; with *on_event*, stream its progress to it first."""
        if on_event is None:
            return self._send(_tool_req(sid, tool, args, images))
        for ev in self.stream(sid, tool, args, images=images):
            if ev.result is not None:
                return ev.result
            on_event(ev)
        raise ConnectionFailed("the event stream ended before the result")  # stream() raises first

    def stream(self, sid: str, tool: str, args: dict, *, images: str | None = None) -> Iterator[Event]:
        """The call's events as they arrive; the last one is ``result``."""
        req = _tool_req(sid, tool, args, images)
        try:
            with self._http.stream("POST", req.path, json=args, params=req.params, timeout=req.timeout,
                                   headers={"Accept": "text/event-stream"}) as r:
                if r.status_code >= 400:
                    r.read()
                    _check(r)
                if not r.headers.get("content-type", "").startswith("text/event-stream"):
                    r.read()
                    data = r.json()     # a broker without streaming answers with the result
                    yield Event("result", data, time.monotonic(), ToolResult.from_json(data))
                    return
                dec = _SSEDecoder()
                for line in r.iter_lines():
                    ev = dec.feed(line, time.monotonic())
                    if ev is not None:
                        yield ev
                        if ev.result is not None:
                            return
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        raise ConnectionFailed("the event stream ended before the result")

    # files
    def download_to(self, sid: str, path: str, out: IO[bytes]) -> int:
        """Stream a file of /mnt/data into *out*; returns the bytes written."""
        req = _Requests.download(sid, path)
        n = 0
        try:
            with self._http.stream("GET", req.path, timeout=req.timeout) as r:
                if r.status_code >= 400:
                    r.read()
                    _check(r)
                for chunk in r.iter_bytes():
                    out.write(chunk)
                    n += len(chunk)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        return n


class Session:
    """One session.  ``with client.create_session() as s:`` deletes it on
    exit; a handle from ``client.session(id)`` leaves it alone."""

    def __init__(self, client: Client, sid: str, *, owned: bool = False):
        self.client = client
        self.id = sid
        self.owned = owned

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            try:
                self.delete()
            except NotFound:
                pass

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def info(self) -> SessionInfo:
        return self.client._send(_Requests.info(self.id))

    def delete(self) -> None:
        self.client.delete_session(self.id)

    def call(self, tool: str, args: dict, *, on_event: Callable[[Event], None] | None = None,
             images: str | None = None) -> ToolResult:
        return self.client.call(self.id, tool, args, on_event=on_event, images=images)

    def stream(self, tool: str, args: dict, *, images: str | None = None) -> Iterator[Event]:
        return self.client.stream(self.id, tool, args, images=images)

    def run(self, code: str, *, timeout: int | None = None,
            on_event: Callable[[Event], None] | None = None) -> ToolResult:
        """ExecutePythonCode."""
        return self.call("ExecutePythonCode", _python_args(code, timeout), on_event=on_event)

    def shell(self, command: str, *, timeout: int | None = None, explanation: str | None = None,
              on_event: Callable[[Event], None] | None = None) -> ToolResult:
        """RunShellCommand."""
        return self.call("RunShellCommand", _shell_args(command, timeout, explanation), on_event=on_event)

    def pdf(self, code: str, expected: str, save_as: str, *, timeout: int | None = None,
            on_event: Callable[[Event], None] | None = None) -> ToolResult:
        """GeneratePdfReport."""
        return self.call("GeneratePdfReport", _pdf_args(code, expected, save_as, timeout), on_event=on_event)

    def files(self, path: str = "") -> list[FileInfo]:
        """Files in /mnt/data (below the folder *path*, if given)."""
        return self.client._send(_Requests.files(self.id, path))

    def download(self, path: str) -> bytes:
        return self.client._send(_Requests.download(self.id, path))

    def download_to(self, path: str, out: IO[bytes]) -> int:
        return self.client.download_to(self.id, path, out)

    def upload(self, path: str, data: bytes | IO[bytes]) -> Upload:
        return self.client._send(_Requests.upload(self.id, path, data))

    def delete_file(self, path: str) -> None:
        self.client._send(_Requests.delete_file(self.id, path))

    def transcript_text(self) -> str:
        """The transcript as the broker serves it (.ipynb JSON text)."""
        return self.client._send(_Requests.transcript(self.id))

    def transcript(self) -> dict:
        """The transcript as a notebook dict (nbformat v4)."""
        return json.loads(self.transcript_text())


# -- the async client -----------------------------------------------------------------------

class AsyncClient:
    """:class:`Client` for asyncio: the same methods, as coroutines."""

    def __init__(self, url: str | None = None, token: str | None = None, *, config: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, transport: httpx.AsyncBaseTransport | None = None):
        self.settings = resolve(url, token, config)
        self.url = self.settings.url
        self._http = httpx.AsyncClient(**_http_args(self.settings, timeout, transport))

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, req: _Req) -> Any:
        try:
            r = await self._http.request(req.method, req.path, json=req.json, content=req.content,
                                         params=req.params, headers=req.headers, timeout=_timeout(req))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        return req.parse(_check(r))

    async def sessions(self) -> list[SessionInfo]:
        return await self._send(_Requests.sessions())

    def create_session(self) -> "_NewSession":
        """A new session: ``s = await client.create_session()``, or
        ``async with client.create_session() as s:`` to delete it on exit."""
        return _NewSession(self)

    def session(self, sid: str) -> "AsyncSession":
        return AsyncSession(self, sid)

    async def delete_session(self, sid: str) -> None:
        await self._send(_Requests.delete(sid))

    async def whoami(self) -> WhoAmI:
        return await self._send(_Requests.whoami())

    async def admin_sessions(self) -> list[AdminSession]:
        return await self._send(_Requests.admin_sessions())

    async def admin_end_session(self, sid: str) -> None:
        await self._send(_Requests.admin_end(sid))

    async def call(self, sid: str, tool: str, args: dict, *, on_event: Callable[[Event], Any] | None = None,
                   images: str | None = None) -> ToolResult:
        """Call a tool; with *on_event* (a function or a coroutine function),
        stream its progress to it first."""
        if on_event is None:
            return await self._send(_tool_req(sid, tool, args, images))
        async for ev in self.stream(sid, tool, args, images=images):
            if ev.result is not None:
                return ev.result
            ret = on_event(ev)
            if hasattr(ret, "__await__"):
                await ret
        raise ConnectionFailed("the event stream ended before the result")

    async def stream(self, sid: str, tool: str, args: dict, *, images: str | None = None) -> AsyncIterator[Event]:
        req = _tool_req(sid, tool, args, images)
        try:
            async with self._http.stream("POST", req.path, json=args, params=req.params, timeout=req.timeout,
                                         headers={"Accept": "text/event-stream"}) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _check(r)
                if not r.headers.get("content-type", "").startswith("text/event-stream"):
                    await r.aread()
                    data = r.json()
                    yield Event("result", data, time.monotonic(), ToolResult.from_json(data))
                    return
                dec = _SSEDecoder()
                async for line in r.aiter_lines():
                    ev = dec.feed(line, time.monotonic())
                    if ev is not None:
                        yield ev
                        if ev.result is not None:
                            return
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        raise ConnectionFailed("the event stream ended before the result")

    async def download_to(self, sid: str, path: str, out: IO[bytes]) -> int:
        req = _Requests.download(sid, path)
        n = 0
        try:
            async with self._http.stream("GET", req.path, timeout=req.timeout) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _check(r)
                async for chunk in r.aiter_bytes():
                    out.write(chunk)
                    n += len(chunk)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        return n


class _NewSession:
    """What AsyncClient.create_session returns: awaitable, or an async
    context manager that deletes the session on exit."""

    def __init__(self, client: AsyncClient):
        self.client = client
        self.session: AsyncSession | None = None

    async def _create(self) -> "AsyncSession":
        self.session = AsyncSession(self.client, (await self.client._send(_Requests.create())).id, owned=True)
        return self.session

    def __await__(self):
        return self._create().__await__()

    async def __aenter__(self) -> "AsyncSession":
        return await self._create()

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.__aexit__(*exc)


class AsyncSession:
    """:class:`Session` for asyncio."""

    def __init__(self, client: AsyncClient, sid: str, *, owned: bool = False):
        self.client = client
        self.id = sid
        self.owned = owned

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc) -> None:
        if self.owned:
            try:
                await self.delete()
            except NotFound:
                pass

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r})"

    async def info(self) -> SessionInfo:
        return await self.client._send(_Requests.info(self.id))

    async def delete(self) -> None:
        await self.client.delete_session(self.id)

    async def call(self, tool: str, args: dict, *, on_event: Callable[[Event], Any] | None = None,
                   images: str | None = None) -> ToolResult:
        return await self.client.call(self.id, tool, args, on_event=on_event, images=images)

    def stream(self, tool: str, args: dict, *, images: str | None = None) -> AsyncIterator[Event]:
        return self.client.stream(self.id, tool, args, images=images)

    async def run(self, code: str, *, timeout: int | None = None,
                  on_event: Callable[[Event], Any] | None = None) -> ToolResult:
        return await self.call("ExecutePythonCode", _python_args(code, timeout), on_event=on_event)

    async def shell(self, command: str, *, timeout: int | None = None, explanation: str | None = None,
                    on_event: Callable[[Event], Any] | None = None) -> ToolResult:
        return await self.call("RunShellCommand", _shell_args(command, timeout, explanation), on_event=on_event)

    async def pdf(self, code: str, expected: str, save_as: str, *, timeout: int | None = None,
                  on_event: Callable[[Event], Any] | None = None) -> ToolResult:
        return await self.call("GeneratePdfReport", _pdf_args(code, expected, save_as, timeout), on_event=on_event)

    async def files(self, path: str = "") -> list[FileInfo]:
        return await self.client._send(_Requests.files(self.id, path))

    async def download(self, path: str) -> bytes:
        return await self.client._send(_Requests.download(self.id, path))

    async def download_to(self, path: str, out: IO[bytes]) -> int:
        return await self.client.download_to(self.id, path, out)

    async def upload(self, path: str, data: bytes) -> Upload:
        return await self.client._send(_Requests.upload(self.id, path, data))

    async def delete_file(self, path: str) -> None:
        await self.client._send(_Requests.delete_file(self.id, path))

    async def transcript_text(self) -> str:
        return await self.client._send(_Requests.transcript(self.id))

    async def transcript(self) -> dict:
        return json.loads(await self.transcript_text())
