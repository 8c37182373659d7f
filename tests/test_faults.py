"""Faults a real broker survives (issue 11 item 2): processes killed from
outside at the worst moment, a broker killed mid-write, torn files on disk,
missing cgroups and quota images, and SIGTERM with calls in flight.

Each test leaves the session usable and its files intact, and records its
figures (tests/figures.py) for docs/reliability.md.  One real ``broker serve``
serves the whole module (killed and started again by the tests that need it);
every kernel and shell command is a real sandbox.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import nbformat
import psutil
import pytest
import requests

from broker.sandbox import cgroups, prereq

from tests.fault_helpers import (Call, PatientBroker, broker_usage, kernel_processes, kill_tree, leftovers,
                                 mounts_under, processes_named, wait_for)
from tests.figures import record

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


@pytest.fixture(scope="module")
def fb(tmp_path_factory):
    # write_delay=0: each call's transcript write happens at once, so a kill lands mid-write.
    b = PatientBroker(str(tmp_path_factory.mktemp("faults")), "--SessionManager.pool_size=0",
                      "--TranscriptSettings.write_delay=0",
                      "--ServeApp.shutdown_grace=3")
    b.start()
    yield b
    b.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(b, sid, path, data: bytes, **kw):
    return b.put(f"/api/sessions/{sid}/files/{path}", data=data, **kw)


def get_file(b, sid, path) -> bytes:
    r = b.get(f"/api/sessions/{sid}/files/{path}")
    assert r.status_code == 200, (r.status_code, r.text)
    return r.content


def kill_broker(b) -> None:
    """SIGKILL the broker (our own child, by pid): no shutdown code runs."""
    b.proc.kill()
    b.proc.wait(30)
    b.stop()


def transcript(b, sid) -> nbformat.NotebookNode:
    nb = nbformat.read(os.path.join(b.data_root, sid, "transcript.ipynb"), as_version=4)
    nbformat.validate(nb)
    return nb


def session_tmp_files(b, sid) -> list[str]:
    found = []
    for top, _dirs, files in os.walk(os.path.join(b.data_root, sid)):
        found += [os.path.join(top, f) for f in files if f.startswith(".") and (
            ".upload-" in f or f.startswith((".transcript.", ".meta.")))]
    return found


# -- processes killed from outside ----------------------------------------------------------------

def test_kernel_sigkill_mid_execution(fb):
    sid = fb.create_session()
    assert put(fb, sid, "keep.csv", b"a,b\n1,2\n").status_code == 201
    call = Call(fb.run, sid, "open('/mnt/data/started', 'w').close()\nimport time\ntime.sleep(60)",
                timeout_seconds=120)
    wait_for(lambda: os.path.exists(os.path.join(fb.data_dir(sid), "started")), what="the execution to start")
    kernels = kernel_processes(fb, sid)
    assert kernels
    t0 = time.monotonic()
    kill_tree(kernels)
    r = call.wait()
    answered = time.monotonic() - t0
    assert call.error is None, call.error
    assert r["status"] == "error" and r["error"]["ename"] == "KernelDied", r
    assert "restarted" in r["notice"] and "files in /mnt/data are kept" in r["notice"], r
    t1 = time.monotonic()
    r = fb.run(sid, "print(open('/mnt/data/keep.csv').read(), end='')")
    assert r["status"] == "success" and r["stdout"] == "a,b\n1,2\n", r
    record("fault: SIGKILL of a kernel mid-execution", answered_s=round(answered, 2),
           next_call_s=round(time.monotonic() - t1, 2), files_intact=True, session_usable=True)
    fb.delete_session(sid)


def test_shell_process_group_sigkill_mid_command(fb):
    sid = fb.create_session()
    assert put(fb, sid, "keep.txt", b"kept\n").status_code == 201
    call = Call(fb.shell, sid, "echo begun; sleep 47.25; echo never")
    sleeps = wait_for(lambda: processes_named(fb, ["sleep", "47.25"]), what="the shell command to start")
    t0 = time.monotonic()
    pgid = os.getpgid(sleeps[0].pid)
    os.killpg(pgid, signal.SIGKILL)
    r = call.wait()
    answered = time.monotonic() - t0
    assert call.error is None, call.error
    assert r["status"] == "error" and "never" not in r["stdout"], r
    # The shell itself is in the group: its sandbox reports the kill (status 137 = 128 + SIGKILL).
    assert r["error"]["ename"] == "CommandFailed", r
    assert "signal 9" in r["error"]["evalue"] or "status 137" in r["error"]["evalue"], r
    r = fb.shell(sid, "cat keep.txt && echo again")
    assert r["status"] == "success" and r["stdout"] == "kept\nagain\n", r
    assert fb.run(sid, "print(1 + 1)")["stdout"] == "2\n"
    record("fault: SIGKILL of a shell command's process group", answered_s=round(answered, 2),
           files_intact=True, session_usable=True)
    fb.delete_session(sid)


# -- the broker killed mid-write ----------------------------------------------------------------------

def test_broker_sigkill_during_upload(fb):
    """An upload is written under a temporary name and renamed when whole:
    a broker killed while writing it leaves the previous version, never a
    partial file under the real name, and the restart removes the temporary file."""
    sid = fb.create_session()
    old = b"version 1\n" * 1000
    assert put(fb, sid, "big.bin", old).status_code == 201
    new = os.urandom(1 << 20) * 48          # 48 MiB
    data = fb.data_dir(sid)
    call = Call(put, fb, sid, "big.bin", new, timeout=120)
    tmp = wait_for(lambda: [f for f in os.listdir(data) if ".upload-" in f], timeout=60, interval=0.002,
                   what="the upload's temporary file")
    try:
        partial = os.stat(os.path.join(data, tmp[0])).st_size
    except FileNotFoundError:
        partial = -1
    kill_broker(fb)
    call.join(30)
    t0 = time.monotonic()
    fb.start()
    restart = time.monotonic() - t0
    got = get_file(fb, sid, "big.bin")
    # Killed while writing: the old version.  (Killed in the instant between
    # the rename and the answer: the whole new one.  Never anything else.)
    assert sha(got) in (sha(old), sha(new)), len(got)
    assert session_tmp_files(fb, sid) == [], session_tmp_files(fb, sid)
    assert fb.shell(sid, "ls -a")["stdout"].split() == [".", "..", "big.bin"]
    assert put(fb, sid, "big.bin", new, timeout=120).status_code == 201
    assert sha(get_file(fb, sid, "big.bin")) == sha(new)
    record("fault: broker SIGKILL during a 48 MiB upload", bytes_written_at_kill=partial,
           kept="previous version" if sha(got) == sha(old) else "new version", temp_files_after_restart=0,
           restart_s=round(restart, 2), session_usable=True)
    fb.delete_session(sid)


def test_broker_sigkill_during_transcript_writes(fb):
    """Transcripts are replaced atomically (temporary file, fsync, rename):
    a broker killed while writing one leaves the previous or the new version."""
    sid = fb.create_session()
    code = "print('x' * 99_000)"
    for _ in range(12):          # a transcript of about 1.2 MB: each write takes a while
        assert fb.run(sid, code)["status"] == "success"
    folder = os.path.join(fb.data_root, sid)
    before = len(transcript(fb, sid).cells)
    kills, hits = 3, 0
    for _ in range(kills):
        calls = [Call(fb.run, sid, code) for _ in range(1)]
        try:
            wait_for(lambda: any(f.startswith(".transcript.") for f in os.listdir(folder)), timeout=20,
                     interval=0.001, what="a transcript write")
            hits += 1
        except AssertionError:
            pass
        kill_broker(fb)
        for c in calls:
            c.join(30)
        fb.start()
        nb = transcript(fb, sid)        # parses and validates: never torn
        assert len(nb.cells) >= before, (len(nb.cells), before)
        before = len(nb.cells)
        assert session_tmp_files(fb, sid) == []
    assert hits >= 1, "no kill landed during a transcript write"
    r = fb.run(sid, "print('after')")
    assert r["status"] == "success" and r["notice"], r
    record("fault: broker SIGKILL during transcript writes", kills=kills, kills_mid_write=hits,
           transcripts_torn=0, cells_kept=before, session_usable=True)
    fb.delete_session(sid)


def _cmdline(p) -> list[str]:
    """A child's command line; [] for one that exited meanwhile (a zombie or gone)."""
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def test_broker_sigkill_during_kernel_start(fb):
    """A session whose first kernel was starting when the broker died never
    reached its caller: the restart removes it, and leaves no sandbox
    process, cgroup or mount of it behind."""
    keep = fb.create_session()
    assert put(fb, keep, "f.txt", b"kept").status_code == 201
    known = set(os.listdir(fb.data_root))
    call = Call(fb.post, "/api/sessions")

    def new_launcher():
        fresh = [d for d in os.listdir(fb.data_root) if d not in known and not d.startswith(".")]
        if fresh and any(fresh[0] in " ".join(_cmdline(p)) for p in psutil.Process(fb.proc.pid).children()):
            return fresh[0]
        return None

    sid = wait_for(new_launcher, timeout=60, interval=0.005, what="a kernel start")
    kill_broker(fb)
    call.join(30)
    left_at_kill = leftovers(fb, [sid])
    fb.start()
    gone = wait_for(lambda: not any(leftovers(fb, [sid]).values()), timeout=15, what="leftovers to go")
    assert gone, leftovers(fb, [sid])
    assert not os.path.exists(os.path.join(fb.data_root, sid))
    assert [s["id"] for s in fb.get("/api/sessions").json()] == [keep]
    assert get_file(fb, keep, "f.txt") == b"kept"
    fresh = fb.create_session()
    assert fb.run(fresh, "print('new')")["stdout"] == "new\n"
    record("fault: broker SIGKILL during a kernel start",
           left_at_kill=sum(len(v) for v in left_at_kill.values()), left_after_restart=0,
           new_sessions_work=True)
    fb.delete_session(fresh)
    fb.delete_session(keep)


def test_broker_sigkill_during_pool_refill(fb):
    """Pooled kernels belong to nobody: after a kill during a refill the
    restart removes them with every process, cgroup and mount."""
    fb.stop()
    plain = list(fb.extra)
    fb.extra = [a for a in plain if "pool_size" not in a] + ["--SessionManager.pool_size=1",
                                                             "--SessionManager.pool_refill_delay=0"]
    try:
        fb.start()
        pooled = wait_for(lambda: [d for d in os.listdir(fb.data_root) if len(d) == 36], timeout=60,
                          what="the pool to fill")
        wait_for(lambda: kernel_processes(fb, pooled[0]), timeout=60, what="the pooled kernel")
        time.sleep(1)           # its preload
        taken = fb.create_session()
        refill = wait_for(lambda: [d for d in os.listdir(fb.data_root) if len(d) == 36 and d != taken],
                          timeout=30, interval=0.005, what="the refill to begin")
        kill_broker(fb)
    finally:
        fb.extra = plain
    fb.start()
    assert wait_for(lambda: not any(leftovers(fb, refill).values()), timeout=15, what="leftovers to go")
    assert sorted(d for d in os.listdir(fb.data_root) if len(d) == 36) == [taken]
    assert fb.run(taken, "print('taken works')")["stdout"] == "taken works\n"
    fresh = fb.create_session()
    assert fb.shell(fresh, "echo ok")["stdout"] == "ok\n"
    record("fault: broker SIGKILL during a pool refill", pooled_sessions_removed=len(refill),
           left_after_restart=0, new_sessions_work=True)
    fb.delete_session(fresh)
    fb.delete_session(taken)


# -- torn or missing pieces at start-up ----------------------------------------------------------------

def test_torn_files_and_missing_pieces_at_startup(fb):
    """meta.json torn: the folder is set aside whole under .quarantine with a
    log line.  Transcript torn: set aside beside the session, which is kept.
    A cgroup or a quota image missing: made again (the log line says the files
    of a missing image are gone).  The broker starts in every case."""
    torn_meta, torn_nb, no_groups, no_image = (fb.create_session() for _ in range(4))
    for sid in (torn_meta, torn_nb, no_groups, no_image):
        assert fb.run(sid, f"open('/mnt/data/{sid[:8]}.txt', 'w').write('{sid}')")["status"] == "success"
    fb.stop()
    path = os.path.join(fb.data_root, torn_meta, "meta.json")
    with open(path, "r+") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    path = os.path.join(fb.data_root, torn_nb, "transcript.ipynb")
    with open(path, "r+") as fh:
        fh.truncate(os.path.getsize(path) * 2 // 3)
    for name in (f"k-{no_groups}", f"sh-{no_groups}"):
        cgroups.remove_named(name)
    image = os.path.join(fb.data_root, no_image, "data.img")
    if prereq.is_root():
        assert os.path.exists(image)
        os.unlink(image)
    mark = os.path.getsize(fb.log_path)
    t0 = time.monotonic()
    fb.start()
    started = time.monotonic() - t0
    with open(fb.log_path, errors="replace") as fh:
        fh.seek(mark)
        log = fh.read()

    quarantined = os.path.join(fb.data_root, ".quarantine", torn_meta)
    assert os.path.isdir(quarantined) and torn_meta in log and "set aside" in log, log
    assert fb.get(f"/api/sessions/{torn_meta}").status_code == 404

    aside = [f for f in os.listdir(os.path.join(fb.data_root, torn_nb)) if f.startswith("transcript.corrupt-")]
    assert len(aside) == 1 and f"session {torn_nb}: transcript" in log, log
    assert fb.run(torn_nb, f"print(open('/mnt/data/{torn_nb[:8]}.txt').read())")["stdout"] == torn_nb + "\n"
    assert fb.get(f"/api/sessions/{torn_nb}/transcript").status_code == 200
    assert len(transcript(fb, torn_nb).cells) == 1

    r = fb.run(no_groups, f"print(open('/mnt/data/{no_groups[:8]}.txt').read())")
    assert r["stdout"] == no_groups + "\n", r
    assert fb.shell(no_groups, "echo shell")["stdout"] == "shell\n"
    if cgroups.detect() is not None:
        for k in kernel_processes(fb, no_groups):
            with open(f"/proc/{k.pid}/cgroup") as fh:
                assert f"k-{no_groups}" in fh.read()

    if prereq.is_root():
        assert f"session {no_image}: its /mnt/data quota image" in log, log
        r = fb.run(no_image, "import os; print(os.listdir('/mnt/data'))")
        assert r["status"] == "success" and r["stdout"] == "[]\n", r
        assert os.path.exists(image) and os.path.ismount(fb.data_dir(no_image))
    record("fault: torn meta.json, torn transcript, missing cgroup and quota image at start-up",
           broker_start_s=round(started, 2), quarantined=1, transcripts_set_aside=1, sessions_kept=3,
           cgroups_remade=True, image_remade=prereq.is_root())
    for sid in (torn_nb, no_groups, no_image):
        fb.delete_session(sid)


# -- SIGTERM ------------------------------------------------------------------------------------------------

def test_sigterm_with_calls_in_flight(fb):
    """Calls running at SIGTERM finish within ServeApp.shutdown_grace (3 s
    here) or answer an error that says the broker stopped them; transcripts
    are flushed, kernels stop, nothing stays mounted, the exit status is 0."""
    quick, slow, shell = (fb.create_session() for _ in range(3))
    for sid in (quick, slow, shell):
        assert put(fb, sid, "f.txt", sid.encode()).status_code == 201
    before = broker_usage(fb)
    calls = {quick: Call(fb.run, quick, "import time; time.sleep(1.5); print('finished')"),
             slow: Call(fb.run, slow, "import time; time.sleep(60)", timeout_seconds=120),
             shell: Call(fb.shell, shell, "sleep 58.5")}
    wait_for(lambda: processes_named(fb, ["sleep", "58.5"]), what="the shell command")
    time.sleep(0.3)
    pid = fb.proc.pid
    t0 = time.monotonic()
    fb.proc.send_signal(signal.SIGTERM)
    code = fb.proc.wait(60)
    took = time.monotonic() - t0
    results = {sid: c.wait(30) for sid, c in calls.items()}
    assert code == 0, (code, fb.log_tail())
    assert results[quick]["status"] == "success" and results[quick]["stdout"] == "finished\n", results[quick]
    for sid in (slow, shell):
        r = results[sid]
        assert r["status"] == "error" and r["error"]["ename"] == "BrokerShuttingDown", r
        assert "shutting down" in r["notice"], r
    assert took < 3 + 15, took
    # Flushed: the quick call's cell is in its transcript.
    assert any("finished" in json.dumps(c.outputs) for c in transcript(fb, quick).cells)
    assert mounts_under(fb.data_root) == []
    left = leftovers(fb, [quick, slow, shell])
    assert not any(left.values()), left
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    fb.stop()
    fb.start()
    for sid in (quick, slow, shell):
        assert get_file(fb, sid, "f.txt") == sid.encode()
    r = fb.run(slow, "print('back')")
    assert r["stdout"] == "back\n" and "new kernel" in r["notice"], r
    record("fault: SIGTERM with calls in flight", grace_s=3, exit_code=code, stop_s=round(took, 2),
           finished_calls=1, stopped_calls_with_error=2, mounts_left=0, processes_left=0,
           fds_before=before["fds"], children_before=before["children"])
    for sid in (quick, slow, shell):
        fb.delete_session(sid)


def test_new_call_during_shutdown_is_refused_with_503(fb):
    """The listening socket closes at once; a call on a connection already
    open gets 503 (reason shutting_down) while a running call finishes."""
    sid = fb.create_session()
    keepalive = requests.Session()
    h = fb.headers("alice")
    assert keepalive.get(f"{fb.url}/api/sessions/{sid}", headers=h, timeout=30).status_code == 200
    call = Call(fb.run, sid, "import time; time.sleep(2); print('done')")
    time.sleep(0.5)
    fb.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    r = keepalive.get(f"{fb.url}/api/sessions/{sid}", headers=h, timeout=30)
    assert r.status_code == 503 and r.json()["reason"] == "shutting_down", r.text
    assert "shutting down" in r.json()["message"]
    assert call.wait()["stdout"] == "done\n"
    assert fb.proc.wait(30) == 0
    keepalive.close()
    fb.stop()
    fb.start()
    fb.delete_session(sid)


# -- the long version (make reliability) ------------------------------------------------------------

@pytest.mark.long
@pytest.mark.timeout(int(os.environ.get("BROKER_RANDOM_KILLS", "20")) * 300 + 300)
def test_broker_sigkill_at_random_moments_long(fb):
    """Twenty kills (BROKER_RANDOM_KILLS) at random moments of a mixed workload (uploads, code,
    shell commands, transcript writes, kernel starts): after each restart
    every transcript parses, no temporary file is left, every upload that
    was answered 201 is there whole, and the sessions work."""
    import random

    rng = random.Random(11)
    sids = [fb.create_session() for _ in range(2)]
    for sid in sids:
        assert fb.run(sid, "print('first')")["status"] == "success"
        wait_for(lambda: os.path.exists(os.path.join(fb.data_root, sid, "transcript.ipynb")), what="a transcript")
    confirmed: dict[tuple[str, str], str] = {}
    kills, t_restart = int(os.environ.get("BROKER_RANDOM_KILLS", "20")), []
    for k in range(kills):
        calls = []
        for sid in sids:
            body = os.urandom(rng.choice([1 << 10, 1 << 20, 8 << 20]))
            name = f"u{rng.randrange(4)}.bin"
            calls.append((sid, name, sha(body), Call(put, fb, sid, name, body, timeout=120)))
            calls.append((sid, None, None, Call(fb.run, sid, "print('y' * 50_000)")))
            calls.append((sid, None, None, Call(fb.shell, sid, f"echo {k} >> log.txt")))
        calls.append((None, None, None, Call(fb.post, "/api/sessions")))
        time.sleep(rng.uniform(0.05, 1.5))
        kill_broker(fb)
        for sid, name, digest, c in calls:
            c.join(30)
            if name and c.result is not None and c.result.status_code == 201:
                confirmed[(sid, name)] = digest
        t0 = time.monotonic()
        fb.start()
        t_restart.append(time.monotonic() - t0)
        for sid in sids:
            transcript(fb, sid)
            assert session_tmp_files(fb, sid) == []
        for (sid, name), digest in confirmed.items():
            got = get_file(fb, sid, name)
            assert sha(got) == digest or any(  # a later, unanswered upload of the same name may have landed whole
                c.result is None and n == name and s == sid for s, n, _d, c in calls), name
            confirmed[(sid, name)] = sha(got)
    for sid in sids:
        assert fb.run(sid, "print('alive')")["stdout"] == "alive\n"
    owned = {s["id"] for s in fb.get("/api/sessions").json()}
    assert owned >= set(sids)
    record("long: broker SIGKILL at random moments of a mixed workload", kills=kills, transcripts_torn=0,
           temp_files_left=0, confirmed_uploads_lost=0, restart_s_max=round(max(t_restart), 2),
           bounds={"transcripts_torn": 0, "confirmed_uploads_lost": 0})
    for sid in owned:
        fb.delete_session(sid)
