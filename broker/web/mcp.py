"""/mcp: the MCP server over Streamable HTTP, behind the broker's tokens.

The SDK's Streamable HTTP transport is an ASGI application; ``McpHandler`` is
a small ASGI bridge inside a Tornado handler.  It authenticates with the
broker's tokens (401 without one, before any body is read), builds the ASGI
scope with the owner as the authenticated user (so the SDK refuses an MCP
session id presented by another owner), feeds the request body through
``receive`` and streams every ``send`` out with a flush, which serves JSON
answers, SSE answers and the long-lived GET stream alike.  The server itself
(tools, resources, one broker session per MCP session) is in
``broker/web/mcp_server.py``, imported on the first /mcp request.

``broker mcp`` (``broker/cli/mcp.py``) serves the same over stdio by
relaying to this endpoint.
"""

from __future__ import annotations

import asyncio

from tornado import web
from tornado.iostream import StreamClosedError
from traitlets import Float, Integer
from traitlets.config import LoggingConfigurable

from broker.sandbox.settings import ByteSize
from broker.web.base import BaseHandler


class McpSettings(LoggingConfigurable):
    """The MCP endpoint (/mcp) and what its results carry."""

    session_idle_timeout = Float(0, min=0, config=True, help="""Seconds an MCP session may go without a request
        (and without an open GET stream) before it ends and its broker session is deleted. 0: the same as
        SessionManager.idle_timeout_minutes.""")
    max_image_bytes = ByteSize(16 << 20, config=True, help="""Bytes of images one tool result carries as MCP
        image content (the PNG bytes). Images past it are sent as resource links only, and the text says so.""")
    max_resource_bytes = ByteSize(16 << 20, config=True, help="""Largest file resources/read returns; for a
        bigger one the error names ReadSessionFile (offset/maxBytes) and GetSessionFile (a download link).""")
    max_sessions = Integer(1000, min=1, config=True, help="""MCP sessions open at once, all owners together
        (503 past it). Each holds a broker session only after its first tool call, so
        SessionManager.max_sessions_per_owner also applies.""")


class McpEndpoint:
    """What every /mcp request shares: the settings and, from the first
    request on, the running MCP server."""

    def __init__(self, state):
        self.state = state
        self.settings = McpSettings(parent=state.sessions)
        # Uploads arrive base64-encoded in the JSON-RPC body: 4/3 of the
        # largest upload, plus room for the envelope.
        self.max_body = state.sessions.max_upload_bytes * 4 // 3 + (1 << 20)
        self._bridge = None

    async def bridge(self):
        if self._bridge is None:
            # Imported at the first /mcp request, not at broker start: the SDK
            # and what it pulls in cost about 1.4 s of CPU, plus 3.2 s where
            # jsonschema's format extras (rfc3987-syntax) are installed.
            from broker.web.mcp_server import McpBridge

            self._bridge = McpBridge(self.state, self.settings, self.max_body)
        await self._bridge.ensure_running()
        return self._bridge


@web.stream_request_body
class McpHandler(BaseHandler):
    """/mcp: the Streamable HTTP transport, bridged to the SDK's ASGI app."""

    def initialize(self, endpoint: McpEndpoint):
        self.endpoint = endpoint
        self._chunks: list[bytes] = []
        self._gone = asyncio.Event()

    def prepare(self):
        super().prepare()   # 401 without a token, before any body is read
        self.request.connection.set_max_body_size(self.endpoint.max_body)

    def data_received(self, chunk: bytes):
        if self.current_user is not None:
            self._chunks.append(chunk)

    def on_connection_close(self):
        self._gone.set()

    def compute_etag(self):
        return None

    async def get(self):
        await self._serve()

    async def post(self):
        await self._serve()

    async def delete(self):
        await self._serve()

    async def _serve(self):
        bridge = await self.endpoint.bridge()
        req = self.request
        owner = self.current_user
        # MCP session ids name this broker as session ids do (b02_<hex>), so a
        # router sends the MCP session's requests here (docs/scale.md).
        broker_name = self.sessions.broker_name
        prefix = f"{broker_name}_" if broker_name else ""
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req.method,
            "scheme": req.protocol, "path": req.path, "raw_path": req.path.encode(), "root_path": "",
            "query_string": req.query.encode(), "client": (req.remote_ip, 0),
            "server": None,   # optional in ASGI; URLs are built from the Host header
            "headers": [(k.lower().encode("latin-1"), _inbound(k, v, prefix).encode("latin-1"))
                        for k, v in req.headers.get_all()],
        }
        body = b"".join(self._chunks)
        self._chunks = []
        body_sent = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self._gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                self.set_status(message["status"])
                self.clear_header("Content-Type")
                seen = set()
                for k, v in message.get("headers", []):
                    name, value = k.decode("latin-1"), v.decode("latin-1")
                    if prefix and name.lower() == MCP_SESSION_HEADER:
                        value = prefix + value
                    (self.add_header if name.lower() in seen else self.set_header)(name, value)
                    seen.add(name.lower())
            elif message["type"] == "http.response.body":
                if self._finished or self._gone.is_set():
                    return
                if message.get("body"):
                    self.write(message["body"])
                if message.get("more_body"):
                    try:
                        await self.flush()
                    except StreamClosedError:
                        self._gone.set()
                else:
                    self.finish()

        try:
            await bridge.handle(scope, owner, receive, send)
        except StreamClosedError:
            self._gone.set()
        if not self._finished and not self._gone.is_set():
            self.finish()


MCP_SESSION_HEADER = "mcp-session-id"


def _inbound(name: str, value: str, prefix: str) -> str:
    """The SDK's own MCP session id, without this broker's prefix."""
    if prefix and name.lower() == MCP_SESSION_HEADER and value.startswith(prefix):
        return value[len(prefix):]
    return value


def routes(state) -> list:
    return [(r"/mcp/?", McpHandler, {"endpoint": McpEndpoint(state)})]
