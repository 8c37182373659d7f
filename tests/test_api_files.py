"""The file endpoints and file tools over real HTTP against a real broker:
uploads (base64 tool, raw PUT, multipart POST), downloads, deletes, and the
refusal of everything planted in /mnt/data that leads elsewhere (symbolic
links to host files or to another session's folder, FIFOs, ``../`` paths).

Every request carries a timeout, so a FIFO that made the broker block would
fail the test instead of hanging it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time

import pytest
import requests

from tests.broker_server import TIMEOUT

FAST = 15  # seconds: a refusal must come back at once, never block on a FIFO


def files_url(sid, path=""):
    return f"/api/sessions/{sid}/files" + (f"/{path}" if path else "")


# -- uploads and downloads -------------------------------------------------------------------

def test_upload_tool_base64_then_read_everywhere(broker, session):
    data = bytes(range(256)) * 40
    r = broker.tool(session, "UploadFileToSession", {"path": "/mnt/data/in/blob.bin",
                                                     "content": base64.b64encode(data).decode()})
    assert r["status"] == "success", r
    assert r["path"] == "/mnt/data/in/blob.bin" and r["size"] == len(data)
    assert r["sha256"] == hashlib.sha256(data).hexdigest()
    assert "blob.bin" in r["markdown"] and r["url"] in r["markdown"]
    # The link in the result downloads it without a token.
    assert requests.get(r["url"], timeout=TIMEOUT).content == data
    # The kernel sees it.
    out = broker.run(session, "import hashlib\nprint(hashlib.sha256(open('/mnt/data/in/blob.bin','rb').read()).hexdigest())")
    assert out["stdout"].strip() == hashlib.sha256(data).hexdigest()
    # ReadSessionFile returns binary as base64, text as text.
    got = broker.tool(session, "ReadSessionFile", {"path": "in/blob.bin"})
    assert got["encoding"] == "base64" and base64.b64decode(got["content"]) == data
    got = broker.tool(session, "ReadSessionFile", {"path": "in/blob.bin", "offset": 256 + 250, "maxBytes": 10})
    assert got["encoding"] == "base64" and got["truncated"] is True
    assert base64.b64decode(got["content"]) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
    broker.put(files_url(session, "in/text.txt"), data="naïve\n".encode())
    got = broker.tool(session, "ReadSessionFile", {"path": "in/text.txt"})
    assert got["encoding"] == "utf-8" and got["content"] == "naïve\n" and got["truncated"] is False
    assert "naïve" in got["markdown"]
    # overwrite=false refuses to replace it.
    r = broker.tool_response(session, "UploadFileToSession", {"path": "in/blob.bin", "content": "AA==",
                                                              "overwrite": False})
    assert r.status_code == 400 and "already exists" in r.json()["message"]


@pytest.mark.parametrize("content", ["not base64!!", "QUJ", "QUJD$", "QUJDRA=\n=="])
def test_upload_tool_bad_base64(broker, session, content):
    r = broker.tool_response(session, "UploadFileToSession", {"path": "bad.bin", "content": content})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["field"] == "content" and "base64" in body["message"]
    assert not os.path.exists(os.path.join(broker.data_dir(session), "bad.bin"))


def test_put_get_delete_raw(broker, session):
    data = "héllo wörld\n".encode() * 1000
    r = broker.put(files_url(session, "docs/notes.txt"), data=data)
    assert r.status_code == 201, r.text
    assert r.json() == {"path": "/mnt/data/docs/notes.txt", "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()}
    # Both spellings of the Authorization header.
    for scheme in ("Bearer", "token"):
        got = broker.get(files_url(session, "docs/notes.txt"), owner=None,
                         headers=broker.headers("alice", scheme))
        assert got.status_code == 200 and got.content == data
        assert got.headers["Content-Type"].startswith("text/plain")
        assert 'filename="notes.txt"' in got.headers["Content-Disposition"]
    # The sandbox owns what the broker wrote.
    st = os.stat(os.path.join(broker.data_dir(session), "docs", "notes.txt"))
    assert (st.st_uid, st.st_gid) == (os.stat(broker.data_dir(session)).st_uid,
                                      os.stat(broker.data_dir(session)).st_gid)
    assert broker.run(session, "open('/mnt/data/docs/notes.txt', 'a').write('more')")["status"] == "success"
    # Overwrite in place.
    assert broker.put(files_url(session, "docs/notes.txt"), data=b"v2").status_code == 201
    assert broker.get(files_url(session, "docs/notes.txt")).content == b"v2"
    r = broker.delete(files_url(session, "docs/notes.txt"))
    assert r.status_code == 204 and r.content == b""
    assert broker.get(files_url(session, "docs/notes.txt")).status_code == 404
    assert broker.delete(files_url(session, "docs/notes.txt")).status_code == 404
    # A folder is deleted with what is in it.
    broker.put(files_url(session, "tree/a/b.txt"), data=b"b")
    assert broker.delete(files_url(session, "tree")).status_code == 204
    assert not os.path.exists(os.path.join(broker.data_dir(session), "tree"))


def test_multipart_upload(broker, session):
    r = broker.post(files_url(session), files={"file": ("report.csv", b"a,b\n1,2\n", "text/csv")})
    assert r.status_code == 201, r.text
    assert r.json()["path"] == "/mnt/data/report.csv" and r.json()["size"] == 8
    r = broker.post(files_url(session), files={"file": ("ignored.csv", b"x\n")}, data={"path": "sub/named.csv"})
    assert r.status_code == 201 and r.json()["path"] == "/mnt/data/sub/named.csv", r.text
    r = broker.post(files_url(session), files={"file": ("into.txt", b"y")}, data={"path": "folder/"})
    assert r.status_code == 201 and r.json()["path"] == "/mnt/data/folder/into.txt", r.text
    r = broker.post(files_url(session), files=[("file", ("one.txt", b"1")), ("file", ("two.txt", b"22"))])
    assert r.status_code == 201, r.text
    assert sorted(x["path"] for x in r.json()) == ["/mnt/data/one.txt", "/mnt/data/two.txt"]
    # A file name that climbs is reduced to its last part, inside /mnt/data.
    r = broker.post(files_url(session), files={"file": ("../../../climb.txt", b"z")})
    assert r.status_code == 201 and r.json()["path"] == "/mnt/data/climb.txt", r.text
    r = broker.post(files_url(session), data={"path": "x.txt"})
    assert r.status_code == 400 and r.json()["field"] == "file"
    listing = {f["path"]: f for f in broker.get(files_url(session)).json()}
    assert {"report.csv", "sub/named.csv", "folder/into.txt", "one.txt", "two.txt", "climb.txt"} <= set(listing)
    # Every listed file carries a working signed link.
    assert requests.get(listing["two.txt"]["url"], timeout=TIMEOUT).content == b"22"
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(broker.data_dir(session))), "climb.txt"))


def test_get_session_file_link_and_search(broker, session):
    broker.put(files_url(session, "logs/app.log"), data=b"INFO ok\nERROR disk full\nWARN slow\nerror lower\n")
    broker.put(files_url(session, "logs/other.txt"), data=b"ERROR elsewhere\n")
    r = broker.tool(session, "GetSessionFile", {"path": "/mnt/data/logs/app.log", "saveAsFilename": "today.log"})
    assert r["name"] == "today.log" and r["size"] == 46
    got = requests.get(r["url"], timeout=TIMEOUT)
    assert got.status_code == 200 and got.content.startswith(b"INFO ok")
    assert 'filename="today.log"' in got.headers["Content-Disposition"]
    assert f"[today.log]({r['url']})" in r["markdown"]
    r = broker.tool(session, "SearchSessionFiles", {"pattern": "ERROR|WARN", "glob": "*.log"})
    assert [(m["path"], m["line"]) for m in r["matches"]] == [("/mnt/data/logs/app.log", 2),
                                                              ("/mnt/data/logs/app.log", 3)]
    r = broker.tool(session, "SearchSessionFiles", {"pattern": "error", "ignoreCase": True, "maxResults": 2})
    assert r["count"] == 2 and r["truncated"] is True
    r = broker.tool_response(session, "SearchSessionFiles", {"pattern": "("})
    assert r.status_code == 400 and "regular expression" in r.json()["message"]
    r = broker.tool_response(session, "GetSessionFile", {"path": "logs/missing.log"})
    assert r.status_code == 404 and "missing.log" in r.json()["message"]


# -- what the sandbox plants ------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(broker):
    """Session A plants links and a FIFO in its /mnt/data; session B (same
    owner) holds a secret file A's links point at."""
    a = broker.create_session("alice")
    b = broker.create_session("alice")
    r = broker.put(files_url(b, "secret.txt"), data=b"B-SECRET-CONTENT\n")
    assert r.status_code == 201
    b_secret = os.path.join(broker.data_dir(b), "secret.txt")
    b_dir = broker.data_dir(b)
    # Relative from A's data folder on the host: <root>/<A>/data -> <root>/<B>/data
    rel_to_b = f"../../{b}/data"
    code = f"""
import os
os.chdir('/mnt/data')
os.symlink('/etc/passwd', 'leak')
os.symlink('/etc', 'etcdir')
os.symlink({b_secret!r}, 'b_secret_abs')
os.symlink({rel_to_b + '/secret.txt'!r}, 'b_secret_rel')
os.symlink({b_dir!r}, 'b_dir_abs')
os.symlink({rel_to_b!r}, 'b_dir_rel')
os.symlink('/mnt/data/../../etc/passwd', 'dotdot_abs')
os.mkfifo('fifo')
open('regular.txt', 'w').write('regular content')
print(sorted(os.listdir()))
"""
    r = broker.run(a, code)
    assert r["status"] == "success", r
    yield {"a": a, "b": b}
    broker.delete_session(a)
    broker.delete_session(b)


LINKS = ["leak", "etcdir/passwd", "b_secret_abs", "b_secret_rel", "b_dir_abs/secret.txt", "b_dir_rel/secret.txt",
         "dotdot_abs"]
SPECIAL = LINKS + ["fifo"]
FORBIDDEN_CONTENT = [b"root:", b"B-SECRET-CONTENT"]


def assert_refused(r: requests.Response, allowed=(400, 404)):
    assert r.status_code in allowed, (r.status_code, r.text[:500])
    for bad in FORBIDDEN_CONTENT:
        assert bad not in r.content, r.content[:500]
    if r.status_code != 404:
        assert r.json()["reason"] in ("invalid_path", "not_a_regular_file", "invalid_argument"), r.text


def host_unchanged(broker, planted):
    with open("/etc/passwd", "rb") as fh:
        assert fh.read().startswith(b"root:")
    with open(os.path.join(broker.data_dir(planted["b"]), "secret.txt"), "rb") as fh:
        assert fh.read() == b"B-SECRET-CONTENT\n"


@pytest.mark.parametrize("path", SPECIAL)
def test_download_refuses_links_and_fifo(broker, planted, path):
    t0 = time.monotonic()
    r = broker.get(files_url(planted["a"], path), timeout=FAST)
    assert_refused(r)
    if path in ("leak", "fifo", "b_secret_abs", "b_secret_rel", "dotdot_abs"):
        assert r.status_code == 400, r.text  # named for what it is, not "missing"
    assert time.monotonic() - t0 < FAST


@pytest.mark.parametrize("path", SPECIAL)
def test_put_refuses_links_and_fifo(broker, planted, path):
    before = os.lstat(os.path.join(broker.data_dir(planted["a"]), path.split("/")[0]))
    r = broker.put(files_url(planted["a"], path), data=b"overwritten", timeout=FAST)
    assert_refused(r)
    host_unchanged(broker, planted)
    after = os.lstat(os.path.join(broker.data_dir(planted["a"]), path.split("/")[0]))
    assert (before.st_mode, before.st_ino) == (after.st_mode, after.st_ino), "the planted entry was replaced"


@pytest.mark.parametrize("path", SPECIAL)
def test_delete_refuses_links_and_fifo(broker, planted, path):
    r = broker.delete(files_url(planted["a"], path), timeout=FAST)
    assert_refused(r)
    host_unchanged(broker, planted)
    assert os.path.lexists(os.path.join(broker.data_dir(planted["a"]), path.split("/")[0]))


@pytest.mark.parametrize("path", ["leak", "b_secret_rel", "fifo", "etcdir/passwd", "b_dir_rel/secret.txt"])
def test_multipart_refuses_links_and_fifo(broker, planted, path):
    r = broker.post(files_url(planted["a"]), files={"file": ("x.txt", b"overwritten")}, data={"path": path},
                    timeout=FAST)
    assert_refused(r)
    host_unchanged(broker, planted)


@pytest.mark.parametrize("path", SPECIAL)
def test_file_tools_refuse_links_and_fifo(broker, planted, path):
    a = planted["a"]
    for tool, body in (("ReadSessionFile", {"path": path}),
                       ("GetSessionFile", {"path": path}),
                       ("UploadFileToSession", {"path": path, "content": base64.b64encode(b"overwritten").decode()})):
        r = broker.tool_response(a, tool, body, timeout=FAST)
        assert_refused(r)
    host_unchanged(broker, planted)


def test_search_and_list_do_not_follow(broker, planted):
    a = planted["a"]
    r = broker.tool(a, "SearchSessionFiles", {"pattern": "root:|B-SECRET|regular"}, timeout=FAST)
    assert [m["path"] for m in r["matches"]] == ["/mnt/data/regular.txt"], r
    for folder in ("etcdir", "b_dir_abs", "b_dir_rel"):
        r = broker.tool_response(a, "SearchSessionFiles", {"pattern": ".", "path": folder}, timeout=FAST)
        assert_refused(r)
        r = broker.tool_response(a, "ListSessionFiles", {"path": folder}, timeout=FAST)
        assert_refused(r)
    listed = [f["path"] for f in broker.tool(a, "ListSessionFiles", {}, timeout=FAST)["files"]]
    assert listed == ["/mnt/data/regular.txt"], listed
    listed = [f["path"] for f in broker.get(files_url(a), timeout=FAST).json()]
    assert listed == ["regular.txt"]
    # The regular file next to them is served as usual.
    assert broker.get(files_url(a, "regular.txt"), timeout=FAST).content == b"regular content"


def test_signed_link_to_a_file_swapped_for_a_link(broker, planted):
    a = planted["a"]
    r = broker.run(a, "open('/mnt/data/swap.txt', 'w').write('before')")
    (entry,) = r["files"]
    assert requests.get(entry["url"], timeout=FAST).content == b"before"
    r = broker.run(a, "import os\nos.remove('/mnt/data/swap.txt')\nos.symlink('/etc/passwd', '/mnt/data/swap.txt')")
    assert r["status"] == "success", r
    assert_refused(requests.get(entry["url"], timeout=FAST))
    r = broker.run(a, "import os\nos.remove('/mnt/data/swap.txt')\nos.mkfifo('/mnt/data/swap.txt')")
    assert r["status"] == "success", r
    assert_refused(requests.get(entry["url"], timeout=FAST))


DOTDOT = ["%2E%2E/meta.json", "..%2Fmeta.json", "sub/%2E%2E/%2E%2E/meta.json", "%2e%2e/%2e%2e/etc/passwd",
          "..%2F..%2F..%2F..%2Fetc%2Fpasswd"]


@pytest.mark.parametrize("path", DOTDOT)
def test_dotdot_paths_refused_by_every_endpoint(broker, planted, path):
    a = planted["a"]
    for method, kw in (("GET", {}), ("PUT", {"data": b"x"}), ("DELETE", {})):
        r = broker.request(method, files_url(a, path), timeout=FAST, **kw)
        assert r.status_code == 400, (method, path, r.status_code, r.text)
        assert "'..'" in r.json()["message"]
        assert b"owner" not in r.content and b"root:" not in r.content
    assert os.path.exists(os.path.join(os.path.dirname(broker.data_dir(a)), "meta.json"))


@pytest.mark.parametrize("path", ["../meta.json", "a/../../x.txt", "/mnt/data/../../etc/passwd", "/etc/passwd",
                                  "/mnt/data/../outside.txt"])
def test_dotdot_and_absolute_paths_refused_by_tools_and_multipart(broker, planted, path):
    a = planted["a"]
    r = broker.post(files_url(a), files={"file": ("x.txt", b"x")}, data={"path": path}, timeout=FAST)
    assert r.status_code == 400, r.text
    for tool, body in (("ReadSessionFile", {"path": path}),
                       ("GetSessionFile", {"path": path}),
                       ("UploadFileToSession", {"path": path, "content": "eA=="}),
                       ("SearchSessionFiles", {"pattern": ".", "path": path}),
                       ("ListSessionFiles", {"path": path}),
                       ("GeneratePdfReport", {"pythonCode": "1", "expectedOutputFilename": path,
                                              "saveAsFilename": "r.pdf"})):
        r = broker.tool_response(a, tool, body, timeout=FAST)
        assert r.status_code == 400, (tool, r.text)
        assert r.json().get("field") in ("path", "expectedOutputFilename") or "path" in r.json()["message"], r.text
        assert b"root:" not in r.content
    host = os.path.dirname(os.path.dirname(broker.data_dir(a)))
    assert not os.path.exists(os.path.join(host, "x.txt")) and not os.path.exists(os.path.join(host, "outside.txt"))


def test_broker_still_answers_after_fifo(broker, planted):
    """Nothing above left a handler blocked: the broker answers promptly."""
    t0 = time.monotonic()
    for _ in range(5):
        assert broker.get(files_url(planted["a"], "fifo"), timeout=FAST).status_code == 400
    assert broker.get("/api/sessions", timeout=FAST).status_code == 200
    assert time.monotonic() - t0 < FAST
