"""Tool calls with ``Accept: text/event-stream``: progress as server-sent
events while code runs, against a real broker with real sandboxed kernels.

The events are read here with plain httpx and a minimal parser of the
event-stream framing, independent of broker.client (tests/test_client.py
covers the client's use of them).
"""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from tests.broker_server import TIMEOUT, BrokerProcess
from tests.seed import PNG_MAGIC

KEEPALIVE = 1.0
SSE = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def sbroker(tmp_path_factory):
    """A broker whose quiet streams send a keep-alive comment every second."""
    b = BrokerProcess(str(tmp_path_factory.mktemp("sse")), f"--ServeApp.event_keepalive={KEEPALIVE}")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def sid(sbroker):
    s = sbroker.create_session()
    yield s
    sbroker.delete_session(s)


def auth(b: BrokerProcess, owner: str = "alice") -> dict:
    return {**SSE, **b.headers(owner)}


def read_events(resp: httpx.Response, stop_after: str | None = None) -> list[dict]:
    """Every event (and comment) of a response as {"event", "data", "t"}:
    t is time.monotonic() when its blank line arrived."""
    out, name, data = [], "", []
    for line in resp.iter_lines():
        now = time.monotonic()
        if line.startswith(":"):
            out.append({"event": ":comment", "data": line[1:].strip(), "t": now})
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif line == "" and data:
            out.append({"event": name, "data": json.loads("\n".join(data)), "t": now})
            name, data = "", []
            if stop_after and out[-1]["event"] == stop_after:
                break
    return out


def stream(b: BrokerProcess, sid: str, tool: str, body: dict, owner: str = "alice") -> tuple[httpx.Response, list]:
    start = time.monotonic()
    with httpx.stream("POST", f"{b.url}/api/sessions/{sid}/tools/{tool}", json=body, headers=auth(b, owner),
                      timeout=TIMEOUT + body.get("timeoutSeconds", 0)) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        events = read_events(r)
    for e in events:
        e["t"] -= start
    return r, events


def only(events, *names):
    return [e for e in events if e["event"] in names]


def test_a_cell_that_prints_once_a_second_streams_each_line_as_it_happens(sbroker, sid):
    code = ("import time\n"
            "for i in range(4):\n"
            "    print(f'tick {i}', flush=True)\n"
            "    time.sleep(1)\n"
            "'done'")
    r, events = stream(sbroker, sid, "ExecutePythonCode", {"pythonCode": code})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-store"
    names = [e["event"] for e in events if e["event"] != ":comment"]
    assert names[0] == "status" and events[0]["data"] == {"type": "status", "state": "busy"}
    assert names[-1] == "result" and names.count("result") == 1
    ticks = only(events, "stdout")
    assert "".join(e["data"]["text"] for e in ticks) == "tick 0\ntick 1\ntick 2\ntick 3\n"
    result = events[-1]
    # The cell runs for 4 s: the first line is printed at once, the last after
    # 3 s.  Each tick reaches us while the cell is still running, about a
    # second after the one before (generous bounds for a loaded machine).
    first = next(e for e in ticks if "tick 0" in e["data"]["text"])
    last = next(e for e in ticks if "tick 3" in e["data"]["text"])
    assert result["t"] - first["t"] >= 2.5, [(e["event"], round(e["t"], 2)) for e in events]
    assert last["t"] - first["t"] >= 2.0, [(e["event"], round(e["t"], 2)) for e in events]
    assert result["t"] - last["t"] >= 0.5
    arrivals = [e["t"] for e in events]
    assert arrivals == sorted(arrivals)
    # The last event is the whole result, as a JSON call would answer it.
    res = result["data"]
    assert res["status"] == "success" and res["tool"] == "ExecutePythonCode"
    assert res["stdout"] == "tick 0\ntick 1\ntick 2\ntick 3\n" and res["result"] == "'done'"
    assert "markdown" in res and res["execution_count"] >= 1
    shown = only(events, "display")
    assert shown and shown[-1]["data"]["kind"] == "execute_result" and shown[-1]["data"]["text"] == "'done'"
    assert only(events, "status")[-1]["data"]["state"] == "idle"


def test_shell_output_streams_per_chunk_with_stderr_apart(sbroker, sid):
    cmd = "for i in 1 2 3; do echo out $i; echo err $i >&2; sleep 1; done; exit 3"
    r, events = stream(sbroker, sid, "RunShellCommand", {"command": cmd})
    assert r.status_code == 200
    assert events[0]["event"] == "status" and events[0]["data"]["state"] == "running"
    out, err = only(events, "stdout"), only(events, "stderr")
    assert "".join(e["data"]["text"] for e in out) == "out 1\nout 2\nout 3\n"
    assert "".join(e["data"]["text"] for e in err) == "err 1\nerr 2\nerr 3\n"
    result = events[-1]
    assert result["event"] == "result"
    assert result["data"]["exit_code"] == 3 and result["data"]["status"] == "error"
    assert result["t"] - out[0]["t"] >= 1.5, [(e["event"], round(e["t"], 2)) for e in events]


def test_images_displays_and_exceptions_are_events(sbroker, sid):
    code = ("import matplotlib.pyplot as plt\n"
            "from IPython.display import HTML, display\n"
            "display(HTML('<b>bold</b>'))\n"
            "plt.plot([1, 2, 3]); plt.show()\n"
            "raise ValueError('late')")
    r, events = stream(sbroker, sid, "ExecutePythonCode", {"pythonCode": code})
    images = only(events, "image")
    assert len(images) == 1 and images[0]["data"]["mime"] == "image/png"
    png = base64.b64decode(images[0]["data"]["data"])
    assert png.startswith(PNG_MAGIC) and len(png) == images[0]["data"]["size"]
    html = [e for e in only(events, "display") if "text/html" in e["data"]["mimes"]]
    assert html and html[0]["data"]["kind"] == "display_data"
    exc = only(events, "exception")
    assert exc and exc[0]["data"]["ename"] == "ValueError" and exc[0]["data"]["evalue"] == "late"
    result = events[-1]["data"]
    assert result["status"] == "error" and result["error"]["ename"] == "ValueError"
    assert len(result["images"]) == 1



def test_a_figure_saved_and_left_open_is_an_image_event_naming_the_file(sbroker, sid):
    code = "import matplotlib.pyplot as plt\nplt.plot([3, 1]); plt.savefig('/mnt/data/left-open.png')"
    r, events = stream(sbroker, sid, "ExecutePythonCode", {"pythonCode": code})
    images = only(events, "image")
    assert len(images) == 1 and images[0]["data"]["saved_as"] == ["/mnt/data/left-open.png"]
    result = events[-1]["data"]
    assert [i["path"] for i in result["images"]] == ["/mnt/data/left-open.png"]

def test_a_quiet_stream_gets_keep_alive_comments(sbroker, sid):
    r, events = stream(sbroker, sid, "ExecutePythonCode", {"pythonCode": "import time; time.sleep(3.5)"})
    comments = only(events, ":comment")
    assert len(comments) >= 2 and all(c["data"] == "keep-alive" for c in comments)
    assert events[-1]["event"] == "result" and events[-1]["data"]["status"] == "success"


def test_cant_stream_without_a_token(sbroker, sid):
    url = f"{sbroker.url}/api/sessions/{sid}/tools/ExecutePythonCode"
    body = {"pythonCode": "open('/mnt/data/ran.txt', 'w').write('x')"}
    for headers in (SSE, {**SSE, "Authorization": "Bearer nope"}, {**SSE, "Authorization": "Basic tok-alice"}):
        r = httpx.post(url, json=body, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/json")
        assert r.json()["reason"] == "unauthorized"
    # Another owner's session is not there at all.
    r = httpx.post(url, json=body, headers=auth(sbroker, "bob"), timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["reason"] == "session_not_found"
    # Nothing ran, and the session still works for its owner.
    assert sbroker.run(sid, "import os; print(os.path.exists('/mnt/data/ran.txt'))")["stdout"] == "False\n"


def test_errors_before_any_output_are_ordinary_json_errors(sbroker, sid):
    url = f"{sbroker.url}/api/sessions/{sid}/tools"
    r = httpx.post(f"{url}/ExecutePythonCode", json={"pythonCode": "1", "timeoutSeconds": 5000},
                   headers=auth(sbroker), timeout=TIMEOUT)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json()["field"] == "timeoutSeconds" and r.json()["allowed"] == "an integer from 1 to 900"
    r = httpx.post(f"{url}/RunShellCommand", json={"command": "sleep 100", "isBackground": True},
                   headers=auth(sbroker), timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["field"] == "isBackground"
    r = httpx.post(f"{url}/NoSuchTool", json={}, headers=auth(sbroker), timeout=TIMEOUT)
    assert r.status_code == 404 and "ExecutePythonCode" in r.json()["message"]
    # A tool that runs no code answers with one result event.
    r, events = stream(sbroker, sid, "ListSessionFiles", {})
    assert [e["event"] for e in events] == ["result"] and events[0]["data"]["tool"] == "ListSessionFiles"


def _leave_after_first_output(b: BrokerProcess, sid: str, code: str, timeout: int) -> float:
    """Start a streamed call, read up to its first stdout event, hang up."""
    with httpx.stream("POST", f"{b.url}/api/sessions/{sid}/tools/ExecutePythonCode",
                      json={"pythonCode": code, "timeoutSeconds": timeout}, headers=auth(b), timeout=TIMEOUT) as r:
        assert r.status_code == 200
        for e in read_events(r, stop_after="stdout"):
            pass
        assert e["event"] == "stdout", e
        return time.monotonic()


def test_a_client_that_leaves_mid_stream_does_not_stop_the_call_or_block_the_session(sbroker, sid):
    code = ("import time\n"
            "for i in range(3):\n"
            "    print('step', i, flush=True); time.sleep(1)\n"
            "open('/mnt/data/finished.txt', 'w').write('yes')")
    _leave_after_first_output(sbroker, sid, code, 60)
    # The next call waits for the first to finish, then runs.
    r = sbroker.run(sid, "print(open('/mnt/data/finished.txt').read())")
    assert r["status"] == "success" and r["stdout"] == "yes\n"
    nb = sbroker.get(f"/api/sessions/{sid}/transcript").json()
    first = nb["cells"][-2]
    assert first["metadata"]["broker"]["status"] == "success"
    assert "".join(first["outputs"][0]["text"]) == "step 0\nstep 1\nstep 2\n"
    assert sbroker.get(f"/api/sessions/{sid}").json()["state"] == "idle"
    assert "Traceback" not in sbroker.log_tail(200)


def test_a_client_that_leaves_a_runaway_cell_gets_it_interrupted_by_its_timeout(sbroker, sid):
    left = _leave_after_first_output(sbroker, sid, "import time\nprint('spinning', flush=True)\nwhile True: time.sleep(0.1)", 3)
    r = sbroker.run(sid, "print('after')")
    waited = time.monotonic() - left
    assert r["status"] == "success" and r["stdout"] == "after\n"
    assert waited < 3 + 30, waited      # the timeout (3 s), an interrupt, generous slack for load
    nb = sbroker.get(f"/api/sessions/{sid}/transcript").json()
    assert nb["cells"][-2]["metadata"]["broker"]["status"] == "timeout"
    # A streamed call after that one works too.
    r, events = stream(sbroker, sid, "ExecutePythonCode", {"pythonCode": "print('streamed again')"})
    assert events[-1]["data"]["stdout"] == "streamed again\n"
    assert "Traceback" not in sbroker.log_tail(200)
