"""Shared pieces of bench/session_ready.py, shell_command.py, idle_memory.py
and concurrency.py (not a benchmark itself: run_all.py skips names starting
with "_").  Builds on _exec_common.py:

- ``Broker``: a real ``broker serve`` on a free loopback port, like
  ``_exec_common.BrokerProc`` but with the warm pool size and other
  ``--Class.trait=value`` settings chosen by the caller;
- ``RestSession``: one broker session over REST (keep-alive requests.Session);
- ``RawKernel``: a plain ipykernel (the venv's ``python3`` kernelspec) started
  by AsyncKernelManager over ipc, with an execute that returns the result;
- where a session's kernel processes are (its cgroup, ``k-<session id>``),
  and waiting for the warm pool to be full and quiet;
- ``machine_quiet()``: the load average and any running pytest, printed by
  every script before it measures.

Everything a script starts is stopped by its own pid; temporary folders are
removed.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import sys
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _exec_common import REPO, VENV_BIN, BrokerProc, RawAnchor, free_port, wait_http  # noqa: E402,F401


def bwrap_version() -> str:
    try:
        return subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "not found"


def env_info() -> dict:
    """Versions and the machine, as the other scripts print them."""
    from _exec_common import versions

    out = versions()
    out["kernel"] = platform.release()
    out["bwrap"] = bwrap_version()
    out["mem_total_gib"] = round(meminfo()["MemTotal"] / (1 << 30), 1)
    try:
        out["head"] = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()
    except OSError:
        pass
    return out


def print_env(title: str, info: dict) -> None:
    print(title)
    print("versions/machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)


def machine_quiet() -> str:
    """A one-line note: load average and whether a pytest is running."""
    pytest = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True).stdout.split()
    pytest = [p for p in pytest if int(p) != os.getpid()]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"load average {load}; pytest processes running: {len(pytest)}"


def meminfo() -> dict:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            k, v = line.split(":", 1)
            parts = v.split()
            out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


# -- the broker ------------------------------------------------------------------

# Diagnostic only (--diagnose): the broker started through this launcher,
# which wraps the functions named in BENCH_WRAP ("module:Qual.name", comma
# separated) with timers and appends one JSON line per call (function, start
# time.time(), duration, and the first argument's ``id`` when it is a string:
# a Session's) to BENCH_TIMINGS, and runs an optional prelude (see
# NO_TRANSCRIPT).  The product code is unchanged; the wrappers add
# microseconds.
TIMING_LAUNCHER = r"""
import functools, importlib, inspect, json, os, sys, time
_out = open(os.environ["BENCH_TIMINGS"], "a", buffering=1)
def _log(spec, w0, t0, a):
    sid = getattr(a[0], "id", None) if a else None
    _out.write(json.dumps({"fn": spec, "start": w0, "dur": time.perf_counter() - t0,
                           "id": sid if isinstance(sid, str) else None}) + "\n")
def _wrap(spec):
    mod, qual = spec.split(":")
    owner = importlib.import_module(mod)
    parts = qual.split(".")
    for p in parts[:-1]:
        owner = getattr(owner, p)
    raw = inspect.getattr_static(owner, parts[-1])
    fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def w(*a, **k):
            w0, t0 = time.time(), time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                _log(spec, w0, t0, a)
    else:
        @functools.wraps(fn)
        def w(*a, **k):
            w0, t0 = time.time(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _log(spec, w0, t0, a)
    if isinstance(raw, classmethod):
        w = classmethod(w)
    elif isinstance(raw, staticmethod):
        w = staticmethod(w)
    setattr(owner, parts[-1], w)
for _spec in filter(None, os.environ.get("BENCH_WRAP", "").split(",")):
    _wrap(_spec)
#PRELUDE#
from broker.app import main
main(sys.argv[1:])
"""


# A prelude: Transcript._save a no-op, to show what writing transcripts costs
# (as _exec_common.NO_TRANSCRIPT_LAUNCHER).  Never a product configuration.
NO_TRANSCRIPT = "import broker.transcripts as _t; _t.Transcript._save = lambda self: None"


def read_timings(path: str) -> list[dict]:
    try:
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except OSError:
        return []


class Broker(BrokerProc):
    """``broker serve`` with a chosen pool size and extra settings; with
    *wrap* or *prelude* (diagnostic), through TIMING_LAUNCHER."""

    def __init__(self, pool_size: int = 0, *extra: str, wrap: list[str] | None = None, prelude: str = ""):
        super().__init__(*extra)
        self.pool_size = pool_size
        self.wrap = list(wrap or [])
        self.prelude = prelude

    @property
    def timings_path(self) -> str:
        return os.path.join(self.dir, "timings.jsonl")

    def timings(self) -> list[dict]:
        return read_timings(self.timings_path)

    @property
    def data_root(self) -> str:
        return os.path.join(self.dir, "data")

    def start(self) -> "Broker":
        tokens = os.path.join(self.dir, "tokens.json")
        with open(tokens, "w") as fh:
            json.dump({self.token: "bench"}, fh)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(self.dir, "broker.log")
        broker = [sys.executable, "-c", TIMING_LAUNCHER.replace("#PRELUDE#", self.prelude)] \
            if self.wrap or self.prelude else [os.path.join(VENV_BIN, "broker")]
        cmd = [*broker, "serve", "--ip", "127.0.0.1", "--port", str(port),
               "--data-root", self.data_root, "--tokens-file", tokens,
               f"--SessionManager.pool_size={self.pool_size}", *self.extra]
        env = dict(os.environ)
        env.pop("BROKER_TOKEN", None)
        if self.wrap or self.prelude:
            env.update({"BENCH_WRAP": ",".join(self.wrap), "BENCH_TIMINGS": self.timings_path})
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=REPO, env=env)
        wait_http(self.url + "/api/kernelspecs", lambda r: r.status_code == 401, self.proc, self.log_path)
        return self

    def http(self) -> requests.Session:
        s = requests.Session()
        s.headers.update(self.headers)
        return s

    def unowned_sessions(self) -> list[str]:
        """Session folders whose meta.json has no owner: pooled kernels (or
        ones still being started for the pool)."""
        out = []
        for meta in glob.glob(os.path.join(self.data_root, "*", "meta.json")):
            try:
                with open(meta) as fh:
                    if not json.load(fh).get("owner"):
                        out.append(os.path.basename(os.path.dirname(meta)))
            except (OSError, ValueError):
                pass
        return out


class RestSession:
    def __init__(self, broker: Broker, http: requests.Session | None = None):
        self.broker = broker
        self.http = http or broker.http()
        t0 = time.perf_counter()
        r = self.http.post(broker.url + "/api/sessions", timeout=180)
        self.create_seconds = time.perf_counter() - t0
        r.raise_for_status()
        self.id = r.json()["id"]
        self.base = f"{broker.url}/api/sessions/{self.id}"

    def tool(self, name: str, args: dict, timeout: float = 180) -> dict:
        r = self.http.post(f"{self.base}/tools/{name}", json=args, timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"{name}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def execute(self, code: str) -> dict:
        return self.tool("ExecutePythonCode", {"pythonCode": code})

    def delete(self) -> None:
        r = self.http.delete(self.base, timeout=120)
        if r.status_code not in (204, 404):
            raise RuntimeError(f"DELETE {self.id}: HTTP {r.status_code}: {r.text[:300]}")


# -- a raw plain kernel ------------------------------------------------------------

class RawKernel(RawAnchor):
    """RawAnchor (plain ipykernel, AsyncKernelManager, ipc) with an execute
    that returns the time, the execute_result's text/plain and any error."""

    async def execute(self, code: str, timeout: float = 120) -> tuple[float, str | None, str | None]:
        kc = self.kc
        t0 = time.perf_counter()
        msg_id = kc.execute(code)
        reply = idle = False
        result = error = None
        while not (reply and idle):
            if not reply:
                m = await kc.get_shell_msg(timeout=timeout)
                if m["parent_header"].get("msg_id") == msg_id:
                    reply = True
                    if m["content"].get("status") != "ok":
                        error = f"{m['content'].get('ename')}: {m['content'].get('evalue')}"
                continue
            m = await kc.get_iopub_msg(timeout=timeout)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            if m["msg_type"] == "execute_result":
                result = m["content"]["data"].get("text/plain")
            elif m["msg_type"] == "error":
                error = f"{m['content'].get('ename')}: {m['content'].get('evalue')}"
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                idle = True
        return time.perf_counter() - t0, result, error

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid


# -- where a session's kernel runs ---------------------------------------------------

def _cgroup_paths(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/cgroup") as fh:
        for line in fh:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def session_pids(broker_pid: int, sid: str) -> list[int]:
    """Every process in the session's kernel cgroup (``k-<sid>`` under the
    broker's ``broker-sandboxes``): the outer bwrap and the kernel."""
    paths = _cgroup_paths(broker_pid)
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        own = paths.get("", "/").rstrip("/")
        if own.endswith("/broker-main"):
            own = own[: -len("/broker-main")]
        cands = [os.path.join("/sys/fs/cgroup", own.lstrip("/"), "broker-sandboxes", f"k-{sid}")]
    else:
        cands = [os.path.join("/sys/fs/cgroup", c, paths.get(c, "/").lstrip("/"), "broker-sandboxes", f"k-{sid}")
                 for c in ("pids", "memory")]
    for d in cands:
        try:
            with open(os.path.join(d, "cgroup.procs")) as fh:
                pids = [int(x) for x in fh.read().split()]
            if pids:
                return pids
        except OSError:
            continue
    return []


def session_cgroup_memory(broker_pid: int, sid: str) -> int | None:
    """memory.usage_in_bytes (v1) or memory.current (v2) of the session's group."""
    paths = _cgroup_paths(broker_pid)
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        own = paths.get("", "/").rstrip("/").removesuffix("/broker-main")
        f = os.path.join("/sys/fs/cgroup", own.lstrip("/"), "broker-sandboxes", f"k-{sid}", "memory.current")
    else:
        f = os.path.join("/sys/fs/cgroup/memory", paths.get("memory", "/").lstrip("/"), "broker-sandboxes",
                         f"k-{sid}", "memory.usage_in_bytes")
    try:
        with open(f) as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])   # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


PRELOADED_MARKERS = ("/pandas/_libs/", "/matplotlib/ft2font")


def has_preloaded(pids: list[int]) -> bool:
    """pandas and matplotlib (ft2font comes with pyplot) are mapped in one of
    the processes."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as fh:
                maps = fh.read()
        except OSError:
            continue
        if all(m in maps for m in PRELOADED_MARKERS):
            return True
    return False


POOL_WAIT_HOW = ("before every sample the script polls every 50 ms until the broker's data root holds "
                 "pool_size unowned (pooled) sessions whose kernels have pandas and matplotlib mapped "
                 "(/proc/PID/maps of the processes in their cgroup) and neither they nor the broker have "
                 "used CPU for 300 ms (6 polls); then it waits another 200 ms")


def wait_pool_full(broker: Broker, pool_size: int, timeout: float = 180.0) -> float:
    """Block until the warm pool is full and quiet (see POOL_WAIT_HOW);
    returns the seconds waited."""
    t0 = time.monotonic()
    quiet, last = 0, None
    while time.monotonic() - t0 < timeout:
        sids = broker.unowned_sessions()
        ok = len(sids) >= pool_size
        pids = []
        if ok:
            for sid in sids:
                p = session_pids(broker.proc.pid, sid)
                if not p or not has_preloaded(p):
                    ok = False
                    break
                pids += p
        if ok:
            ticks = cpu_ticks(pids + [broker.proc.pid])
            quiet = quiet + 1 if ticks == last else 0
            last = ticks
            if quiet >= 6:
                time.sleep(0.2)
                return time.monotonic() - t0
        else:
            quiet, last = 0, None
        time.sleep(0.05)
    raise RuntimeError(f"the warm pool did not fill within {timeout:.0f} s (see {broker.log_path})")


def wait_quiet(pids: list[int], polls: int = 6, interval: float = 0.05, timeout: float = 60.0) -> None:
    """Until none of *pids* used CPU for *polls* polls in a row."""
    t0 = time.monotonic()
    quiet, last = 0, None
    while time.monotonic() - t0 < timeout:
        ticks = cpu_ticks(pids)
        quiet = quiet + 1 if ticks == last else 0
        last = ticks
        if quiet >= polls:
            return
        time.sleep(interval)
