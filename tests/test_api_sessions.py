"""Sessions, authentication and ownership, limits, restart, idle culling and
the OpenAPI document, over real HTTP against real `broker serve` processes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import threading
import time

import pytest
import requests

from tests.broker_server import REPO, TIMEOUT, BrokerProcess

SEED_PARAMS = {
    "ExecutePythonCode": {"pythonCode": (True, None, None), "timeoutSeconds": (False, 120, 900)},
    "GeneratePdfReport": {"pythonCode": (True, None, None), "expectedOutputFilename": (True, None, None),
                          "saveAsFilename": (True, None, None), "timeoutSeconds": (False, 180, 900)},
    "RunShellCommand": {"command": (True, None, None), "explanation": (False, None, None),
                        "isBackground": (False, False, None), "timeoutSeconds": (False, 120, 240)},
}
FILE_TOOLS = ["ReadSessionFile", "SearchSessionFiles", "ListSessionFiles", "GetSessionFile", "UploadFileToSession"]


def ts(s: str) -> datetime.datetime:
    assert s.endswith("Z"), s
    return datetime.datetime.fromisoformat(s[:-1] + "+00:00")


# -- auth ---------------------------------------------------------------------------------------

def every_session_url(sid):
    """(method, path, kwargs) for every URL under one session."""
    base = f"/api/sessions/{sid}"
    return [
        ("GET", base, {}),
        ("DELETE", base, {}),
        ("POST", f"{base}/tools/ExecutePythonCode", {"json": {"pythonCode": "print('pwned')"}}),
        ("POST", f"{base}/tools/ListSessionFiles", {"json": {}}),
        ("POST", f"{base}/tools/ReadSessionFile", {"json": {"path": "mine.txt"}}),
        ("POST", f"{base}/tools/UploadFileToSession", {"json": {"path": "x.txt", "content": "eA=="}}),
        ("POST", f"{base}/tools/NoSuchTool", {"json": {}}),
        ("GET", f"{base}/files", {}),
        ("POST", f"{base}/files", {"files": {"file": ("x.txt", b"x")}}),
        ("GET", f"{base}/files/mine.txt", {}),
        ("PUT", f"{base}/files/mine.txt", {"data": b"overwritten"}),
        ("DELETE", f"{base}/files/mine.txt", {}),
    ]


def test_no_token_and_wrong_token_are_401(broker, session):
    broker.put(f"/api/sessions/{session}/files/mine.txt", data=b"mine")
    urls = [("GET", "/api/sessions", {}), ("POST", "/api/sessions", {})] + every_session_url(session)
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "token wrong-token"},
                    {"Authorization": "Bearer"}, {"Authorization": "tok-alice"},
                    {"Authorization": "Basic dG9rLWFsaWNlOg=="}):
        for method, path, kw in urls:
            r = broker.request(method, path, owner=None, headers=headers, timeout=TIMEOUT, **kw)
            assert r.status_code == 401, (headers, method, path, r.status_code, r.text)
            body = r.json()
            assert body["reason"] == "unauthorized" and "token" in body["message"]
    # Nothing happened.
    assert broker.get(f"/api/sessions/{session}/files/mine.txt").content == b"mine"
    assert broker.get(f"/api/sessions/{session}").status_code == 200
    # The API document needs no token.
    assert requests.get(broker.url + "/api/openapi.json", timeout=TIMEOUT).status_code == 200


def test_other_owner_gets_404_everywhere(broker, session):
    broker.put(f"/api/sessions/{session}/files/mine.txt", data=b"mine")
    for method, path, kw in every_session_url(session):
        r = broker.request(method, path, owner="bob", **kw)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert b"pwned" not in r.content and b"mine" not in r.content
        assert r.json()["reason"] in ("session_not_found", "not_found")
    # The same answer as for a session that does not exist at all.
    r = broker.get("/api/sessions/00000000-0000-4000-8000-000000000000", owner="bob")
    assert r.status_code == 404 and r.json()["reason"] == "session_not_found"
    assert session not in [s["id"] for s in broker.get("/api/sessions", owner="bob").json()]
    # Alice's session and file are untouched.
    assert broker.get(f"/api/sessions/{session}/files/mine.txt").content == b"mine"
    assert broker.get(f"/api/sessions/{session}").status_code == 200


def test_token_scheme_spelling(broker, session):
    for header in (f"token {broker.owners['alice']}", f"Bearer {broker.owners['alice']}",
                   f"bearer {broker.owners['alice']}"):
        r = broker.get(f"/api/sessions/{session}", owner=None, headers={"Authorization": header})
        assert r.status_code == 200, (header, r.text)


# -- lifecycle -------------------------------------------------------------------------------------

def test_create_get_list_delete(broker):
    t0 = datetime.datetime.now(datetime.timezone.utc)
    r = broker.post("/api/sessions", owner="carol")
    assert r.status_code == 201, r.text
    s = r.json()
    assert set(s) >= {"id", "created", "last_activity", "expires_at", "state"}
    sid = s["id"]
    assert r.headers["Location"] == f"/api/sessions/{sid}"
    assert s["state"] == "idle"
    created = ts(s["created"])
    assert abs((created - t0).total_seconds()) < 60
    assert ts(s["expires_at"]) - ts(s["last_activity"]) == datetime.timedelta(minutes=20)
    # Location resolves to the same model.
    got = broker.get(r.headers["Location"], owner="carol")
    assert got.status_code == 200 and got.json()["id"] == sid
    # A second session; the list holds only carol's, oldest first.
    sid2 = broker.create_session("carol")
    dave = broker.create_session("dave")
    listed = broker.get("/api/sessions", owner="carol").json()
    assert [x["id"] for x in listed] == [sid, sid2]
    assert [x["id"] for x in broker.get("/api/sessions", owner="dave").json()] == [dave]
    # Activity moves last_activity and expires_at.
    time.sleep(1.1)
    broker.tool(sid, "ListSessionFiles", {}, owner="carol")
    again = broker.get(f"/api/sessions/{sid}", owner="carol").json()
    assert ts(again["last_activity"]) > ts(s["last_activity"])
    assert ts(again["expires_at"]) - ts(again["last_activity"]) == datetime.timedelta(minutes=20)
    # DELETE: 204, then 404 everywhere, and the folder is gone.
    folder = os.path.join(broker.data_root, sid)
    assert os.path.isdir(folder)
    r = broker.delete(f"/api/sessions/{sid}", owner="carol")
    assert r.status_code == 204 and r.content == b""
    assert broker.get(f"/api/sessions/{sid}", owner="carol").status_code == 404
    assert broker.delete(f"/api/sessions/{sid}", owner="carol").status_code == 404
    assert broker.tool_response(sid, "ListSessionFiles", {}, owner="carol").status_code == 404
    assert not os.path.exists(folder)
    assert [x["id"] for x in broker.get("/api/sessions", owner="carol").json()] == [sid2]
    broker.delete_session(sid2, "carol")
    broker.delete_session(dave, "dave")


def test_state_busy_while_running(broker, session):
    result = {}

    def run():
        result["r"] = broker.run(session, "import time\ntime.sleep(3)\nprint('done')")

    t = threading.Thread(target=run)
    t.start()
    try:
        deadline = time.monotonic() + 10
        seen = set()
        while time.monotonic() < deadline and t.is_alive():
            seen.add(broker.get(f"/api/sessions/{session}", timeout=5).json()["state"])
            if "busy" in seen:
                break
            time.sleep(0.1)
        assert "busy" in seen, seen
    finally:
        t.join(TIMEOUT)
    assert result["r"]["stdout"] == "done\n"
    assert broker.get(f"/api/sessions/{session}").json()["state"] == "idle"


def test_unknown_endpoint_and_method(broker):
    r = broker.get("/api/nothing-here")
    assert r.status_code == 404 and "no such endpoint" in r.json()["message"]
    r = broker.request("PATCH", "/api/sessions")
    assert r.status_code == 405


# -- limits --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_broker(tmp_path_factory):
    """At most 3 sessions in all and 2 per owner."""
    b = BrokerProcess(str(tmp_path_factory.mktemp("small-broker")),
                      "--SessionManager.max_sessions=3", "--SessionManager.max_sessions_per_owner=2")
    b.start()
    yield b
    b.stop()


def test_session_limits_answer_429_naming_the_limit(small_broker):
    b = small_broker
    c1, c2 = b.create_session("carol"), b.create_session("carol")
    r = b.post("/api/sessions", owner="carol")
    assert r.status_code == 429, r.text
    assert r.json()["reason"] == "too_many_sessions"
    assert "max_sessions_per_owner" in r.json()["message"] and "2" in r.json()["message"]
    # Another owner still gets one, up to the total of 3.
    d1 = b.create_session("dave")
    r = b.post("/api/sessions", owner="dave")
    assert r.status_code == 429, r.text
    msg = r.json()["message"]
    assert "SessionManager.max_sessions)" in msg and "3" in msg, msg
    r = b.post("/api/sessions", owner="alice")
    assert r.status_code == 429 and "SessionManager.max_sessions)" in r.json()["message"]
    # A failed create made nothing.
    assert [s["id"] for s in b.get("/api/sessions", owner="alice").json()] == []
    # Deleting one frees a place.
    assert b.delete(f"/api/sessions/{c1}", owner="carol").status_code == 204
    a1 = b.create_session("alice")
    assert b.run(a1, "print('works')", owner="alice")["stdout"] == "works\n"
    for sid, owner in ((c2, "carol"), (d1, "dave"), (a1, "alice")):
        assert b.delete(f"/api/sessions/{sid}", owner=owner).status_code == 204


# -- restart ---------------------------------------------------------------------------------------

def test_restart_keeps_sessions_and_files(tmp_path):
    b = BrokerProcess(str(tmp_path / "restart"), "--SessionManager.pool_size=0")
    b.start()
    try:
        sid = b.create_session("alice")
        other = b.create_session("bob")
        assert b.put(f"/api/sessions/{sid}/files/uploaded.txt", data=b"uploaded before restart").status_code == 201
        r = b.run(sid, "open('/mnt/data/made.csv', 'w').write('a,b\\n1,2\\n')\nvariable = 'in memory'")
        assert r["status"] == "success", r
        before = b.get(f"/api/sessions/{sid}").json()
        assert b.stop() == 0, b.log_tail()
        # Stopped: nothing answers.
        with pytest.raises(requests.ConnectionError):
            requests.get(b.url + "/api/sessions", timeout=5)

        b.start()  # same --data-root and tokens file, a new port
        listed = b.get("/api/sessions").json()
        assert [s["id"] for s in listed] == [sid]
        assert listed[0]["created"] == before["created"]
        assert listed[0]["state"] == "stopped"  # the kernel starts on the next tool call
        assert [s["id"] for s in b.get("/api/sessions", owner="bob").json()] == [other]
        files = {f["path"]: f["size"] for f in b.get(f"/api/sessions/{sid}/files").json()}
        assert files == {"uploaded.txt": 23, "made.csv": 8}
        assert b.get(f"/api/sessions/{sid}/files/uploaded.txt").content == b"uploaded before restart"
        # Ownership survived too.
        assert b.get(f"/api/sessions/{sid}", owner="bob").status_code == 404
        r = b.run(sid, "print(open('/mnt/data/made.csv').read().strip()); print('variable' in dir())")
        assert r["status"] == "success", r
        assert r["stdout"] == "a,b\n1,2\nFalse\n"
        assert b.get(f"/api/sessions/{sid}").json()["state"] == "idle"
        r = b.shell(sid, "cat uploaded.txt")
        assert r["stdout"] == "uploaded before restart"
    finally:
        b.stop()


# -- idle culling ----------------------------------------------------------------------------------

class InProcessBroker:
    """The real ServeApp (configuration, SessionManager, web app, culler) run
    in a thread of the test process.  Used only for culling, because the idle
    cooldown cannot be shortened below its 5-minute minimum from the command
    line: here the test can reach the session objects and date a session's
    last activity back, then let the real culler loop find it."""

    def __init__(self, workdir, *argv):
        from broker.cli.serve import ServeApp
        from tests.broker_server import TOKENS

        os.makedirs(workdir, exist_ok=True)
        tokens = os.path.join(workdir, "tokens.json")
        with open(tokens, "w") as fh:
            json.dump(TOKENS, fh)
        self.app = ServeApp()
        self.app.initialize(["--ip", "127.0.0.1", "--port", "0", "--data-root", os.path.join(workdir, "data"),
                             "--tokens-file", tokens, *argv])
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "in-process broker did not start"

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self):
        from tornado.httpserver import HTTPServer
        from tornado.netutil import bind_sockets

        self.server = HTTPServer(self.app.web_app)
        sockets = bind_sockets(0, "127.0.0.1")
        self.server.add_sockets(sockets)
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        self.app.sessions.start_background()  # the culler, as `broker serve` starts it

    def call(self, fn, timeout=60):
        """Run fn() on the broker's loop and return its result."""
        async def wrapper():
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def stop(self):
        async def _stop():
            self.server.stop()
            await self.app.sessions.shutdown()
        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def test_idle_session_is_culled(tmp_path):
    b = InProcessBroker(str(tmp_path / "inproc"), "--SessionManager.cull_interval=0.2",
                        "--SessionManager.pool_size=0")
    h = {"Authorization": "Bearer tok-alice"}
    try:
        idle = requests.post(b.url + "/api/sessions", headers=h, timeout=TIMEOUT).json()
        busy = requests.post(b.url + "/api/sessions", headers=h, timeout=TIMEOUT).json()
        r = requests.put(f"{b.url}/api/sessions/{idle['id']}/files/f.txt", data=b"x", headers=h, timeout=TIMEOUT)
        assert r.status_code == 201
        folder = os.path.join(b.app.sessions.data_root, idle["id"])
        assert os.path.isdir(folder)
        # Nothing is culled before its cooldown (20 minutes by default).
        time.sleep(1)
        assert requests.get(f"{b.url}/api/sessions/{idle['id']}", headers=h, timeout=TIMEOUT).status_code == 200

        # Date the idle session's last call back past the cooldown.
        def age():
            s = b.app.sessions.sessions[idle["id"]]
            s.last_activity = time.time() - (b.app.sessions.idle_timeout_minutes * 60 + 1)
        b.call(age)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = requests.get(f"{b.url}/api/sessions/{idle['id']}", headers=h, timeout=TIMEOUT)
            if r.status_code == 404:
                break
            time.sleep(0.2)
        assert r.status_code == 404, r.text
        # The folder goes once the kernel has stopped.
        while os.path.exists(folder) and time.monotonic() < deadline + 10:
            time.sleep(0.1)
        assert not os.path.exists(folder), "the culled session's files were kept"
        r = requests.get(f"{b.url}/api/sessions/{idle['id']}/files/f.txt", headers=h, timeout=TIMEOUT)
        assert r.status_code == 404
        # The other session, recently used, is still there and works.
        listed = requests.get(b.url + "/api/sessions", headers=h, timeout=TIMEOUT).json()
        assert [s["id"] for s in listed] == [busy["id"]]
        r = requests.post(f"{b.url}/api/sessions/{busy['id']}/tools/ExecutePythonCode", headers=h,
                          json={"pythonCode": "print(2)"}, timeout=TIMEOUT)
        assert r.json()["stdout"] == "2\n"
    finally:
        b.stop()


# -- OpenAPI -----------------------------------------------------------------------------------------

def test_openapi_served_equals_docs(broker):
    r = requests.get(broker.url + "/api/openapi.json", timeout=TIMEOUT)
    assert r.status_code == 200
    with open(os.path.join(REPO, "docs", "openapi.json")) as fh:
        on_disk = json.load(fh)
    assert r.json() == on_disk, "docs/openapi.json is stale: run `.venv/bin/broker openapi > docs/openapi.json`"


def test_openapi_tools_carry_the_seed_parameters(broker):
    doc = requests.get(broker.url + "/api/openapi.json", timeout=TIMEOUT).json()
    schemas = doc["components"]["schemas"]
    for tool in list(SEED_PARAMS) + FILE_TOOLS:
        path = f"/api/sessions/{{id}}/tools/{tool}"
        assert path in doc["paths"], tool
        op = doc["paths"][path]["post"]
        assert op["operationId"] == tool
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{tool}"}
        assert schemas[tool]["additionalProperties"] is False
    for tool, params in SEED_PARAMS.items():
        schema = schemas[tool]
        assert set(schema["properties"]) == set(params), tool
        assert set(schema["required"]) == {name for name, (req, _, _) in params.items() if req}, tool
        for name, (_req, default, maximum) in params.items():
            prop = schema["properties"][name]
            if default is not None:
                assert prop.get("default") == default, (tool, name, prop)
            if maximum is not None:
                assert prop.get("maximum") == maximum, (tool, name, prop)
    assert schemas["ExecutePythonCode"]["properties"]["pythonCode"]["maxLength"] == 20_000
    assert schemas["RunShellCommand"]["properties"]["isBackground"]["type"] == "boolean"
    assert schemas["ExecutePythonCode"]["properties"]["timeoutSeconds"]["type"] == "integer"
    # The file tools: what each needs.
    assert "path" in schemas["ReadSessionFile"]["required"]
    assert "pattern" in schemas["SearchSessionFiles"]["required"]
    assert schemas["ListSessionFiles"].get("required", []) == []
    assert "path" in schemas["GetSessionFile"]["required"]
    assert set(schemas["UploadFileToSession"]["required"]) == {"path", "content"}
    # Every tool path is a session tool path, and there are exactly eight.
    tools = [p for p in doc["paths"] if "/tools/" in p]
    assert len(tools) == 8
