"""Helpers for the transcript and replay tests (tests/test_transcripts.py,
tests/test_replay.py).

- ``start_broker`` starts a real ``broker serve`` through
  ``tests.broker_server.BrokerProcess`` (loopback only, stopped by its pid).
- ``ws_execute`` runs code over ``/api/kernels/{id}/channels`` with a minimal
  legacy-framing (JSON text frames) WebSocket client, as a notebook frontend
  would.
- ``broker_cli`` runs the real ``.venv/bin/broker`` command as a subprocess.
- ``fetch_transcript`` gets a session's transcript from the REST endpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
import uuid

import nbformat
import websocket

from tests.broker_server import BROKER_BIN, BrokerProcess

CLI_TIMEOUT = 600


def start_broker(workdir: str, *extra: str) -> BrokerProcess:
    return BrokerProcess(workdir, *extra).start()


def fetch_transcript(broker: BrokerProcess, sid: str, owner: str = "alice"):
    """(response, notebook) of GET /api/sessions/{sid}/transcript."""
    r = broker.get(f"/api/sessions/{sid}/transcript", owner=owner)
    assert r.status_code == 200, (r.status_code, r.text[:500])
    return r, nbformat.reads(r.text, as_version=4)


def broker_cli(*args: str, env: dict | None = None, timeout: float = CLI_TIMEOUT, cwd: str | None = None):
    full_env = dict(os.environ)
    full_env.pop("BROKER_TOKEN", None)
    full_env.update(env or {})
    return subprocess.run([BROKER_BIN, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd, stdin=subprocess.DEVNULL)


# -- a minimal Jupyter WebSocket client (legacy JSON framing) -----------------------

def _header(msg_type: str, session: str) -> dict:
    return {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": session, "username": "test",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "version": "5.3"}


class WsExecution:
    def __init__(self, msg_id: str):
        self.msg_id = msg_id
        self.iopub: list[dict] = []
        self.reply: dict | None = None

    @property
    def idle(self) -> bool:
        return any(m["msg_type"] == "status" and m["content"].get("execution_state") == "idle" for m in self.iopub)

    def of_type(self, t: str) -> list[dict]:
        return [m for m in self.iopub if m["msg_type"] == t]

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stdout")


class KernelSocket:
    """One WebSocket client of a session's kernel channels."""

    def __init__(self, broker: BrokerProcess, sid: str, owner: str = "alice", timeout: float = 60):
        self.session = uuid.uuid4().hex
        url = broker.url.replace("http://", "ws://") + f"/api/kernels/{sid}/channels?session_id={self.session}"
        self.ws = websocket.create_connection(url, header=[f"Authorization: Bearer {broker.owners[owner]}"],
                                              timeout=timeout)

    def close(self) -> None:
        try:
            self.ws.close(timeout=2)
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, msg_type: str, content: dict, channel: str = "shell") -> str:
        header = _header(msg_type, self.session)
        self.ws.send(json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content,
                                 "channel": channel, "buffers": []}))
        return header["msg_id"]

    def execute(self, code: str, timeout: float = 120, silent: bool = False) -> WsExecution:
        msg_id = self.send("execute_request", {"code": code, "silent": silent, "store_history": not silent,
                                               "user_expressions": {}, "allow_stdin": False,
                                               "stop_on_error": True})
        ex = WsExecution(msg_id)
        deadline = time.monotonic() + timeout
        while not (ex.idle and ex.reply is not None):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"execution incomplete: {[m['msg_type'] for m in ex.iopub]}")
            self.ws.settimeout(left)
            raw = self.ws.recv()
            if isinstance(raw, bytes):      # binary frames only carry buffers; none expected here
                continue
            m = json.loads(raw)
            if m.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if m["channel"] == "iopub":
                ex.iopub.append(m)
            elif m["channel"] == "shell":
                ex.reply = m
        return ex


def ws_execute(broker: BrokerProcess, sid: str, code: str, owner: str = "alice", timeout: float = 120) -> WsExecution:
    with KernelSocket(broker, sid, owner) as ks:
        return ks.execute(code, timeout)
