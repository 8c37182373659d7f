"""What a model is shown, through a real broker with real sandboxed kernels:
every output in order in ``markdown`` (rich displays as text), the structured
``outputs``, figures left open shown once, and the budgets (long output cut
to head and tail with the whole text readable, many files summarised with
exact counts, many images listed, the JSON size) for every tool.
"""

from __future__ import annotations

import base64
import json
import re

import pytest

from tests.broker_server import BrokerProcess
from tests.test_api_tools import fetch, md_images, md_links

MD_BUDGET = 8000
JSON_BUDGET = 64 << 10


def within_budget(r: dict) -> None:
    md = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "data:", r["markdown"])
    assert len(md) <= MD_BUDGET, len(md)
    size = len(json.dumps(r, ensure_ascii=False).encode())
    assert size <= JSON_BUDGET, size


def positions(markdown: str, *needles: str) -> list[int]:
    found = [markdown.find(n) for n in needles]
    assert all(p >= 0 for p in found), (needles, found, markdown)
    return found


# -- every output reaches the result -------------------------------------------------------------

def test_display_of_a_dataframe_is_a_markdown_table(broker, session):
    r = broker.run(session, "import pandas as pd\n"
                            "df = pd.DataFrame({'city': [f'c{i:02d}' for i in range(30)],\n"
                            "                   'sales': [i * 7 for i in range(30)]})\n"
                            "display(df)")
    assert r["status"] == "success", r
    md = r["markdown"]
    assert "_(no output)_" not in md
    # Every one of the 30 rows, as table rows a model can read.
    for i in range(30):
        assert re.search(rf"^\| {i} \| c{i:02d} \| {i * 7} \|$", md, re.M), (i, md)
    assert "| city | sales |" in md.replace("|  |", "|")  or "city | sales" in md
    (out,) = r["outputs"]
    assert out["type"] == "display_data" and {"text/html", "text/plain"} <= set(out["mimes"])
    assert out["shown_as"] == "text/html" and "| 29 | c29 | 203 |" in out["text"]
    # The last expression's value is shown the same way.
    r = broker.run(session, "df.head(3)")
    assert "| 2 | c02 | 14 |" in r["markdown"] and r["outputs"][0]["type"] == "execute_result", r
    assert r["result"].split()[:2] == ["city", "sales"], r["result"]   # text/plain kept in 'result'


def test_rich_displays_as_text(broker, session):
    r = broker.run(session, r"""
from IPython.display import display, Markdown, HTML, Latex, JSON, SVG
display(Markdown('## Findings\n\n- **north** leads'))
display(HTML('<h3>Report</h3><p>Total: <b>42</b></p><script>alert(1)</script><style>p {color: red}</style>'))
display(Latex(r'$$E = mc^2$$'))
display(JSON({'region': 'north', 'units': [1, 2, 3]}))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" width="20" height="20"><circle cx="10" cy="10" r="8"/></svg>'))
""")
    assert r["status"] == "success", r
    md = r["markdown"]
    a, b, c, d = positions(md, "## Findings\n\n- **north** leads", "Total: **42**", "$$E = mc^2$$", '"region": "north"')
    assert a < b < c < d
    assert "alert(1)" not in md and "color: red" not in md   # scripts and styles are not text
    assert "### Report" in md
    assert '```json\n{\n  "region": "north",\n  "units": [\n    1,' in md    # pretty-printed
    types = [o["shown_as"] for o in r["outputs"][:4]]
    assert types == ["text/markdown", "text/html", "text/latex", "application/json"], r["outputs"]
    # SVG comes back as an image: inline in the markdown, a file like any other.
    (img,) = r["images"]
    assert img["type"] == "image/svg+xml" and img["path"].endswith(".svg")
    assert md_images(md)[-1][1] == img["url"] and md.find(img["url"]) > d
    assert r["outputs"][4]["image"]["path"] == img["path"] and "image/svg+xml" in r["outputs"][4]["mimes"]
    assert b"<circle" in fetch(img["url"]).content


def test_outputs_in_the_order_the_code_produced_them(broker, session):
    r = broker.run(session, """
import sys
from IPython.display import display, Markdown
import matplotlib.pyplot as plt
print('first line')
display(Markdown('*second*'))
print('third line', file=sys.stderr)
plt.figure(figsize=(2, 2)); plt.plot([1, 2]); plt.show()
print('fifth line')
'sixth'
""")
    assert r["status"] == "success", r
    md = r["markdown"]
    (alt, url), = md_images(md)
    p = positions(md, "first line", "*second*", "third line", url, "fifth line", "'sixth'")
    assert p == sorted(p), (p, md)
    assert md[:p[2]].rstrip().endswith("stderr:\n```text") or "stderr:" in md[p[1]:p[2]]
    kinds = [(o["type"], o.get("name")) for o in r["outputs"]]
    assert kinds == [("stream", "stdout"), ("display_data", None), ("stream", "stderr"), ("display_data", None),
                     ("stream", "stdout"), ("execute_result", None)], kinds
    # The structured streams hold all of it, as before.
    assert r["stdout"] == "first line\nfifth line\n" and r["stderr"] == "third line\n"
    # An error comes where it happened, after what was printed before it.
    r = broker.run(session, "print('before the error')\n1/0")
    a, b = positions(r["markdown"], "before the error", "ZeroDivisionError")
    assert a < b and r["outputs"][-1]["type"] == "error" and r["outputs"][-1]["ename"] == "ZeroDivisionError"


# -- figures left open -------------------------------------------------------------------------------

def test_figure_left_open_is_shown_once(broker, session):
    r = broker.run(session, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('left open')")
    assert r["status"] == "success", r
    (img,) = r["images"]
    assert img["path"].startswith("/mnt/data/outputs/") and img["type"] == "image/png"
    assert md_images(r["markdown"]) == [(img["name"], img["url"])]
    assert fetch(img["url"]).content.startswith(b"\x89PNG")
    # Shown once: the next cell does not show it again.
    r = broker.run(session, "print('next')")
    assert r["images"] == [] and md_images(r["markdown"]) == []
    # Two figures left open: two images.
    r = broker.run(session, "plt.figure(); plt.plot([1]); plt.figure(); plt.plot([2])")
    assert len(r["images"]) == 2 and len(md_images(r["markdown"])) == 2, r


def test_figure_saved_and_left_open_is_reported_once_as_the_file(broker, session):
    r = broker.run(session, "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [1, 2])\n"
                            "plt.savefig('/mnt/data/bars.png')")
    assert r["status"] == "success", r
    (img,) = r["images"]
    assert img["path"] == "/mnt/data/bars.png", r["images"]
    assert len(md_images(r["markdown"])) == 1 and r["files"] == [], r
    # The auto-shown display points at the saved file, not at a second copy.
    (out,) = [o for o in r["outputs"] if o["type"] == "display_data"]
    assert out["image"]["path"] == "/mnt/data/bars.png"
    listed = broker.tool(session, "ListSessionFiles", {})["files"]
    assert not [f for f in listed if f["path"].startswith("/mnt/data/outputs/image-")], listed
    # A saved file displayed as it is: one image, the file.
    r = broker.run(session, "plt.plot([2, 1]); plt.savefig('/mnt/data/again.png'); plt.close()\n"
                            "from IPython.display import Image\ndisplay(Image(filename='/mnt/data/again.png'))")
    assert [i["path"] for i in r["images"]] == ["/mnt/data/again.png"] and len(md_images(r["markdown"])) == 1, r
    assert r["outputs"][-1]["text"] == "(the same image as a file in 'images')", r["outputs"]


def test_plt_show_then_end_of_cell_is_once_and_close_is_none(broker, session):
    r = broker.run(session, "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()\nprint('after show')")
    assert r["status"] == "success" and len(r["images"]) == 1 and len(md_images(r["markdown"])) == 1, r
    r = broker.run(session, "plt.plot([1, 2])\nplt.close()")
    assert r["images"] == [] and md_images(r["markdown"]) == [], r
    r = broker.run(session, "fig = plt.figure(); plt.plot([3, 1])\nplt.close(fig)\nplt.figure(); plt.plot([0, 1])")
    assert len(r["images"]) == 1, r   # only the figure left open


@pytest.fixture(scope="module")
def no_autoshow(tmp_path_factory):
    b = BrokerProcess(str(tmp_path_factory.mktemp("no-autoshow")), "--SandboxSettings.figure_autoshow=False",
                      "--SessionManager.pool_size=1")
    b.start()
    yield b
    b.stop()


def test_autoshow_off_setting(no_autoshow):
    b = no_autoshow
    sid = b.create_session()
    try:
        r = b.run(sid, "import matplotlib.pyplot as plt\nplt.plot([1, 2])")
        assert r["status"] == "success" and r["images"] == [] and md_images(r["markdown"]) == [], r
        # ... and the figure left open does not come back later either.
        r = b.run(sid, "plt.figure(figsize=(2, 2)); plt.plot([2, 1]); plt.show()")
        assert len(r["images"]) == 1, r
        r = b.run(sid, "import os; os.environ.get('BROKER_FIGURE_AUTOSHOW')")
        assert r["result"] == "'0'", r
    finally:
        b.delete_session(sid)


def test_autoshow_for_the_plain_kernelspec():
    """The same setting works with no broker: jupyter_client configuration
    of the provisioner (here, as a papermill or nbclient caller would pass it)."""
    from traitlets.config import Config

    from tests.harness import SandboxKernel

    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2])"
    on = SandboxKernel()
    try:
        r = on.run(code)
        assert r.status == "ok" and len(r.displays) == 1 and "image/png" in r.displays[0], r
    finally:
        on.shutdown()
    c = Config()
    c.SandboxProvisioner.figure_autoshow = False
    off = SandboxKernel(config=c)
    try:
        r = off.run(code)
        assert r.status == "ok" and r.displays == [], r
        assert len(off.run("plt.figure(); plt.plot([0]); plt.show()").displays) == 1
    finally:
        off.shutdown()


# -- bounded answers -------------------------------------------------------------------------------

def test_long_stdout_keeps_head_and_tail_and_the_whole_is_readable(broker, session):
    r = broker.run(session, "for i in range(20000):\n    print(f'row {i:05d}')")
    assert r["status"] == "success", r
    within_budget(r)
    md = r["markdown"]
    total = sum(len(f"row {i:05d}\n") for i in range(20000))
    assert "row 00000" in md and "row 19999" in md and "row 10000" not in md
    m = re.search(r"\[… ([\d,]+) characters, ([\d,]+) lines not shown …\]", md)
    assert m, md[:500]
    t = r["truncated"]["stdout"]
    assert t["chars"] == total and t["cut_in_markdown"] == int(m.group(1).replace(",", ""))
    # Head, tail and the cut add up: nothing is lost in the count.
    (block,) = re.findall(r"```text\n(.*?)\n```", md, re.S)
    shown_lines = [ln for ln in block.splitlines() if ln.startswith("row ")]
    assert len(shown_lines) + int(m.group(2).replace(",", "")) == 20000
    # The notice says where the whole is, and it is there.
    path = t["file"]
    assert path.startswith("/mnt/data/outputs/") and path in r["notice"] and path in md
    got = broker.tool(session, "ReadSessionFile", {"path": path, "offset": total - 10, "maxBytes": 10})
    assert got["content"] == "row 19999\n" and got["size"] == total
    found = broker.tool(session, "SearchSessionFiles", {"pattern": "^row 12345$", "path": "outputs"})
    assert found["count"] == 1 and found["matches"][0]["path"] == path
    # The structured field holds head and tail too, within the JSON budget.
    assert r["stdout"].startswith("row 00000\n") and r["stdout"].endswith("row 19999\n")
    assert r["outputs"][0]["full"] == path


def test_shell_output_and_json_budget(broker, session):
    r = broker.shell(session, "seq 1 100000")
    assert r["status"] == "success", r
    within_budget(r)
    assert "\n1\n" in "\n" + r["markdown"] and "100000" in r["markdown"]
    t = r["truncated"]["stdout"]
    with open(f"{broker.data_dir(session)}/{t['file'][len('/mnt/data/'):]}") as fh:
        assert fh.read() == "".join(f"{i}\n" for i in range(1, 100001))
    # Python: huge stdout, stderr and a traceback at once stay within both budgets.
    r = broker.run(session, "import sys\nprint('x' * 200000)\nsys.stderr.write('y\\n' * 100000)\n"
                            "def f(n): return f(n + 1)\nf(0)")
    assert r["status"] == "error" and r["error"]["ename"] == "RecursionError", r["error"]["ename"]
    within_budget(r)
    assert {"stdout", "stderr"} <= set(r["truncated"]) and r["truncated"]["stderr"]["chars"] == 200000
    assert "RecursionError" in r["markdown"]


def test_a_thousand_new_files_are_summarised_with_exact_counts(broker, session):
    r = broker.run(session, """
import os
for d in ('parts/a', 'parts/b', 'logs'):
    os.makedirs(f'/mnt/data/{d}', exist_ok=True)
for i in range(1000):
    folder = ('parts/a', 'parts/b', 'logs')[i % 3]
    with open(f'/mnt/data/{folder}/f{i:04d}.txt', 'w') as fh:
        fh.write('x' * i)
print('done')
""")
    assert r["status"] == "success", r
    within_budget(r)
    assert r["file_count"] == 1000
    t = r["truncated"]["files"]
    assert t["count"] == 1000 and t["bytes"] == sum(range(1000))
    by_folder = {f["path"]: f["count"] for f in t["folders"]}
    assert by_folder == {"/mnt/data/parts/a": 334, "/mnt/data/parts/b": 333, "/mnt/data/logs": 333}, by_folder
    assert sum(by_folder.values()) == 1000
    md = r["markdown"]
    assert "1,000 files" in md and "334 files" in md and "ListSessionFiles" in md
    links = md_links(md)
    assert 0 < len(links) <= 12 and len(r["files"]) == len(links)
    assert fetch(links[0][1]).status_code == 200
    # ListSessionFiles: a summary with exact counts too.
    listed = broker.tool(session, "ListSessionFiles", {})
    within_budget(listed)
    assert listed["count"] >= 1000 and listed["truncated"]["files"]["count"] == listed["count"]
    assert len(listed["files"]) == 100
    one = broker.tool(session, "ListSessionFiles", {"path": "logs"})
    assert one["count"] == 333
    within_budget(one)


def test_many_images_past_the_count_are_listed(broker, session):
    r = broker.run(session, """
import matplotlib.pyplot as plt
for i in range(12):
    plt.figure(figsize=(1, 1)); plt.plot([0, i]); plt.show()
""")
    assert r["status"] == "success", r
    within_budget(r)
    assert r["image_count"] == 12
    assert len(md_images(r["markdown"])) == 8
    assert r["truncated"]["images"] == {"count": 12, "inlined": 8, "listed": 12}
    not_inlined = [u for _t, u in md_links(r["markdown"])]
    assert len(not_inlined) == 4 and all(fetch(u).content.startswith(b"\x89PNG") for u in not_inlined)


def test_read_and_search_within_the_budget(broker, session):
    text = "".join(f"line {i:06d} {'abc' if i % 7 == 0 else 'xyz'}\n" for i in range(40000))
    broker.tool(session, "UploadFileToSession", {"path": "big.txt", "content": base64.b64encode(text.encode()).decode()})
    # Reading on with next_offset gives back the file exactly.
    got, offset, n = "", 0, 0
    while offset is not None and n < 40:
        r = broker.tool(session, "ReadSessionFile", {"path": "big.txt", "offset": offset, "maxBytes": 100_000})
        within_budget(r)
        got += r["content"]
        offset, n = r["next_offset"], n + 1
        if offset is not None:
            assert r["truncated"] is True and f'"offset": {offset}' in r["markdown"]
    assert got == text[:len(got)] and len(got) > 40_000
    # Binary: base64 within the JSON budget.
    blob = bytes(range(256)) * 1024
    broker.tool(session, "UploadFileToSession", {"path": "blob.bin", "content": base64.b64encode(blob).decode()})
    r = broker.tool(session, "ReadSessionFile", {"path": "blob.bin", "maxBytes": len(blob)})
    within_budget(r)
    part = base64.b64decode(r["content"])
    assert blob.startswith(part) and r["next_offset"] == len(part)
    # Search: a thousand matches, the count exact, the answer within budget.
    r = broker.tool(session, "SearchSessionFiles", {"pattern": "abc", "path": "", "glob": "big.txt",
                                                    "maxResults": 1000})
    within_budget(r)
    assert r["count"] == 1000 and r["truncated"] is True and 0 < r["listed"] < 1000
    assert "Showing" in r["markdown"] and "of 1,000 matches" in r["markdown"]
