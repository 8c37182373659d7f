"""Three real brokers behind a real HAProxy (``broker router-config``), on loopback.

Sessions made through the router spread over the brokers; REST calls, the
kernel WebSocket, the Azure-compatible API, MCP and a ``jupyter server
--gateway-url`` reach the broker that holds the session; the override map
re-points one session at runtime; a fourth broker added by a reload moves no
live session; a broker killed with SIGKILL takes only its own sessions away.
The tests run in file order against one cluster (module scope).
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from broker.ids import GATEWAY_KERNEL_ID_RE, broker_of
from broker.router import RuntimeApi
from tests.gateway_helpers import KernelWS
from tests.router_support import Cluster
from tests.test_gateway_jupyter_server import KERNEL, JupyterServer

MCP_PROTOCOL = "2025-11-25"
AZURE = "2025-10-02-preview"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("router")), 3)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def spread(cluster):
    """Six sessions made through the router, three at a time."""
    with ThreadPoolExecutor(3) as pool:
        ids = list(pool.map(lambda _: cluster.router.create_session(), range(6)))
    return ids


def holder(cluster, sid) -> str:
    """The broker that holds *sid*, asked directly."""
    found = [n for n, b in cluster.brokers.items()
             if b.proc is not None and b.get(f"/api/sessions/{sid}").status_code == 200]
    assert len(found) == 1, (sid, found)
    return found[0]


def test_ids_name_their_broker_and_suit_the_gateway_client(spread):
    for sid in spread:
        assert re.fullmatch(r"b0[0-2]_[0-9a-f-]{36}", sid), sid
        assert GATEWAY_KERNEL_ID_RE.match(sid)


def test_new_sessions_spread_over_the_brokers(cluster, spread):
    where = {sid: holder(cluster, sid) for sid in spread}
    assert all(broker_of(sid) == name for sid, name in where.items())
    assert set(where.values()) == {"b00", "b01", "b02"}, where


def test_rest_calls_reach_the_sessions_broker(cluster, spread):
    for sid in spread:
        out = cluster.router.run(sid, "import socket, os\nopen('/mnt/data/mark.txt', 'w').write('here')\n"
                                      f"print('{sid}')")
        assert out["stdout"] == f"{sid}\n", out
        b = cluster.brokers[broker_of(sid)]
        with open(f"{b.data_dir(sid)}/mark.txt") as fh:
            assert fh.read() == "here"
        r = cluster.router.get(f"/api/sessions/{sid}/files/mark.txt")
        assert r.status_code == 200 and r.content == b"here"
    # another owner gets nothing through the router either
    assert cluster.router.get(f"/api/sessions/{spread[0]}", owner="bob").status_code == 404


def test_kernel_websocket_reaches_the_sessions_broker(cluster, spread):
    for sid in spread[:3]:
        ws_url = cluster.router.url.replace("http://", "ws://") + f"/api/kernels/{sid}/channels"
        with KernelWS(ws_url, cluster.router.owners["alice"], timeout=60) as c:
            c.wait_ready(60)
            ex = c.run("open('/mnt/data/mark.txt').read()")
            assert ex.result == "'here'", ex.error


def test_azure_identifier_stays_on_one_broker(cluster):
    ident = f"route-{uuid.uuid4()}"
    body = {"codeInputType": "Inline", "executionType": "Synchronous", "code": "n = 7", "timeoutInSeconds": 60}
    r = cluster.router.post("/azure/executions", params={"api-version": AZURE, "identifier": ident}, json=body)
    assert r.status_code == 200, r.text
    for _ in range(4):
        body["code"] = "n += 1\nprint(n)"
        r = cluster.router.post("/azure/executions", params={"api-version": AZURE, "identifier": ident}, json=body)
        assert r.status_code == 200, r.text
    assert r.json()["result"]["stdout"] == "11\n", r.json()
    cluster.azure_ident = ident


def _mcp(cluster, body, sid=None):
    h = {"Accept": "application/json, text/event-stream", "mcp-protocol-version": MCP_PROTOCOL}
    if sid:
        h["mcp-session-id"] = sid
    return cluster.router.post("/mcp", headers=h, json=body)


def _sse(r) -> dict:
    import json

    for line in r.text.splitlines():
        if line.startswith("data:"):
            return json.loads(line[5:])
    raise AssertionError(r.text)


def test_mcp_session_stays_on_its_broker(cluster):
    r = _mcp(cluster, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": MCP_PROTOCOL, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    assert r.status_code == 200, r.text
    msid = r.headers["mcp-session-id"]
    assert re.fullmatch(r"b0[0-2]_[0-9a-f]{32}", msid), msid
    assert _mcp(cluster, {"jsonrpc": "2.0", "method": "notifications/initialized"}, msid).status_code == 202
    for i, code in enumerate(["k = 5", "k * 2", "k * 3"]):
        r = _mcp(cluster, {"jsonrpc": "2.0", "id": 2 + i, "method": "tools/call",
                           "params": {"name": "ExecutePythonCode", "arguments": {"pythonCode": code}}}, msid)
        assert r.status_code == 200, r.text
        res = _sse(r)["result"]
        assert not res.get("isError"), res
    assert res["structuredContent"]["result"] == "15"
    # the broker session behind it is on the broker the MCP session id names
    name = broker_of(msid)
    sessions = cluster.brokers[name].get("/api/sessions").json()
    assert sessions, f"no session on {name}"


def test_override_map_repoints_one_session_without_reload(cluster, spread):
    sid = spread[0]
    other = next(n for n in cluster.brokers if n != broker_of(sid))
    api = RuntimeApi(cluster.haproxy.socket, cluster.haproxy.map_file)
    api.set_override(sid, other)
    try:
        assert api.overrides() == {sid: other}
        # now at a broker that does not hold it
        assert cluster.router.get(f"/api/sessions/{sid}").status_code == 404
        assert cluster.router.get(f"/api/sessions/{spread[1]}").status_code == 200
    finally:
        api.clear_override(sid)
    assert cluster.router.get(f"/api/sessions/{sid}").status_code == 200


def test_jupyter_server_through_the_router_runs_a_cell(cluster, tmp_path):
    js = JupyterServer(str(tmp_path), cluster.router.url, cluster.router.owners["alice"])
    js.start()
    try:
        r = js.request("POST", "/api/kernels", json={"name": KERNEL})
        assert r.status_code == 201, (r.text, js.log_tail())
        kid = r.json()["id"]
        assert broker_of(kid) in cluster.brokers
        with js.ws(kid) as c:
            c.wait_ready(90)
            ex = c.run("print(6 * 7)")
            assert ex.stdout == "42\n", ex.error
        assert js.request("DELETE", f"/api/kernels/{kid}").status_code == 204
    finally:
        js.stop()


def test_a_fourth_broker_moves_no_live_session(cluster, spread):
    api = RuntimeApi(cluster.haproxy.socket, cluster.haproxy.map_file)
    # one live override must survive the reload too
    api.set_override(spread[1], broker_of(spread[1]))
    added = cluster.add_broker()
    assert added == "b03"
    assert api.overrides() == {spread[1]: broker_of(spread[1])}
    api.clear_override(spread[1])
    for sid in spread:
        out = cluster.router.run(sid, "print(open('/mnt/data/mark.txt').read())")
        assert out["stdout"] == "here\n"
    body = {"codeInputType": "Inline", "executionType": "Synchronous", "code": "print(n)", "timeoutInSeconds": 60}
    r = cluster.router.post("/azure/executions", params={"api-version": AZURE, "identifier": cluster.azure_ident},
                            json=body)
    assert r.status_code == 200 and r.json()["result"]["stdout"] == "11\n", r.text
    # and the new broker takes new sessions
    made = [cluster.router.create_session() for _ in range(3)]
    assert "b03" in {broker_of(s) for s in made}, made
    spread.extend(made)


def test_a_killed_broker_takes_only_its_own_sessions(cluster, spread):
    victim = cluster.brokers["b02"]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    victim.proc = None
    deadline = time.monotonic() + 20
    for sid in spread:
        if broker_of(sid) == "b02":
            code = cluster.router.get(f"/api/sessions/{sid}").status_code
            assert code in (404, 502, 503), code
        else:
            out = cluster.router.run(sid, "print('alive')")
            assert out["stdout"] == "alive\n"
    # new sessions go to the brokers still up once the checks see it down
    while time.monotonic() < deadline:
        made = cluster.router.post("/api/sessions")
        if made.status_code == 201:
            assert broker_of(made.json()["id"]) != "b02"
            break
        time.sleep(0.3)
    else:
        raise AssertionError("no new session after a broker was killed")


def test_readiness_and_liveness_need_no_token(cluster):
    for name, b in cluster.brokers.items():
        if b.proc is None:
            continue
        r = b.get("/api/ready", owner=None)
        assert r.status_code == 200 and r.json() == {"ready": True, "broker": name, "problems": []}, r.text
        r = b.get("/api/live", owner=None)
        assert r.status_code == 200 and r.json()["live"] is True
