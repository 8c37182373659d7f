"""The eight tools over real HTTP against a real `broker serve` with real
sandboxed kernels: the seed's example prompts end to end, each tool's limits,
timeouts and kernel deaths, and how images and files come back.

One broker for the module (the ``broker`` fixture in conftest.py); each test
makes its own session unless it continues the seed's scenario.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import random
import re
import time
from collections import Counter, defaultdict
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest
import requests
from PIL import Image
from pypdf import PdfReader

from tests.broker_server import TIMEOUT
from tests.seed import PNG_MAGIC, SEED_BAR_CHART, SEED_PANDAS_SUMMARY, SEED_PDF_REPORT, SEED_SEABORN_CHART

TOOL_NAMES = ["ExecutePythonCode", "GeneratePdfReport", "RunShellCommand", "ReadSessionFile", "SearchSessionFiles",
              "ListSessionFiles", "GetSessionFile", "UploadFileToSession"]

CATEGORIES = ["network", "database", "storage", "auth"]


def md_images(markdown: str) -> list[tuple[str, str]]:
    """(alt, url) of every inline image in markdown."""
    return re.findall(r"!\[([^\]]*)\]\(([^)\s]+)\)", markdown)


def md_links(markdown: str) -> list[tuple[str, str]]:
    """(text, url) of every plain (non-image) link in markdown."""
    return re.findall(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)", markdown)


def fetch(url: str, **kw) -> requests.Response:
    """Follow a link the way a markdown viewer would: no token."""
    return requests.get(url, timeout=TIMEOUT, **kw)


def assert_png_url(url: str, min_size: int = 1000) -> Image.Image:
    r = fetch(url)
    assert r.status_code == 200, (url, r.status_code, r.text[:300])
    assert r.headers["Content-Type"] == "image/png"
    assert r.content.startswith(PNG_MAGIC)
    assert len(r.content) >= min_size
    img = Image.open(io.BytesIO(r.content))
    img.load()
    return img


# -- the seed's example prompts, end to end, in one session -----------------------------------

@pytest.fixture(scope="module")
def seed(broker):
    """The seed scenario's session: incidents.csv as the first prompt asks
    ("Create a CSV file of all the incidents ... Name the file incidents.csv
    and save it to /mnt/data"), uploaded through UploadFileToSession."""
    sid = broker.create_session("alice")
    rng = random.Random(20260117)
    rows = [{"id": i, "category": rng.choice(CATEGORIES), "resolution_time": round(rng.uniform(0.5, 12.0), 2),
             "count": rng.randint(1, 9)} for i in range(1, 61)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["id", "category", "resolution_time", "count"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    data = buf.getvalue().encode()
    r = broker.tool(sid, "UploadFileToSession", {"path": "incidents.csv", "content": base64.b64encode(data).decode()})
    assert r["status"] == "success" and r["path"] == "/mnt/data/incidents.csv" and r["size"] == len(data), r
    yield {"sid": sid, "rows": rows, "csv": data}
    broker.delete_session(sid, "alice")


def test_seed_chart_by_severity_inline_image(broker, seed):
    r = broker.run(seed["sid"], SEED_BAR_CHART)
    assert r["status"] == "success", r
    assert r["tool"] == "ExecutePythonCode"
    # The chart comes back once, inline, as the saved file.
    assert [i["path"] for i in r["images"]] == ["/mnt/data/incidents_by_severity.png"], r["images"]
    assert r["files"] == []
    imgs = md_images(r["markdown"])
    assert len(imgs) == 1, r["markdown"]
    alt, url = imgs[0]
    assert alt == "incidents_by_severity.png"
    assert url == r["images"][0]["url"]
    assert url.startswith(broker.url + "/api/sessions/" + seed["sid"] + "/files/incidents_by_severity.png?")
    img = assert_png_url(url, 10_000)
    assert img.size == (1500, 900)  # figsize (10, 6) at dpi=150
    assert len(img.convert("RGB").getcolors(1 << 24)) > 10  # a chart, not a blank canvas


def test_seed_incident_csv_summary(broker, seed):
    r = broker.run(seed["sid"], SEED_PANDAS_SUMMARY)
    assert r["status"] == "success", r
    groups = defaultdict(list)
    for row in seed["rows"]:
        groups[row["category"]].append(row["resolution_time"])
    lines = [ln.split() for ln in r["stdout"].strip().splitlines()]
    assert lines[0] == ["count", "avg_resolution_hours"], r["stdout"]
    assert [ln[0] for ln in lines[2:]] == sorted(groups)
    for name, count, mean in lines[2:]:
        assert int(count) == len(groups[name])
        assert float(mean) == pytest.approx(sum(groups[name]) / len(groups[name]), abs=1e-4)
    assert "```" in r["markdown"] and "avg_resolution_hours" in r["markdown"]
    # The new CSV comes back as a download link, not an image.
    assert r["images"] == []
    assert [f["path"] for f in r["files"]] == ["/mnt/data/incident_summary.csv"], r["files"]
    entry = r["files"][0]
    assert entry["type"] == "text/csv" and entry["name"] == "incident_summary.csv"
    assert ("incident_summary.csv", entry["url"]) in md_links(r["markdown"])
    got = fetch(entry["url"])
    assert got.status_code == 200
    written = list(csv.reader(io.StringIO(got.text)))
    assert written[0] == ["category", "count", "avg_resolution_hours"]
    assert {row[0]: int(row[1]) for row in written[1:]} == {c: len(v) for c, v in groups.items()}
    assert int(got.headers["Content-Length"]) == entry["size"]


def test_seed_seaborn_chart(broker, seed):
    # The seed's seaborn example uses `pd` imported by the pandas example.
    r = broker.run(seed["sid"], "import pandas as pd")
    assert r["status"] == "success", r
    r = broker.run(seed["sid"], SEED_SEABORN_CHART)
    assert r["status"] == "success", r
    assert [i["name"] for i in r["images"]] == ["category_chart.png"], r
    (alt, url), = md_images(r["markdown"])
    assert alt == "category_chart.png"
    img = assert_png_url(url, 10_000)
    assert img.size == (1800, 900)  # figsize (12, 6) at dpi=150


def test_seed_weekly_pdf_report(broker, seed):
    r = broker.tool(seed["sid"], "GeneratePdfReport", {
        "pythonCode": SEED_PDF_REPORT, "expectedOutputFilename": "weekly_report.pdf",
        "saveAsFilename": "weekly_incident_summary.pdf"})
    assert r["status"] == "success", r
    pdf = r["pdf"]
    assert pdf["name"] == "weekly_incident_summary.pdf"
    assert pdf["path"] == "/mnt/data/weekly_report.pdf"
    assert pdf["type"] == "application/pdf"
    # The download link is named by saveAsFilename, in the markdown and in the result.
    assert ("weekly_incident_summary.pdf", pdf["url"]) in md_links(r["markdown"]), r["markdown"]
    assert r["files"][0] == pdf
    got = fetch(pdf["url"])
    assert got.status_code == 200, got.text
    assert got.content.startswith(b"%PDF-")
    assert got.headers["Content-Type"] == "application/pdf"
    cd = got.headers["Content-Disposition"]
    assert cd.startswith("attachment") and 'filename="weekly_incident_summary.pdf"' in cd, cd
    text = PdfReader(io.BytesIO(got.content)).pages[0].extract_text()
    assert "Weekly Incident Report" in text and "Total incidents: 90" in text


def test_generate_pdf_reports_missing_and_non_pdf_output(broker, session):
    r = broker.tool(session, "GeneratePdfReport", {"pythonCode": "x = 1", "expectedOutputFilename": "nope.pdf",
                                                   "saveAsFilename": "a.pdf"})
    assert r["status"] == "error" and r["error"]["ename"] == "PdfNotCreated", r
    assert "nope.pdf" in r["markdown"]
    r = broker.tool(session, "GeneratePdfReport", {
        "pythonCode": "open('/mnt/data/fake.pdf', 'w').write('hello')", "expectedOutputFilename": "/mnt/data/fake.pdf",
        "saveAsFilename": "a.pdf"})
    assert r["status"] == "error" and r["error"]["ename"] == "NotAPdf", r


def make_log(seed_value=7, n=400) -> tuple[bytes, list[str]]:
    rng = random.Random(seed_value)
    levels = ["INFO"] * 6 + ["DEBUG"] * 2 + ["WARN", "ERROR", "FATAL"]
    msgs = ["disk latency high", "connection reset", "retrying request", "cache miss", "timeout talking to db"]
    lines = [f"{rng.choice(levels)} {rng.choice(msgs)}" for _ in range(n)]
    return ("\n".join(lines) + "\n").encode(), lines


def test_seed_log_analysis_with_shell(broker, seed):
    data, lines = make_log()
    r = broker.put(f"/api/sessions/{seed['sid']}/files/application.log", data=data)
    assert r.status_code == 201, r.text
    r = broker.shell(seed["sid"], 'grep -E "ERROR|WARN|FATAL" application.log | sort | uniq -c | sort -rn')
    assert r["status"] == "success" and r["exit_code"] == 0, r
    expected = Counter(ln for ln in lines if re.search("ERROR|WARN|FATAL", ln))
    got = {}
    counts = []
    for ln in r["stdout"].splitlines():
        n, text = ln.strip().split(" ", 1)
        got[text] = int(n)
        counts.append(int(n))
    assert got == dict(expected)
    assert counts == sorted(counts, reverse=True)  # sort -rn
    assert r["stdout"].strip() in r["markdown"]

    r = broker.tool(seed["sid"], "RunShellCommand", {"command": "tail -100 application.log",
                                                     "explanation": "most recent log entries"})
    assert r["status"] == "success", r
    assert r["stdout"].splitlines() == lines[-100:]
    assert r["explanation"] == "most recent log entries"


def test_seed_list_files_with_sizes(broker, seed):
    r = broker.tool(seed["sid"], "ListSessionFiles", {})
    assert r["status"] == "success", r
    files = {f["path"]: f for f in r["files"]}
    host = broker.data_dir(seed["sid"])
    for rel in ("incidents.csv", "application.log"):
        assert files[f"/mnt/data/{rel}"]["size"] == os.path.getsize(os.path.join(host, rel))
    assert files["/mnt/data/incidents.csv"]["size"] == len(seed["csv"])
    assert r["count"] == len(r["files"])
    assert "| name | size |" in r["markdown"] and "incidents.csv" in r["markdown"]
    # Same listing over the REST files endpoint.
    listing = broker.get(f"/api/sessions/{seed['sid']}/files").json()
    assert {f["path"]: f["size"] for f in listing} == {p[len("/mnt/data/"):]: f["size"] for p, f in files.items()}


# -- each tool's limits -----------------------------------------------------------------------

def assert_bad(r: requests.Response, field: str, *needles: str):
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert body["field"] == field, body
    assert field in body["message"], body
    for n in needles:
        assert n in body["message"] or n in body.get("allowed", ""), (n, body)
    return body


def test_python_code_length_limit(broker, session):
    r = broker.tool_response(session, "ExecutePythonCode", {"pythonCode": "x" * 20_001})
    body = assert_bad(r, "pythonCode", "20,000")
    assert "20,001" in body["message"]
    r = broker.tool_response(session, "GeneratePdfReport", {
        "pythonCode": "#" * 20_001, "expectedOutputFilename": "a.pdf", "saveAsFilename": "a.pdf"})
    assert_bad(r, "pythonCode", "20,000")
    # Exactly 20,000 characters is allowed.
    code = "print('ok')\n"
    code += "#" * (20_000 - len(code))
    assert len(code) == 20_000
    assert broker.run(session, code)["stdout"] == "ok\n"


@pytest.mark.parametrize("tool,maximum,extra", [
    ("ExecutePythonCode", 900, {"pythonCode": "1"}),
    ("GeneratePdfReport", 900, {"pythonCode": "1", "expectedOutputFilename": "a.pdf", "saveAsFilename": "a.pdf"}),
    ("RunShellCommand", 240, {"command": "true"}),
])
def test_timeout_over_maximum(broker, session, tool, maximum, extra):
    r = broker.tool_response(session, tool, {**extra, "timeoutSeconds": maximum + 1})
    body = assert_bad(r, "timeoutSeconds", f"from 1 to {maximum}")
    assert str(maximum + 1) in body["message"]
    r = broker.tool_response(session, tool, {**extra, "timeoutSeconds": 0})
    assert_bad(r, "timeoutSeconds", f"from 1 to {maximum}")
    r = broker.tool_response(session, tool, {**extra, "timeoutSeconds": "60"})
    assert_bad(r, "timeoutSeconds", f"from 1 to {maximum}")
    # The maximum itself is accepted.
    r = broker.tool_response(session, tool, {**extra, "timeoutSeconds": maximum})
    assert r.status_code == 200 and r.json()["tool"] == tool, r.text


def test_is_background_refused(broker, session):
    r = broker.tool_response(session, "RunShellCommand", {"command": "sleep 1", "isBackground": True})
    body = assert_bad(r, "isBackground", "false")
    assert "background" in body["message"]
    r = broker.tool_response(session, "RunShellCommand", {"command": "echo fg", "isBackground": False})
    assert r.status_code == 200 and r.json()["stdout"] == "fg\n"


def test_unknown_tool_404_lists_known(broker, session):
    r = broker.tool_response(session, "ExecuteRubyCode", {"code": "1"})
    assert r.status_code == 404, r.text
    msg = r.json()["message"]
    assert "ExecuteRubyCode" in msg
    for name in TOOL_NAMES:
        assert name in msg, msg


@pytest.mark.parametrize("tool,body", [
    ("ExecutePythonCode", {"pythonCode": "1", "code": "2"}),
    ("RunShellCommand", {"command": "true", "cwd": "/"}),
    ("ListSessionFiles", {"recursive": True}),
    ("UploadFileToSession", {"path": "a", "content": "", "mode": "0777"}),
])
def test_unknown_field_400_lists_known(broker, session, tool, body):
    from broker.tools import TOOLS

    r = broker.tool_response(session, tool, body)
    assert r.status_code == 400, r.text
    b = r.json()
    unknown = (set(body) - {p.name for p in TOOLS[tool].params}).pop()
    assert b["field"] == unknown and unknown in b["message"]
    for p in TOOLS[tool].params:
        assert p.name in b["message"], b


def test_missing_required_and_bad_json(broker, session):
    r = broker.tool_response(session, "ExecutePythonCode", {})
    assert_bad(r, "pythonCode", "required")
    r = broker.tool_response(session, "GeneratePdfReport", {"pythonCode": "1", "expectedOutputFilename": "a.pdf"})
    assert_bad(r, "saveAsFilename", "required")
    r = broker.post(f"/api/sessions/{session}/tools/ExecutePythonCode", data=b"{not json",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    r = broker.tool_response(session, "ExecutePythonCode", ["print(1)"])
    assert r.status_code == 400 and "pythonCode" in r.json()["message"]


def test_seed_parameters_defaults(broker):
    """The tool definitions carry the seed's names, defaults and maxima."""
    from broker.tools import TOOLS

    def p(tool, name):
        return next(x for x in TOOLS[tool].params if x.name == name)
    assert (p("ExecutePythonCode", "timeoutSeconds").default, p("ExecutePythonCode", "timeoutSeconds").maximum) == (120, 900)
    assert (p("GeneratePdfReport", "timeoutSeconds").default, p("GeneratePdfReport", "timeoutSeconds").maximum) == (180, 900)
    assert (p("RunShellCommand", "timeoutSeconds").default, p("RunShellCommand", "timeoutSeconds").maximum) == (120, 240)
    assert p("ExecutePythonCode", "pythonCode").max_length == 20_000
    assert list(TOOLS) == TOOL_NAMES


# -- timeouts ----------------------------------------------------------------------------------

def test_interrupted_sleep_keeps_variables_and_does_not_block(broker, session):
    assert broker.run(session, "kept = 41 + 1")["status"] == "success"
    t0 = time.monotonic()
    r = broker.run(session, "import time\nstarted = True\ntime.sleep(60)", timeout_seconds=2)
    assert time.monotonic() - t0 < 20
    assert r["status"] == "timeout", r
    assert r["error"]["ename"] == "TimeoutError" and "timeoutSeconds=2" in r["error"]["evalue"]
    assert r["kernel_restarted"] is False
    assert "interrupted" in r["notice"] and "variables are kept" in r["notice"]
    assert "TimeoutError" in r["markdown"]
    t0 = time.monotonic()
    r = broker.run(session, "print(kept, started)")
    assert time.monotonic() - t0 < 10, "the next execution waited behind the timed-out one"
    assert r["status"] == "success" and r["stdout"] == "42 True\n", r


def test_code_catching_keyboardinterrupt_forces_restart(broker, session):
    marker = broker.run(session, "open('/mnt/data/survivor.txt', 'w').write('still here')\nlost = 1")
    assert marker["status"] == "success"
    t0 = time.monotonic()
    r = broker.run(session, """
import time
while True:
    try:
        time.sleep(100)
    except KeyboardInterrupt:
        print('caught the interrupt, carrying on')
""", timeout_seconds=2)
    assert time.monotonic() - t0 < 45
    assert r["status"] == "timeout", r
    assert "caught the interrupt" in r["stdout"]
    assert r["kernel_restarted"] is True
    assert "restarted" in r["notice"] and "/mnt/data are kept" in r["notice"]
    # The next call is answered at once by the fresh kernel: variables are
    # gone, files are not.
    t0 = time.monotonic()
    r = broker.run(session, "print(open('/mnt/data/survivor.txt').read())\nprint('lost' in dir())")
    assert time.monotonic() - t0 < 15
    assert r["status"] == "success" and r["stdout"] == "still here\nFalse\n", r


def test_shell_timeout_does_not_block(broker, session):
    r = broker.tool(session, "RunShellCommand", {"command": "echo start; sleep 60", "timeoutSeconds": 2})
    assert r["status"] == "timeout", r
    assert "start" in r["stdout"]
    assert r["error"]["ename"] == "TimeoutError"
    t0 = time.monotonic()
    r = broker.shell(session, "echo next")
    assert r["stdout"] == "next\n" and time.monotonic() - t0 < 10


# -- kernel deaths -----------------------------------------------------------------------------

@pytest.mark.parametrize("code,says", [
    ("import os\nos._exit(3)", "exited with status 3"),
    ("import ctypes\nctypes.string_at(0)", "segmentation fault"),
])
def test_kernel_death_is_an_error_and_next_call_works(broker, session, code, says):
    r = broker.run(session, "open('/mnt/data/before-death.txt', 'w').write('kept')\nvar = 'x'")
    assert r["status"] == "success", r
    r = broker.run(session, code)
    assert r["status"] == "error", r
    assert r["error"]["ename"] == "KernelDied"
    assert "died" in r["error"]["evalue"] and says in r["error"]["evalue"], r["error"]
    assert r["kernel_restarted"] is True
    assert "KernelDied" in r["markdown"] and says in r["markdown"]
    r = broker.run(session, "print(open('/mnt/data/before-death.txt').read(), 'var' in dir())")
    assert r["status"] == "success" and r["stdout"] == "kept False\n", r
    assert broker.get(f"/api/sessions/{session}").json()["state"] == "idle"


# -- images and files in results ------------------------------------------------------------

SHOW = """
import matplotlib.pyplot as plt
plt.figure(figsize=(4, 3))
plt.plot([1, 2, 3], [3, 1, 2])
plt.show()
"""


def test_plt_show_inline_and_written_to_outputs(broker, session):
    r = broker.run(session, SHOW)
    assert r["status"] == "success", r
    assert len(r["images"]) == 1, r["images"]
    img = r["images"][0]
    assert img["path"].startswith("/mnt/data/outputs/") and img["path"].endswith(".png")
    assert img["type"] == "image/png"
    rel = img["path"][len("/mnt/data/"):]
    with open(os.path.join(broker.data_dir(session), rel), "rb") as fh:
        on_disk = fh.read()
    assert on_disk.startswith(PNG_MAGIC) and len(on_disk) == img["size"]
    (alt, url), = md_images(r["markdown"])
    assert url == img["url"]
    assert fetch(url).content == on_disk
    # The file written under outputs/ is not reported a second time as a link.
    assert r["files"] == []
    listed = [f["path"] for f in broker.tool(session, "ListSessionFiles", {"path": "outputs"})["files"]]
    assert img["path"] in listed


def test_figure_saved_and_shown_is_reported_once(broker, session):
    r = broker.run(session, """
import matplotlib.pyplot as plt
plt.figure(figsize=(4, 3))
plt.plot([1, 2, 3], [3, 1, 2])
plt.savefig('/mnt/data/both.png')
plt.show()
""")
    assert r["status"] == "success", r
    assert len(r["images"]) == 1, r["images"]
    assert len(md_images(r["markdown"])) == 1, r["markdown"]
    assert r["images"][0]["path"] == "/mnt/data/both.png"
    assert r["files"] == []
    # A second, different figure shown in the same cell still comes back.
    r = broker.run(session, """
import matplotlib.pyplot as plt
fig = plt.figure(figsize=(3, 3))
plt.plot([1, 2])
plt.savefig('/mnt/data/first.png')
plt.show()
plt.figure(figsize=(2, 2))
plt.plot([2, 1])
plt.show()
""")
    assert r["status"] == "success", r
    paths = [i["path"] for i in r["images"]]
    assert len(paths) == 2 and paths[0] == "/mnt/data/first.png" and paths[1].startswith("/mnt/data/outputs/"), paths
    # A figure changed after it was saved is another picture: both come back.
    r = broker.run(session, """
import matplotlib.pyplot as plt
plt.figure(figsize=(3, 3))
plt.plot([1, 2])
plt.savefig('/mnt/data/draft.png')
plt.title('changed after saving')
plt.show()
""")
    paths = [i["path"] for i in r["images"]]
    assert len(paths) == 2 and paths[0] == "/mnt/data/draft.png" and paths[1].startswith("/mnt/data/outputs/"), paths


def test_images_as_data_uris(broker, session):
    r = broker.run(session, SHOW + "\nplt.figure(); plt.plot([0, 1]); plt.savefig('/mnt/data/saved.png')",
                   params={"images": "data"})
    assert r["status"] == "success", r
    assert len(r["images"]) == 2, r["images"]
    for img in r["images"]:
        assert img["url"].startswith("data:image/png;base64,")
        raw = base64.b64decode(img["url"].split(",", 1)[1])
        assert raw.startswith(PNG_MAGIC) and len(raw) == img["size"]
    for _alt, url in md_images(r["markdown"]):
        assert url.startswith("data:image/png;base64,")
    r = broker.tool_response(session, "ExecutePythonCode", {"pythonCode": "1"}, params={"images": "inline"})
    assert r.status_code == 400 and r.json()["field"] == "images"


def test_new_csv_is_a_download_link(broker, session):
    r = broker.run(session, "import os, pandas as pd\nos.makedirs('/mnt/data/out', exist_ok=True)\n"
                            "pd.DataFrame({'a': [1, 2], 'b': [3, 4]}).to_csv('/mnt/data/out/table.csv', index=False)")
    assert r["status"] == "success", r
    assert r["images"] == []
    (entry,) = r["files"]
    assert entry["path"] == "/mnt/data/out/table.csv" and entry["size"] == len("a,b\n1,3\n2,4\n")
    assert md_links(r["markdown"]) == [("table.csv", entry["url"])]
    assert fetch(entry["url"]).text == "a,b\n1,3\n2,4\n"
    # Unchanged files are not reported again.
    r = broker.run(session, "print('nothing new')")
    assert r["files"] == [] and r["images"] == []


def test_signed_links(broker, session):
    r = broker.run(session, "open('/mnt/data/secret.txt', 'w').write('s3cret')\n"
                            "open('/mnt/data/other.txt', 'w').write('other')")
    links = {f["name"]: f["url"] for f in r["files"]}
    url = links["secret.txt"]
    assert fetch(url).text == "s3cret"          # no token needed
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}

    def with_query(path=parts.path, **changes):
        return urlunsplit((parts.scheme, parts.netloc, path, urlencode({**q, **changes}), ""))

    sig = q["sig"]
    tampered = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    for bad in (with_query(sig=tampered),
                with_query(exp=str(int(q["exp"]) + 3600)),          # a longer life
                with_query(exp=str(int(time.time()) - 10)),          # expired
                with_query(name="renamed.txt"),                      # another download name
                with_query(path=parts.path.replace("secret.txt", "other.txt")),   # another path
                urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))):  # no signature at all
        got = fetch(bad)
        assert got.status_code == 401, (bad, got.status_code, got.text)
        assert "s3cret" not in got.text and "other" not in got.text
    # The signature is for this session only.
    other = broker.create_session("alice")
    try:
        broker.run(other, "open('/mnt/data/secret.txt', 'w').write('theirs')")
        got = fetch(url.replace(session, other))
        assert got.status_code == 401, got.text
    finally:
        broker.delete_session(other)
    # A signed link never authorises writes.
    got = requests.put(url, data=b"overwrite", timeout=TIMEOUT)
    assert got.status_code == 401
    got = requests.delete(url, timeout=TIMEOUT)
    assert got.status_code == 401
    assert fetch(url).text == "s3cret"


def test_stderr_result_and_errors_in_markdown(broker, session):
    r = broker.run(session, "import sys\nprint('to err', file=sys.stderr)\n6 * 7")
    assert r["status"] == "success" and r["stderr"] == "to err\n" and r["result"] == "42", r
    assert "to err" in r["markdown"] and "42" in r["markdown"]
    r = broker.run(session, "1 / 0")
    assert r["status"] == "error" and r["error"]["ename"] == "ZeroDivisionError", r
    assert "ZeroDivisionError" in r["markdown"]
    r = broker.run(session, "print('after error')")
    assert r["stdout"] == "after error\n"
