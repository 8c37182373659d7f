"""The MCP server against a real `broker serve` with real sandboxed kernels,
driven by the `mcp` SDK's own client: over Streamable HTTP at /mcp and over
stdio through `broker mcp` (relaying to a running broker, or starting its
own).  Tokens are required on /mcp, an MCP session id never crosses owners,
and each MCP session holds one broker session that ends with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import sys
import time

import httpx
import pytest
import requests
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError
from PIL import Image

from broker.tools import TOOLS
from tests.broker_server import BROKER_BIN, TIMEOUT, BrokerProcess
from tests.seed import PNG_MAGIC, SEED_BAR_CHART

TOOL_NAMES = ["ExecutePythonCode", "GeneratePdfReport", "RunShellCommand", "ReadSessionFile", "SearchSessionFiles",
              "ListSessionFiles", "GetSessionFile", "UploadFileToSession"]
CSV = b"name,value\nalpha,1\nbeta,2\ngamma,39\n"
PROTOCOL = "2025-11-25"

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def mcp_http(broker: BrokerProcess, owner: str = "alice"):
    """An initialised SDK client session over Streamable HTTP; yields (session, get_session_id)."""
    headers = broker.headers(owner)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(TIMEOUT, read=300)) as client:
        async with streamable_http_client(broker.url + "/mcp", http_client=client) as (read, write, get_id):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session, get_id


def stdio_params(*args: str, **env: str) -> StdioServerParameters:
    return StdioServerParameters(command=BROKER_BIN, args=["mcp", *args], env=env)


def sessions_of(broker: BrokerProcess, owner: str = "alice") -> set[str]:
    r = broker.get("/api/sessions", owner=owner)
    assert r.status_code == 200, r.text
    return {s["id"] for s in r.json()}


async def assert_gone(broker: BrokerProcess, sid: str, owner: str = "alice", within: float = 30) -> None:
    """The broker session ends soon after its MCP session (the SDK runs the
    end of a session after answering the DELETE)."""
    deadline = time.monotonic() + within
    while broker.get(f"/api/sessions/{sid}", owner=owner).status_code != 404 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert broker.get(f"/api/sessions/{sid}", owner=owner).status_code == 404


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def png_of(result) -> bytes:
    images = [c for c in result.content if c.type == "image"]
    assert images, [c.type for c in result.content]
    assert images[0].mimeType == "image/png"
    blob = base64.b64decode(images[0].data)
    assert blob.startswith(PNG_MAGIC) and len(blob) > 1000
    img = Image.open(io.BytesIO(blob))
    img.load()
    assert img.size[0] >= 200
    return blob


async def exercise(session: ClientSession, broker: BrokerProcess, before: set[str]) -> str:
    """The round trip both transports must pass: list the tools, run code,
    get a chart back as image content, upload and read a file (as a tool and
    as a resource).  Returns the broker session the MCP session made."""
    tools = (await session.list_tools()).tools
    assert [t.name for t in tools] == TOOL_NAMES
    assert sessions_of(broker) == before, "no broker session before the first tool call"

    r = await session.call_tool("ExecutePythonCode", {"pythonCode": "x = 6 * 7\nprint(x)"})
    assert not r.isError, text_of(r)
    assert "42" in text_of(r)
    assert r.structuredContent["status"] == "success" and r.structuredContent["stdout"] == "42\n"
    made = sessions_of(broker) - before
    assert len(made) == 1, made
    sid = made.pop()

    r = await session.call_tool("ExecutePythonCode", {"pythonCode": "print(x + 1)"})
    assert r.structuredContent["stdout"] == "43\n", "state persists within the MCP session"
    assert sessions_of(broker) - before == {sid}, "one broker session per MCP session"

    r = await session.call_tool("ExecutePythonCode", {"pythonCode": SEED_BAR_CHART})
    assert not r.isError, text_of(r)
    blob = png_of(r)
    path = r.structuredContent["images"][0]["path"]
    rel = path[len("/mnt/data/"):]
    download = broker.get(f"/api/sessions/{sid}/files/{rel}")
    assert download.status_code == 200 and download.content == blob, "the image content is the file's bytes"

    r = await session.call_tool("ReadSessionFile", {"path": path})
    assert png_of(r) == blob, "an image read back comes as image content too"

    r = await session.call_tool("UploadFileToSession", {"path": "in/data.csv",
                                                        "content": base64.b64encode(CSV).decode()})
    assert not r.isError, text_of(r)
    links = [c for c in r.content if c.type == "resource_link"]
    assert [str(c.uri) for c in links] == ["sandbox:///mnt/data/in/data.csv"]
    assert links[0].size == len(CSV) and links[0].mimeType == "text/csv"

    r = await session.call_tool("ReadSessionFile", {"path": "/mnt/data/in/data.csv"})
    assert r.structuredContent["content"] == CSV.decode()
    r = await session.call_tool("ExecutePythonCode", {"pythonCode": (
        "import pandas as pd\ndf = pd.read_csv('in/data.csv')\nprint(df.value.sum())\n"
        "df.to_csv('/mnt/data/out.csv', index=False)")})
    assert r.structuredContent["stdout"] == "42\n", text_of(r)
    links = [c for c in r.content if c.type == "resource_link"]
    assert [str(c.uri) for c in links] == ["sandbox:///mnt/data/out.csv"], r.content

    listed = {str(res.uri): res for res in (await session.list_resources()).resources}
    assert {"sandbox:///mnt/data/in/data.csv", "sandbox:///mnt/data/out.csv", f"sandbox:///{path[1:]}"} <= set(listed)
    read = await session.read_resource(links[0].uri)
    assert read.contents[0].text.splitlines()[0] == "name,value"
    read = await session.read_resource(f"sandbox://{path}")
    assert base64.b64decode(read.contents[0].blob) == blob and read.contents[0].mimeType == "image/png"
    return sid


async def test_tools_have_the_seed_names_parameters_and_descriptions(broker):
    async with mcp_http(broker) as (session, _):
        tools = (await session.list_tools()).tools
        assert [t.name for t in tools] == TOOL_NAMES
        for t in tools:
            assert t.description == TOOLS[t.name].description
            assert t.inputSchema == TOOLS[t.name].input_schema()
        schema = {t.name: t.inputSchema for t in tools}
        assert schema["ExecutePythonCode"]["required"] == ["pythonCode"]
        assert schema["ExecutePythonCode"]["properties"]["timeoutSeconds"]["maximum"] == 900
        assert schema["RunShellCommand"]["properties"]["timeoutSeconds"]["maximum"] == 240
        assert set(schema["GeneratePdfReport"]["required"]) == {"pythonCode", "expectedOutputFilename",
                                                                 "saveAsFilename"}
        # No tool call: no broker session, and no files to list.
        assert (await session.list_resources()).resources == []


async def test_http_session_runs_code_gets_a_chart_and_files_then_ends(broker):
    before = sessions_of(broker)
    async with mcp_http(broker) as (session, _):
        sid = await exercise(session, broker, before)

        # A bad argument: an error result naming the field, and the session goes on.
        r = await session.call_tool("ExecutePythonCode", {"pythonCode": "print(1)", "timeoutSeconds": 5000})
        assert r.isError
        assert r.structuredContent["field"] == "timeoutSeconds" and "900" in text_of(r)
        r = await session.call_tool("ReadSessionFile", {"path": "../../etc/passwd"})
        assert r.isError and r.structuredContent["field"] == "path"
        r = await session.call_tool("ExecutePythonCode", {"pythonCode": "1/0"})
        assert r.isError and r.structuredContent["error"]["ename"] == "ZeroDivisionError"
        assert "ZeroDivisionError" in text_of(r)
        assert sessions_of(broker) - before == {sid}
    # The client ended the MCP session (DELETE): its broker session is gone.
    await assert_gone(broker, sid)
    assert sessions_of(broker) == before


async def test_a_deleted_broker_session_is_replaced_with_a_notice(broker):
    before = sessions_of(broker)
    async with mcp_http(broker) as (session, _):
        r = await session.call_tool("ExecutePythonCode", {"pythonCode": "y = 1"})
        assert not r.isError
        (sid,) = sessions_of(broker) - before
        assert broker.delete(f"/api/sessions/{sid}").status_code == 204
        r = await session.call_tool("ExecutePythonCode", {"pythonCode": "print('y' in globals())"})
        assert not r.isError
        assert r.structuredContent["stdout"] == "False\n"
        assert "A new session was started" in text_of(r) and "A new session" in r.structuredContent["notice"]
        (sid2,) = sessions_of(broker) - before
        assert sid2 != sid
    await assert_gone(broker, sid2)


def _initialize(broker, owner="alice") -> str:
    r = broker.post("/mcp", owner=owner, headers={"Accept": "application/json, text/event-stream"}, json={
        "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}})
    assert r.status_code == 200, r.text
    sid = r.headers["mcp-session-id"]
    r = broker.post("/mcp", owner=owner, headers=_mcp_headers(sid),
                    json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert r.status_code == 202, r.text
    return sid


def _mcp_headers(mcp_sid: str) -> dict:
    return {"Accept": "application/json, text/event-stream", "mcp-session-id": mcp_sid,
            "mcp-protocol-version": PROTOCOL}


def _sse_result(r: requests.Response) -> dict:
    """The JSON-RPC message of an SSE answer."""
    for line in r.text.splitlines():
        if line.startswith("data:"):
            return json.loads(line[5:])
    raise AssertionError(r.text)


def _call(code: str, rid: int = 2) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": "ExecutePythonCode", "arguments": {"pythonCode": code}}}


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
@pytest.mark.parametrize("auth", [None, "Bearer nope", "Bearer ", "Basic dG9rLWFsaWNlOg=="])
async def test_mcp_requires_a_token(broker, method, auth):
    headers = {"Accept": "application/json, text/event-stream"}
    if auth:
        headers["Authorization"] = auth
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    r = requests.request(method, broker.url + "/mcp", headers=headers, json=body if method == "POST" else None,
                         timeout=TIMEOUT)
    assert r.status_code == 401, (r.status_code, r.text)
    assert "token" in r.json()["message"]
    assert "mcp-session-id" not in r.headers


async def test_cant_use_an_mcp_session_of_another_owner(broker):
    before_alice, before_bob = sessions_of(broker, "alice"), sessions_of(broker, "bob")
    mcp_sid = _initialize(broker, "alice")
    r = broker.post("/mcp", owner="alice", headers=_mcp_headers(mcp_sid), json=_call("secret = 'alice-only'"))
    assert r.status_code == 200 and _sse_result(r)["result"]["structuredContent"]["status"] == "success", r.text
    (alice_sid,) = sessions_of(broker, "alice") - before_alice

    # Bob holds the MCP session id: every use of it with his token is refused
    # as if it did not exist, and reaches nothing of alice's.
    r = broker.post("/mcp", owner="bob", headers=_mcp_headers(mcp_sid), json=_call("print(secret)", 3))
    assert r.status_code == 404, r.text
    assert "alice-only" not in r.text
    r = broker.post("/mcp", owner="bob", headers=_mcp_headers(mcp_sid), json={
        "jsonrpc": "2.0", "id": 4, "method": "resources/read", "params": {"uri": "sandbox:///mnt/data/x"}})
    assert r.status_code == 404, r.text
    r = broker.get("/mcp", owner="bob", headers=_mcp_headers(mcp_sid), timeout=10)
    assert r.status_code == 404, r.text
    r = broker.delete("/mcp", owner="bob", headers=_mcp_headers(mcp_sid))
    assert r.status_code == 404, r.text
    assert sessions_of(broker, "bob") == before_bob
    assert broker.get(f"/api/sessions/{alice_sid}", owner="bob").status_code == 404

    # Alice's MCP session is untouched and still works.
    r = broker.post("/mcp", owner="alice", headers=_mcp_headers(mcp_sid), json=_call("print(secret)", 5))
    assert r.status_code == 200, r.text
    assert _sse_result(r)["result"]["structuredContent"]["stdout"] == "alice-only\n"
    r = broker.delete("/mcp", owner="alice", headers=_mcp_headers(mcp_sid))
    assert r.status_code in (200, 204), r.text
    await assert_gone(broker, alice_sid)
    # An ended session's id answers 404, for its owner too.
    r = broker.post("/mcp", owner="alice", headers=_mcp_headers(mcp_sid), json=_call("print(1)", 6))
    assert r.status_code == 404


async def test_stdio_relay_to_a_running_broker(broker):
    before = sessions_of(broker)
    params = stdio_params("--url", broker.url, BROKER_TOKEN=broker.owners["alice"])
    with open(os.path.join(broker.workdir, "mcp-stdio.err"), "w+") as err:
        async with stdio_client(params, errlog=err) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                sid = await exercise(session, broker, before)
    await assert_gone(broker, sid)   # stdin closed: the MCP session and its broker session ended


async def test_stdio_with_a_wrong_token_says_so(broker, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        BROKER_BIN, "mcp", "--url", broker.url + "/mcp", "--token", "wrong", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(b""), 60)
    assert proc.returncode == 2
    assert out == b""
    assert b"refused the token (401)" in err


async def test_stdio_starts_its_own_broker(tmp_path):
    errlog = tmp_path / "stderr.txt"
    env = {"TMPDIR": str(tmp_path)}
    with open(errlog, "w+") as err:
        async with stdio_client(stdio_params(**env), errlog=err) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                r = await session.call_tool("ExecutePythonCode", {"pythonCode": SEED_BAR_CHART})
                assert not r.isError, text_of(r)
                png_of(r)
                r = await session.call_tool("RunShellCommand", {"command": "ls /mnt/data/*.png"})
                assert r.structuredContent["stdout"] == "/mnt/data/incidents_by_severity.png\n", text_of(r)
    text = errlog.read_text()
    assert "started a broker (pid " in text, text
    pid = int(text.split("started a broker (pid ")[1].split(")")[0])
    def left():
        return [p for p in tmp_path.iterdir() if p.name.startswith("broker-mcp-")]

    deadline = time.monotonic() + 60
    while (os.path.exists(f"/proc/{pid}") or left()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not os.path.exists(f"/proc/{pid}"), "the started broker stops when `broker mcp` ends"
    assert not left(), "its temporary data root is removed"


@pytest.fixture(scope="module")
def idle_broker(tmp_path_factory):
    """Short MCP idle timeout, small image and resource budgets."""
    b = BrokerProcess(str(tmp_path_factory.mktemp("mcp-idle")), "--McpSettings.session_idle_timeout=2",
                      "--McpSettings.max_image_bytes=2000", "--McpSettings.max_resource_bytes=100",
                      "--SessionManager.pool_size=0")
    b.start()
    yield b
    b.stop()


async def test_an_idle_mcp_session_ends_with_its_broker_session(idle_broker):
    b = idle_broker
    mcp_sid = _initialize(b)
    r = b.post("/mcp", headers=_mcp_headers(mcp_sid), json=_call("print('hi')"))
    assert r.status_code == 200 and _sse_result(r)["result"]["structuredContent"]["stdout"] == "hi\n", r.text
    (sid,) = sessions_of(b)
    deadline = time.monotonic() + 30
    while sessions_of(b) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert sessions_of(b) == set(), "idle for 2 s: the MCP session and its broker session ended"
    r = b.post("/mcp", headers=_mcp_headers(mcp_sid), json=_call("print(1)", 3))
    assert r.status_code == 404, r.text


async def test_images_and_resources_past_their_budgets_are_links_and_say_so(idle_broker):
    b = idle_broker
    async with mcp_http(b) as (session, _):
        r = await session.call_tool("ExecutePythonCode", {"pythonCode": SEED_BAR_CHART})
        assert not r.isError, text_of(r)
        assert [c.type for c in r.content] == ["text", "resource_link", "text"], r.content
        assert str(r.content[1].uri) == "sandbox:///mnt/data/incidents_by_severity.png"
        assert "McpSettings.max_image_bytes" in r.content[2].text
        with pytest.raises(McpError) as err:
            await session.read_resource("sandbox:///mnt/data/incidents_by_severity.png")
        assert "McpSettings.max_resource_bytes" in err.value.error.message
        assert "ReadSessionFile" in err.value.error.message
        # Nothing outside the session's /mnt/data is a resource.
        for uri in ("sandbox:///mnt/data/../../etc/passwd", "sandbox:///mnt/data/%2E%2E/%2E%2E/etc/passwd",
                    "file:///etc/passwd"):
            with pytest.raises(McpError) as err:
                await session.read_resource(uri)
            assert "root:" not in err.value.error.message
        r = await session.call_tool("ReadSessionFile", {"path": "incidents_by_severity.png", "maxBytes": 50})
        assert r.structuredContent["truncated"] and not [c for c in r.content if c.type == "image"]


if __name__ == "__main__":   # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
