"""A real ``broker serve`` in a subprocess, for the REST API tests.

``BrokerProcess`` starts ``.venv/bin/broker serve`` on a free loopback port
with its own data root and tokens file (plus any ``--Class.trait=value``
arguments), waits until it answers over HTTP, and stops it by its own pid
(SIGTERM, then SIGKILL).  Every request made through it carries a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKER_BIN = os.path.join(os.path.dirname(sys.executable), "broker")
if not os.path.exists(BROKER_BIN):
    BROKER_BIN = os.path.join(REPO, ".venv", "bin", "broker")

TIMEOUT = 60          # seconds: default bound on every HTTP request
TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-carol": "carol", "tok-dave": "dave"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerProcess:
    """One broker subprocess.  ``url`` is its base URL (no trailing slash)."""

    def __init__(self, workdir: str, *extra: str, tokens: dict | None = None,
                 data_root: str | None = None, name: str = "broker", tls: tuple[str, str] | None = None):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.extra = list(extra)
        # tls: (certfile, keyfile) to serve HTTPS; requests then trust that certificate.
        self.scheme, self.verify = ("https", tls[0]) if tls else ("http", True)
        if tls:
            self.extra += ["--certfile", tls[0], "--keyfile", tls[1]]
        self.tokens = dict(tokens or TOKENS)
        # An entry is "owner" or {"owner": ..., "admin": true} (docs/admin.md).
        self.owners = {owner if isinstance(owner, str) else owner["owner"]: tok for tok, owner in self.tokens.items()}
        self.data_root = data_root or os.path.join(workdir, "data")
        self.tokens_file = os.path.join(workdir, "tokens.json")
        with open(self.tokens_file, "w") as fh:
            json.dump(self.tokens, fh)
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.url = ""

    # -- lifecycle ----------------------------------------------------------------
    def start(self, wait: float = 120.0) -> "BrokerProcess":
        last = ""
        for _attempt in range(3):  # a port picked free can be taken before the broker binds it
            self.port = free_port()
            self.url = f"{self.scheme}://127.0.0.1:{self.port}"
            cmd = [BROKER_BIN, "serve", "--ip", "127.0.0.1", "--port", str(self.port), "--data-root", self.data_root,
                   "--tokens-file", self.tokens_file, *self.extra]
            env = dict(os.environ)
            env.pop("BROKER_TOKEN", None)
            self._log = open(self.log_path, "a")
            self._log.write(f"\n=== {' '.join(cmd)}\n")
            self._log.flush()
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                         stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    r = requests.get(self.url + "/api/openapi.json", timeout=2, verify=self.verify)
                    if r.status_code == 200:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.1)
            last = self.log_tail()
            if self.proc.poll() is None:
                self.stop()
                raise RuntimeError(f"broker did not answer within {wait}s:\n{last}")
            self._log.close()
            if "Address already in use" not in last:
                break
        raise RuntimeError(f"broker exited with status {self.proc.returncode}:\n{last}")

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after *grace* seconds; only our own pid."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.proc = None
        try:
            self._log.close()
        except Exception:
            pass
        return p.returncode

    def restart(self) -> "BrokerProcess":
        self.stop()
        return self.start()

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP ----------------------------------------------------------------------
    def headers(self, owner: str | None = "alice", scheme: str = "Bearer") -> dict:
        return {} if owner is None else {"Authorization": f"{scheme} {self.owners[owner]}"}

    def request(self, method: str, path: str, owner: str | None = "alice", timeout: float = TIMEOUT,
                headers: dict | None = None, **kw) -> requests.Response:
        h = self.headers(owner)
        h.update(headers or {})
        url = path if path.startswith("http") else self.url + path
        return requests.request(method, url, headers=h, timeout=timeout, verify=self.verify, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, **kw):
        return self.request("POST", path, **kw)

    def put(self, path, **kw):
        return self.request("PUT", path, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def create_session(self, owner: str = "alice") -> str:
        r = self.post("/api/sessions", owner=owner)
        assert r.status_code == 201, (r.status_code, r.text, self.log_tail())
        return r.json()["id"]

    def delete_session(self, sid: str, owner: str = "alice") -> None:
        self.delete(f"/api/sessions/{sid}", owner=owner)

    def tool_response(self, sid: str, tool: str, body, owner: str = "alice", params: dict | None = None,
                      timeout: float | None = None) -> requests.Response:
        # The HTTP bound sits above the tool's own timeoutSeconds (plus kernel restart time).
        t = timeout or TIMEOUT
        if timeout is None and isinstance(body, dict) and isinstance(body.get("timeoutSeconds"), int):
            t = max(TIMEOUT, body["timeoutSeconds"] + 60)
        return self.post(f"/api/sessions/{sid}/tools/{tool}", owner=owner, json=body, params=params, timeout=t)

    def tool(self, sid: str, tool: str, body, owner: str = "alice", params: dict | None = None,
             timeout: float | None = None) -> dict:
        r = self.tool_response(sid, tool, body, owner, params, timeout)
        assert r.status_code == 200, (tool, r.status_code, r.text)
        return r.json()

    def run(self, sid: str, code: str, timeout_seconds: int | None = None, **kw) -> dict:
        body = {"pythonCode": code}
        if timeout_seconds is not None:
            body["timeoutSeconds"] = timeout_seconds
        return self.tool(sid, "ExecutePythonCode", body, **kw)

    def shell(self, sid: str, command: str, **kw) -> dict:
        return self.tool(sid, "RunShellCommand", {"command": command}, **kw)

    def data_dir(self, sid: str) -> str:
        """The host folder behind the session's /mnt/data."""
        return os.path.join(self.data_root, sid, "data")
