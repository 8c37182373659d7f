"""A real ``jupyter server --gateway-url`` in front of the broker: what
JupyterLab does, driven through jupyter_server's own REST and WebSocket API.

The server runs from this virtualenv with JUPYTER_PLATFORM_DIRS=1, its own
config/data/runtime folders and root dir, an identity token, on a free
loopback port; it is stopped by its own pid.  Every kernel call it makes goes
to the broker with ``Authorization: token <GatewayClient.auth_token>``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
import requests

from tests.gateway_helpers import FILES_MIME, BrokerServer, KernelWS, free_port, parse_gateway_time, stop_pid

JS_TOKEN = "js-" + uuid.uuid4().hex
KERNEL = "python3-sandbox"


class JupyterServer:
    def __init__(self, workdir: str, gateway_url: str, gateway_token: str):
        self.workdir = workdir
        self.gateway_url = gateway_url
        self.gateway_token = gateway_token
        self.root = os.path.join(workdir, "root")
        self.log_path = os.path.join(workdir, "jupyter-server.log")
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, wait: float = 90.0) -> "JupyterServer":
        os.makedirs(self.root, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "KERNEL_", "JPY_"))}
        env.update({
            "JUPYTER_PLATFORM_DIRS": "1",
            "JUPYTER_CONFIG_DIR": os.path.join(self.workdir, "config"),
            "JUPYTER_DATA_DIR": os.path.join(self.workdir, "data"),
            "JUPYTER_RUNTIME_DIR": os.path.join(self.workdir, "runtime"),
            "IPYTHONDIR": os.path.join(self.workdir, "ipython"),
        })
        for _ in range(3):
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "jupyter_server",
                   "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                   f"--ServerApp.root_dir={self.root}", f"--IdentityProvider.token={JS_TOKEN}",
                   "--allow-root", "--no-browser",
                   f"--gateway-url={self.gateway_url}", f"--GatewayClient.auth_token={self.gateway_token}"]
            with open(self.log_path, "a") as log:
                log.write(f"\n=== {' '.join(cmd)}\n")
                log.flush()
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             cwd=self.root, env=env)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if self.get("/api", timeout=2).status_code == 200:  # answers without the gateway
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.2)
            tail = self.log_tail()
            if self.proc.poll() is None:
                self.stop()
                raise RuntimeError(f"jupyter server did not answer within {wait}s:\n{tail}")
            if "already in use" not in tail:
                raise RuntimeError(f"jupyter server exited with {self.proc.returncode}:\n{tail}")
        raise RuntimeError("could not start jupyter server on a free port")

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def log_tail(self, n: int = 80) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    def request(self, method: str, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 90)
        return requests.request(method, self.url + path, headers={"Authorization": f"token {JS_TOKEN}"}, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def ws(self, kid: str, session_id: str | None = None) -> KernelWS:
        """A client of jupyter_server's own kernel WebSocket (legacy framing:
        the gateway relay speaks nothing else)."""
        ws_url = self.url.replace("http://", "ws://")
        return KernelWS(f"{ws_url}/api/kernels/{kid}/channels", JS_TOKEN, session_id=session_id, timeout=60)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    b = BrokerServer(str(tmp_path_factory.mktemp("gw-jserver")))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def jserver(gw, tmp_path_factory):
    js = JupyterServer(str(tmp_path_factory.mktemp("jserver")), gw.url, gw.token["alice"])
    js.start()
    yield js
    js.stop()


def broker_kernel_ids(gw, owner="alice") -> set[str]:
    return {k["id"] for k in gw.request("GET", "/api/kernels", owner).json()}


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def test_kernelspecs_through_server(jserver):
    r = jserver.get("/api/kernelspecs")
    assert r.status_code == 200, r.text
    # jupyter_server reads its default before fetching the gateway's specs and
    # adopts the gateway's default during that fetch, so from the second
    # answer on the default is the broker's.
    r = jserver.get("/api/kernelspecs")
    specs = r.json()
    assert specs["default"] == KERNEL
    assert list(specs["kernelspecs"]) == [KERNEL]
    spec = specs["kernelspecs"][KERNEL]
    assert spec["spec"]["display_name"] == "Python 3 (sandbox)"
    assert spec["spec"]["language"] == "python"
    # resource paths are rewritten onto the server and fetched from the broker
    logo = spec["resources"]["logo-64x64"]
    assert logo.endswith(f"/kernelspecs/{KERNEL}/logo-64x64.png")
    img = jserver.get(logo)
    assert img.status_code == 200 and img.content.startswith(b"\x89PNG")
    one = jserver.get(f"/api/kernelspecs/{KERNEL}")
    assert one.status_code == 200 and one.json()["name"] == KERNEL
    assert jserver.get("/api/kernelspecs/python3").status_code == 404


def test_kernel_lifecycle_through_server(gw, jserver):
    # start
    r = jserver.request("POST", "/api/kernels", json={"name": KERNEL})
    assert r.status_code == 201, (r.status_code, r.text, jserver.log_tail())
    kid = r.json()["id"]
    try:
        # the kernel is a broker session of the gateway token's owner
        assert kid in broker_kernel_ids(gw, "alice")
        assert kid not in broker_kernel_ids(gw, "bob")
        listed = jserver.get("/api/kernels").json()
        assert kid in {k["id"] for k in listed}
        model = jserver.get(f"/api/kernels/{kid}").json()
        assert model["name"] == KERNEL
        parse_gateway_time(gw.request("GET", f"/api/kernels/{kid}").json()["last_activity"])

        with jserver.ws(kid) as c:
            c.wait_ready(90)
            # execute and see output
            ex = c.run("import os\nprint('hello from', os.getcwd())\nx = 41\nx + 1")
            assert ex.reply["content"]["status"] == "ok", ex.error
            assert ex.stdout == "hello from /mnt/data\n"
            assert ex.result == "42"

            # files notice through the relay; the file is in the broker session
            ex = c.run("open('/mnt/data/relay.csv', 'w').write('a,b\\n1,2\\n')")
            assert ex.files and ex.files["files"][0]["path"] == "/mnt/data/relay.csv"
            listed = gw.tool(kid, "ListSessionFiles", {})
            assert "/mnt/data/relay.csv" in {f["path"] for f in listed["files"]}

            # interrupt a sleeping cell
            mid = c.execute("import time\ntime.sleep(60)\nprint('not reached')")
            c.collect(mid, until=lambda e: bool(e.of("execute_input")), timeout=30)
            time.sleep(0.3)
            t0 = time.monotonic()
            ir = jserver.request("POST", f"/api/kernels/{kid}/interrupt", json={})
            assert ir.status_code == 204, ir.text
            ex = c.collect(mid, timeout=30)
            assert time.monotonic() - t0 < 15
            assert ex.error and ex.error["ename"] == "KeyboardInterrupt"
            assert ex.reply["content"]["status"] == "error"
            assert "not reached" not in ex.stdout
            # the kernel state survived the interrupt
            assert c.run("x").result == "41"

            # restart: state is gone, files stay, the same socket keeps working
            rr = jserver.request("POST", f"/api/kernels/{kid}/restart", json={})
            assert rr.status_code == 200, rr.text
            assert rr.json()["id"] == kid

            def fresh():
                try:
                    ex = c.run("'x' in dir()", timeout=10)
                except TimeoutError:
                    return None
                return ex if ex.result == "False" else None

            ex = wait_for(fresh, timeout=60, interval=0.5)
            assert ex is not None, "the kernel did not come back after the restart"
            assert c.run("import os; os.path.exists('/mnt/data/relay.csv')").result == "True"
    finally:
        d = jserver.request("DELETE", f"/api/kernels/{kid}")
    assert d.status_code == 204, d.text
    assert wait_for(lambda: kid not in broker_kernel_ids(gw), timeout=30)
    assert gw.request("GET", f"/api/kernels/{kid}").status_code == 404
    assert kid not in {k["id"] for k in jserver.get("/api/kernels").json()}


def test_notebook_session_through_server(gw, jserver):
    """What JupyterLab does when a notebook opens and closes."""
    body = {"path": "analysis.ipynb", "name": "analysis.ipynb", "type": "notebook", "kernel": {"name": KERNEL}}
    r = jserver.request("POST", "/api/sessions", json=body)
    assert r.status_code == 201, (r.text, jserver.log_tail())
    session = r.json()
    kid = session["kernel"]["id"]
    assert session["kernel"]["name"] == KERNEL
    assert kid in broker_kernel_ids(gw)
    with jserver.ws(kid, session_id=uuid.uuid4().hex) as c:
        c.wait_ready(90)
        ex = c.run("import pandas as pd\npd.DataFrame({'a': [1, 2]}).to_csv('/mnt/data/nb.csv')\nprint('ok')")
        assert ex.stdout == "ok\n", ex.error
        assert ex.files["files"][0]["path"] == "/mnt/data/nb.csv"
        notices = [m for m in ex.of("display_data") if FILES_MIME in m["content"]["data"]]
        assert len(notices) == 1
    d = jserver.request("DELETE", f"/api/sessions/{session['id']}")
    assert d.status_code == 204, d.text
    assert wait_for(lambda: kid not in broker_kernel_ids(gw), timeout=30)


def test_gateway_token_is_required(gw, tmp_path):
    """A jupyter server with the wrong gateway token gets nothing from the broker."""
    js = JupyterServer(str(tmp_path), gw.url, "not-a-broker-token")
    js.start()
    try:
        assert js.get("/api/kernelspecs").status_code >= 400
        r = js.request("POST", "/api/kernels", json={"name": KERNEL})
        assert r.status_code >= 400
    finally:
        js.stop()
