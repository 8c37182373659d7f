"""``broker mcp``: the MCP server over stdio, for local agents.

It is a relay, not a second server: every JSON-RPC message read from stdin
goes to a broker's ``/mcp`` endpoint (Streamable HTTP, the SDK's own client
transport) and every message back is written to stdout.  So stdio and HTTP
clients get the same tools, results, sessions and limits from one
implementation (``broker/web/mcp.py``).  One stdio connection is one MCP
session, hence one broker session; when stdin closes the relay ends the MCP
session (``DELETE /mcp``), which deletes the broker session.

Which broker:

- ``--url`` (or ``BROKER_URL``) with ``--token`` (or ``BROKER_TOKEN``): reach a
  running broker;
- no URL: start one of its own: ``broker serve`` on a free loopback port with
  a fresh token, a fresh temporary data root and no warm pool, its log in a
  file named on stderr, through a supervisor that stops it and removes the
  folder when the relay ends, however it ends (``broker/cli/mcp_supervisor.py``).

stdout carries only the protocol; everything else goes to stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys

import anyio
import httpx
from mcp.client.streamable_http import streamable_http_client
from mcp.server.stdio import stdio_server
from mcp.shared._httpx_utils import create_mcp_http_client
from traitlets import Float, Unicode, default
from traitlets.config import Application



def _say(msg: str) -> None:
    print(f"broker mcp: {msg}", file=sys.stderr, flush=True)


class McpApp(Application):
    name = "broker-mcp"
    description = ("Serve the eight tools over MCP on stdio for a local agent: relays to a running broker "
                   "(--url/BROKER_URL with --token/BROKER_TOKEN), or starts a broker of its own when no URL is given.")

    url = Unicode(config=True, help="""Base URL of a running broker (e.g. http://127.0.0.1:8888); the relay uses
        its /mcp endpoint. Default: $BROKER_URL. Empty: start a broker of our own.""")
    token = Unicode(config=True, help="Token for --url. Default: $BROKER_TOKEN.")
    data_root = Unicode("", config=True, help="""Data root of the broker started when no --url is given. Default: a
        fresh temporary folder, removed when `broker mcp` exits (an MCP session cannot outlive its connection).""")
    serve_config = Unicode("", config=True, help="Config file passed to the started broker (`broker serve --config`).")
    log_file = Unicode("", config=True, help="""Where the started broker writes its log. Default: a file in the
        temporary folder, named on stderr at start.""")
    startup_timeout = Float(120.0, min=1, config=True, help="Seconds to wait for the started broker to listen.")
    read_timeout = Float(1200.0, min=1, config=True, help="""Seconds the relay waits for data on an HTTP stream
        (above the longest tool timeout, 900 s).""")

    aliases = {"url": "McpApp.url", "token": "McpApp.token", "data-root": "McpApp.data_root",
               "config": "McpApp.serve_config", "log": "McpApp.log_file"}

    @default("url")
    def _default_url(self):
        return os.environ.get("BROKER_URL", "")

    @default("token")
    def _default_token(self):
        return os.environ.get("BROKER_TOKEN", "")

    def start(self):
        url, token = self.url.rstrip("/"), self.token
        if url.endswith("/mcp"):    # the endpoint given instead of the broker's base URL
            url = url[:-len("/mcp")]
        if url and not token:
            _say("--url needs a token: pass --token or set BROKER_TOKEN")
            self.exit(2)
        supervisor = None
        if not url:
            supervisor, url, token = self._start_broker()
        try:
            code = asyncio.run(self._main(url, token))
        finally:
            if supervisor is not None:
                supervisor.stdin.close()   # it stops the broker and removes its folder
        self.exit(code)

    def _start_broker(self):
        """Start the broker through a supervisor in a session of its own: it
        stops the broker and removes its folder once our end of its stdin
        closes, however we end (an MCP host may SIGKILL our whole process
        group seconds after closing our stdin)."""
        token = secrets.token_hex(24)
        spec = {"data_root": self.data_root, "config": self.serve_config, "log": self.log_file,
                "timeout": self.startup_timeout}
        supervisor = subprocess.Popen([sys.executable, "-m", "broker.cli.mcp_supervisor", json.dumps(spec)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                      env=dict(os.environ, BROKER_TOKEN=token))
        url = supervisor.stdout.readline().decode().strip()
        if not url:
            supervisor.wait()
            self.exit(1)
        return supervisor, url, token

    # -- the relay ----------------------------------------------------------------------
    async def _main(self, url: str, token: str) -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        headers = {"Authorization": f"Bearer {token}"}
        timeout = httpx.Timeout(30.0, read=self.read_timeout)
        async with create_mcp_http_client(headers=headers, timeout=timeout) as client:
            # Say what is wrong before the MCP client's first message, not as
            # a broken pipe after it.
            try:
                r = await client.get(f"{url}/api/sessions")
            except httpx.HTTPError as exc:
                _say(f"cannot reach the broker at {url}: {exc}")
                return 1
            if r.status_code == 401:
                _say(f"the broker at {url} refused the token (401): check --token or BROKER_TOKEN")
                return 2
            try:
                await relay(client, f"{url}/mcp")
            except asyncio.CancelledError:
                return 0
        return 0


async def relay(client: httpx.AsyncClient, endpoint: str) -> None:
    """Copy MCP messages between stdio and the broker's endpoint until stdin
    closes; then the HTTP transport ends the MCP session (DELETE)."""
    async with streamable_http_client(endpoint, http_client=client) as (http_read, http_write, _), \
            stdio_server() as (stdio_read, stdio_write):
        async with anyio.create_task_group() as tg:
            # Either side ending (stdin closed: the MCP client is gone) ends both.
            tg.start_soon(_pump, stdio_read, http_write, "unreadable message on stdin", tg.cancel_scope.cancel)
            tg.start_soon(_pump, http_read, stdio_write, "from the broker", tg.cancel_scope.cancel)
        # Closing our ends lets both transports wind down: stdio's writer
        # stops, and the HTTP one ends the MCP session (DELETE).
        await stdio_write.aclose()
        await http_write.aclose()


async def _pump(source, sink, what: str, done) -> None:
    async for msg in source:
        if isinstance(msg, Exception):
            _say(f"{what}: {msg}")
            continue
        await sink.send(msg)
    done()
