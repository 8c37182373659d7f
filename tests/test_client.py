"""broker.client against a real broker (the shared ``broker`` fixture): the
sync and async clients, sessions as context managers, results as
dataclasses, streamed progress, and errors that name the field."""

from __future__ import annotations

import ast
import io
import json
import os
import time

import pytest

import broker.client as bc
from broker.client import (AsyncClient, Client, ConfigError, ConnectionFailed, FileInfo, InvalidArgument, NotFound,
                           SessionInfo, ToolResult, Unauthorized, Upload)
from tests.broker_server import free_port
from tests.seed import PNG_MAGIC

TICKS = ("import time\n"
         "for i in range(3):\n"
         "    print('tick', i, flush=True)\n"
         "    time.sleep(1)\n")


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No BROKER_* variables from outside, and no config file of the user's."""
    for name in ("BROKER_URL", "BROKER_TOKEN", "BROKER_SESSION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BROKER_CONFIG", str(tmp_path / "absent.json"))
    return monkeypatch


def test_client_imports_nothing_else_from_broker():
    tree = ast.parse(open(bc.__file__).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "broker"], names


def test_session_round_trip_and_results_as_dataclasses(broker, env):
    with Client(broker.url, "tok-alice") as c:
        with c.create_session() as s:
            info = s.info()
            assert isinstance(info, SessionInfo) and info.id == s.id and info.state == "idle"
            assert s.id in [x.id for x in c.sessions()]

            r = s.run("x = 6 * 7\nprint('hello')\nx")
            assert isinstance(r, ToolResult) and r.ok and r.tool == "ExecutePythonCode"
            assert r.stdout == "hello\n" and r.result == "42" and r.error is None and r.execution_count >= 1
            assert r.raw["status"] == "success" and "hello" in r.markdown

            r = s.run("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.savefig('/mnt/data/c.png')\n1/0")
            assert r.status == "error" and r.error.ename == "ZeroDivisionError" and "1/0" in r.error.traceback
            assert [i.path for i in r.images] == ["/mnt/data/c.png"] and isinstance(r.images[0], FileInfo)

            r = s.shell("echo out; echo err >&2; exit 4")
            assert r.status == "error" and r.exit_code == 4 and r.stdout == "out\n" and r.stderr == "err\n"

            up = s.upload("in/data.csv", b"a,b\n1,2\n")
            assert up == Upload("/mnt/data/in/data.csv", 8, up.sha256) and len(up.sha256) == 64
            with open(__file__, "rb") as fh:
                up2 = s.upload("/mnt/data/in/me.py", fh)       # a file object, sent in chunks
            assert up2.size == os.path.getsize(__file__)
            assert {f.path for f in s.files("in")} == {"in/data.csv", "in/me.py"}
            assert {f.path for f in s.files()} >= {"in/data.csv", "in/me.py", "c.png"}
            assert s.files("in/data.csv")[0].size == 8 and s.files("nothing") == []
            assert s.download("in/data.csv") == b"a,b\n1,2\n"
            buf = io.BytesIO()
            assert s.download_to("/mnt/data/c.png", buf) > 1000 and buf.getvalue().startswith(PNG_MAGIC)
            s.delete_file("in/data.csv")
            with pytest.raises(NotFound) as e:
                s.download("in/data.csv")
            assert e.value.status == 404 and e.value.reason == "file_not_found"

            nb = s.transcript()
            assert nb["nbformat"] == 4 and len(nb["cells"]) == 3
            assert json.loads(s.transcript_text()) == nb
            sid = s.id
        # leaving the with deleted the session it made
        assert sid not in [x.id for x in c.sessions()]
        with pytest.raises(NotFound):
            c.session(sid).info()


def test_a_handle_on_an_existing_session_is_not_deleted_on_exit(broker, session, env):
    with Client(broker.url, "tok-alice") as c:
        with c.session(session) as s:
            s.run("y = 1")
        assert c.session(session).run("print(y)").stdout == "1\n"


def test_errors_name_the_field(broker, session, env):
    with Client(broker.url, "tok-alice") as c:
        s = c.session(session)
        for on_event in (None, lambda e: None):         # plain and streamed calls alike
            with pytest.raises(InvalidArgument) as e:
                s.run("1", timeout=5000, on_event=on_event)
            assert e.value.field == "timeoutSeconds" and e.value.allowed == "an integer from 1 to 900"
            assert e.value.status == 400 and "5000" in e.value.message and "timeoutSeconds" in str(e.value)
        with pytest.raises(InvalidArgument) as e:
            s.call("ExecutePythonCode", {"pythonCode": "1", "timeout": 3})
        assert e.value.field == "timeout" and "timeoutSeconds" in e.value.allowed
        with pytest.raises(InvalidArgument) as e:
            s.shell("sleep 1", timeout=241)
        assert e.value.field == "timeoutSeconds" and "240" in e.value.allowed
        with pytest.raises(NotFound) as e:
            s.call("NoSuchTool", {})
        assert "ExecutePythonCode" in e.value.message
    with Client(broker.url, "tok-bob") as other:
        with pytest.raises(NotFound) as e:
            other.session(session).run("1")
        assert e.value.reason == "session_not_found"
    with Client(broker.url, "wrong") as c, pytest.raises(Unauthorized) as e:
        c.sessions()
    assert e.value.status == 401


def test_dot_segments_in_paths_never_reach_another_endpoint(broker, env):
    """URL normalisation would turn files/../../ID into the session ID
    itself: a file deletion must never become a session deletion."""
    with Client(broker.url, "tok-alice") as c, c.create_session() as one, c.create_session() as two:
        for path in (f"../../{two.id}", f"/mnt/data/../../{two.id}", "../x", "a/../../x"):
            with pytest.raises(InvalidArgument) as e:
                one.delete_file(path)
            assert e.value.reason == "invalid_path", path
        assert two.info().state == "idle" and one.info().state == "idle"
        with pytest.raises(NotFound):
            c.session("..").info()
        with pytest.raises(NotFound):
            c.session(f"{one.id}/files/..").info()
        assert one.info().id == one.id


def test_unreachable_broker_and_missing_token(env):
    with Client(f"http://127.0.0.1:{free_port()}", "tok") as c, pytest.raises(ConnectionFailed) as e:
        c.sessions()
    assert "cannot reach the broker" in e.value.message
    with pytest.raises(ConfigError) as e:
        Client("http://127.0.0.1:1")
    assert "BROKER_TOKEN" in e.value.message
    with pytest.raises(ConfigError):
        Client("ftp://x", "tok")


def test_url_and_token_from_flags_environment_and_config_file(broker, env, tmp_path):
    cfg = tmp_path / "client.json"
    cfg.write_text(json.dumps({"url": broker.url, "token": "tok-bob"}))
    env.setenv("BROKER_CONFIG", str(cfg))
    s = bc.resolve()
    assert (s.url, s.token, s.token_from) == (broker.url, "tok-bob", str(cfg))
    env.setenv("BROKER_TOKEN", "tok-carol")
    assert bc.resolve().token == "tok-carol" and bc.resolve().token_from == "BROKER_TOKEN"
    assert bc.resolve(token="tok-dave").token == "tok-dave"
    env.setenv("BROKER_URL", "http://example.invalid:1/")
    assert bc.resolve().url == "http://example.invalid:1" and bc.resolve(url=broker.url).url == broker.url
    env.delenv("BROKER_URL")
    with Client() as c:                     # the file's URL, the environment's token
        with c.create_session() as s:
            assert s.id in [x.id for x in c.sessions()]
        with Client(token="tok-dave") as d:
            assert d.sessions() == []
    cfg.write_text("{not json")
    with pytest.raises(ConfigError) as e:
        bc.resolve()
    assert str(cfg) in e.value.message
    with pytest.raises(ConfigError):
        bc.resolve(config=str(tmp_path / "missing.json"))     # a file asked for must exist


def test_progress_arrives_before_the_cell_ends(broker, session, env):
    got = []
    with Client(broker.url, "tok-alice") as c:
        start = time.monotonic()
        r = c.session(session).run(TICKS, on_event=got.append)
        end = time.monotonic()
    ticks = [e for e in got if e.type == "stdout"]
    assert "".join(e.text for e in ticks) == "tick 0\ntick 1\ntick 2\n" == r.stdout
    assert got[0].type == "status" and all(e.result is None for e in got)
    assert end - ticks[0].received >= 1.5, [(e.type, round(e.received - start, 2)) for e in got]
    assert ticks[-1].received - ticks[0].received >= 1.0


def test_stream_yields_events_then_the_result(broker, session, env):
    with Client(broker.url, "tok-alice") as c:
        events = list(c.session(session).stream("RunShellCommand", {"command": "echo a; sleep 1; echo b"}))
    assert [e.type for e in events][0] == "status" and events[-1].type == "result"
    assert isinstance(events[-1].result, ToolResult) and events[-1].result.stdout == "a\nb\n"
    assert "".join(e.text for e in events if e.type == "stdout") == "a\nb\n"


@pytest.mark.asyncio
async def test_async_client_round_trip(broker, env):
    async with AsyncClient(broker.url, "tok-alice") as c:
        async with c.create_session() as s:
            assert (await s.info()).id == s.id
            r = await s.run("print('async')\n7")
            assert r.ok and r.stdout == "async\n" and r.result == "7"
            await s.upload("a.txt", b"hi")
            assert [f.path for f in await s.files()] == ["a.txt"]
            assert await s.download("a.txt") == b"hi"
            await s.delete_file("a.txt")
            assert await s.files() == []
            assert (await s.shell("exit 2")).exit_code == 2
            with pytest.raises(InvalidArgument) as e:
                await s.run("1", timeout=5000)
            assert e.value.field == "timeoutSeconds"

            seen = []

            async def on_event(ev):         # a coroutine works as a callback
                seen.append(ev)

            start = time.monotonic()
            r = await s.run(TICKS, on_event=on_event)
            end = time.monotonic()
            ticks = [e for e in seen if e.type == "stdout"]
            assert "".join(e.text for e in ticks) == r.stdout == "tick 0\ntick 1\ntick 2\n"
            assert end - ticks[0].received >= 1.5, [(e.type, round(e.received - start, 2)) for e in seen]

            types = [ev.type async for ev in s.stream("ExecutePythonCode", {"pythonCode": "print(1)"})]
            assert types[0] == "status" and types[-1] == "result" and "stdout" in types
            assert len((await s.transcript())["cells"]) == 4
            sid = s.id
        assert sid not in [x.id for x in await c.sessions()]
        s2 = await c.create_session()           # awaited: not deleted until asked
        assert s2.id in [x.id for x in await c.sessions()]
        await s2.delete()
        with pytest.raises(NotFound):
            await s2.info()
    async with AsyncClient(broker.url, "nope") as c:
        with pytest.raises(Unauthorized):
            await c.sessions()
