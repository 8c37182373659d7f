"""The client commands (`broker sessions`, `exec`, `shell`, `files`,
`transcript`) as a user runs them, against a real broker: output for people,
--json for scripts, and exit codes that say what happened."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.broker_server import BROKER_BIN, free_port

CLI_TIMEOUT = 180


@pytest.fixture
def cli(broker, tmp_path):
    """Runs `broker ARGS` with BROKER_URL/BROKER_TOKEN for alice, in tmp_path."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    base.update(BROKER_URL=broker.url, BROKER_TOKEN="tok-alice", BROKER_CONFIG=str(tmp_path / "no-config.json"))

    def run(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([BROKER_BIN, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT,
                              env={**base, **(env or {})}, cwd=tmp_path, input=input if input is not None else "",
                              )
    run.env = base
    return run


def test_sessions_new_ls_show_rm(cli, broker):
    r = cli("sessions", "new")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()
    assert broker.get(f"/api/sessions/{sid}").status_code == 200
    r = cli("sessions")
    assert r.returncode == 0 and sid in r.stdout and r.stdout.startswith("ID") and "idle" in r.stdout
    r = cli("sessions", "ls", "--json")
    assert r.returncode == 0 and sid in [s["id"] for s in json.loads(r.stdout)]
    r = cli("sessions", "show", sid, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == sid
    r = cli("sessions", "rm", sid)
    assert r.returncode == 0 and f"{sid}: deleted" in r.stdout
    assert broker.get(f"/api/sessions/{sid}").status_code == 404
    r = cli("sessions", "show", sid)
    assert r.returncode == 4 and "no session" in r.stderr
    r = cli("sessions", "rm", sid, "--json")
    assert r.returncode == 4 and json.loads(r.stdout) == {"deleted": [], "not_found": [sid]}


def test_exec_from_an_argument_a_file_and_stdin(cli, session, tmp_path):
    s = ["--session", session]
    r = cli("exec", *s, "x = 40 + 2\nprint('from arg')\nx")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "from arg\n42\n"
    (tmp_path / "job.py").write_text("print('from file', x)\n")
    r = cli("exec", *s, "-f", "job.py")
    assert r.returncode == 0 and r.stdout == "from file 42\n"
    r = cli("exec", *s, input="print('from stdin', x)\n")
    assert r.returncode == 0 and r.stdout == "from stdin 42\n"
    r = cli("exec", *s, "-", input="print('dash', x)\n")
    assert r.returncode == 0 and r.stdout == "dash 42\n"
    # The session from the environment; stderr and errors on stderr, exit 1.
    r = cli("exec", "import sys; print('o'); print('e', file=sys.stderr); 1/0", env={"BROKER_SESSION": session})
    assert r.returncode == 1 and r.stdout == "o\n"
    assert "e\n" in r.stderr and "ZeroDivisionError" in r.stderr
    # --json: the whole result for scripts.
    r = cli("exec", *s, "--json", "print(x)")
    res = json.loads(r.stdout)
    assert r.returncode == 0 and res["status"] == "success" and res["stdout"] == "42\n"
    # Images and files are listed with their links.
    r = cli("exec", *s, "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.savefig('/mnt/data/p.png')\n"
                        "n = open('/mnt/data/t.csv', 'w').write('a\\n')")
    assert r.returncode == 0 and r.stdout == ""
    assert "/mnt/data/p.png (" in r.stderr and "/mnt/data/t.csv (" in r.stderr and "http" in r.stderr


def test_exec_exit_codes(cli, session, broker):
    s = ["--session", session]
    r = cli("exec", *s, "--timeout", "5000", "1")
    assert r.returncode == 2 and "'timeoutSeconds' is 5000" in r.stderr
    r = cli("exec", *s, "--json", "--timeout", "5000", "1")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["field"] == "timeoutSeconds"
    r = cli("exec", *s, "--timeout", "2", "import time; print('start', flush=True); time.sleep(60)")
    assert r.returncode == 124 and r.stdout == "start\n" and "timeout" in r.stderr
    r = cli("exec", *s, "print('after the timeout')")
    assert r.returncode == 0 and r.stdout == "after the timeout\n"
    r = cli("exec", *s, "1", env={"BROKER_TOKEN": "wrong"})
    assert r.returncode == 3 and "token" in r.stderr
    r = cli("exec", "--session", "00000000-0000-4000-8000-000000000000", "1")
    assert r.returncode == 4 and "no session" in r.stderr
    r = cli("exec", "1", env={"BROKER_URL": f"http://127.0.0.1:{free_port()}"})
    assert r.returncode == 6 and "cannot reach the broker" in r.stderr
    r = cli("exec", "1", env={"BROKER_TOKEN": ""})
    assert r.returncode == 2 and "no token" in r.stderr
    r = cli("exec", *s, "a", "b")
    assert r.returncode == 2 and "usage: broker exec" in r.stderr
    r = cli("exec", *s, "-f", "missing.py")
    assert r.returncode == 2 and "missing.py" in r.stderr


def test_exec_without_a_session_uses_a_fresh_one(cli, broker):
    before = {s["id"] for s in broker.get("/api/sessions").json()}
    r = cli("exec", "print('one-off')")
    assert r.returncode == 0 and r.stdout == "one-off\n"
    assert {s["id"] for s in broker.get("/api/sessions").json()} == before      # made and deleted
    r = cli("exec", "--keep", "open('/mnt/data/kept.txt', 'w').write('k')")
    assert r.returncode == 0 and r.stderr.startswith("session: ")
    sid = r.stderr.split()[1]
    assert broker.get(f"/api/sessions/{sid}/files/kept.txt").content == b"k"
    broker.delete_session(sid)


def test_exec_prints_output_as_it_comes(cli, session):
    code = "import time\nfor i in range(4):\n    print('tick', i, flush=True)\n    time.sleep(1)"
    p = subprocess.Popen([BROKER_BIN, "exec", "--session", session, code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=cli.env, stdin=subprocess.DEVNULL)
    lines = []
    try:
        for line in p.stdout:
            lines.append((line, time.monotonic()))
        p.wait(CLI_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
    ended = time.monotonic()
    assert p.returncode == 0, p.stderr.read()
    assert [t for t, _ in lines] == ["tick 0\n", "tick 1\n", "tick 2\n", "tick 3\n"]
    assert ended - lines[0][1] >= 2.5, [round(ended - t, 2) for _, t in lines]
    assert lines[3][1] - lines[0][1] >= 2.0
    # --events: each event a JSON line as it arrives, the result last.
    r = cli("exec", "--session", session, "--events", "print('e')")
    events = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0 and events[0]["event"] == "status" and events[-1]["event"] == "result"
    assert {"event": "stdout", "data": {"type": "stdout", "text": "e\n"}} in events
    # --no-stream waits for the result and prints the same.
    r = cli("exec", "--session", session, "--no-stream", "print('whole')\n5")
    assert r.returncode == 0 and r.stdout == "whole\n5\n"


def test_shell(cli, session):
    s = ["--session", session]
    r = cli("shell", *s, "echo out; echo err >&2; exit 7")
    assert r.returncode == 7 and r.stdout == "out\n" and "err\n" in r.stderr
    r = cli("shell", *s, input="printf 'a;b' | tr ';' '\\n' > /mnt/data/lines.txt && wc -l < lines.txt")
    assert r.returncode == 0 and r.stdout.strip() == "1"
    r = cli("shell", *s, "--json", "cat lines.txt")
    assert r.returncode == 0 and json.loads(r.stdout)["stdout"] == "a\nb"
    r = cli("shell", *s, "--timeout", "1", "echo begun; sleep 30")
    assert r.returncode == 124 and r.stdout == "begun\n"
    r = cli("shell", *s, "--timeout", "241", "true")
    assert r.returncode == 2 and "timeoutSeconds" in r.stderr


def test_files_ls_get_put_rm(cli, session, tmp_path, broker):
    s = ["--session", session]
    (tmp_path / "local.bin").write_bytes(bytes(range(256)) * 10)
    r = cli("files", "put", "local.bin", "in/", *s)
    assert r.returncode == 0 and "/mnt/data/in/local.bin (2.5 KB" in r.stdout
    r = cli("files", "put", "-", "in/notes.txt", *s, "--json", input="from stdin\n")
    assert r.returncode == 0 and json.loads(r.stdout)["size"] == 11
    r = cli("files", "ls", *s)
    assert r.returncode == 0 and "in/local.bin" in r.stdout and "in/notes.txt" in r.stdout
    r = cli("files", "ls", "in", *s, "--json")
    assert sorted(f["path"] for f in json.loads(r.stdout)) == ["in/local.bin", "in/notes.txt"]
    r = cli("files", "get", "in/local.bin", *s, "-o", "copy.bin")
    assert r.returncode == 0 and (tmp_path / "copy.bin").read_bytes() == bytes(range(256)) * 10
    r = cli("files", "get", "/mnt/data/in/notes.txt", *s)         # to ./notes.txt
    assert r.returncode == 0 and (tmp_path / "notes.txt").read_text() == "from stdin\n"
    r = cli("files", "get", "in/notes.txt", *s, "-o", "-")
    assert r.returncode == 0 and r.stdout == "from stdin\n"
    r = cli("files", "rm", "in/notes.txt", *s)
    assert r.returncode == 0
    r = cli("files", "get", "in/notes.txt", *s, "-o", "gone.txt")
    assert r.returncode == 4 and "no file" in r.stderr and not (tmp_path / "gone.txt").exists()
    assert not (tmp_path / "gone.txt.part").exists()
    r = cli("files", "get", "../etc/passwd", *s, "-o", "-")
    assert r.returncode == 2 and r.stdout == "" and ".." in r.stderr
    r = cli("files", "ls")
    assert r.returncode == 2 and "BROKER_SESSION" in r.stderr
    r = cli("files")
    assert r.returncode == 2


def test_transcript_remote_and_local(cli, session, broker, tmp_path):
    assert cli("exec", "--session", session, "print('in the transcript')").returncode == 0
    r = cli("transcript", session)                  # BROKER_URL is set: from the broker
    assert r.returncode == 0, r.stderr
    nb = json.loads(r.stdout)
    assert nb["cells"][-1]["source"] == "print('in the transcript')"
    assert r.stdout == broker.get(f"/api/sessions/{session}/transcript").text
    r = cli("transcript", session, "-o", "t.ipynb", env={"BROKER_URL": ""}, )
    assert r.returncode == 1 and "no transcript" in r.stderr      # no URL: the default data root, not this one
    r = cli("transcript", session, "-o", "t.ipynb", "--url", broker.url)
    assert r.returncode == 0 and json.loads((tmp_path / "t.ipynb").read_text()) == nb
    r = cli("transcript", session, "--data-root", broker.data_root)       # the local form, as before
    assert r.returncode == 0 and json.loads(r.stdout)["cells"] == nb["cells"]
    r = cli("transcript", "00000000-0000-4000-8000-000000000000")
    assert r.returncode == 4
    r = cli("transcript", session, env={"BROKER_TOKEN": "tok-bob"})
    assert r.returncode == 4 and "no session" in r.stderr


def test_config_file_and_flags(cli, broker, tmp_path):
    cfg = tmp_path / "client.json"
    cfg.write_text(json.dumps({"url": broker.url, "token": "tok-carol"}))
    env = {"BROKER_URL": "", "BROKER_TOKEN": "", "BROKER_CONFIG": str(cfg)}
    r = cli("sessions", "new", env=env)
    assert r.returncode == 0
    sid = r.stdout.strip()
    assert sid in [s["id"] for s in broker.get("/api/sessions", owner="carol").json()]
    r = cli("sessions", "--json", "--url", broker.url, "--token", "tok-dave", env=env)   # flags win
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = cli("sessions", "--client-config", str(tmp_path / "nope.json"), env={"BROKER_URL": "", "BROKER_TOKEN": ""})
    assert r.returncode == 2 and "nope.json" in r.stderr
    broker.delete_session(sid, owner="carol")
