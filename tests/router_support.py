"""Several real brokers behind a real HAProxy (``broker router-config``), on loopback.

``Cluster`` starts brokers named b00, b01, ... (``SessionManager.broker_name``)
with their own data roots and the same tokens, writes the router's
configuration with the real ``broker router-config`` command, runs
``haproxy`` on a free port (stopped by its own pid) and reloads it after the
set of brokers changes.  ``cluster.router`` is a ``BrokerProcess`` pointed at
the router's URL, so every test helper (``run``, ``tool``, ...) goes through it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.broker_server import BROKER_BIN, BrokerProcess, free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
# Small and quick: no pool, nothing preloaded, quick health checks.
BROKER_ARGS = ("--SessionManager.pool_size=0", "--SessionManager.pool_preload=")


class Haproxy:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.cfg = os.path.join(workdir, "haproxy.cfg")
        self.map_file = os.path.join(workdir, "overrides.map")
        self.socket = os.path.join(workdir, "admin.sock")
        self.log_path = os.path.join(workdir, "haproxy.log")
        self.port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def configure(self, brokers: dict[str, BrokerProcess], keep_overrides: bool = False) -> str:
        spec = ",".join(f"{name}=127.0.0.1:{b.port}" for name, b in brokers.items())
        cmd = [BROKER_BIN, "router-config", f"--brokers={spec}", f"--bind=127.0.0.1:{self.port}",
               f"--runtime-api={self.socket}", f"--map-file={self.map_file}",
               f"--peer-address=127.0.0.1:{self.peer_port}", "--check-interval=500ms", "--log-requests", "-o", self.cfg]
        if keep_overrides:
            cmd.append("--keep-overrides")
        subprocess.run(cmd, check=True, timeout=60, capture_output=True)
        check = subprocess.run([HAPROXY, "-c", "-f", self.cfg], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.cfg) as fh:
            return fh.read()

    def start(self) -> "Haproxy":
        old = [p for p in self.procs if p.poll() is None]
        cmd = [HAPROXY, "-db", "-f", self.cfg]
        if old:
            cmd += ["-sf", *(str(p.pid) for p in old)]
        log = open(self.log_path, "a")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.procs[-1].poll() is None, self.log_tail()
            try:
                if os.path.exists(self.socket) and requests.get(self.url + "/api/live", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        for p in old:       # the old process hands over its stick table and finishes its connections
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.procs = []

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    def wait_servers_up(self, names, timeout: float = 30.0) -> None:
        """Until the router's health checks see each named broker up."""
        from broker.router import RuntimeApi

        api = RuntimeApi(self.socket, self.map_file)
        deadline = time.monotonic() + timeout
        while True:
            state = {}
            for line in api.command("show servers state brokers").splitlines()[2:]:
                parts = line.split()
                if len(parts) > 5:
                    state[parts[3]] = parts[5]      # srv_name, srv_op_state (2 = running)
            if all(state.get(n) == "2" for n in names):
                return
            assert time.monotonic() < deadline, f"servers not up: {state}"
            time.sleep(0.2)


class Cluster:
    def __init__(self, workdir: str, n: int, extra: tuple[str, ...] = ()):
        self.workdir = workdir
        self.extra = extra
        self.brokers: dict[str, BrokerProcess] = {}
        self.haproxy = Haproxy(os.path.join(workdir, "router"))
        os.makedirs(self.haproxy.workdir, exist_ok=True)
        self.router = BrokerProcess(os.path.join(workdir, "router-client"))
        self.router.url = self.haproxy.url
        self._n = n

    def _broker(self, name: str) -> BrokerProcess:
        return BrokerProcess(os.path.join(self.workdir, name), f"--SessionManager.broker_name={name}",
                             *BROKER_ARGS, *self.extra, name=name)

    def start(self) -> "Cluster":
        new = {f"b{i:02d}": self._broker(f"b{i:02d}") for i in range(self._n)}
        with ThreadPoolExecutor(len(new)) as pool:
            list(pool.map(lambda b: b.start(wait=180), new.values()))
        self.brokers.update(new)
        self.haproxy.configure(self.brokers)
        self.haproxy.start()
        self.haproxy.wait_servers_up(self.brokers)
        return self

    def add_broker(self) -> str:
        name = f"b{len(self.brokers):02d}"
        self.brokers[name] = self._broker(name).start(wait=180)
        self.haproxy.configure(self.brokers, keep_overrides=True)
        self.haproxy.start()        # a reload: -sf the old process
        self.haproxy.wait_servers_up(self.brokers)
        return name

    def stop(self) -> None:
        self.haproxy.stop()
        for b in self.brokers.values():
            b.stop()
