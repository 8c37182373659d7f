"""Load with proof of no cross-talk, against a real broker on loopback.

Many sessions at once, each making a sequence of mixed calls (Python over
REST, shell, upload, download, search, Python over the kernel WebSocket).
Every call carries a nonce of its own, and every answer is searched for
nonces: the call's own must be there, and no other call's may be (a search
must return exactly the files this session uploaded).  Afterwards every
session is deleted and the broker's descriptors, child processes, the
sessions' cgroups and mounts must be back where they started; its RSS may
grow by at most ``RSS_TOLERANCE`` (allocator arenas and caches that Python
keeps; measured, see docs/admission.md).

The short version runs in ``make test``; the full one (50 sessions x 40
calls) is marked ``long`` and runs in ``make reliability``.  A second test
fires 100 session creates at once and checks the global and per-owner
limits hold exactly (the rest get 429).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from tests.broker_server import TIMEOUT, BrokerProcess
from tests.figures import record
from tests.gateway_helpers import KernelWS

NONCE = re.compile(r"NONCE[0-9a-f]{3}x[0-9]{3}x[0-9a-f]{8}")
KINDS = ("upload", "python", "shell", "download", "search", "ws")
RSS_TOLERANCE = 64 << 20     # bytes the broker's RSS may keep after the sessions end
CREATE_CONCURRENCY = 4       # sessions started at a time (2 cores: more only queues)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def _tokens(owners: int) -> dict[str, str]:
    return {f"tok-load-{i}-{secrets.token_hex(4)}": f"owner{i}" for i in range(owners)}


def _session_ids(b: BrokerProcess) -> set[str]:
    try:
        return {d for d in os.listdir(b.data_root) if len(d) == 36}
    except FileNotFoundError:
        return set()


def _cgroups(sids: set[str]) -> list[str]:
    """Cgroup folders of these sessions' kernels and shell commands (k-<id>, sh-<id>), any controller."""
    found = []
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        if os.path.basename(root) == "broker-sandboxes":
            found += [os.path.join(root, d) for d in dirs if d[2:] in sids or d[3:] in sids]
            dirs[:] = []
        elif root.count("/") > 8:
            dirs[:] = []
    return found


def _mounts(b: BrokerProcess, sids: set[str]) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return [p for p in points if p.startswith(b.data_root) or any(s in p for s in sids)]


def snapshot(b: BrokerProcess, sids: set[str]) -> dict:
    p = psutil.Process(b.proc.pid)
    return {"rss": p.memory_info().rss, "fds": p.num_fds(), "procs": len(p.children(recursive=True)),
            "threads": p.num_threads(), "cgroups": len(_cgroups(sids)), "mounts": len(_mounts(b, sids))}


def settle(b: BrokerProcess, sids: set[str], base: dict, timeout: float = 60.0) -> dict:
    """The broker's figures once descriptors, processes, cgroups and mounts are back (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot(b, sids)
        if all(now[k] <= base[k] for k in ("fds", "procs", "cgroups", "mounts")) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


class Worker:
    """One session's sequence of calls; records every problem rather than stopping at the first."""

    def __init__(self, b: BrokerProcess, index: int, owner: str, calls: int):
        self.b, self.index, self.owner, self.calls = b, index, owner, calls
        self.sid = ""
        self.errors: list[str] = []
        self.uploaded: dict[str, bytes] = {}     # file name -> content (each holds its nonce)
        self.issued: set[str] = set()
        self.done = 0
        self.ws: KernelWS | None = None

    def nonce(self, call: int) -> str:
        n = f"NONCE{self.index:03x}x{call:03d}x{secrets.token_hex(4)}"
        self.issued.add(n)
        return n

    def _check(self, what: str, text: str, must: set[str]) -> None:
        """*text* holds every nonce in *must* and no nonce this session did not issue (or no other call's)."""
        found = set(NONCE.findall(text))
        missing = must - found
        foreign = found - must
        if missing:
            self.errors.append(f"{what}: lost output, missing {sorted(missing)}")
        if foreign:
            crossed = foreign - self.issued
            self.errors.append(f"{what}: {'CROSS-TALK' if crossed else 'stray'} nonces {sorted(foreign)}")

    def tool(self, name: str, body: dict) -> dict:
        r = self.b.tool_response(self.sid, name, body, owner=self.owner)
        if r.status_code != 200:
            raise AssertionError(f"{name} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def call(self, i: int) -> None:
        kind = KINDS[i % len(KINDS)]
        nonce = self.nonce(i)
        if kind == "upload":
            name = f"f{i:03d}.txt"
            data = f"{nonce}\n".encode()
            res = self.tool("UploadFileToSession", {"path": name, "content": base64.b64encode(data).decode()})
            self.uploaded[name] = data
            self._check(kind, repr(res) + data.decode(), {nonce})
        elif kind == "python":
            res = self.tool("ExecutePythonCode", {"pythonCode": f"print('{nonce}')"})
            self._check(kind, res.get("stdout", ""), {nonce})
            self._check(kind + " (whole result)", repr(res), {nonce})
        elif kind == "shell":
            res = self.tool("RunShellCommand", {"command": f"echo {nonce}; ls /mnt/data | wc -l"})
            self._check(kind, repr(res), {nonce})
            if res.get("exitCode", res.get("exit_code", 0)) not in (0, None):
                self.errors.append(f"shell exit code {res}")
        elif kind == "download":
            name = sorted(self.uploaded)[-1]
            r = self.b.get(f"/api/sessions/{self.sid}/files/{name}", owner=self.owner)
            if r.status_code != 200 or r.content != self.uploaded[name]:
                self.errors.append(f"download {name}: {r.status_code} {r.content[:100]!r} "
                                   f"(expected {self.uploaded[name]!r})")
            self.issued.discard(nonce)
        elif kind == "search":
            res = self.tool("SearchSessionFiles", {"pattern": "NONCE", "maxResults": 1000})
            want = {n for d in self.uploaded.values() for n in NONCE.findall(d.decode())}
            self._check(kind, repr(res), want)
            self.issued.discard(nonce)
        elif kind == "ws":
            if self.ws is None:
                self.ws = KernelWS(f"ws://127.0.0.1:{self.b.port}/api/kernels/{self.sid}/channels",
                                   self.b.owners[self.owner], timeout=TIMEOUT)
            msg_id = self.ws.execute(f"print('{nonce}')")
            ex = self.ws.collect(msg_id, timeout=TIMEOUT)
            self._check(kind, ex.stdout, {nonce})
            self._check(kind + " (its messages)", repr(ex.iopub), {nonce})
            # The socket also shows this session's REST executions (one kernel, one IOPub): those may
            # carry this session's earlier nonces, never another session's.
            crossed = set(NONCE.findall(repr(self.ws.backlog))) - self.issued
            if crossed:
                self.errors.append(f"ws backlog: CROSS-TALK nonces {sorted(crossed)}")
            self.ws.backlog.clear()
        self.done += 1

    def run(self) -> None:
        for i in range(self.calls):
            try:
                self.call(i)
            except Exception as exc:  # count it, carry on: the figure is errors of all kinds
                self.errors.append(f"call {i} ({KINDS[i % len(KINDS)]}): {type(exc).__name__}: {exc}"[:500])

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


def _warm_up(b: BrokerProcess, owner: str) -> None:
    """One session through every kind of call, deleted: imports and caches the first call of each kind
    pays for are not counted as growth."""
    w = Worker(b, 0xfff, owner, len(KINDS))
    w.sid = b.create_session(owner)
    w.run()
    w.close()
    b.delete_session(w.sid, owner)
    assert not w.errors, w.errors


def run_load(tmp_path, sessions: int, calls: int, name: str):
    owners = max(1, sessions // 10)
    tokens = _tokens(owners)
    b = BrokerProcess(str(tmp_path / "load"), f"--SessionManager.max_sessions={sessions + 5}",
                      f"--SessionManager.max_sessions_per_owner={sessions}", "--SessionManager.pool_size=0",
                      tokens=tokens)
    b.start()
    try:
        owner_names = sorted(b.owners)
        _warm_up(b, owner_names[0])
        time.sleep(1)
        base_sids = _session_ids(b)
        base = snapshot(b, base_sids)
        workers = [Worker(b, i, owner_names[i % owners], calls) for i in range(sessions)]
        t0 = time.monotonic()

        def create(w):
            w.sid = b.create_session(w.owner)

        with ThreadPoolExecutor(CREATE_CONCURRENCY) as pool:
            list(pool.map(create, workers))
        created = time.monotonic() - t0
        peak = {"rss": 0}
        stop = threading.Event()

        def watch():
            p = psutil.Process(b.proc.pid)
            while not stop.wait(0.5):
                peak["rss"] = max(peak["rss"], p.memory_info().rss)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t1 = time.monotonic()
        with ThreadPoolExecutor(sessions) as pool:
            list(pool.map(Worker.run, workers))
        ran = time.monotonic() - t1
        stop.set()
        watcher.join()
        sids = {w.sid for w in workers} | base_sids
        during = snapshot(b, sids)
        for w in workers:
            w.close()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda w: b.delete_session(w.sid, w.owner), workers))
        after = settle(b, sids, base)
        errors = [f"session {w.index}: {e}" for w in workers for e in w.errors]
        total = sum(w.done for w in workers)
        record(name, sessions=sessions, calls_per_session=calls, calls=total, errors=len(errors),
               crossed=sum("CROSS-TALK" in e for e in errors), lost=sum("lost output" in e for e in errors),
               create_seconds=round(created, 1), run_seconds=round(ran, 1),
               calls_per_second=round(total / ran, 1) if ran else None,
               rss_before_mib=round(base["rss"] / 2**20, 1), rss_peak_mib=round(peak["rss"] / 2**20, 1),
               rss_after_mib=round(after["rss"] / 2**20, 1), fds_before=base["fds"], fds_during=during["fds"],
               fds_after=after["fds"], procs_before=base["procs"], procs_during=during["procs"],
               procs_after=after["procs"], cgroups_during=during["cgroups"], cgroups_after=after["cgroups"],
               mounts_during=during["mounts"], mounts_after=after["mounts"])
        assert not errors, f"{len(errors)} errors, first: {errors[:10]}"
        assert total == sessions * calls
        assert during["procs"] > base["procs"], "the sessions' kernels were not counted: the check would be empty"
        for k in ("fds", "procs", "cgroups", "mounts"):
            assert after[k] <= base[k], (k, base, after)
        assert after["rss"] <= base["rss"] + RSS_TOLERANCE, (base["rss"], after["rss"])
        assert not _session_ids(b) - base_sids, "session folders left behind"
    finally:
        b.stop()


def test_load_short_no_crosstalk(tmp_path):
    run_load(tmp_path, sessions=10, calls=12, name="load: 10 sessions x 12 mixed calls")


@pytest.mark.long
def test_load_full_no_crosstalk(tmp_path):
    run_load(tmp_path, sessions=50, calls=40, name="load: 50 sessions x 40 mixed calls")


def test_simultaneous_creates_respect_limits(tmp_path):
    """100 creates at once from 4 owners: never more than max_sessions in all, nor
    max_sessions_per_owner for one owner; every other answer is 429."""
    max_sessions, per_owner = 5, 2
    tokens = _tokens(4)
    b = BrokerProcess(str(tmp_path / "burst"), f"--SessionManager.max_sessions={max_sessions}",
                      f"--SessionManager.max_sessions_per_owner={per_owner}", "--SessionManager.pool_size=0",
                      tokens=tokens)
    b.start()
    try:
        owners = sorted(b.owners)
        barrier = threading.Barrier(100)

        def create(i):
            owner = owners[i % len(owners)]
            s = requests.Session()
            barrier.wait()
            r = s.post(b.url + "/api/sessions", headers=b.headers(owner), timeout=120)
            return owner, r.status_code, r.json()

        t0 = time.monotonic()
        with ThreadPoolExecutor(100) as pool:
            results = list(pool.map(create, range(100)))
        seconds = time.monotonic() - t0
        statuses = [st for _, st, _ in results]
        made = [(o, body["id"]) for o, st, body in results if st == 201]
        refused = [body for _, st, body in results if st == 429]
        per = {o: sum(1 for x, _ in made if x == o) for o in owners}
        record("load: 100 simultaneous creates", creates=100, created=len(made), refused_429=len(refused),
               other=len(statuses) - len(made) - len(refused), max_sessions=max_sessions,
               max_per_owner=per_owner, most_for_one_owner=max(per.values()), seconds=round(seconds, 1))
        assert len(made) + len(refused) == 100, sorted(set(statuses))
        assert len(made) == max_sessions, per
        assert max(per.values()) <= per_owner, per
        assert all(r["reason"] == "too_many_sessions" and "max_sessions" in r["message"] for r in refused)
        # What the broker holds agrees, and the sessions work.
        listed = {o: [s["id"] for s in b.get("/api/sessions", owner=o).json()] for o in owners}
        assert sum(len(v) for v in listed.values()) == max_sessions
        o, sid = made[0]
        assert "ok" in b.run(sid, "print('ok')", owner=o)["stdout"]
        for o, sid in made:
            b.delete_session(sid, o)
        # Room again once they are gone.
        sid = b.create_session(owners[0])
        b.delete_session(sid, owners[0])
    finally:
        b.stop()
