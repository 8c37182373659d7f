"""Shared pieces of bench/ws_execute.py and bench/rest_execute.py (not a
benchmark itself: run_all.py skips names starting with "_").

- ``RawAnchor``: a plain ipykernel started by ``AsyncKernelManager`` over ipc,
  driven by its ``AsyncKernelClient`` -- the anchor every ratio divides by;
- ``BrokerProc``: a real ``broker serve`` on a free loopback port;
- ``KernelGatewayProc``: Jupyter Kernel Gateway from PyPI (installed into this
  virtualenv when missing) on a free loopback port with ``KG_AUTH_TOKEN``;
- ``WSClient``: a synchronous kernel WebSocket client (websocket-client, as
  the tests use) for either framing.

One execute is timed from sending ``execute_request`` until both its
``execute_reply`` and its ``status: idle`` have arrived, for every target
alike.  Subprocesses are stopped by their own pid.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV_BIN = os.path.dirname(sys.executable)
V1 = "v1.kernel.websocket.jupyter.org"
CODE = "1+1"


# -- statistics -------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "p99": percentile(values, 99),
            "min": min(values), "max": max(values), "first50": statistics.median(values[:50]),
            "last50": statistics.median(values[-50:])}


def versions() -> dict:
    import ipykernel
    import jupyter_client
    import tornado
    import zmq

    out = {"python": platform.python_version(), "ipykernel": ipykernel.__version__,
           "jupyter_client": jupyter_client.__version__, "tornado": tornado.version, "pyzmq": zmq.__version__,
           "cpus": os.cpu_count(), "machine": platform.machine(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import kernel_gateway

        out["kernel_gateway"] = kernel_gateway.__version__
    except ImportError:
        pass
    try:
        out["load_avg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return out


def table(rows: list[tuple[str, dict]]) -> str:
    """p50/p99/min over all rounds, and the p50 of the first and of the last
    50 rounds (a broker session's transcript grows by one cell per execute)."""
    lines = [f"{'target':<44} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'min ms':>8} {'p50 first50':>12} "
             f"{'p50 last50':>11}"]
    for name, s in rows:
        lines.append(f"{name:<44} {s['n']:>5} {s['median'] * 1e3:>8.2f} {s['p99'] * 1e3:>8.2f} "
                     f"{s['min'] * 1e3:>8.2f} {s['first50'] * 1e3:>12.2f} {s['last50'] * 1e3:>11.2f}")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_pid(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_http(url: str, ok, proc: subprocess.Popen, log_path: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if ok(requests.get(url, timeout=2)):
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    with open(log_path, errors="replace") as fh:
        tail = "".join(fh.readlines()[-40:])
    stop_pid(proc)
    raise RuntimeError(f"{url} did not come up:\n{tail}")


# -- the anchor ----------------------------------------------------------------------

class RawAnchor:
    """A plain ipykernel (the venv's ``python3`` kernelspec, ``ipykernel_launcher``)
    started by AsyncKernelManager over ipc; executes through AsyncKernelClient."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="bench-raw-", dir="/tmp")
        self.km = None
        self.kc = None

    async def start(self) -> None:
        from jupyter_client.manager import AsyncKernelManager

        self.km = AsyncKernelManager(kernel_name="python3", transport="ipc")
        self.km.ip = os.path.join(self.dir, "k")
        await self.km.start_kernel(cwd=self.dir)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=60)

    async def execute_once(self) -> float:
        kc = self.kc
        t0 = time.perf_counter()
        msg_id = kc.execute(CODE)
        reply = idle = False
        while not reply:
            m = await kc.get_shell_msg(timeout=30)
            reply = m["parent_header"].get("msg_id") == msg_id
        while not idle:
            m = await kc.get_iopub_msg(timeout=30)
            idle = (m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                    and m["content"]["execution_state"] == "idle")
        return time.perf_counter() - t0

    async def stop(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None and self.km.has_kernel:
            await self.km.shutdown_kernel(now=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the broker ------------------------------------------------------------------------

# Diagnostic only (--diagnose): the broker with Transcript._save replaced by a
# no-op, to show how much of a broker figure is the per-execution transcript
# rewrite.  Never a product configuration.
NO_TRANSCRIPT_LAUNCHER = (
    "import sys, broker.transcripts as t; t.Transcript._save = lambda self: None; "
    "from broker.app import main; main(sys.argv[1:])")


class BrokerProc:
    def __init__(self, *extra: str, diagnostic_no_transcript: bool = False):
        self.dir = tempfile.mkdtemp(prefix="bench-broker-", dir="/tmp")
        self.token = secrets.token_hex(16)
        self.extra = list(extra)
        self.no_transcript = diagnostic_no_transcript
        self.proc = None
        self.url = ""

    def start(self) -> "BrokerProc":
        tokens = os.path.join(self.dir, "tokens.json")
        with open(tokens, "w") as fh:
            json.dump({self.token: "bench"}, fh)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(self.dir, "broker.log")
        broker = [sys.executable, "-c", NO_TRANSCRIPT_LAUNCHER] if self.no_transcript else \
            [os.path.join(VENV_BIN, "broker")]
        # No warm pool: its kernels would start (and import pandas) in the
        # background while we measure.
        cmd = [*broker, "serve", "--ip", "127.0.0.1", "--port", str(port), "--data-root",
               os.path.join(self.dir, "data"), "--tokens-file", tokens, "--SessionManager.pool_size=0", *self.extra]
        env = dict(os.environ)
        env.pop("BROKER_TOKEN", None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=REPO, env=env)
        wait_http(self.url + "/api/kernelspecs", lambda r: r.status_code == 401, self.proc, self.log_path)
        return self

    @property
    def headers(self) -> dict:
        return {"Authorization": f"token {self.token}"}

    def create_kernel(self) -> str:
        r = requests.post(self.url + "/api/kernels", json={"name": "python3-sandbox"}, headers=self.headers,
                          timeout=120)
        r.raise_for_status()
        return r.json()["id"]

    def ws_url(self, kid: str) -> str:
        return self.url.replace("http://", "ws://") + f"/api/kernels/{kid}/channels"

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


# -- Jupyter Kernel Gateway -------------------------------------------------------------

def ensure_kernel_gateway() -> None:
    try:
        import kernel_gateway  # noqa: F401
    except ImportError:
        print("installing jupyter_kernel_gateway from PyPI into this virtualenv ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "jupyter_kernel_gateway"])


class KernelGatewayProc:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="bench-kg-", dir="/tmp")
        self.token = secrets.token_hex(16)
        self.proc = None
        self.url = ""

    def start(self) -> "KernelGatewayProc":
        ensure_kernel_gateway()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(self.dir, "kg.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "KG_"))}
        env.update({"KG_AUTH_TOKEN": self.token, "JUPYTER_PLATFORM_DIRS": "1",
                    "JUPYTER_RUNTIME_DIR": os.path.join(self.dir, "runtime")})
        cmd = [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1",
               f"--KernelGatewayApp.port={port}", "--KernelGatewayApp.port_retries=0"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.dir, env=env)
        wait_http(self.url + "/api", lambda r: r.status_code in (200, 401), self.proc, self.log_path)
        return self

    @property
    def headers(self) -> dict:
        return {"Authorization": f"token {self.token}"}

    def create_kernel(self) -> str:
        r = requests.post(self.url + "/api/kernels", json={"name": "python3"}, headers=self.headers, timeout=120)
        r.raise_for_status()
        return r.json()["id"]

    def ws_url(self, kid: str) -> str:
        return self.url.replace("http://", "ws://") + f"/api/kernels/{kid}/channels"

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


# -- a kernel WebSocket client -------------------------------------------------------------

def _header(msg_type: str, session: str) -> dict:
    return {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "bench", "session": session,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "version": "5.3"}


class WSClient:
    """Sends execute_request frames and decodes every frame it receives
    (as a real client would) until the reply and the idle have come."""

    def __init__(self, url: str, token: str, v1: bool):
        import websocket

        self.v1 = v1
        self.session = uuid.uuid4().hex
        self.ws = websocket.create_connection(f"{url}?session_id={self.session}",
                                              header=[f"Authorization: token {token}"],
                                              subprotocols=[V1] if v1 else None, timeout=60)
        if v1 and self.ws.getsubprotocol() != V1:
            raise RuntimeError("the server did not accept the v1 subprotocol")

    def _frame(self, msg_type: str, content: dict):
        header = _header(msg_type, self.session)
        if self.v1:
            parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
            channel = b"shell"
            offsets = [8 * (len(parts) + 3)]
            offsets.append(offsets[-1] + len(channel))
            for p in parts:
                offsets.append(offsets[-1] + len(p))
            head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
            return header["msg_id"], head + channel + b"".join(parts), True
        msg = {"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell",
               "buffers": []}
        return header["msg_id"], json.dumps(msg), False

    def _decode(self, data) -> tuple[str, dict, dict, dict]:
        if self.v1:
            n = int.from_bytes(data[:8], "little")
            offs = [int.from_bytes(data[8 * (i + 1):8 * (i + 2)], "little") for i in range(n)]
            channel = data[offs[0]:offs[1]].decode()
            header, parent, _metadata, content = (json.loads(data[offs[i]:offs[i + 1]]) for i in range(1, 5))
            return channel, header, parent, content
        d = json.loads(data)
        return d["channel"], d["header"], d["parent_header"], d["content"]

    def execute_once(self, code: str = CODE) -> float:
        import websocket

        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        t0 = time.perf_counter()
        msg_id, frame, binary = self._frame("execute_request", content)
        self.ws.send(frame, opcode=websocket.ABNF.OPCODE_BINARY if binary else websocket.ABNF.OPCODE_TEXT)
        reply = idle = False
        while not (reply and idle):
            channel, header, parent, content = self._decode(self.ws.recv())
            if parent.get("msg_id") != msg_id:
                continue
            if channel == "shell" and header["msg_type"] == "execute_reply":
                reply = True
            elif channel == "iopub" and header["msg_type"] == "status" and content.get("execution_state") == "idle":
                idle = True
        return time.perf_counter() - t0

    def close(self) -> None:
        self.ws.close()


def _once(fn, loop):
    import inspect

    return loop.run_until_complete(fn()) if inspect.iscoroutinefunction(fn) else fn()


def run_interleaved(targets: dict, n: int, warmup: int, loop: asyncio.AbstractEventLoop, seed: int = 1) -> dict:
    """targets: name -> callable returning seconds (plain or coroutine
    function).  Each round runs every target once, in a fresh random order
    (so no target always follows the same one)."""
    import random

    rng = random.Random(seed)
    names = list(targets)
    for _ in range(warmup):
        for name in names:
            _once(targets[name], loop)
    times = {name: [] for name in names}
    for _ in range(n):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            times[name].append(_once(targets[name], loop))
    return times


def run_blocks(targets: dict, n: int, loop: asyncio.AbstractEventLoop, block: int = 25) -> dict:
    """Back-to-back: *block* executes in a row on one target, then the next
    target, until each has *n*."""
    names = list(targets)
    times = {name: [] for name in names}
    while any(len(t) < n for t in times.values()):
        for name in names:
            for _ in range(min(block, n - len(times[name]))):
                times[name].append(_once(targets[name], loop))
    return times
