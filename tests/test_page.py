"""The web page at ``/`` in a real browser: Debian's chromium driven by
Playwright (``executable_path=/usr/bin/chromium``; no browser is downloaded),
against a real broker with real sandboxed kernels.

One broker and one browser for the module.  Screenshots go to the test run's
temporary folder (``<basetemp>/page-screenshots*/``) so a person can look at
them; their folder is printed in the log of each test.
"""

from __future__ import annotations

import base64
import json
import os
import re

import pytest
import requests
import websocket

from broker.web.page import WsTickets
from tests.broker_server import BrokerProcess

CHROMIUM = "/usr/bin/chromium"

if not os.path.exists(CHROMIUM):
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and we are not root to install it: the browser tests need Debian's "
                    "chromium (sudo apt-get install -y chromium, or run `make test` as root)",
                    allow_module_level=True)
    raise RuntimeError(f"{CHROMIUM} is missing: `make install` as root installs it (apt-get install chromium)")

from playwright.sync_api import expect, sync_playwright  # noqa: E402  (after the skip: only with chromium)

expect.set_options(timeout=30_000)   # a loaded machine: kernels and shells answer in seconds, not 5 s

PNG_1PX = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
CSP_MUST = ["default-src 'self'", "script-src 'self'", "object-src 'none'", "frame-ancestors 'none'",
            "base-uri 'none'"]


ADMIN_TOKEN = "tok-page-ops"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = BrokerProcess(str(tmp_path_factory.mktemp("page-broker")), "--SessionManager.pool_size=1")
    tokens = dict(b.tokens, **{ADMIN_TOKEN: {"owner": "ops", "admin": True}})   # the admin role (docs/admin.md)
    with open(b.tokens_file, "w") as fh:
        json.dump(tokens, fh)
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("page-screenshots")
    print(f"screenshots in {d}")
    return d


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, broker):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.errors = []                      # uncaught page errors and console errors (CSP violations among them)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    # (a refused token's 401 and the 404 of a missing /api/whoami are expected answers, not errors)
    pg.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
          and pg.errors.append(m.text))
    pg.on("dialog", lambda d: d.accept())
    pg.goto(broker.url + "/")
    yield pg
    ctx.close()


def take_blocked_script_errors(page) -> int:
    """Remove and count chromium's console errors for scripts it refused to run
    in a sandboxed srcdoc frame (an HTML output)."""
    blocked = [e for e in page.errors if "Blocked script execution in 'about:srcdoc'" in e]
    page.errors[:] = [e for e in page.errors if e not in blocked]
    return len(blocked)


def snap(page, shots, name):
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def sign_in(page, token):
    page.fill("#token", token)
    page.click("#signin-button")


def last_cell(page):
    # Pinned by index: running the last cell appends a new empty one.
    return page.locator("#cells .cell").nth(page.locator("#cells .cell").count() - 1)


def run_cell(page, code):
    """Type code into the last cell and run it; return that cell's locator."""
    cell = last_cell(page)
    cell.locator("textarea").fill(code)
    cell.locator("button.run").click()
    expect(cell).not_to_have_attribute("data-state", "running", timeout=60_000)
    expect(cell).to_have_attribute("data-state", re.compile("ok|error"))
    return cell


# -- headers (no browser) --------------------------------------------------------------------

def test_page_and_its_files_carry_the_security_headers(broker):
    for path, ctype in [("/", "text/html"), ("/static/js/main.js", "text/javascript"),
                        ("/static/js/render.js", "text/javascript"), ("/static/page.css", "text/css")]:
        r = requests.get(broker.url + path, headers={"Accept": "text/html,*/*;q=0.8"}, timeout=30)
        assert r.status_code == 200, (path, r.status_code)
        h = r.headers
        assert h["Content-Type"].startswith(ctype), (path, h["Content-Type"])
        csp = h["Content-Security-Policy"]
        for part in CSP_MUST:
            assert part in csp, (path, part, csp)
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
        assert h["X-Content-Type-Options"] == "nosniff"
        assert h["Referrer-Policy"] == "no-referrer"
        assert h["X-Frame-Options"] == "DENY"
        assert h["Cache-Control"] == "no-cache", (path, h.get("Cache-Control"))
    # static files revalidate: a second fetch with the ETag answers 304
    r = requests.get(broker.url + "/static/page.css", timeout=30)
    r2 = requests.get(broker.url + "/static/page.css", headers={"If-None-Match": r.headers["Etag"]}, timeout=30)
    assert r2.status_code == 304
    # only the page's own files: no traversal, no other kinds of file
    for bad in ["/static/../web/page.py", "/static/%2e%2e/web/page.py", "/static/js/nope.js", "/static/"]:
        r = requests.get(broker.url + bad, timeout=30)
        assert r.status_code in (403, 404), (bad, r.status_code)
        assert "import" not in r.text


def test_api_callers_still_get_the_json_description_at_root(broker):
    for accept in (None, "*/*", "application/json"):
        r = requests.get(broker.url + "/", headers={"Accept": accept} if accept else {}, timeout=30)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("application/json"), accept
        d = r.json()
        assert d["name"] == "broker" and d["openapi"] == "/api/openapi.json", d
        assert r.headers["Vary"] == "Accept"


def _ws(broker, sid, ticket=None, header=None):
    url = broker.url.replace("http", "ws", 1) + f"/api/kernels/{sid}/channels"
    if ticket:
        url += f"?ticket={ticket}"
    return websocket.create_connection(url, timeout=30, header=header or [])


def test_cant_open_the_kernel_socket_with_a_used_foreign_or_missing_ticket(broker):
    sid = broker.create_session("alice")
    other = broker.create_session("bob")
    try:
        t = broker.post(f"/api/sessions/{sid}/ws-ticket").json()
        assert t["expires_in"] <= 60 and t["url"] == f"/api/kernels/{sid}/channels"
        # bob cannot get a ticket for alice's session, nor use his own on it
        assert broker.post(f"/api/sessions/{sid}/ws-ticket", owner="bob").status_code == 404
        bob_t = broker.post(f"/api/sessions/{other}/ws-ticket", owner="bob").json()["ticket"]
        for ticket in (bob_t, "", "x" * 43, t["ticket"] + "x"):
            with pytest.raises(websocket.WebSocketBadStatusException) as e:
                _ws(broker, sid, ticket)
            assert e.value.status_code == 401, ticket
        # the real ticket opens it once
        ws = _ws(broker, sid, t["ticket"])
        ws.send(json.dumps({"header": {"msg_id": "k1", "msg_type": "kernel_info_request", "session": "s",
                                       "username": "", "version": "5.3"},
                            "parent_header": {}, "metadata": {}, "content": {}, "channel": "shell"}))
        while True:
            m = json.loads(ws.recv())
            if m["msg_type"] == "kernel_info_reply":
                break
        ws.close()
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            _ws(broker, sid, t["ticket"])
        assert e.value.status_code == 401
        # a ticket is never needed with the header, and the header still works
        ws = _ws(broker, sid, header=[f"Authorization: Bearer {broker.owners['alice']}"])
        ws.close()
        # tickets are not written to the broker's log (a URL's query string never is)
        log = open(broker.log_path, errors="replace").read()
        assert t["ticket"] not in log and bob_t not in log
    finally:
        broker.delete_session(sid)
        broker.delete_session(other, "bob")


def test_cant_use_an_expired_ticket():
    now = [1000.0]
    tickets = WsTickets(ttl=30, clock=lambda: now[0])
    t = tickets.issue("s1", "alice")
    now[0] += 31
    assert tickets.redeem(t, "s1") is None
    t = tickets.issue("s1", "alice")
    now[0] += 29
    assert tickets.redeem(t, "s2") is None          # bound to its session, and used up by the try
    assert tickets.redeem(t, "s1") is None
    t = tickets.issue("s1", "alice")
    assert tickets.redeem(t, "s1") == "alice"
    assert tickets.redeem(t, "s1") is None


# -- the page in chromium ---------------------------------------------------------------------

def test_sign_in_refuses_a_wrong_token_and_keeps_the_token_out_of_urls(page, broker, shots):
    sign_in(page, "not-a-token")
    expect(page.locator("#signin-error")).to_contain_text("refused")
    snap(page, shots, "01-signin-refused")
    sign_in(page, broker.owners["alice"])
    expect(page.locator("#app")).to_be_visible()
    assert broker.owners["alice"] not in page.url
    assert page.evaluate("sessionStorage.getItem('broker.token')") == broker.owners["alice"]
    assert page.evaluate("localStorage.length") == 0
    assert page.evaluate("document.cookie") == ""
    snap(page, shots, "02-signed-in")


def test_cant_send_the_token_anywhere_by_form_without_script(browser, broker):
    ctx = browser.new_context(java_script_enabled=False)
    try:
        pg = ctx.new_page()
        sent = []
        pg.on("request", lambda r: sent.append((r.url, r.post_data or "")))
        pg.goto(broker.url + "/")
        pg.fill("#token", "tok-secret-typed")
        pg.click("#signin-button", no_wait_after=True)   # the blocked submission is a navigation that never ends
        pg.wait_for_timeout(1000)
        assert not [u for u, body in sent if "tok-secret-typed" in u + body], sent
        assert "tok-secret-typed" not in pg.url
    finally:
        ctx.close()


def test_notebook_streams_output_images_errors_and_counts(page, broker, shots):
    page.click("#new-session")
    expect(page.locator("#kernel-status")).to_have_text("idle")
    sid = page.locator("#session").get_attribute("data-id")
    assert sid in broker.get("/api/sessions").text
    # streaming: the first line shows before the cell finishes
    cell = last_cell(page)
    cell.locator("textarea").fill("import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')")
    cell.locator("button.run").click()
    expect(cell.locator(".outputs")).to_contain_text("first", timeout=30_000)
    assert "second" not in cell.locator(".outputs").inner_text()
    assert cell.get_attribute("data-state") == "running"
    expect(cell).to_have_attribute("data-state", "ok", timeout=60_000)
    expect(cell.locator(".outputs")).to_contain_text("second")
    expect(cell.locator(".prompt")).to_have_text("In [1]:")

    cell = run_cell(page, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('page chart')\nplt.show()")
    img = cell.locator("img.image-output")
    expect(img).to_be_visible()
    assert img.evaluate("i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100")
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    expect(cell.locator(".prompt")).to_have_text("In [2]:")

    cell = run_cell(page, "1 / 0")
    err = cell.locator("pre.error")
    expect(err).to_contain_text("ZeroDivisionError")
    assert "\x1b" not in err.inner_text() and "[0;31m" not in err.inner_text()
    assert cell.get_attribute("data-state") == "error"
    expect(cell.locator(".prompt")).to_have_text("In [3]:")
    snap(page, shots, "03-notebook")
    assert not page.errors, page.errors


def test_cant_run_script_from_an_html_output_in_the_page(page, broker, shots):
    title = page.title()
    cell = run_cell(page, "from IPython.display import HTML, display\n"
                          "display(HTML('<b id=\"boldly\">bold output</b>"
                          "<script>window.top.pwned = 1; top.document.title = \"pwned\"; "
                          "document.body.dataset.ran = \"yes\";</script>"
                          "<img src=x onerror=\"window.top.pwned = 2\">'))\n"
                          "print('after html')")
    frame_el = cell.locator("iframe.html-output")
    expect(frame_el).to_be_visible()
    assert frame_el.get_attribute("sandbox") == ""
    frame = frame_el.element_handle().content_frame()
    frame.wait_for_load_state()
    assert frame.locator("#boldly").inner_text() == "bold output"
    assert frame.locator("body").get_attribute("data-ran") is None      # not even inside the frame
    page.wait_for_timeout(500)
    assert page.evaluate("window.pwned") is None
    assert page.title() == title
    assert take_blocked_script_errors(page), page.errors   # chromium says why
    expect(cell.locator(".outputs")).to_contain_text("after html")
    # and the page still works afterwards
    cell = run_cell(page, "print(6 * 7)")
    expect(cell.locator(".outputs")).to_have_text("42")
    snap(page, shots, "04-html-sandboxed")


def test_interrupt_stops_a_running_cell(page):
    cell = last_cell(page)
    cell.locator("textarea").fill("import time\nprint('sleeping', flush=True)\ntime.sleep(120)")
    cell.locator("button.run").click()
    expect(cell.locator(".outputs")).to_contain_text("sleeping", timeout=30_000)
    page.click("#interrupt")
    expect(cell).to_have_attribute("data-state", "error", timeout=30_000)
    expect(cell.locator("pre.error")).to_contain_text("KeyboardInterrupt")
    cell = run_cell(page, "print('still here')")
    expect(cell.locator(".outputs")).to_have_text("still here")


def test_shell_command(page, shots):
    # Activated from the keyboard: after the long notebook tests a mouse click
    # on the tab was sometimes lost (the cells above were still re-laying out);
    # a tab a user reaches with Tab and Enter must work too.
    page.focus("[data-tab=shell]")
    page.keyboard.press("Enter")
    expect(page.locator("#shell-command")).to_be_visible()
    page.fill("#shell-command", "echo hello from bash; ls /mnt/data | wc -l; exit 3")
    page.click("#shell-run")
    run = page.locator(".shell-run").first
    expect(run.locator(".exit")).to_have_text(re.compile("status 3|exit 3"))
    expect(run).to_contain_text("hello from bash")
    snap(page, shots, "05-shell")


def test_files_upload_by_input_and_drop_then_download_and_delete(page, broker, shots, tmp_path):
    sid = page.locator("#session").get_attribute("data-id")
    page.click("[data-tab=files]")
    payload = bytes(range(256)) * 40 + b"end"
    src = tmp_path / "bytes.bin"
    src.write_bytes(payload)
    page.set_input_files("#file-input", str(src))
    row = page.locator("#files tr[data-path='bytes.bin']")
    expect(row).to_be_visible()
    # drag and drop: a real drop event carrying a File, on the drop zone
    dt = page.evaluate_handle("""b64 => { const dt = new DataTransfer();
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'})); return dt; }""",
                              base64.b64encode(PNG_1PX).decode())
    page.dispatch_event("#dropzone", "dragover", {"dataTransfer": dt})
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dt})
    expect(page.locator("#files tr[data-path='dropped.png']")).to_be_visible()
    expect(page.locator("#files-message")).to_contain_text("Uploaded dropped.png")
    with open(broker.data_dir(sid) + "/dropped.png", "rb") as fh:
        assert fh.read() == PNG_1PX
    snap(page, shots, "06-files")

    with page.expect_download() as dl:
        row.locator("button.download").click()
    d = dl.value
    assert d.suggested_filename == "bytes.bin"
    assert open(d.path(), "rb").read() == payload

    page.locator("#files tr[data-path='dropped.png'] button.delete").click()
    expect(page.locator("#files tr[data-path='dropped.png']")).to_have_count(0)
    assert not os.path.exists(broker.data_dir(sid) + "/dropped.png")


def test_transcript_shows_page_and_agent_calls_and_downloads_ipynb(page, broker, shots):
    sid = page.locator("#session").get_attribute("data-id")
    r = broker.run(sid, "print('from an agent over REST')")
    assert r["status"] == "success", r
    page.click("[data-tab=transcript]")
    box = page.locator("#transcript")
    expect(box).to_contain_text("from an agent over REST")
    expect(box).to_contain_text("ExecutePythonCode")
    expect(box).to_contain_text("print(6 * 7)")          # a cell run from the page's notebook
    expect(box.locator("img.image-output").first).to_be_visible()
    frame = box.locator("iframe.html-output")           # the HTML output, sandboxed here too
    expect(frame).to_have_count(1)
    assert frame.get_attribute("sandbox") == ""
    frame.element_handle().content_frame().wait_for_load_state()
    page.wait_for_timeout(300)
    assert take_blocked_script_errors(page)
    assert page.evaluate("window.pwned") is None
    snap(page, shots, "07-transcript")
    with page.expect_download() as dl:
        page.click("#transcript-download")
    d = dl.value
    assert d.suggested_filename == f"session-{sid}.ipynb"
    nb = json.loads(open(d.path(), "rb").read())
    assert nb["nbformat"] == 4
    assert any("from an agent over REST" in "".join(c["source"]) for c in nb["cells"])


def test_admin_panel_hidden_for_non_admins_and_session_delete(page, broker, shots):
    assert page.locator("#admin").is_hidden()
    sid = page.locator("#session").get_attribute("data-id")
    page.click("#delete-session")
    expect(page.locator("#session")).to_be_hidden()
    expect(page.locator(f"#sessions li[data-id='{sid}']")).to_have_count(0)
    assert broker.get(f"/api/sessions/{sid}").status_code == 404
    # sign out forgets the token
    page.click("#signout")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('broker.token')") is None
    assert not page.errors, page.errors


def test_admin_sees_and_ends_every_owners_sessions(page, broker, shots):
    bobs = broker.create_session("bob")
    sign_in(page, ADMIN_TOKEN)
    expect(page.locator("#whoami")).to_have_text("ops (admin)")
    expect(page.locator("#admin")).to_be_visible()
    row = page.locator(f"#admin-table tr[data-id='{bobs}']")
    expect(row).to_contain_text("bob")
    # the admin's own session, with a chart, next to the operator's view (the screenshot in docs/page.md)
    page.click("#new-session")
    expect(page.locator("#kernel-status")).to_have_text("idle")
    cell = run_cell(page, "import matplotlib.pyplot as plt\nimport numpy as np\nx = np.linspace(0, 6, 200)\n"
                          "print('mean of sin(x):', np.sin(x).mean().round(3))\n"
                          "plt.figure(figsize=(6, 3)); plt.plot(x, np.sin(x)); plt.title('sin(x)'); plt.show()")
    expect(cell.locator("img.image-output")).to_be_visible()
    page.click("#admin-refresh")
    expect(page.locator("#admin-table tbody tr")).to_have_count(2)
    snap(page, shots, "08-admin")
    row.locator("button.end").click()
    expect(row).to_have_count(0)
    assert broker.get(f"/api/sessions/{bobs}", owner="bob").status_code == 404
    assert not page.errors, page.errors
