"""The MCP server behind /mcp: tools, resources and sessions, on the ``mcp`` SDK.

A thin adapter over the one tool layer (``broker/tools.py``), built on the
official SDK's low-level ``Server`` (major version 1, the protocol's
session-based handshake era):

- ``tools/list`` comes from ``TOOLS`` (names, descriptions and parameter
  schemas as REST and OpenAPI show them) and ``tools/call`` goes through
  ``tools.call_tool``; results leave as MCP content: the markdown as text,
  images as image content (the PNG bytes), files as resource links, and the
  whole result dict as ``structuredContent``;
- each MCP session holds one broker session of the caller's owner, made on
  its first tool call and deleted when the MCP session ends (the client's
  ``DELETE``, or no request for the idle timeout);
- the session's ``/mnt/data`` files are MCP resources
  (``sandbox:///mnt/data/<path>``), listed and read through ``SessionFiles``;
- ``McpBridge`` runs the SDK's ``StreamableHTTPSessionManager`` (an ASGI
  application) on the broker's event loop; ``broker/web/mcp.py`` feeds it
  requests from Tornado.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
from urllib.parse import quote, unquote

import anyio
import mcp.types as types
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.lowlevel import Server
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import McpError

from broker import __version__
from broker.errors import BrokerError, InvalidArgument, SessionNotFound
from broker.files import FileError, guess_type, normalise
from broker.links import Links
from broker.tools import TOOLS, ToolContext, call_tool, get_tool
from broker.web.mcp import McpSettings

log = logging.getLogger("broker.mcp")


class _QuietStreamClose(logging.Filter):
    """The SDK logs a traceback each time a session with an open GET stream
    ends (its writer finds the stream closed under it): that is the normal
    end of every such session, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage() == "Error in standalone SSE writer" and record.exc_info
                    and isinstance(record.exc_info[1], anyio.ClosedResourceError))


logging.getLogger("mcp.server.streamable_http").addFilter(_QuietStreamClose())

RESOURCE_PREFIX = "sandbox:///mnt/data/"
PAGE = 500   # resources per resources/list page

INSTRUCTIONS = ("A code interpreter: a sandboxed Python kernel with its own /mnt/data folder, kept for this MCP "
                "session. Variables and files persist between calls; the session ends with the MCP session.")


class McpSession:
    """What one MCP session holds: its owner and, after the first tool
    call, its broker session."""

    def __init__(self):
        self.owner: str | None = None
        self.session = None
        self.lock = asyncio.Lock()


def resource_uri(path: str) -> str:
    """The MCP resource URI of a file; *path* is relative to /mnt/data or
    starts with /mnt/data/."""
    rel = path[len("/mnt/data/"):] if path.startswith("/mnt/data/") else path
    return RESOURCE_PREFIX + quote(rel)


def _uri_path(uri: str) -> str:
    if not uri.startswith(RESOURCE_PREFIX):
        raise McpError(types.ErrorData(code=types.INVALID_PARAMS, message=(
            f"unknown resource {uri!r}: session files are {RESOURCE_PREFIX}<path relative to /mnt/data>")))
    try:
        return normalise(unquote(uri[len(RESOURCE_PREFIX):]))
    except FileError as exc:
        raise McpError(types.ErrorData(code=types.INVALID_PARAMS, message=f"{uri!r}: {exc.message}")) from None


class McpAdapter:
    """The MCP server: tools, resources and one broker session per MCP session."""

    def __init__(self, state, settings: McpSettings):
        self.state = state
        self.settings = settings
        self.server = Server("broker", version=__version__, instructions=INSTRUCTIONS, lifespan=self._lifespan)
        self.server.list_tools()(self._list_tools)
        # The tool layer validates arguments itself, with messages that name
        # the field and what is allowed; the SDK's jsonschema pass would
        # answer first and less helpfully.
        self.server.call_tool(validate_input=False)(self._call_tool)
        self.server.list_resources()(self._list_resources)
        self.server.list_resource_templates()(self._list_resource_templates)
        self.server.read_resource()(self._read_resource)

    @property
    def sessions(self):
        return self.state.sessions

    # -- the MCP session's lifetime ---------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, _server):
        """Entered when an MCP session starts, left when it ends (however)."""
        mine = McpSession()
        try:
            yield mine
        finally:
            s = mine.session
            # When the broker stops, its sessions stay on disk like every
            # other and the idle cooldown removes them after the restart.
            if s is not None and not s.deleted and not self.sessions.closing:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.sessions.delete(s.id, s.owner)
                    except Exception:   # the MCP session is over either way; say why its session stayed
                        log.exception("could not delete session %s at the end of its MCP session", s.id)

    def _caller(self) -> tuple[McpSession, str, Links]:
        ctx = self.server.request_context
        mine: McpSession = ctx.lifespan_context
        request = ctx.request
        owner = request.scope["broker.owner"]
        if mine.owner is None:
            mine.owner = owner
        elif mine.owner != owner:   # the SDK refuses this first; never reach another owner's session
            raise SessionNotFound("(MCP session of another owner)")
        base = self.state.public_url or f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"
        return mine, owner, Links(base, self.state.signer)

    async def _session(self, mine: McpSession, owner: str) -> tuple[object, str]:
        """The MCP session's broker session, made on first use (or again,
        with a notice, after the broker deleted it)."""
        notice = ""
        async with mine.lock:
            s = mine.session
            if s is not None and s.deleted:
                minutes = self.sessions.idle_timeout_minutes
                notice = (f"A new session was started: the previous one ended (idle for {minutes:g} minutes, or "
                          "deleted); its variables and files are gone.")
                s = None
            if s is None:
                s = await self.sessions.create(owner)
                mine.session = s
        return s, notice

    # -- tools ---------------------------------------------------------------------------
    async def _list_tools(self) -> list[types.Tool]:
        return [types.Tool(name=t.name, description=t.description, inputSchema=t.input_schema())
                for t in TOOLS.values()]

    async def _call_tool(self, name: str, arguments: dict) -> types.CallToolResult:
        try:
            get_tool(name)
            mine, owner, links = self._caller()
            s, notice = await self._session(mine, owner)
            result = await call_tool(ToolContext(s, links, "url"), name, arguments or {})
        except BrokerError as exc:
            return _error_result(name, exc)
        if notice:
            result["notice"] = f"{notice} {result.get('notice') or ''}".strip()
            result["markdown"] = f"_{notice}_\n\n{result['markdown']}"
        content: list = [types.TextContent(type="text", text=result["markdown"])]
        content += self._media(s, name, result)
        return types.CallToolResult(content=content, structuredContent=result,
                                    isError=result.get("status") != "success")

    def _media(self, s, name: str, result: dict) -> list:
        """Images as image content within the byte budget; files (and the
        images past it) as resource links."""
        out, budget, skipped = [], self.settings.max_image_bytes, []
        images = list(result.get("images") or [])
        if name == "ReadSessionFile" and result.get("type", "").startswith("image/") and not result["truncated"] \
                and result["encoding"] == "base64":
            images.append({"path": result["path"], "type": result["type"], "size": result["size"],
                           "url": "data:;base64," + result["content"]})
        for img in images:
            blob = _image_bytes(s, img)
            if blob is None or len(blob) > budget:
                skipped.append(img)
                continue
            budget -= len(blob)
            out.append(types.ImageContent(type="image", data=base64.b64encode(blob).decode(), mimeType=img["type"]))
        files = list(result.get("files") or [])
        if name in ("GetSessionFile", "UploadFileToSession"):
            files.append({"path": result["path"], "name": result.get("name") or os.path.basename(result["path"]),
                          "size": result["size"], "type": result.get("type") or guess_type(result["path"]),
                          "url": result["url"]})
        for f in skipped + files:
            url = f.get("url") or ""
            out.append(types.ResourceLink(type="resource_link", uri=resource_uri(f["path"]),
                                          name=f.get("name") or os.path.basename(f["path"]), mimeType=f["type"],
                                          size=f["size"],
                                          description=f"Download link: {url}" if url.startswith("http") else None))
        if skipped:
            out.append(types.TextContent(type="text", text=(
                f"{len(skipped)} image(s) are not included as image content: past the "
                f"{self.settings.max_image_bytes:,}-byte budget per result (McpSettings.max_image_bytes) or no "
                "longer readable; they are linked above as resources.")))
        return out

    # -- resources -----------------------------------------------------------------------
    def _current(self):
        mine, owner, _ = self._caller()
        s = mine.session
        return None if s is None or s.deleted else s

    async def _list_resources(self, request: types.ListResourcesRequest) -> types.ListResourcesResult:
        s = self._current()
        if s is None:
            return types.ListResourcesResult(resources=[])
        cursor = request.params.cursor if request.params else None
        try:
            start = int(cursor or 0)
        except ValueError:
            raise McpError(types.ErrorData(code=types.INVALID_PARAMS,
                                           message=f"invalid cursor {cursor!r}: pass back a nextCursor")) from None
        infos = s.files.list("")
        page = infos[start:start + PAGE]
        resources = [types.Resource(uri=resource_uri(i.path), name=i.path, mimeType=i.type, size=i.size)
                     for i in page]
        more = start + PAGE < len(infos)
        return types.ListResourcesResult(resources=resources, nextCursor=str(start + PAGE) if more else None)

    async def _list_resource_templates(self) -> list[types.ResourceTemplate]:
        return [types.ResourceTemplate(uriTemplate=RESOURCE_PREFIX + "{path}", name="session file",
                                       description="A file in the session's /mnt/data (path relative to it).")]

    async def _read_resource(self, uri) -> list[ReadResourceContents]:
        rel = _uri_path(str(uri))
        s = self._current()
        if s is None:
            raise McpError(types.ErrorData(code=types.INVALID_PARAMS, message=(
                "this MCP session has no files yet: its session starts with the first tool call")))
        limit = self.settings.max_resource_bytes
        try:
            info = s.files.stat(rel)
            if info.size > limit:
                raise McpError(types.ErrorData(code=types.INVALID_PARAMS, message=(
                    f"/mnt/data/{rel} is {info.size:,} bytes; resources/read returns at most {limit:,} "
                    "(McpSettings.max_resource_bytes). Use ReadSessionFile with offset and maxBytes, or "
                    "GetSessionFile for a download link.")))
            data, _, rel = s.files.read(rel, limit=limit)
        except FileError as exc:
            raise McpError(types.ErrorData(code=types.INVALID_PARAMS, message=exc.message)) from None
        s.touch()
        mime = guess_type(rel)
        if mime.startswith("text/") or mime.endswith(("json", "xml", "yaml")) or mime == "application/sql":
            with contextlib.suppress(UnicodeDecodeError):
                return [ReadResourceContents(content=data.decode("utf-8"), mime_type=mime)]
        return [ReadResourceContents(content=data, mime_type=mime)]


def _image_bytes(s, img: dict) -> bytes | None:
    url = img.get("url") or ""
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.partition(",")[2], validate=True)
        except (binascii.Error, ValueError):
            return None
    try:
        blob, _, _ = s.files.read(img["path"], limit=s.manager.executor.max_image_bytes)
    except FileError:
        return None
    return blob


def _error_result(name: str, exc: BrokerError) -> types.CallToolResult:
    body = {"status": "error", "tool": name, "message": exc.message, "reason": exc.reason}
    if isinstance(exc, InvalidArgument):
        body.update({k: v for k, v in (("field", exc.field), ("allowed", exc.allowed)) if v})
    return types.CallToolResult(content=[types.TextContent(type="text", text=f"**{exc.reason}**: {exc.message}")],
                                structuredContent=body, isError=True)


class McpBridge:
    """The SDK's session manager, run for the broker's lifetime on the
    broker's event loop (started by the first request)."""

    def __init__(self, state, settings, max_body: int):
        self.settings = settings
        self.adapter = McpAdapter(state, settings)
        idle = settings.session_idle_timeout or state.sessions.idle_timeout_minutes * 60
        # No DNS-rebinding checks (security_settings=None): every request
        # carries a bearer token, which a rebinding page cannot know.
        self.manager = StreamableHTTPSessionManager(app=self.adapter.server, session_idle_timeout=idle,
                                                    max_request_body_size=max_body,
                                                    max_sessions=self.settings.max_sessions)
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def ensure_running(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        if not self._ready.is_set():
            ready = asyncio.ensure_future(self._ready.wait())
            await asyncio.wait([ready, self._task], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
        if self._task.done():
            why = None if self._task.cancelled() else self._task.exception()
            raise RuntimeError("the MCP session manager stopped") from why

    async def handle(self, scope: dict, owner: str, receive, send) -> None:
        # The SDK binds each MCP session to the credential that opened it
        # and answers 404 to any other: the owner is that credential.
        scope["user"] = AuthenticatedUser(AccessToken(token="", client_id=owner, scopes=[], subject=owner))
        scope["broker.owner"] = owner
        await self.manager.handle_request(scope, receive, send)

    async def _run(self) -> None:
        async with self.manager.run():
            self._ready.set()
            await asyncio.Event().wait()
