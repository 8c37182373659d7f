"""The broker's kernel WebSocket ``/api/kernels/{id}/channels`` and the Kernel
Gateway REST around it, against a real ``broker serve`` on loopback.

Both framings (legacy JSON/binary, ``v1.kernel.websocket.jupyter.org``),
binary buffers both ways, several clients on one kernel, stdin, reconnect
replay, the files notice, malformed frames, auth on the upgrade, the env
allow-list of POST /api/kernels and per-owner listing.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
import uuid

import pytest
import requests

from tests.gateway_helpers import (
    FILES_MIME,
    V1,
    BrokerServer,
    KernelWS,
    parse_gateway_time,
    upgrade_status,
)

FRAMINGS = [pytest.param(False, id="legacy"), pytest.param(True, id="v1")]
RECONNECT_WINDOW = 4.0


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    b = BrokerServer(str(tmp_path_factory.mktemp("gw-channels")),
                     f"--ChannelSettings.reconnect_window={RECONNECT_WINDOW}")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def kernel(gw):
    """A fresh kernel of owner alice, deleted afterwards."""
    model = gw.create_kernel("alice")
    yield model["id"]
    gw.delete_kernel(model["id"], "alice")


def client(gw, kid, v1=False, **kw) -> KernelWS:
    c = gw.ws(kid, v1=v1, **kw)
    c.wait_ready()
    return c


# -- both framings ----------------------------------------------------------------------

@pytest.mark.parametrize("v1", FRAMINGS)
def test_execute_and_kernel_info(gw, kernel, v1):
    with client(gw, kernel, v1) as c:
        info = c.request("kernel_info_request", {})
        assert info["channel"] == "shell"
        assert info["content"]["language_info"]["name"] == "python"
        ex = c.run("import os\nprint('hello', os.getcwd())\n6*7")
        assert ex.reply["content"]["status"] == "ok"
        assert ex.stdout == "hello /mnt/data\n"
        assert ex.result == "42"
        # busy first, idle last, all with the request as parent
        assert ex.iopub[0]["msg_type"] == "status" and ex.iopub[0]["content"]["execution_state"] == "busy"
        assert ex.iopub[-1]["msg_type"] == "status" and ex.iopub[-1]["content"]["execution_state"] == "idle"
        # the control channel answers too
        r = c.request("kernel_info_request", {}, channel="control")
        assert r["channel"] == "control" and r["msg_type"] == "kernel_info_reply"


def test_legacy_frames_are_text_without_buffers(gw, kernel):
    """Legacy messages without buffers are JSON text frames with the top-level
    fields jupyter_server's relay and JupyterLab's legacy path read."""
    import websocket

    with client(gw, kernel) as c:
        mid = c.execute("print('x')")
        seen = 0
        c.ws.settimeout(30)
        while True:
            opcode, data = c.ws.recv_data()
            assert opcode == websocket.ABNF.OPCODE_TEXT
            d = json.loads(data)
            assert {"header", "parent_header", "metadata", "content", "channel", "msg_id", "msg_type",
                    "buffers"} <= set(d)
            assert d["msg_id"] == d["header"]["msg_id"] and d["msg_type"] == d["header"]["msg_type"]
            seen += 1
            if d["parent_header"].get("msg_id") == mid and d["msg_type"] == "status" \
                    and d["content"]["execution_state"] == "idle":
                break
        assert seen >= 4


KERNEL_COMM = """
from ipykernel.comm import Comm
c = Comm(target_name="broker-test", data={"opened": True})
c.send({"kind": "blob"}, buffers=[b"\\x00\\x01\\x02\\xffbinary", bytes(range(256))])
print("sent")
"""

ECHO_TARGET = """
import comm
def _target(c, open_msg):
    @c.on_msg
    def _on(msg):
        bufs = [bytes(b) for b in msg["buffers"]]
        c.send({"sizes": [len(b) for b in bufs], "data": msg["content"]["data"]}, buffers=[b[::-1] for b in bufs])
comm.get_comm_manager().register_target("echo", _target)
print("registered")
"""


@pytest.mark.parametrize("v1", FRAMINGS)
def test_buffers_kernel_to_client(gw, kernel, v1):
    with client(gw, kernel, v1) as c:
        ex = c.run(KERNEL_COMM)
        assert ex.reply["content"]["status"] == "ok", ex.error
        opens = ex.of("comm_open")
        msgs = ex.of("comm_msg")
        assert len(opens) == 1 and opens[0]["content"]["target_name"] == "broker-test"
        assert len(msgs) == 1
        m = msgs[0]
        assert m["content"]["comm_id"] == opens[0]["content"]["comm_id"]
        assert m["content"]["data"] == {"kind": "blob"}
        assert m["buffers"] == [b"\x00\x01\x02\xffbinary", bytes(range(256))]


@pytest.mark.parametrize("v1", FRAMINGS)
def test_buffers_client_to_kernel(gw, kernel, v1):
    with client(gw, kernel, v1) as c:
        assert c.run(ECHO_TARGET).stdout == "registered\n"
        comm_id = uuid.uuid4().hex
        open_id = c.send("comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}})
        c.collect(open_id, want_reply=False)
        bufs = [b"\x00abc\xff\xfe", bytes(range(256)) * 40]
        mid = c.send("comm_msg", {"comm_id": comm_id, "data": {"n": 2}}, buffers=bufs)
        ex = c.collect(mid, want_reply=False, until=lambda e: bool(e.of("comm_msg")))
        echo = ex.of("comm_msg")[0]
        assert echo["content"]["comm_id"] == comm_id
        assert echo["content"]["data"] == {"sizes": [len(b) for b in bufs], "data": {"n": 2}}
        assert echo["buffers"] == [b[::-1] for b in bufs]


# -- several clients ---------------------------------------------------------------------

@pytest.mark.parametrize("v1_b", FRAMINGS)
def test_two_clients_share_iopub(gw, kernel, v1_b):
    with client(gw, kernel, False) as a, client(gw, kernel, v1_b) as b:
        assert gw.request("GET", f"/api/kernels/{kernel}").json()["connections"] == 2
        mid = a.execute("import time\nfor i in range(3):\n    print('tick', i, flush=True); time.sleep(0.1)")
        ex_a = a.collect(mid)
        ex_b = b.collect(mid, want_reply=False)
        assert ex_a.stdout == ex_b.stdout == "tick 0\ntick 1\ntick 2\n"
        assert [m["msg_type"] for m in ex_a.iopub] == [m["msg_type"] for m in ex_b.iopub]
        # the shell reply goes only to the client that asked
        time.sleep(0.3)
        try:
            while True:
                b.backlog.append(b.recv(0.2))
        except TimeoutError:
            pass
        assert not [m for m in b.backlog if m["channel"] == "shell" and m["parent_header"].get("msg_id") == mid]
        # and b can execute on the same kernel, seeing a's variables
        assert b.run("i").result == "2"


@pytest.mark.parametrize("v1", FRAMINGS)
def test_input_answered_over_stdin(gw, kernel, v1):
    with client(gw, kernel, v1) as c:
        prompts = []

        def answer(req):
            prompts.append(req["content"]["prompt"])
            return "Ada"

        ex = c.run("name = input('who? ')\nprint('hello', name)", stdin_answer=answer)
        assert ex.reply["content"]["status"] == "ok", ex.error
        assert prompts == ["who? "]
        assert ex.stdin[0]["msg_type"] == "input_request" and ex.stdin[0]["channel"] == "stdin"
        assert ex.stdout.endswith("hello Ada\n")


def test_input_refused_without_allow_stdin(gw, kernel):
    with client(gw, kernel) as c:
        ex = c.run("input('x')", allow_stdin=False)
        assert ex.reply["content"]["status"] == "error"
        assert "StdinNotImplementedError" in ex.error["ename"]


# -- reconnect --------------------------------------------------------------------------

TICKER = "import time\nfor i in range(10):\n    print(f'line {i}', flush=True)\n    time.sleep(0.2)\n'done'"
EXPECTED = "".join(f"line {i}\n" for i in range(10))


@pytest.mark.parametrize("v1", FRAMINGS)
def test_reconnect_same_session_replays(gw, kernel, v1):
    sid = uuid.uuid4().hex
    a = client(gw, kernel, v1, session_id=sid)
    mid = a.execute(TICKER)
    first = a.collect(mid, until=lambda e: "line 0" in e.stdout)
    a.disconnect()               # the cell is still running
    a.absorb(first)              # what was on the wire when we left
    time.sleep(0.8)              # lines printed now reach nobody but the buffer
    b = gw.ws(kernel, v1=v1, session_id=sid)
    try:
        rest = b.collect(mid, timeout=30)
    finally:
        b.close()
    assert first.stdout + rest.stdout == EXPECTED
    assert rest.reply is not None and rest.reply["content"]["status"] == "ok"   # the shell reply too
    assert rest.result == "'done'"


def test_new_session_id_gets_no_replay(gw, kernel):
    a = client(gw, kernel)
    mid = a.execute(TICKER)
    a.collect(mid, until=lambda e: "line 0" in e.stdout)
    a.disconnect()
    time.sleep(0.5)
    with gw.ws(kernel) as b:          # another session_id
        ex = b.collect(mid, want_reply=False, timeout=30)
        assert ex.reply is None       # live iopub only, never another client's replies
        assert "line 0" not in ex.stdout and ex.stdout.endswith("line 9\n")
        time.sleep(0.3)
        try:
            while True:
                b.backlog.append(b.recv(0.2))
        except TimeoutError:
            pass
        assert not [m for m in b.backlog if m["parent_header"].get("msg_id") == mid and m["channel"] == "shell"]


def test_reconnect_after_window_gets_nothing_buffered(gw, kernel):
    sid = uuid.uuid4().hex
    a = client(gw, kernel, session_id=sid)
    mid = a.execute("print('before', flush=True)\nimport time; time.sleep(0.5)\nprint('after')")
    a.collect(mid, until=lambda e: "before" in e.stdout)
    a.disconnect()
    time.sleep(RECONNECT_WINDOW + 1.5)
    with gw.ws(kernel, session_id=sid) as b:
        b.wait_ready()
        try:
            while True:
                b.backlog.append(b.recv(0.5))
        except TimeoutError:
            pass
        assert not [m for m in b.backlog if m["parent_header"].get("msg_id") == mid]
        assert b.run("1+1").result == "2"


# -- files --------------------------------------------------------------------------------

@pytest.mark.parametrize("v1", FRAMINGS)
def test_files_display_after_csv(gw, kernel, v1):
    code = ("import pandas as pd\n"
            "pd.DataFrame({'host': ['a', 'b'], 'errors': [3, 7]}).to_csv('/mnt/data/report.csv', index=False)\n"
            "print('written')")
    with client(gw, kernel, v1) as c:
        ex = c.run(code)
        assert ex.reply["content"]["status"] == "ok", ex.error
        notices = [m for m in ex.of("display_data") if FILES_MIME in m["content"]["data"]]
        assert len(notices) == 1
        n = notices[0]
        # it comes right before the idle status, with the execution as parent
        assert ex.iopub[-2] is n and ex.iopub[-1]["content"]["execution_state"] == "idle"
        data = n["content"]["data"]
        assert set(data) == {FILES_MIME, "text/markdown", "text/plain"}
        payload = data[FILES_MIME]
        expected = b"host,errors\na,3\nb,7\n"
        assert payload["more"] == 0
        assert len(payload["files"]) == 1
        f = payload["files"][0]
        assert f["path"] == "/mnt/data/report.csv" and f["size"] == len(expected) and f["type"] == "text/csv"
        assert f["url"].startswith(gw.url + f"/api/sessions/{kernel}/files/report.csv?")
        assert "report.csv" in data["text/markdown"] and "/mnt/data/report.csv" in data["text/plain"]
        # the signed link works without a token
        r = requests.get(f["url"], timeout=30)
        assert r.status_code == 200 and r.content == expected
        # the REST tool sees the same file
        listed = gw.tool(kernel, "ListSessionFiles", {})
        mine = [x for x in listed["files"] if x["path"] == "/mnt/data/report.csv"]
        assert len(mine) == 1 and mine[0]["size"] == len(expected)
        # a cell that writes nothing gets no notice
        ex2 = c.run("open('/mnt/data/report.csv').read()")
        assert ex2.files is None
        assert "host,errors" in ex2.result


def test_rest_upload_is_read_by_ws_kernel(gw, kernel):
    blob = "id,value\n1,alpha\n2,beta\n".encode()
    up = gw.tool(kernel, "UploadFileToSession", {"path": "inbox/upload.csv",
                                                  "content": base64.b64encode(blob).decode()})
    assert up["path"] == "/mnt/data/inbox/upload.csv"
    with client(gw, kernel, True) as c:
        ex = c.run("import pandas as pd\ndf = pd.read_csv('/mnt/data/inbox/upload.csv')\n"
                   "print(df['value'].tolist())")
        assert ex.stdout == "['alpha', 'beta']\n", ex.error
        assert ex.files is None   # reading changes nothing


def test_ws_sees_rest_execution_output(gw, kernel):
    """IOPub of a REST ExecutePythonCode reaches the WebSocket clients too."""
    with client(gw, kernel) as c:
        r = gw.tool(kernel, "ExecutePythonCode", {"pythonCode": "print('from rest')"})
        assert r["stdout"] == "from rest\n"
        deadline = time.monotonic() + 10
        texts = []
        while time.monotonic() < deadline and "from rest\n" not in texts:
            m = c.recv(deadline - time.monotonic())
            if m["msg_type"] == "stream":
                texts.append(m["content"]["text"])
        assert "from rest\n" in texts


# -- malformed frames -------------------------------------------------------------------

def _v1_frame(channel: bytes, parts: list[bytes]) -> bytes:
    from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1

    return serialize_msg_to_ws_v1(parts, channel.decode())


MALFORMED = [
    pytest.param(False, "not json at all", False, id="legacy-not-json"),
    pytest.param(False, '["a", "list"]', False, id="legacy-not-object"),
    pytest.param(False, '{"channel": "shell", "content": {}}', False, id="legacy-no-header"),
    pytest.param(False, '{"channel": "iopub", "header": {"msg_type": "execute_request"}}', False,
                 id="legacy-iopub-channel"),
    pytest.param(False, '{"channel": "shell", "header": {"msg_id": "x"}}', False, id="legacy-no-msg-type"),
    pytest.param(False, b"\x00\x00", True, id="legacy-binary-short"),
    pytest.param(False, b"\x00\x00\x00\x09\x00\x00\x00\x08", True, id="legacy-binary-bad-count"),
    pytest.param(True, '{"header": {}}', False, id="v1-text-frame"),
    pytest.param(True, b"\x01\x02\x03", True, id="v1-short"),
    pytest.param(True, (40).to_bytes(8, "little") + b"\x00" * 16, True, id="v1-bad-offsets"),
    pytest.param(True, "v1-not-json", True, id="v1-header-not-json"),
    pytest.param(True, "v1-unknown-channel", True, id="v1-unknown-channel"),
]


@pytest.mark.parametrize("v1, frame, binary", MALFORMED)
def test_malformed_frame_closes_1008(gw, kernel, v1, frame, binary):
    if frame == "v1-not-json":
        frame = _v1_frame(b"shell", [b"{not json", b"{}", b"{}", b"{}"])
    elif frame == "v1-unknown-channel":
        frame = _v1_frame(b"nonsense", [json.dumps({"msg_type": "execute_request", "msg_id": "m"}).encode(),
                                        b"{}", b"{}", b"{}"])
    with client(gw, kernel) as other, client(gw, kernel, v1) as bad:
        if isinstance(frame, str) and binary:
            frame = frame.encode()
        bad.send_frame(frame, binary)
        closed = bad.wait_closed(10)
        assert closed.code == 1008, (closed.code, closed.reason)
        assert "malformed" in closed.reason
        # the kernel keeps working for the other client
        ex = other.run("print('still here')")
        assert ex.stdout == "still here\n"
    # and for a new connection
    with client(gw, kernel, v1) as again:
        assert again.run("3*3").result == "9"


def test_malformed_frame_is_not_kept_for_reconnect(gw, kernel):
    """After a 1008 close the client's channels are dropped, not buffered:
    reconnecting with the same session_id replays nothing."""
    sid = uuid.uuid4().hex
    a = client(gw, kernel, session_id=sid)
    mid = a.execute("import time\ntime.sleep(1.0)\nprint('late')")
    a.collect(mid, until=lambda e: bool(e.of("execute_input")))
    a.send_frame("not json", False)
    assert a.wait_closed(10).code == 1008
    a.close()
    time.sleep(1.8)              # the cell finishes while nobody is connected
    with gw.ws(kernel, session_id=sid) as b:
        b.wait_ready()
        try:
            while True:
                b.backlog.append(b.recv(0.5))
        except TimeoutError:
            pass
        assert not [m for m in b.backlog if m["parent_header"].get("msg_id") == mid]


def test_oversized_frame_closes_1009(tmp_path):
    b = BrokerServer(str(tmp_path / "small"), "--ChannelSettings.max_message_bytes=65536")
    b.start()
    try:
        kid = b.create_kernel()["id"]
        with client(b, kid) as c:
            c.send("execute_request", {"code": "x = '" + "a" * 100_000 + "'", "silent": False})
            assert c.wait_closed(10).code == 1009
        with client(b, kid) as c:
            assert c.run("1+1").result == "2"
    finally:
        b.stop()


# -- auth on the upgrade -------------------------------------------------------------------

def test_upgrade_auth(gw, kernel):
    url = f"{gw.ws_url}/api/kernels/{kernel}/channels?session_id=x"
    alice = gw.token["alice"]
    assert upgrade_status(url, []) == 401
    assert upgrade_status(url, ["Authorization: token wrong-token"]) == 401
    assert upgrade_status(url, [f"Authorization: Basic {alice}"]) == 401
    assert upgrade_status(url, [f"Authorization: token {gw.token['bob']}"]) == 404
    assert upgrade_status(url, [f"Authorization: Bearer {gw.token['bob']}"], [V1]) == 404
    missing = f"{gw.ws_url}/api/kernels/{uuid.uuid4()}/channels"
    assert upgrade_status(missing, [f"Authorization: token {alice}"]) == 404
    # the token in the query string is not a credential
    assert upgrade_status(url + f"&token={alice}", []) == 401
    assert upgrade_status(url, [f"Authorization: token {alice}"]) == 101
    assert upgrade_status(url, [f"Authorization: Bearer {alice}"], [V1]) == 101


def test_http_auth_and_other_owner(gw, kernel):
    assert requests.get(gw.url + "/api/kernels", timeout=30).status_code == 401
    assert requests.get(gw.url + "/api/kernels", headers={"Authorization": "token nope"},
                        timeout=30).status_code == 401
    for method, path in [("GET", f"/api/kernels/{kernel}"), ("DELETE", f"/api/kernels/{kernel}"),
                         ("POST", f"/api/kernels/{kernel}/interrupt"), ("POST", f"/api/kernels/{kernel}/restart")]:
        r = gw.request(method, path, "bob", json={} if method == "POST" else None)
        assert r.status_code == 404, (method, path, r.status_code)
    assert gw.request("GET", f"/api/kernels/{kernel}", "alice").status_code == 200


def test_list_only_own_kernels(gw):
    a1 = gw.create_kernel("alice")["id"]
    b1 = gw.create_kernel("bob")["id"]
    try:
        mine = {k["id"] for k in gw.request("GET", "/api/kernels", "alice").json()}
        theirs = {k["id"] for k in gw.request("GET", "/api/kernels", "bob").json()}
        assert a1 in mine and b1 not in mine
        assert b1 in theirs and a1 not in theirs
        assert not mine & theirs
    finally:
        gw.delete_kernel(a1, "alice")
        gw.delete_kernel(b1, "bob")
    assert a1 not in {k["id"] for k in gw.request("GET", "/api/kernels", "alice").json()}


# -- POST /api/kernels env, kernel models ----------------------------------------------------

ENV_PROBE = """
import json, os, sys
print(json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "path": sys.path}))
"""


def test_env_allowlist(gw):
    env = {"KERNEL_USERNAME": "ada", "LD_PRELOAD": "/nonexistent/evil.so", "PATH": "/evil/bin",
           "PYTHONPATH": "/evil/site", "KERNEL_WORKING_DIR": "/etc", "KERNEL_LAUNCH_TIMEOUT": "40",
           "PYTHONSTARTUP": "/evil/start.py", "BROKER_TOKEN": "x"}
    model = gw.create_kernel("alice", env=env)
    try:
        with client(gw, model["id"], True) as c:
            ex = c.run(ENV_PROBE)
            assert ex.reply["content"]["status"] == "ok", ex.error
            probe = json.loads(ex.stdout)
        kenv = probe["env"]
        assert kenv.get("KERNEL_USERNAME") == "ada"
        for name in ("LD_PRELOAD", "PYTHONPATH", "KERNEL_WORKING_DIR", "KERNEL_LAUNCH_TIMEOUT", "PYTHONSTARTUP",
                     "BROKER_TOKEN"):
            assert name not in kenv, name
        assert kenv["PATH"] == "/usr/bin:/bin"
        assert probe["cwd"] == "/mnt/data"
        assert not [p for p in probe["path"] if p.startswith("/evil")]
    finally:
        gw.delete_kernel(model["id"])


@pytest.mark.parametrize("env", [["KERNEL_USERNAME"], "KERNEL_USERNAME=x", 7])
def test_env_must_be_object(gw, env):
    r = gw.request("POST", "/api/kernels", json={"name": "python3-sandbox", "env": env})
    assert r.status_code == 400, r.text
    assert r.json()["reason"]


def test_unknown_kernelspec_refused(gw):
    r = gw.request("POST", "/api/kernels", json={"name": "python3"})
    assert r.status_code == 400 and "python3-sandbox" in r.text
    assert gw.request("GET", "/api/kernelspecs/python3").status_code == 404


def test_kernel_models_and_last_activity(gw):
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    r = gw.request("POST", "/api/kernels", json={"name": "python3-sandbox"})
    assert r.status_code == 201
    model = r.json()
    kid = model["id"]
    try:
        assert r.headers["Location"] == f"/api/kernels/{kid}"
        uuid.UUID(kid)
        assert set(model) >= {"id", "name", "last_activity", "execution_state", "connections"}
        assert model["name"] == "python3-sandbox" and isinstance(model["connections"], int)
        t0 = parse_gateway_time(model["last_activity"])
        assert start <= t0 <= datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=5)
        listed = [k for k in gw.request("GET", "/api/kernels").json() if k["id"] == kid][0]
        parse_gateway_time(listed["last_activity"])
        time.sleep(0.05)
        with client(gw, kid) as c:
            c.run("1+1")
            one = gw.request("GET", f"/api/kernels/{kid}").json()
            assert one["connections"] == 1 and one["execution_state"] in ("idle", "busy")
            assert parse_gateway_time(one["last_activity"]) > t0
        restarted = gw.request("POST", f"/api/kernels/{kid}/restart", json={})
        assert restarted.status_code == 200
        parse_gateway_time(restarted.json()["last_activity"])
        assert gw.request("POST", f"/api/kernels/{kid}/interrupt", json={}).status_code == 204
    finally:
        assert gw.request("DELETE", f"/api/kernels/{kid}").status_code == 204
    assert gw.request("GET", f"/api/kernels/{kid}").status_code == 404
    assert upgrade_status(f"{gw.ws_url}/api/kernels/{kid}/channels",
                          [f"Authorization: token {gw.token['alice']}"]) == 404


def test_debug_request_not_forwarded(gw, kernel):
    with client(gw, kernel) as c:
        mid = c.send("debug_request", {"command": "initialize", "arguments": {}, "seq": 1, "type": "request"},
                     channel="control")
        time.sleep(1.0)
        try:
            while True:
                c.backlog.append(c.recv(0.3))
        except TimeoutError:
            pass
        assert not [m for m in c.backlog if m["parent_header"].get("msg_id") == mid and m["channel"] == "control"]
        assert c.run("1+1").result == "2"


def test_delete_closes_connected_clients(gw):
    kid = gw.create_kernel()["id"]
    a, b = client(gw, kid), client(gw, kid, True)
    try:
        assert gw.request("DELETE", f"/api/kernels/{kid}").status_code == 204
        for c in (a, b):
            closed = c.wait_closed(10)
            assert closed.code == 1001, (closed.code, closed.reason)
            assert "kernel deleted" in closed.reason
    finally:
        a.close()
        b.close()


def test_same_session_id_newest_wins(gw, kernel):
    sid = uuid.uuid4().hex
    old = client(gw, kernel, session_id=sid)
    new = client(gw, kernel, True, session_id=sid)
    try:
        assert old.wait_closed(10).code == 1001
        assert new.run("1+1").result == "2"
        assert gw.request("GET", f"/api/kernels/{kernel}").json()["connections"] == 1
    finally:
        old.close()
        new.close()
