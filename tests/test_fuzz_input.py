"""Bad input at a real broker on loopback: oversized bodies get 413, bodies
that are not JSON 400, garbage on the kernel WebSocket closes that socket with
1008 and leaves the kernel alone (it still executes, its variables kept),
wrong or missing tokens 401 on HTTP and on the WebSocket upgrade, and the
token comparison is constant-time (hmac.compare_digest over every token,
no early exit)."""

from __future__ import annotations

import hmac
import json
import struct
import time

import pytest
import requests
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.web.base import Auth
from tests.broker_server import BrokerProcess
from tests.figures import record
from tests.gateway_helpers import V1, KernelWS

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

UPLOAD_CAP = 1 << 20          # the broker below: max_upload_bytes 1 MiB, so bodies over 2 MiB are 413
GARBAGE_EXAMPLES = 25
_counts = {"frames": 0, "closed_1008": 0}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    b = BrokerProcess(str(tmp_path_factory.mktemp("bad")), f"--SessionManager.max_upload_bytes={UPLOAD_CAP}",
                      "--SessionManager.pool_size=0")
    b.start()
    b.sid = b.create_session()
    b.run(b.sid, "kept = 'still here'")
    yield b
    record("bad input: garbage WebSocket frames", frames=_counts["frames"], closed_1008=_counts["closed_1008"],
           kernel_kept_state=True)
    b.stop()


def _ws(b: BrokerProcess, v1: bool, token: str | None = "alice") -> KernelWS:
    return KernelWS(f"ws://127.0.0.1:{b.port}/api/kernels/{b.sid}/channels",
                    b.owners[token] if token else None, v1=v1, timeout=30)


# -- HTTP ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("POST", "/api/sessions/{sid}/tools/ExecutePythonCode"), ("POST", "/api/sessions/{sid}/tools/UploadFileToSession"),
    ("POST", "/api/sessions"), ("POST", "/api/kernels"), ("PUT", "/api/sessions/{sid}/files/big.bin"),
    ("POST", "/api/sessions/{sid}/files"), ("POST", "/mcp"), ("POST", "/api/nowhere")])
def test_oversized_body_is_413(bad, method, path):
    body = json.dumps({"pythonCode": "x" * (2 * UPLOAD_CAP + 10)}).encode()
    r = bad.request(method, path.format(sid=bad.sid), data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert "max_upload_bytes" in r.json()["message"]
    # The connection was not reset and the broker carries on.
    assert bad.run(bad.sid, "print(kept)")["stdout"].strip() == "still here"


@pytest.mark.parametrize("path", ["/api/sessions/{sid}/tools/ExecutePythonCode",
                                  "/api/sessions/{sid}/tools/ListSessionFiles", "/api/sessions", "/api/kernels"])
@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00", b"[1,", b"{\"pythonCode\": \"x\"", b"nul"])
def test_body_not_json_is_400(bad, path, body):
    r = bad.post(path.format(sid=bad.sid), data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert "not valid JSON" in r.json()["message"] and r.json()["reason"] == "invalid_argument"


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer ", "Bearer wrong", "Basic dG9rLWFsaWNlOg==",
                                    "Bearer tok-alice ", "bearer tok-alicex", "Bearer tok-alic", "tok-alice",
                                    "Bearer \u00e9t\u00e9"])
def test_wrong_or_missing_token_is_401_http_and_upgrade(bad, header):
    h = {} if header is None else {"Authorization": header.encode("utf-8").decode("latin-1")}
    for method, path in (("GET", "/api/sessions"), ("POST", f"/api/sessions/{bad.sid}/tools/ListSessionFiles"),
                         ("GET", f"/api/sessions/{bad.sid}/files"), ("GET", "/api/kernels")):
        r = requests.request(method, bad.url + path, headers=h, timeout=30)
        if header == "Bearer tok-alice ":
            assert r.status_code == 200   # surrounding whitespace is not part of the token
            continue
        assert r.status_code == 401, (header, path, r.status_code, r.text)
        assert r.json()["reason"] == "unauthorized"
    if header == "Bearer tok-alice ":
        return
    for v1 in (False, True):
        hs = [] if header is None else [f"Authorization: {h['Authorization']}"]
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            websocket.create_connection(f"ws://127.0.0.1:{bad.port}/api/kernels/{bad.sid}/channels", header=hs,
                                        subprotocols=[V1] if v1 else None, timeout=30)
        assert e.value.status_code == 401


def test_token_comparison_is_constant_time_over_every_token(monkeypatch):
    """Every token is compared with hmac.compare_digest, whatever matches and wherever: no early exit
    that would tell an attacker by timing how many tokens there are or which one came close."""
    tokens = {f"tok-{i}-" + "x" * i: f"owner{i}" for i in range(8)}
    auth = Auth(tokens)
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for given_token in ["nope", "tok-0-", "tok-7-xxxxxxx", "tok-3-xx"]:
        calls.clear()
        auth.owner_for(f"Bearer {given_token}")
        assert len(calls) == len(tokens), given_token
        assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    assert auth.owner_for("Bearer tok-3-xxx") == "owner3"


# -- the kernel WebSocket ---------------------------------------------------------------------------------

def _legacy_garbage():
    return st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200),
        st.sampled_from(["{}", "[]", "null", '{"header": 1}', '{"header": {}}', '{"header": {"msg_type": 5}}',
                         '{"header": {"msg_type": "execute_request"}, "channel": "nowhere"}',
                         '{"header": {"msg_type": "execute_request", "msg_id": []}, "channel": "shell", '
                         '"content": {"code": 1}}']),
        st.binary(min_size=4, max_size=60).map(lambda b: struct.pack("!I", 3) + b))


def _v1_garbage():
    return st.one_of(
        st.binary(max_size=200),
        st.text(max_size=100),
        st.lists(st.binary(max_size=20), min_size=1, max_size=8).map(
            lambda parts: struct.pack(f"<{len(parts) + 1}Q", len(parts), *range(8, 8 * (len(parts) + 1), 8))
            + b"".join(parts)))


def _is_garbage(frame, v1: bool) -> bool:
    """Frames the hypothesis strategies may draw that are in fact valid messages are skipped."""
    from broker.web.kernels import decode_legacy, decode_v1

    try:
        if v1:
            if not isinstance(frame, bytes):
                return True
            channel, parts = decode_v1(frame)
        else:
            channel, parts = decode_legacy(frame)
        if channel not in ("shell", "control", "stdin"):
            return True
        header = json.loads(parts[0])
        return not isinstance(header.get("msg_type"), str) or any(
            not isinstance(json.loads(p or b"{}"), dict) for p in parts[1:4])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return True


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "v1"])
def test_garbage_frames_close_1008_and_leave_the_kernel(bad, v1):
    strategy = _v1_garbage() if v1 else _legacy_garbage()

    @settings(max_examples=GARBAGE_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(frame=strategy)
    def one(frame):
        if not _is_garbage(frame, v1):
            return
        c = _ws(bad, v1)
        try:
            c.send_frame(frame, binary=isinstance(frame, bytes))
            closed = c.wait_closed(15)
        finally:
            c.close()
        _counts["frames"] += 1
        assert closed.code == 1008, (frame, closed.code, closed.reason)
        _counts["closed_1008"] += 1

    one()
    # The kernel is untouched: same variables, and it executes over a new socket and over REST.
    with _ws(bad, v1) as c:
        c.wait_ready()
        ex = c.collect(c.execute("print(kept)"), timeout=60)
        assert ex.stdout.strip() == "still here", ex.iopub
    assert bad.run(bad.sid, "print(kept)")["stdout"].strip() == "still here"


def test_garbage_then_good_on_another_socket_meanwhile(bad):
    """A client that sends garbage is closed; another client of the same kernel is not disturbed."""
    good = _ws(bad, True)
    try:
        evil = _ws(bad, False)
        evil.send_frame(b"\x00\x01garbage", binary=True)
        assert evil.wait_closed(15).code == 1008
        evil.close()
        t0 = time.monotonic()
        ex = good.collect(good.execute("print(kept * 2)"), timeout=60)
        assert ex.stdout.strip() == "still herestill here"
        assert time.monotonic() - t0 < 60
    finally:
        good.close()
