"""Resource limits over real HTTP, against one broker started with small
ones: a 512 MiB kernel memory limit, 2,000 characters of stdout/stderr per
execution, 4 KiB of shell output, and 1 MiB uploads.
"""

from __future__ import annotations

import base64
import http.client
import os
import time

import pytest

from tests.broker_server import BrokerProcess

MiB = 1 << 20
STREAM_CAP = 2000
SHELL_CAP = 4096


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    b = BrokerProcess(str(tmp_path_factory.mktemp("limited-broker")),
                      "--SandboxSettings.memory_limit=512M",
                      f"--Executor.max_stream_bytes={STREAM_CAP}",
                      f"--SessionManager.shell_output_limit={SHELL_CAP}",
                      "--SessionManager.max_upload_bytes=1M",
                      "--SessionManager.pool_size=1")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def sid(limited):
    s = limited.create_session("alice")
    yield s
    limited.delete_session(s)


def leftovers(broker, sid):
    """Every entry under /mnt/data, temporary upload files included."""
    out = []
    for dirpath, dirnames, filenames in os.walk(broker.data_dir(sid)):
        for n in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), broker.data_dir(sid)))
    return sorted(out)


# -- memory ----------------------------------------------------------------------------------------

def test_out_of_memory_kills_kernel_reports_and_recovers(limited, sid):
    r = limited.run(sid, "open('/mnt/data/keep.txt', 'w').write('survives the OOM')\nbefore = 1")
    assert r["status"] == "success", r
    t0 = time.monotonic()
    r = limited.run(sid, "chunks = []\nwhile True:\n    chunks.append(b'x' * (32 << 20))", timeout_seconds=120)
    assert time.monotonic() - t0 < 100
    assert r["status"] == "error", r
    assert r["error"]["ename"] == "KernelDied", r["error"]
    assert "memory" in r["error"]["evalue"], r["error"]
    assert r["kernel_restarted"] is True
    assert "memory" in r["markdown"] and "restarted" in r["markdown"]
    r = limited.run(sid, "print(open('/mnt/data/keep.txt').read(), 'before' in dir())")
    assert r["status"] == "success" and r["stdout"] == "survives the OOM False\n", r
    assert limited.tool(sid, "ReadSessionFile", {"path": "keep.txt"})["content"] == "survives the OOM"
    # Under the limit, memory works as usual.
    r = limited.run(sid, "data = b'y' * (200 << 20)\nprint(len(data) >> 20)")
    assert r["stdout"] == "200\n", r


# -- output caps -----------------------------------------------------------------------------------

def test_stdout_capped_with_visible_notice(limited, sid):
    r = limited.run(sid, "for i in range(2000):\n    print(f'line {i:05d}')")
    assert r["status"] == "success", r
    total = sum(len(f"line {i:05d}\n") for i in range(2000))
    kept, notice = r["stdout"][:STREAM_CAP], r["stdout"][STREAM_CAP:]
    assert kept.startswith("line 00000\nline 00001\n")
    assert "line 01999" not in r["stdout"]
    assert notice == f"\n[stdout truncated: {total - STREAM_CAP} more characters not shown]\n", notice
    assert r["truncated"]["stdout"]["dropped"] == total - STREAM_CAP
    assert "stdout truncated" in r["markdown"]
    # stderr has its own cap; the kernel keeps working afterwards.
    r = limited.run(sid, "import sys\nsys.stderr.write('e' * 5000)\nprint('small')")
    assert r["stdout"] == "small\n"
    assert r["stderr"].startswith("e" * STREAM_CAP) and "[stderr truncated: 3000 more characters" in r["stderr"]
    assert limited.run(sid, "print('next')")["stdout"] == "next\n"


def test_shell_output_capped(limited, sid):
    r = limited.shell(sid, "yes line | head -c 100000")
    assert r["truncated"] == {"output": True}, r
    assert len(r["stdout"]) < SHELL_CAP + 100
    assert r["stdout"].endswith("[output truncated]\n")
    assert str(SHELL_CAP) in r["notice"] and "limit" in r["notice"]
    assert limited.shell(sid, "echo fine")["stdout"] == "fine\n"


# -- upload cap ------------------------------------------------------------------------------------

def test_uploads_at_the_cap_are_accepted(limited, sid):
    data = os.urandom(MiB)
    assert limited.put(f"/api/sessions/{sid}/files/exact.bin", data=data).status_code == 201
    r = limited.post(f"/api/sessions/{sid}/files", files={"file": ("exact2.bin", data)})
    assert r.status_code == 201, r.text
    r = limited.tool(sid, "UploadFileToSession", {"path": "exact3.bin", "content": base64.b64encode(data).decode()})
    assert r["size"] == MiB
    for name in ("exact.bin", "exact2.bin", "exact3.bin"):
        assert os.path.getsize(os.path.join(limited.data_dir(sid), name)) == MiB


def assert_413(r, sid_files_before, limited, sid):
    assert r.status_code == 413, (r.status_code, r.text[:300])
    body = r.json()
    assert body["reason"] == "file_too_large" and str(MiB) in body["message"], body
    assert leftovers(limited, sid) == sid_files_before, "a partial upload was left behind"


def test_put_over_the_cap_is_413_and_leaves_nothing(limited, sid):
    before = leftovers(limited, sid)
    r = limited.put(f"/api/sessions/{sid}/files/big.bin", data=os.urandom(MiB + 1))
    assert_413(r, before, limited, sid)


def test_streamed_put_over_the_cap_is_413_and_leaves_nothing(limited, sid):
    """No Content-Length up front (chunked): the broker must stop reading
    once the stream passes the cap, and keep no partial file."""
    # Streamed and under the cap: stored whole.
    small = os.urandom(512 * 1024)
    r = limited.put(f"/api/sessions/{sid}/files/streamed-ok.bin",
                    data=(small[i:i + 65536] for i in range(0, len(small), 65536)))
    assert r.status_code == 201 and r.json()["size"] == len(small), r.text
    with open(os.path.join(limited.data_dir(sid), "streamed-ok.bin"), "rb") as fh:
        assert fh.read() == small
    before = leftovers(limited, sid)
    conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=30)
    try:
        conn.putrequest("PUT", f"/api/sessions/{sid}/files/streamed.bin")
        conn.putheader("Authorization", f"Bearer {limited.owners['alice']}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = os.urandom(64 * 1024)
        try:
            for _ in range(40):  # 2.5 MiB in all
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the broker may close the connection once it has answered
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
    finally:
        conn.close()
    assert status == 413, (status, body[:300])
    assert leftovers(limited, sid) == before
    # The broker is fine afterwards.
    assert limited.put(f"/api/sessions/{sid}/files/small.bin", data=b"ok").status_code == 201


def test_multipart_over_the_cap_is_413_and_leaves_nothing(limited, sid):
    before = leftovers(limited, sid)
    r = limited.post(f"/api/sessions/{sid}/files", files={"file": ("big.bin", os.urandom(MiB + 1))})
    assert_413(r, before, limited, sid)


def test_upload_tool_over_the_cap_is_413_and_leaves_nothing(limited, sid):
    before = leftovers(limited, sid)
    r = limited.tool_response(sid, "UploadFileToSession",
                              {"path": "big.bin", "content": base64.b64encode(os.urandom(MiB + 1)).decode()})
    assert_413(r, before, limited, sid)
