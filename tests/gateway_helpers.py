"""Helpers for the Jupyter-compatible surface tests: a real ``broker serve``
subprocess and a small synchronous WebSocket client for
``/api/kernels/{id}/channels`` speaking either framing.

The framings are encoded and decoded with jupyter_server's own reference
functions (``serialize_binary_message``, ``serialize_msg_to_ws_v1`` and their
inverses), so these tests check the broker against what Jupyter clients send
and expect, not against the broker's own codec.

Everything listens on 127.0.0.1 only; subprocesses are stopped by their own
pid.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import requests
import websocket
from jupyter_client.jsonutil import json_default
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
BROKER_BIN = os.path.join(VENV_BIN, "broker")
if not os.path.exists(BROKER_BIN):
    BROKER_BIN = os.path.join(REPO, ".venv", "bin", "broker")

V1 = "v1.kernel.websocket.jupyter.org"
FILES_MIME = "application/vnd.broker.files+json"
GATEWAY_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
TOKENS = {"gw-tok-alice": "alice", "gw-tok-bob": "bob"}
HTTP_TIMEOUT = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_pid(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM our own child, then SIGKILL after *grace* seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class BrokerServer:
    """``broker serve`` on a free loopback port with its own data root and
    tokens file; ``extra`` are further ``--Class.trait=value`` arguments."""

    def __init__(self, workdir: str, *extra: str, tokens: dict[str, str] | None = None):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.extra = list(extra)
        self.tokens = dict(tokens or TOKENS)
        self.token = {owner: tok for tok, owner in self.tokens.items()}
        self.data_root = os.path.join(workdir, "data")
        self.tokens_file = os.path.join(workdir, "tokens.json")
        with open(self.tokens_file, "w") as fh:
            json.dump(self.tokens, fh)
        self.log_path = os.path.join(workdir, "broker.log")
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.ws_url = ""

    def start(self, wait: float = 120.0) -> "BrokerServer":
        for _ in range(3):  # the free port can be taken before the broker binds it
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            self.ws_url = f"ws://127.0.0.1:{port}"
            cmd = [BROKER_BIN, "serve", "--ip", "127.0.0.1", "--port", str(port), "--data-root", self.data_root,
                   "--tokens-file", self.tokens_file, *self.extra]
            env = dict(os.environ)
            env.pop("BROKER_TOKEN", None)
            log = open(self.log_path, "a")
            log.write(f"\n=== {' '.join(cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=REPO, env=env)
            log.close()
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if requests.get(self.url + "/api/kernelspecs", timeout=2).status_code == 401:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.1)
            tail = self.log_tail()
            if self.proc.poll() is None:
                self.stop()
                raise RuntimeError(f"broker did not answer within {wait}s:\n{tail}")
            if "Address already in use" not in tail:
                raise RuntimeError(f"broker exited with status {self.proc.returncode}:\n{tail}")
        raise RuntimeError("could not start the broker on a free port")

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    # -- HTTP ----------------------------------------------------------------------
    def headers(self, owner: str | None = "alice", scheme: str = "token") -> dict:
        return {} if owner is None else {"Authorization": f"{scheme} {self.token[owner]}"}

    def request(self, method: str, path: str, owner: str | None = "alice", **kw) -> requests.Response:
        kw.setdefault("timeout", HTTP_TIMEOUT)
        return requests.request(method, self.url + path, headers=self.headers(owner), **kw)

    def create_kernel(self, owner: str = "alice", env: dict | None = None) -> dict:
        body = {"name": "python3-sandbox"}
        if env is not None:
            body["env"] = env
        r = self.request("POST", "/api/kernels", owner, json=body)
        assert r.status_code == 201, (r.status_code, r.text)
        return r.json()

    def delete_kernel(self, kid: str, owner: str = "alice") -> None:
        self.request("DELETE", f"/api/kernels/{kid}", owner)

    def tool(self, kid: str, name: str, args: dict, owner: str = "alice") -> dict:
        r = self.request("POST", f"/api/sessions/{kid}/tools/{name}", owner, json=args)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def ws(self, kid: str, owner: str = "alice", **kw) -> "KernelWS":
        return KernelWS(f"{self.ws_url}/api/kernels/{kid}/channels", self.token[owner], **kw)


def parse_gateway_time(value: str) -> datetime.datetime:
    """How jupyter_server's gateway client reads ``last_activity``."""
    return datetime.datetime.strptime(value, GATEWAY_TIME).replace(tzinfo=datetime.timezone.utc)


# -- the WebSocket client ------------------------------------------------------------

def new_header(msg_type: str, session: str) -> dict:
    return {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "tester", "session": session,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "version": "5.3"}


def _pack(obj) -> bytes:
    return json.dumps(obj, default=json_default).encode()


def encode_frame(msg: dict, v1: bool) -> tuple[bytes | str, bool]:
    """A client message (dict with channel, header, parent_header, metadata,
    content, buffers) as one WebSocket frame: (data, is_binary)."""
    buffers = [bytes(b) for b in msg.get("buffers") or []]
    if v1:
        parts = [_pack(msg["header"]), _pack(msg.get("parent_header") or {}), _pack(msg.get("metadata") or {}),
                 _pack(msg.get("content") or {}), *buffers]
        return serialize_msg_to_ws_v1(parts, msg["channel"]), True
    if buffers:
        return serialize_binary_message(dict(msg, buffers=buffers)), True
    return json.dumps(dict(msg, buffers=[]), default=json_default), False


def decode_frame(data, v1: bool) -> dict:
    """A server frame as a message dict like jupyter_client's deserialize:
    header, parent_header, metadata, content, buffers, msg_id, msg_type and
    channel."""
    if v1:
        assert isinstance(data, bytes), "v1 frames must be binary"
        channel, parts = deserialize_msg_from_ws_v1(data)
        header, parent, metadata, content = (json.loads(p) if p else {} for p in parts[:4])
        msg = {"header": header, "parent_header": parent, "metadata": metadata, "content": content,
               "buffers": [bytes(b) for b in parts[4:]], "channel": channel}
    elif isinstance(data, bytes):
        msg = deserialize_binary_message(data)
    else:
        msg = json.loads(data)
    msg["msg_id"] = msg["header"].get("msg_id")
    msg["msg_type"] = msg["header"].get("msg_type")
    msg.setdefault("buffers", [])
    return msg


@dataclass
class Execution:
    msg_id: str
    reply: dict | None = None
    iopub: list = field(default_factory=list)    # every iopub message with this parent, in order
    stdin: list = field(default_factory=list)

    def of(self, msg_type: str) -> list:
        return [m for m in self.iopub if m["msg_type"] == msg_type]

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.of("stream") if m["content"]["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(m["content"]["text"] for m in self.of("stream") if m["content"]["name"] == "stderr")

    @property
    def result(self) -> str | None:
        r = self.of("execute_result")
        return r[0]["content"]["data"]["text/plain"] if r else None

    @property
    def error(self) -> dict | None:
        r = self.of("error")
        return r[0]["content"] if r else None

    @property
    def files(self) -> dict | None:
        for m in self.of("display_data"):
            if FILES_MIME in m["content"]["data"]:
                return m["content"]["data"][FILES_MIME]
        return None

    @property
    def idle(self) -> bool:
        return any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" for m in self.iopub)


class Closed(Exception):
    def __init__(self, code: int | None, reason: str = ""):
        super().__init__(f"WebSocket closed: {code} {reason}")
        self.code = code
        self.reason = reason


class KernelWS:
    """One synchronous client of a kernel's channels WebSocket."""

    def __init__(self, url: str, token: str | None, v1: bool = False, session_id: str | None = None,
                 scheme: str = "token", timeout: float = 30.0, connect: bool = True):
        self.base_url = url
        self.token = token
        self.v1 = v1
        self.session_id = session_id or uuid.uuid4().hex
        self.scheme = scheme
        self.timeout = timeout
        self.ws: websocket.WebSocket | None = None
        self.backlog: list[dict] = []   # messages received while waiting for something else
        if connect:
            self.connect()

    @property
    def url(self) -> str:
        return f"{self.base_url}?session_id={self.session_id}"

    def connect(self) -> "KernelWS":
        header = [f"Authorization: {self.scheme} {self.token}"] if self.token is not None else []
        self.ws = websocket.create_connection(self.url, header=header, subprotocols=[V1] if self.v1 else None,
                                              timeout=self.timeout, enable_multithread=True)
        if self.v1:
            assert self.ws.getsubprotocol() == V1, self.ws.getsubprotocol()
        else:
            assert not self.ws.getsubprotocol()
        return self

    def disconnect(self, timeout: float = 5.0) -> list[dict]:
        """Close the socket from our side, keeping every message the server
        sent before it saw our close frame (websocket-client's close() would
        discard them); they are returned and also left in the backlog."""
        got = []
        self.ws.send_close(websocket.STATUS_NORMAL)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                got.append(self.recv(max(0.01, deadline - time.monotonic())))
        except Exception:  # Closed, a timeout, or the peer already gone
            pass
        self.backlog.extend(got)
        self.close()
        return got

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close(timeout=2)
            except Exception:
                pass
            self.ws = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- sending ---------------------------------------------------------------------
    def send(self, msg_type: str, content: dict, channel: str = "shell", buffers=(), parent: dict | None = None,
             metadata: dict | None = None) -> str:
        header = new_header(msg_type, self.session_id)
        msg = {"channel": channel, "header": header, "parent_header": parent or {}, "metadata": metadata or {},
               "content": content, "buffers": list(buffers)}
        data, binary = encode_frame(msg, self.v1)
        self.send_frame(data, binary)
        return header["msg_id"]

    def send_frame(self, data, binary: bool) -> None:
        self.ws.send(data, opcode=websocket.ABNF.OPCODE_BINARY if binary else websocket.ABNF.OPCODE_TEXT)

    def execute(self, code: str, allow_stdin: bool = False, silent: bool = False, stop_on_error: bool = True) -> str:
        return self.send("execute_request", {"code": code, "silent": silent, "store_history": not silent,
                                             "user_expressions": {}, "allow_stdin": allow_stdin,
                                             "stop_on_error": stop_on_error})

    # -- receiving -------------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> dict:
        """The next message; raises TimeoutError, or Closed with the close code."""
        self.ws.settimeout(timeout if timeout is not None else self.timeout)
        ABNF = websocket.ABNF
        opcode, chunks = None, []
        while True:
            try:
                frame = self.ws.recv_frame()
            except websocket.WebSocketTimeoutException:
                raise TimeoutError("no message within the timeout") from None
            except (websocket.WebSocketConnectionClosedException, OSError):
                raise Closed(None) from None
            if frame.opcode == ABNF.OPCODE_CLOSE:
                data = frame.data
                try:
                    self.ws.send_close()
                except Exception:  # the server may have reset the connection already
                    pass
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                raise Closed(code, data[2:].decode(errors="replace"))
            if frame.opcode == ABNF.OPCODE_PING:
                self.ws.pong(frame.data)
                continue
            if frame.opcode == ABNF.OPCODE_PONG:
                continue
            if frame.opcode != ABNF.OPCODE_CONT:
                opcode, chunks = frame.opcode, []
            chunks.append(frame.data)
            if not frame.fin:
                continue
            data = b"".join(chunks)
            if opcode == ABNF.OPCODE_TEXT:
                data = data.decode()
            return decode_frame(data, self.v1)

    def wait_closed(self, timeout: float = 10.0) -> Closed:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the socket was not closed")
            try:
                self.backlog.append(self.recv(left))
            except Closed as c:
                return c

    def collect(self, msg_id: str, timeout: float = 60.0, want_reply: bool = True, stdin_answer=None,
                until=None, execution: Execution | None = None) -> Execution:
        """Messages whose parent is *msg_id*, until both the shell reply and
        the iopub idle have arrived (or *until(execution)* is true).
        *stdin_answer(input_request) -> str* answers input requests."""
        ex = execution or Execution(msg_id)
        deadline = time.monotonic() + timeout

        def done():
            if until is not None:
                return until(ex)
            return ex.idle and (ex.reply is not None or not want_reply)

        with self._backlog() as next_msg:
            while not done():
                m = next_msg(deadline, lambda m: m["parent_header"].get("msg_id") == msg_id,
                             lambda: f"execution {msg_id} incomplete: {[x['msg_type'] for x in ex.iopub]}, "
                                     f"reply={ex.reply is not None}")
                if m["channel"] == "iopub":
                    ex.iopub.append(m)
                elif m["channel"] == "stdin":
                    ex.stdin.append(m)
                    if stdin_answer is not None and m["msg_type"] == "input_request":
                        self.send("input_reply", {"value": stdin_answer(m)}, channel="stdin", parent=m["header"])
                elif m["channel"] in ("shell", "control"):
                    ex.reply = m
        return ex

    def absorb(self, ex: Execution) -> Execution:
        """Move backlog messages whose parent is *ex*'s request into *ex*."""
        keep = []
        for m in self.backlog:
            if m["parent_header"].get("msg_id") != ex.msg_id:
                keep.append(m)
            elif m["channel"] == "iopub":
                ex.iopub.append(m)
            elif m["channel"] == "stdin":
                ex.stdin.append(m)
            else:
                ex.reply = m
        self.backlog = keep
        return ex

    @contextlib.contextmanager
    def _backlog(self):
        """Yields next_msg(deadline, wanted, describe): the next wanted message,
        first from the backlog, then from the socket; unwanted ones stay in
        the backlog in arrival order."""
        queue, self.backlog = self.backlog, []
        kept_old, kept_new = [], []

        def next_msg(deadline, wanted, describe=lambda: "no message"):
            while True:
                if queue:
                    m, kept = queue.pop(0), kept_old
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(describe())
                    m, kept = self.recv(left), kept_new
                if wanted(m):
                    return m
                kept.append(m)

        try:
            yield next_msg
        finally:
            self.backlog = kept_old + queue + kept_new + self.backlog

    def run(self, code: str, timeout: float = 60.0, **kw) -> Execution:
        allow_stdin = kw.pop("allow_stdin", kw.get("stdin_answer") is not None)
        return self.collect(self.execute(code, allow_stdin=allow_stdin), timeout, **kw)

    def request(self, msg_type: str, content: dict, channel: str = "shell", timeout: float = 30.0) -> dict:
        """Send a request and return its reply."""
        msg_id = self.send(msg_type, content, channel)
        deadline = time.monotonic() + timeout
        with self._backlog() as next_msg:
            return next_msg(deadline, lambda m: m["parent_header"].get("msg_id") == msg_id and m["channel"] == channel,
                            lambda: f"no reply to {msg_type}")

    def wait_ready(self, timeout: float = 60.0) -> dict:
        return self.request("kernel_info_request", {}, timeout=timeout)


def upgrade_status(url: str, headers: list[str], subprotocols=None) -> int:
    """The HTTP status the WebSocket upgrade gets (101 when it succeeds)."""
    try:
        ws = websocket.create_connection(url, header=headers, subprotocols=subprotocols, timeout=15)
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code
    ws.close()
    return 101
