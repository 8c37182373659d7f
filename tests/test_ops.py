"""The operator's side against a real broker: the admin role and endpoints,
``broker admin``, /metrics and the call log (docs/admin.md, docs/metrics.md,
docs/logs.md).

Two brokers, one per setting group: the default one (human call log,
/metrics needs a token) and one with the JSON call log and an open /metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
from types import SimpleNamespace

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from broker.cli.serve import ServeApp
from broker.logs import CallLog
from broker.metrics import Metrics
from broker.web import admin
from broker.web.base import Auth, BaseHandler, Identity, log_request, route_table
from tests.broker_server import BROKER_BIN, BrokerProcess
from tests.gateway_helpers import KernelWS

TOKENS = {"tok-alice-7f3a": "alice", "tok-bob-91c2": "bob",
          "tok-ops-55d0": {"owner": "ops", "admin": True}, "tok-eve-0b1e": {"owner": "eve", "admin": False}}


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of a /metrics page."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(page: dict, name: str, **labels) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


def total(page: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in page.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = BrokerProcess(str(tmp_path_factory.mktemp("ops")), "--SessionManager.pool_size=1", tokens=TOKENS)
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def sessions(broker):
    """One session of alice (with 40 MB held and a 1 MB file) and one of bob."""
    alice, bob = broker.create_session("alice"), broker.create_session("bob")
    r = broker.run(alice, "held = b'x' * 40_000_000\nopen('/mnt/data/one-mb.bin', 'wb').write(b'y' * (1 << 20))")
    assert r["status"] == "success", r
    return {"alice": alice, "bob": bob}


def metrics(broker, owner="alice") -> dict:
    r = broker.get("/metrics", owner=owner)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(r.text)


# -- the admin role -----------------------------------------------------------------------

def test_whoami_says_owner_and_role(broker):
    assert broker.get("/api/whoami", owner="alice").json() == {"owner": "alice", "admin": False}
    assert broker.get("/api/whoami", owner="eve").json() == {"owner": "eve", "admin": False}
    assert broker.get("/api/whoami", owner="ops").json() == {"owner": "ops", "admin": True}
    assert broker.get("/api/whoami", owner=None).status_code == 401


def test_cant_reach_admin_endpoints_or_other_owners_sessions_without_admin_role(broker, sessions):
    """A non-admin token gets 404 on the admin endpoints and never sees another owner's session."""
    bob = sessions["bob"]
    unknown = broker.get("/api/no-such-endpoint", owner="alice")
    assert unknown.status_code == 404
    for owner in ("alice", "eve"):   # eve's entry says "admin": false
        for method, path in (("GET", "/api/admin/sessions"), ("GET", f"/api/admin/sessions/{bob}"),
                             ("DELETE", f"/api/admin/sessions/{bob}")):
            r = broker.request(method, path, owner=owner)
            assert r.status_code == 404, (owner, method, path, r.status_code, r.text)
            assert r.json()["reason"] == unknown.json()["reason"] == "not_found"
            # word for word what an endpoint that does not exist answers: nothing about bob or his session
            assert r.json() == {"message": f"no such endpoint: {method} {path}", "reason": "not_found"}
        listed = broker.get("/api/sessions", owner=owner).json()
        assert bob not in {s["id"] for s in listed}
        assert broker.get(f"/api/sessions/{bob}", owner=owner).status_code == 404
    assert broker.get("/api/admin/sessions", owner=None).status_code == 401
    # bob's session is untouched by all of that
    assert broker.get(f"/api/sessions/{bob}", owner="bob").status_code == 200


def test_admin_lists_every_owners_sessions_with_numbers(broker, sessions):
    r = broker.get("/api/admin/sessions", owner="ops")
    assert r.status_code == 200, r.text
    rows = {s["id"]: s for s in r.json()["sessions"]}
    assert rows[sessions["alice"]]["owner"] == "alice" and rows[sessions["bob"]]["owner"] == "bob"
    a = rows[sessions["alice"]]
    for key in ("id", "owner", "state", "created", "age_seconds", "idle_seconds", "memory_bytes", "cpu_seconds",
                "disk_bytes", "executing"):
        assert key in a, key
    assert a["state"] == "idle" and a["executing"] is False
    assert a["memory_bytes"] > 40_000_000, a          # the 40 MB the kernel holds
    assert a["cpu_seconds"] > 0, a
    assert a["disk_bytes"] >= 1 << 20, a              # the 1 MB file
    assert a["age_seconds"] >= a["idle_seconds"] >= 0
    assert rows[sessions["bob"]]["memory_bytes"] < a["memory_bytes"]
    assert r.json()["pooled"] >= 0


def test_admin_ends_another_owners_session(broker):
    sid = broker.create_session("bob")
    r = broker.delete(f"/api/admin/sessions/{sid}", owner="ops")
    assert r.status_code == 204, r.text
    assert broker.get(f"/api/sessions/{sid}", owner="bob").status_code == 404
    assert sid not in {s["id"] for s in broker.get("/api/admin/sessions", owner="ops").json()["sessions"]}
    assert broker.delete(f"/api/admin/sessions/{sid}", owner="ops").status_code == 404


def _cli(broker, owner, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_CONFIG"] = os.path.join(broker.workdir, "no-client-config.json")
    return subprocess.run([BROKER_BIN, "admin", *args, "--url", broker.url, "--token", broker.owners[owner]],
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_admin_sessions_and_end(broker, sessions):
    p = _cli(broker, "ops", "sessions")
    assert p.returncode == 0, p.stderr
    head, *lines = p.stdout.splitlines()
    assert head.split() == ["ID", "OWNER", "STATE", "AGE", "IDLE", "MEMORY", "CPU", "DISK"]
    mine = next(line for line in lines if line.startswith(sessions["alice"]))
    assert mine.split()[1] == "alice" and "MB" in mine
    p = _cli(broker, "alice", "sessions")
    assert p.returncode == 4 and "no such endpoint" in p.stderr, (p.returncode, p.stderr)
    sid = broker.create_session("bob")
    p = _cli(broker, "ops", "end", sid)
    assert p.returncode == 0 and f"{sid}: ended" in p.stdout, (p.stdout, p.stderr)
    assert broker.get(f"/api/sessions/{sid}", owner="bob").status_code == 404


def test_bad_tokens_file_entry_is_named(tmp_path):
    bad = tmp_path / "tokens.json"
    bad.write_text(json.dumps({"tok-fine": "alice", "tok-secret-xyz": {"owner": "ops", "admin": "yes"}}))
    # What `broker serve --tokens-file` runs first (in-process: a serve subprocess costs seconds of imports).
    with pytest.raises(SystemExit) as stop:
        ServeApp(tokens_file=str(bad)).init_auth()
    message = str(stop.value)
    assert "entry 2 (owner 'ops'): 'admin'" in message and "true or false" in message, message
    assert "tok-secret-xyz" not in message
    bad.write_text(json.dumps({"tok-x": ["alice"]}))
    with pytest.raises(SystemExit, match=r"entry 1: the value is \["):
        ServeApp(tokens_file=str(bad)).init_auth()


# -- /metrics --------------------------------------------------------------------------------

def test_metrics_need_a_token_by_default(broker):
    assert broker.get("/metrics", owner=None).status_code == 401
    assert broker.get("/metrics", owner=None, headers={"Authorization": "Bearer wrong"}).status_code == 401
    metrics(broker, "eve")   # any valid token


def test_metrics_change_after_calls(broker, sessions):
    sid = sessions["alice"]
    before = metrics(broker)
    assert broker.run(sid, "print(6 * 7)")["status"] == "success"
    refused = broker.run(sid, "import os; os.system('id')")
    assert refused["status"] == "error" and "PermissionError" in refused["error"]["ename"]
    payload = os.urandom(300_000)
    assert broker.put(f"/api/sessions/{sid}/files/up.bin", data=payload).status_code == 201
    got = broker.get(f"/api/sessions/{sid}/files/up.bin")
    assert got.content == payload
    assert broker.post("/api/sessions", owner=None).status_code == 401
    r = broker.post(f"/api/kernels/{sessions['bob']}/restart", owner="bob")
    assert r.status_code == 200, r.text
    after = metrics(broker)

    def grew(name, by=1.0, **labels):
        b, a = value(before, name, **labels), value(after, name, **labels)
        assert a - b >= by, (name, labels, b, a)

    grew("broker_tool_calls_total", tool="ExecutePythonCode", outcome="success")
    grew("broker_tool_calls_total", tool="ExecutePythonCode", outcome="error")
    grew("broker_tool_call_duration_seconds_count", 2, tool="ExecutePythonCode")
    grew("broker_refused_total", reason="sandbox")
    grew("broker_refused_total", reason="unauthorized")
    route = "/api/sessions/{sid}/tools/{name}"
    grew("broker_http_requests_total", 2, method="POST", route=route, status="200")
    grew("broker_http_request_duration_seconds_count", 2, method="POST", route=route)
    files = "/api/sessions/{sid}/files/{path}"
    grew("broker_http_received_bytes_total", len(payload), route=files)
    grew("broker_http_sent_bytes_total", len(payload), route=files)
    assert value(after, "broker_sessions_alive") >= 2
    assert total(after, "broker_kernel_starts_total") >= 2
    grew("broker_kernel_restarts_total", reason="jupyter_api")
    assert value(after, "broker_sandbox_memory_bytes", owner="alice") > 40_000_000
    assert value(after, "broker_sandbox_cpu_seconds", owner="alice") > 0
    # Bounded labels: route patterns, never a raw path or a session id.
    labels = {v for (_, ls) in after for _, v in ls}
    assert not any(sid in v for v in labels), [v for v in labels if sid in v]


# -- the call log (human, the default) --------------------------------------------------------

def _log(broker) -> str:
    deadline = time.monotonic() + 10
    while True:
        with open(broker.log_path, errors="replace") as fh:
            text = fh.read()
        if "refusal" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_call_log_lines_carry_the_fields_and_no_secrets(broker, sessions):
    sid = sessions["alice"]
    secret_text = "contents-4b1d9e-never-logged"
    r = broker.run(sid, f"open('/mnt/data/s.txt', 'w').write({secret_text!r})\nimport socket; socket.socket()")
    assert r["status"] == "error"
    files = broker.get(f"/api/sessions/{sid}/files").json()
    url = next(f["url"] for f in files if f["name"] == "s.txt")
    assert "sig=" in url
    assert requests.get(url, timeout=30).text == secret_text      # a signed link, no token
    text = _log(broker)
    lines = text.splitlines()
    call = [ln for ln in lines if " http POST /api/sessions/{sid}/tools/{name} 200 " in ln and f"session={sid}" in ln]
    assert call, text[-3000:]
    ln = call[-1]
    assert "tool=ExecutePythonCode" in ln and "outcome=error" in ln and "owner=alice" in ln
    assert "ms " in ln and "bytes_in=" in ln and "bytes_out=" in ln
    assert ln[:4].isdigit() and ln[10] == "T"
    refusal = [ln for ln in lines if " refusal " in ln and f"session={sid}" in ln and "socket" in ln]
    assert refusal and "owner=alice" in refusal[-1] and "tool=ExecutePythonCode" in refusal[-1], text[-3000:]
    download = [ln for ln in lines if " http GET /api/sessions/{sid}/files/{path} 200 " in ln]
    assert download
    for token in TOKENS:
        assert token not in text
    assert "sig=" not in text and secret_text not in text and "Authorization" not in text


# -- the JSON call log and an open /metrics -----------------------------------------------------

@pytest.fixture(scope="module")
def json_broker(tmp_path_factory):
    b = BrokerProcess(str(tmp_path_factory.mktemp("ops-json")), "--SessionManager.pool_size=0",
                      "--ServeApp.call_log_format=json", "--ServeApp.metrics_auth=none",
                      "--ServeApp.metrics_per_session=True", tokens=TOKENS)
    b.start()
    yield b
    b.stop()


def _records(broker) -> list[dict]:
    with open(broker.log_path, errors="replace") as fh:
        return [json.loads(ln) for ln in fh if ln.startswith("{")]


def test_json_call_log_and_open_metrics(json_broker):
    b = json_broker
    page = b.get("/metrics", owner=None)
    assert page.status_code == 200 and "broker_sessions_alive" in page.text
    sid = b.create_session("bob")
    assert b.run(sid, "1 + 1", owner="bob")["status"] == "success"
    with KernelWS(f"ws://127.0.0.1:{b.port}/api/kernels/{sid}/channels", b.owners["bob"]) as ws:
        ws.wait_ready()
        ex = ws.run("print('over the socket')")
        assert ex.reply["content"]["status"] == "ok"
        ex = ws.run("import os; os.system('id')")
        assert ex.reply["content"]["status"] == "error"
    deadline = time.monotonic() + 10
    while True:
        recs = _records(b)
        ws_lines = [r for r in recs if r["kind"] == "ws" and r.get("session") == sid]
        if len(ws_lines) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    call = [r for r in recs if r["kind"] == "http" and r.get("tool") == "ExecutePythonCode" and r["session"] == sid]
    assert call, recs[-10:]
    c = call[-1]
    assert c["method"] == "POST" and c["endpoint"] == "/api/sessions/{sid}/tools/{name}" and c["status"] == 200
    assert c["owner"] == "bob" and c["outcome"] == "success" and c["duration_ms"] > 0
    assert c["bytes_in"] > 0 and c["bytes_out"] > 0 and c["time"].endswith("Z")
    assert ws_lines, recs[-10:]
    w = ws_lines[0]
    assert w["owner"] == "bob" and w["outcome"] == "ok" and w["duration_ms"] > 0
    assert ws_lines[1]["outcome"] == "error"
    assert w["endpoint"] == "/api/kernels/{sid}/channels"
    per_session = samples(b.get("/metrics", owner=None).text)
    assert value(per_session, "broker_session_memory_bytes", session=sid, owner="bob") > 0
    assert value(per_session, "broker_session_cpu_seconds", session=sid, owner="bob") > 0
    refusal = [r for r in recs if r["kind"] == "refusal" and r.get("session") == sid]
    assert refusal and refusal[-1]["tool"] == "(websocket)" and "os.system" in refusal[-1]["message"], recs[-10:]
    assert refusal[-1]["owner"] == "bob" and refusal[-1]["error"].endswith("PermissionError")
    opened = [r for r in recs if r["kind"] == "http" and r["endpoint"] == "/metrics"]
    assert opened and "owner" not in opened[0]
    with open(b.log_path, errors="replace") as fh:
        text = fh.read()
    for token in TOKENS:
        assert token not in text


# -- an unexpected exception: logged with its traceback, never shown to the client -----------------

class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class _Boom(BaseHandler):
    """A handler with a bug: the failure mode is hard to cause for real, so it is made here."""

    def get(self, sid):
        raise RuntimeError("boom-4711")


def test_unexpected_error_is_logged_with_traceback_and_no_secrets():
    lines = _Lines()
    logger = logging.getLogger("tests.ops.calls")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    state = SimpleNamespace(auth=Auth({"tok-secret-1": "alice"}), call_log=CallLog("json", logger), observer=None,
                            sessions=SimpleNamespace(snapshots=None, sessions={}))
    rules = [(r"/boom/(?P<sid>[^/]+)", _Boom)]
    state.routes = route_table(rules)

    async def main():
        app = web.Application(rules, broker=state, log_function=log_request)
        sock, = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(app)
        server.add_sockets([sock])
        try:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/boom/s-123?sig=signed-secret"
            return await AsyncHTTPClient().fetch(url, headers={"Authorization": "Bearer tok-secret-1"},
                                                 raise_error=False)
        finally:
            server.stop()

    r = asyncio.run(main())
    assert r.code == 500
    assert json.loads(r.body) == {"message": "internal error (see the broker's log)",
                                  "reason": "internal_server_error"}
    records = [json.loads(ln) for ln in lines.lines]
    err = next(x for x in records if x["kind"] == "error")
    assert "RuntimeError: boom-4711" in err["traceback"] and "Traceback" in err["traceback"]
    assert err["endpoint"] == "/boom/{sid}" and err["session"] == "s-123" and err["owner"] == "alice"
    http = next(x for x in records if x["kind"] == "http")
    assert http["status"] == 500
    text = "\n".join(lines.lines)
    assert "tok-secret-1" not in text and "signed-secret" not in text


def test_metrics_for_admins_only_when_the_setting_says_so():
    """ServeApp.metrics_auth=admin: other tokens get 404, like the admin endpoints."""
    state = SimpleNamespace(auth=Auth({"tok-a": "alice", "tok-o": Identity("ops", True)}), call_log=None,
                            observer=None, metrics=Metrics(None), metrics_auth="admin", routes={},
                            sessions=SimpleNamespace(snapshots=None, sessions={}))

    async def main():
        app = web.Application(admin.routes, broker=state)
        sock, = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(app)
        server.add_sockets([sock])
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"
        try:
            return [(await AsyncHTTPClient().fetch(url, raise_error=False, headers=h)).code
                    for h in ({}, {"Authorization": "Bearer tok-a"}, {"Authorization": "Bearer tok-o"})]
        finally:
            server.stop()

    assert asyncio.run(main()) == [401, 404, 200]


def test_two_brokers_in_one_process_keep_separate_counts():
    """Each broker's metrics live on a registry of its own, not prometheus_client's global one."""
    one, two = Metrics(None), Metrics(None)
    one.tool_calls.labels("ExecutePythonCode", "success").inc()
    a, b = samples(one.render().decode()), samples(two.render().decode())
    assert value(a, "broker_tool_calls_total", tool="ExecutePythonCode", outcome="success") == 1
    assert value(b, "broker_tool_calls_total", tool="ExecutePythonCode", outcome="success") == 0
