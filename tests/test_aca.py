"""The Azure Container Apps sessions API at /azure, against a real broker:
LangChain's SessionsPythonREPLTool unchanged, both API generations over
plain HTTP, tokens on every endpoint, identifiers per owner, validation,
and the identifier map surviving a restart."""

from __future__ import annotations

import base64
import io
import json
import os
import time
import uuid
import warnings

import pytest
import requests

from tests.broker_server import TIMEOUT, BrokerProcess

with warnings.catch_warnings():
    # The package announces its successor (langchain-azure-compute) on import;
    # the issue names this one, the one existing agents use.
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_azure_dynamic_sessions import SessionsPythonREPLTool

OLD = "2024-02-02-preview"
NEW = "2025-10-02-preview"
PNG = b"\x89PNG\r\n\x1a\n"


def ident(tag: str = "t") -> str:
    return f"{tag}-{uuid.uuid4()}"


def aca(broker, method, path, identifier=None, owner="alice", version=NEW, params=None, **kw):
    q = {"api-version": version}
    if identifier is not None:
        q["identifier"] = identifier
    q.update(params or {})
    return broker.request(method, f"/azure/{path}", owner=owner, params=q, **kw)


def run(broker, identifier, code, owner="alice", **kw):
    r = aca(broker, "POST", "executions", identifier, owner,
            json={"codeInputType": "Inline", "executionType": "Synchronous", "code": code, "timeoutInSeconds": 60},
            **kw)
    assert r.status_code == 200, r.text
    return r.json()


def call(tool, code):
    """Call the tool as an agent framework does; (content as JSON, artifact)."""
    msg = tool.invoke({"args": {"python_code": code}, "id": "call-1", "name": tool.name, "type": "tool_call"})
    return json.loads(msg.content), msg.artifact


def release(broker, identifier, owner="alice"):
    assert aca(broker, "DELETE", "session", identifier, owner).status_code == 204


def owned(broker, owner):
    return {s["id"] for s in broker.get("/api/sessions", owner=owner).json()}


# -- LangChain, unchanged -------------------------------------------------------------------

def test_langchain_repl_tool_runs_code_and_moves_files(broker):
    tool = SessionsPythonREPLTool(pool_management_endpoint=f"{broker.url}/azure",
                                  access_token_provider=lambda: broker.owners["alice"],
                                  session_id=ident("lc"))
    before = owned(broker, "alice")
    content, artifact = call(tool, "6 * 7")
    assert content == {"result": 42, "stdout": "", "stderr": ""}
    assert artifact["status"] == "Success"
    (sid,) = owned(broker, "alice") - before          # the unknown identifier started one session

    out = json.loads(tool.invoke("```python\nx = 21\nprint('x is', x)\n```"))
    assert out["stdout"] == "x is 21\n" and out["result"] == ""

    # A chart comes back as Azure's image result; LangChain drops the bytes
    # from the model's text and keeps them in the artifact.
    content, artifact = call(tool, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert content["result"] == {"type": "image", "format": "png"}
    assert artifact["result"]["type"] == "image"
    assert base64.b64decode(artifact["result"]["base64_data"]).startswith(PNG)

    meta = tool.upload_file(data=io.BytesIO(b"a,b\n1,2\n3,4\n"), remote_file_path="input.csv")
    assert (meta.filename, meta.size_in_bytes, meta.full_path) == ("input.csv", 12, "/mnt/data/input.csv")
    assert os.path.getsize(os.path.join(broker.data_dir(sid), "input.csv")) == 12
    out = json.loads(tool.invoke("import pandas as pd\ndf = pd.read_csv('/mnt/data/input.csv')\n"
                                 "df.to_csv('/mnt/data/doubled.csv', index=False)\nint(df['b'].sum())"))
    assert out["result"] == 6, out

    names = {f.filename: f.size_in_bytes for f in tool.list_files()}
    assert names["input.csv"] == 12 and "doubled.csv" in names
    assert tool.download_file(remote_file_path="doubled.csv").read() == b"a,b\n1,2\n3,4\n"

    content, artifact = call(tool, "1 / 0")
    assert artifact["status"] == "Failure"
    assert "ZeroDivisionError" in content["stderr"]
    assert json.loads(tool.invoke("x"))["result"] == 21      # the session lives on after an error

    tool.close()                                       # DELETE session, from a thread in LangChain
    deadline = time.monotonic() + 30
    while sid in owned(broker, "alice") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sid not in owned(broker, "alice")


def test_result_values_as_the_service_parses_them(broker):
    i = ident()
    try:
        for code, value in [("True", True), ("3.5", 3.5), ("'abc'", "abc"), ("[1, 2]", "[1, 2]"),
                            ("print('hi')", ""), ("float('nan')", "nan")]:
            r = aca(broker, "POST", "code/execute", i, version=OLD, json={"properties": {
                "codeInputType": "inline", "executionType": "synchronous", "code": code}})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["$id"] == "1" and set(body["properties"]) == {
                "$id", "status", "stdout", "stderr", "result", "executionTimeInMilliseconds"}
            assert body["properties"]["result"] == value, (code, body)
    finally:
        release(broker, i)


# -- 2025-10-02-preview, by hand -------------------------------------------------------------

def test_resources_generation_round_trip(broker):
    i = ident("new")
    r = run(broker, i, "import os\nos.makedirs('/mnt/data/sub', exist_ok=True)\n"
                       "open('/mnt/data/sub/deep.txt', 'w').write('deep')\nprint(7 * 9)")
    assert r["status"] == "Succeeded" and r["identifier"] == i and r["executionType"] == "Synchronous"
    assert r["result"]["stdout"] == "63\n" and r["result"]["executionResult"] == ""
    assert isinstance(r["result"]["executionTimeInMilliseconds"], int) and r["id"]

    up = aca(broker, "POST", "files", i, params={"path": "/mnt/data"},
             files={"file": ("notes.txt", b"hello azure", "application/octet-stream")})
    assert up.status_code == 200, up.text
    assert up.json()["name"] == "notes.txt" and up.json()["sizeInBytes"] == 11 and up.json()["type"] == "file"

    listing = aca(broker, "GET", "files", i).json()["value"]
    top = {e["name"]: e for e in listing}
    assert top["notes.txt"]["sizeInBytes"] == 11 and top["notes.txt"]["contentType"].startswith("text/plain")
    assert top["sub"]["type"] == "directory" and "deep.txt" not in top       # not recursive by default
    deep = aca(broker, "GET", "files", i, params={"recursive": "true"}).json()["value"]
    assert {"name": "deep.txt", "directory": "sub"}.items() <= next(e for e in deep if e["name"] == "deep.txt").items()

    meta = aca(broker, "GET", "files/notes.txt", i)
    assert meta.status_code == 200 and meta.json()["sizeInBytes"] == 11 and meta.json()["lastModifiedAt"]
    content = aca(broker, "GET", "files/notes.txt/content", i)
    assert content.status_code == 200 and content.content == b"hello azure"
    assert aca(broker, "GET", "files/deep.txt/content", i, params={"path": "/mnt/data/sub"}).content == b"deep"
    assert run(broker, i, "open('/mnt/data/notes.txt').read()")["result"]["executionResult"] == "hello azure"

    assert aca(broker, "DELETE", "files/notes.txt", i).status_code == 204
    gone = aca(broker, "GET", "files/notes.txt/content", i)
    assert gone.status_code == 404 and gone.json()["error"]["code"] and gone.headers["x-ms-error-code"]

    failed = run(broker, i, "raise KeyError('nope')")
    assert failed["status"] == "Failed" and "KeyError" in failed["result"]["stderr"]
    assert failed["error"]["error"]["code"] == "KeyError"

    s = aca(broker, "GET", "session", i).json()
    assert s["identifier"] == i and {"createdAt", "lastAccessedAt", "expireAt", "etag"} <= set(s)
    release(broker, i)
    assert aca(broker, "GET", "session", i).status_code == 404


def test_timeout_fails_the_execution_and_the_session_goes_on(broker):
    i = ident("slow")
    try:
        r = aca(broker, "POST", "executions", i, json={"code": "x = 5\nimport time\ntime.sleep(30)",
                                                      "timeoutInSeconds": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "Failed" and body["error"]["error"]["code"] == "Timeout"
        assert "timeoutInSeconds=2" in body["result"]["stderr"]
        assert body["result"]["executionTimeInMilliseconds"] < 20_000
        assert run(broker, i, "x * 2")["result"]["executionResult"] == 10
    finally:
        release(broker, i)


def test_old_generation_file_endpoints(broker):
    i = ident("old")
    try:
        up = aca(broker, "POST", "files/upload", i, version=OLD,
                 files={"file": ("/mnt/data/report.txt", b"0123456789", "application/octet-stream")})
        assert up.status_code == 200, up.text
        props = up.json()["value"][0]["properties"]
        assert props["filename"] == "report.txt" and props["size"] == 10 and props["lastModifiedTime"].endswith("Z")
        listing = aca(broker, "GET", "files", i, version=OLD).json()
        assert [v["properties"]["filename"] for v in listing["value"]] == ["report.txt"]
        assert aca(broker, "GET", "files/content/report.txt", i, version=OLD).content == b"0123456789"
        assert aca(broker, "GET", "files/report.txt", i, version=OLD).json()["value"][0]["properties"]["size"] == 10
        # Semantic Kernel's uploads carry its JSON Content-Type over a multipart body.
        up = aca(broker, "POST", "files/upload", i, version=OLD, headers={"Content-Type": "application/json"},
                 data=b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"sk.txt\"\r\n"
                      b"Content-Type: application/octet-stream\r\n\r\nfrom sk\r\n--b0undary--\r\n")
        assert up.status_code == 200 and up.json()["value"][0]["properties"]["size"] == 7, up.text
        assert aca(broker, "GET", "files/content/sk.txt", i, version=OLD).content == b"from sk"
    finally:
        release(broker, i)


# -- tokens, owners, validation ---------------------------------------------------------------

ENDPOINTS = [("POST", "code/execute", OLD), ("POST", "executions", NEW), ("GET", "files", NEW),
             ("POST", "files", NEW), ("POST", "files/upload", OLD), ("GET", "files/content/a.txt", OLD),
             ("GET", "files/a.txt", NEW), ("GET", "files/a.txt/content", NEW), ("DELETE", "files/a.txt", NEW),
             ("GET", "session", NEW), ("DELETE", "session", NEW), ("GET", "metadata", NEW)]


@pytest.mark.parametrize("method,path,version", ENDPOINTS)
def test_cant_reach_any_endpoint_without_a_token(broker, method, path, version):
    i = ident("anon")
    before = owned(broker, "alice")
    body = {"properties": {"code": "print(1)"}} if path == "code/execute" else {"code": "print(1)"}
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic dG9rLWFsaWNl"}):
        r = requests.request(method, f"{broker.url}/azure/{path}", params={"api-version": version, "identifier": i},
                             headers=headers, json=body, timeout=TIMEOUT)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "Unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
    assert owned(broker, "alice") == before                  # nothing was started
    # and the broker still serves the owner with a token
    assert aca(broker, "GET", "session", i).status_code == 404


def test_cant_reach_another_owners_session_by_its_identifier(broker):
    i = ident("shared")
    alice_before, bob_before = owned(broker, "alice"), owned(broker, "bob")
    try:
        assert run(broker, i, "secret = 'alice only'\nopen('/mnt/data/alice.txt', 'w').write('mine')\n1")[
            "status"] == "Succeeded"
        (alice_sid,) = owned(broker, "alice") - alice_before
        # Bob uses the same identifier: he gets a session of his own.
        r = run(broker, i, "secret", owner="bob")
        assert r["status"] == "Failed" and "NameError" in r["result"]["stderr"]
        (bob_sid,) = owned(broker, "bob") - bob_before
        assert bob_sid != alice_sid
        assert aca(broker, "GET", "files", i, owner="bob").json()["value"] == []
        assert aca(broker, "GET", "files/alice.txt/content", i, owner="bob").status_code == 404
        assert aca(broker, "GET", "session", i, owner="bob").json()["etag"] == bob_sid
        # Bob releasing "his" identifier leaves Alice's session alone.
        release(broker, i, owner="bob")
        assert bob_sid not in owned(broker, "bob") and alice_sid in owned(broker, "alice")
        assert run(broker, i, "secret")["result"]["executionResult"] == "alice only"
        assert aca(broker, "GET", "files/alice.txt/content", i).content == b"mine"
    finally:
        release(broker, i)
    assert alice_sid not in owned(broker, "alice")


@pytest.mark.parametrize("identifier,why", [("abc", "characters"), ("x" * 129, "characters"),
                                            ("has space", "character"), ("tab\tbed", "character"),
                                            (None, "missing")])
def test_identifier_is_validated_as_azure_does(broker, identifier, why):
    r = aca(broker, "POST", "executions", identifier, json={"code": "1"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["target"] == "identifier" and why in err["message"] and "4 to 128" in err["message"]
    assert r.headers["x-ms-error-code"] == "InvalidArgument"


def test_identifier_edges_accepted(broker):
    for i in ("abcd", "x" * 128, "{[(a|b)]}-&^%$#;<>"):
        try:
            assert run(broker, i, "1")["status"] == "Succeeded"
        finally:
            release(broker, i)


def test_bad_requests_name_the_field(broker):
    i = ident("bad")
    cases = [
        ("POST", "executions", NEW, {"code": "1", "executionType": "Asynchronous"}, "executionType"),
        ("POST", "executions", NEW, {"code": "1", "timeoutInSeconds": 5000}, "timeoutInSeconds"),
        ("POST", "executions", NEW, {"code": "1", "codeInputType": "Pickle"}, "codeInputType"),
        ("POST", "executions", NEW, {"codeInputType": "Inline"}, "code"),
        ("POST", "code/execute", OLD, {"code": "1"}, "properties"),
        ("POST", "executions", "2023-01-01", {"code": "1"}, "api-version"),
    ]
    for method, path, version, body, field in cases:
        r = aca(broker, method, path, i, version=version, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["target"] == field, (body, r.text)
    r = aca(broker, "POST", "executions", i, json={"codeInputType": "InlineBase64", "executionType": "Synchronous",
                                                   "code": base64.b64encode(b"6 * 7").decode()})
    assert r.json()["result"]["executionResult"] == 42
    release(broker, i)
    assert aca(broker, "GET", "listSessions").status_code == 404


# -- persistence -------------------------------------------------------------------------------

def test_identifier_survives_a_broker_restart(tmp_path):
    with BrokerProcess(str(tmp_path / "b"), "--SessionManager.pool_size=0") as b:
        i = ident("keep")
        assert run(b, i, "open('/mnt/data/kept.txt', 'w').write('still here')\n1")["status"] == "Succeeded"
        sid = aca(b, "GET", "session", i).json()["etag"]
        b.stop()
        # An entry naming alice's session under bob is not enough to reach it:
        # every lookup checks the session's owner again.
        path = os.path.join(b.data_root, ".azure-identifiers.json")
        with open(path) as fh:
            mapping = json.load(fh)
        assert mapping == {"alice": {i: sid}}
        mapping["bob"] = {"forged-id": sid}
        with open(path, "w") as fh:
            json.dump(mapping, fh)
        b.start()
        assert aca(b, "GET", "session", i).json()["etag"] == sid
        assert aca(b, "GET", "files/kept.txt/content", i).content == b"still here"
        assert owned(b, "alice") == {sid}
        assert aca(b, "GET", "session", "forged-id", owner="bob").status_code == 404
        r = run(b, "forged-id", "import os\nos.listdir('/mnt/data')", owner="bob")
        assert r["result"]["executionResult"] == "[]"
        assert aca(b, "GET", "session", "forged-id", owner="bob").json()["etag"] != sid
