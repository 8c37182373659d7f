"""Honest continuity: a code call that lands in a new kernel says so.

When the kernel that ran a session's code is gone (the broker was killed and
started again, the kernel was killed between calls, it was restarted through
the Jupyter API), the next ExecutePythonCode or GeneratePdfReport result
carries a ``notice`` (also in ``markdown``): the variables are gone, the files
are kept.  Kernels that never ran code (a pooled kernel's preload does not
count) and shell commands give no such notice.  Real brokers, real kernels.
"""

from __future__ import annotations

import json
import os
import time

import psutil
import pytest

from broker.sandbox import cgroups

from tests.broker_server import BrokerProcess
from tests.gateway_helpers import KernelWS

NEW_KERNEL = "This code ran in a new kernel"


def meta(broker, sid: str) -> dict:
    with open(os.path.join(broker.data_root, sid, "meta.json")) as fh:
        return json.load(fh)


def launchers(broker, sid: str) -> list[psutil.Process]:
    """The broker's children that launch the session's sandbox (their arguments name the session)."""
    found = []
    for child in psutil.Process(broker.proc.pid).children():
        try:
            if any(sid in arg for arg in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def kernel_processes(broker, sid: str) -> list[psutil.Process]:
    """The session's kernel: below the broker's sandbox child whose
    arguments name the session."""
    procs = []
    for child in launchers(broker, sid):
        try:
            procs += child.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
    found = []
    for p in procs:
        try:
            if "kernel_profile" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def kill_kernel(broker, sid: str) -> None:
    """SIGKILL the session's kernel from outside, as the OOM killer would."""
    kernels = kernel_processes(broker, sid)
    assert kernels, f"no kernel process found for session {sid}"
    for p in kernels:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(kernels, timeout=10)
    # The kernel is gone for the broker once its launcher (the broker's own
    # child, outside the sandbox) has exited too: bwrap follows its pid 1 a
    # moment later.  Until then the next call could still find it "alive".
    # On a loaded machine (CI runs four test workers on two cores) that
    # can take seconds; a launcher still running at the deadline fails
    # here, not as a puzzling answer from the next call.
    deadline = time.monotonic() + 60
    for launcher in launchers(broker, sid):
        while True:
            try:
                if launcher.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            assert time.monotonic() < deadline, f"the launcher {launcher.pid} outlived its kernel by 60 s"
            time.sleep(0.02)


def test_new_session_and_pooled_preload_give_no_notice(broker, session):
    assert meta(broker, session)["kernel_state"] is False
    r = broker.run(session, "x = 1")
    assert r["status"] == "success" and r["notice"] == "", r
    assert meta(broker, session)["kernel_state"] is True


def test_broker_killed_and_started_again_gives_notice(tmp_path):
    b = BrokerProcess(str(tmp_path / "b"), "--SessionManager.pool_size=1")
    b.start()
    try:
        used = b.create_session()
        r = b.run(used, "defined_before = 42\nopen('/mnt/data/kept.txt', 'w').write('kept')")
        assert r["status"] == "success" and r["notice"] == "", r
        shell_only = b.create_session()
        assert b.shell(shell_only, "echo data > f.txt")["status"] == "success"
        assert meta(b, used)["kernel_state"] is True
        assert meta(b, shell_only)["kernel_state"] is False
        # A notice still owed (a restart through the Jupyter API, no code
        # call since) survives the broker's death.
        restarted = b.create_session()
        assert b.run(restarted, "gone = 1")["status"] == "success"
        assert b.post(f"/api/kernels/{restarted}/restart").status_code == 200
        assert "/api/kernels/" in meta(b, restarted)["kernel_notice"]

        b.proc.kill()                   # SIGKILL: no shutdown, no chance to write anything
        b.proc.wait(30)
        b.stop()
        b.start()

        # A shell command has no state to lose: it says nothing, and the
        # notice waits for the next code call.
        r = b.shell(used, "cat kept.txt")
        assert r["status"] == "success" and r["stdout"] == "kept" and r["notice"] == "", r
        r = b.run(used, "print(open('/mnt/data/kept.txt').read())\nprint(defined_before)")
        assert r["status"] == "error" and r["error"]["ename"] == "NameError", r
        assert r["stdout"] == "kept\n", r
        assert NEW_KERNEL in r["notice"] and "broker restarted" in r["notice"], r
        assert "variables" in r["notice"] and "files in /mnt/data are kept" in r["notice"], r
        assert r["notice"] in r["markdown"], r
        # Said once: the next call runs in the same (new) kernel.
        r = b.run(used, "print('again')")
        assert r["status"] == "success" and r["notice"] == "", r

        r = b.run(restarted, "print(gone)")
        assert r["error"]["ename"] == "NameError" and "/api/kernels/" in r["notice"], r
        assert meta(b, restarted)["kernel_notice"] == ""

        # A session whose kernel never ran code lost nothing.
        r = b.run(shell_only, "print(open('/mnt/data/f.txt').read())")
        assert r["status"] == "success" and r["notice"] == "", r

        # A clean restart (SIGTERM) loses the variables just the same.
        b.restart()
        r = b.tool(used, "GeneratePdfReport", {
            "pythonCode": "print(defined_before)", "expectedOutputFilename": "r.pdf", "saveAsFilename": "r.pdf"})
        assert r["error"]["ename"] == "NameError" and NEW_KERNEL in r["notice"], r
    finally:
        b.stop()


def test_kernel_killed_between_calls_gives_notice(broker, session):
    r = broker.run(session, "y = 2\nopen('/mnt/data/still.txt', 'w').write('still')")
    assert r["status"] == "success", r
    kill_kernel(broker, session)
    r = broker.run(session, "print(open('/mnt/data/still.txt').read())\nprint(y)")
    assert r["status"] == "error" and r["error"]["ename"] == "NameError", r
    assert r["stdout"] == "still\n"
    assert NEW_KERNEL in r["notice"] and "stopped between calls" in r["notice"], r
    assert "killed" in r["notice"], r                     # the reason, as the host saw it
    assert r["notice"] in r["markdown"]
    r = broker.run(session, "print('ok')")
    assert r["notice"] == "" and r["stdout"] == "ok\n", r


def test_kernel_killed_between_calls_then_shell_first(broker, session):
    """The shell call restarts the dead kernel (its uid owns /mnt/data) but
    does not consume the notice: the next code call still says it."""
    assert broker.run(session, "z = 3")["status"] == "success"
    kill_kernel(broker, session)
    r = broker.shell(session, "echo shell")
    assert r["stdout"] == "shell\n" and r["notice"] == "", r
    r = broker.run(session, "print(z)")
    assert r["error"]["ename"] == "NameError" and NEW_KERNEL in r["notice"], r


def test_kernel_killed_between_calls_and_its_groups_swept(broker, session):
    """A group left empty for a minute is removed by the sweep any broker or
    kernelspec start on the machine runs (cgroups.sweep_empty).  The dead
    kernel's group and the session's shell group are made again when next
    joined: the session keeps working, within its limits."""
    if cgroups.detect() is None:
        pytest.skip("no writable cgroup on this machine")
    assert broker.run(session, "u = 6")["status"] == "success"
    assert broker.shell(session, "echo made the shell group")["status"] == "success"
    kill_kernel(broker, session)
    # What the sweep does to these two groups (only these: other sessions'
    # groups on this machine are not ours to remove).
    cgroups.remove_named(f"k-{session}")
    cgroups.remove_named(f"sh-{session}")
    r = broker.shell(session, "echo shell")
    assert r["status"] == "success" and r["stdout"].startswith("shell\n"), r
    r = broker.run(session, "print(u)")
    assert r["error"]["ename"] == "NameError" and NEW_KERNEL in r["notice"], r
    kernels = kernel_processes(broker, session)
    assert kernels
    for kernel in kernels:
        with open(f"/proc/{kernel.pid}/cgroup") as fh:
            assert f"k-{session}" in fh.read()


def test_code_run_over_the_websocket_counts_as_state(broker, session):
    """A notebook client's cells hold variables too: after the kernel that ran
    them dies, the next tool call says so."""
    assert meta(broker, session)["kernel_state"] is False
    token = broker.owners["alice"]
    c = KernelWS(f"ws://127.0.0.1:{broker.port}/api/kernels/{session}/channels", token)
    try:
        c.wait_ready()
        ex = c.run("from_notebook = 1")
        assert ex.reply["content"]["status"] == "ok"
    finally:
        c.close()
    assert meta(broker, session)["kernel_state"] is True
    kill_kernel(broker, session)
    r = broker.run(session, "print(from_notebook)")
    assert r["error"]["ename"] == "NameError" and NEW_KERNEL in r["notice"], r


def test_restart_through_jupyter_api_gives_notice(broker, session):
    assert broker.run(session, "w = 4")["status"] == "success"
    r = broker.post(f"/api/kernels/{session}/restart")
    assert r.status_code == 200, r.text
    r = broker.run(session, "print(w)")
    assert r["error"]["ename"] == "NameError", r
    assert NEW_KERNEL in r["notice"] and "/api/kernels/" in r["notice"], r


def test_restart_of_a_kernel_without_state_gives_no_notice(broker, session):
    r = broker.post(f"/api/kernels/{session}/restart")
    assert r.status_code == 200, r.text
    r = broker.run(session, "print('fresh')")
    assert r["status"] == "success" and r["notice"] == "", r


def test_crash_and_timeout_restarts_are_told_once(broker, session):
    """A restart inside a call is told by that call, not again by the next."""
    assert broker.run(session, "v = 5")["status"] == "success"
    r = broker.run(session, "import os\nos._exit(3)")
    assert r["error"]["ename"] == "KernelDied" and "restarted" in r["notice"], r
    assert NEW_KERNEL not in r["notice"]
    assert meta(broker, session)["kernel_state"] is False
    r = broker.run(session, "print('v' in dir())")
    assert r["stdout"] == "False\n" and r["notice"] == "", r

    t0 = time.monotonic()
    r = broker.run(session, "import time\nwhile True:\n    try:\n        time.sleep(100)\n"
                            "    except KeyboardInterrupt:\n        pass", timeout_seconds=2)
    assert time.monotonic() - t0 < 45
    assert r["status"] == "timeout" and "restarted" in r["notice"] and NEW_KERNEL not in r["notice"], r
    r = broker.run(session, "print('after')")
    assert r["stdout"] == "after\n" and r["notice"] == "", r
