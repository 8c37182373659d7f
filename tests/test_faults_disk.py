"""The data root's file system full (issue 11 item 2): a real broker whose
data root is a small tmpfs of its own, filled up from outside.

Uploads, code and shell commands get clear errors, nothing already there is
corrupted (files, transcript, meta.json), and everything resumes once space
returns.  /mnt/data sits directly on the data root here
(SandboxSettings.quota=off), so the session sees the file system fill up
as the broker does.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time

import nbformat
import pytest

from broker.sandbox import prereq

from tests.fault_helpers import PatientBroker, wait_for
from tests.figures import record

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    if not prereq.is_root():
        pytest.skip("mounting a small tmpfs as the data root needs root")
    root = str(tmp_path_factory.mktemp("smallfs"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0711", "broker-test-small", root], check=True)
    yield root
    subprocess.run(["umount", "-l", root], check=False)


@pytest.fixture(scope="module")
def db(small_root, tmp_path_factory):
    b = PatientBroker(str(tmp_path_factory.mktemp("disk")), "--SessionManager.pool_size=0",
                      "--TranscriptSettings.write_delay=0",
                      "--SandboxSettings.quota=off", data_root=os.path.join(small_root, "sessions"))
    b.start()
    yield b
    b.stop()


def fill(folder: str) -> int:
    """Fill the file system holding *folder*; returns the bytes written."""
    path = os.path.join(folder, "filler")
    block = b"\0" * (1 << 16)
    written = 0
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                written += fh.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return written


def read_transcript(b, sid):
    nb = nbformat.read(os.path.join(b.data_root, sid, "transcript.ipynb"), as_version=4)
    nbformat.validate(nb)
    return nb


def test_data_root_full_then_space_returns(db, small_root):
    sid = db.create_session()
    kept = os.urandom(1 << 20)
    assert db.put(f"/api/sessions/{sid}/files/kept.bin", data=kept).status_code == 201
    assert db.run(sid, "print('before')")["stdout"] == "before\n"
    wait_for(lambda: len(read_transcript(db, sid).cells) == 1, what="the first transcript write")
    mark = os.path.getsize(db.log_path)

    filled = fill(small_root)
    try:
        r = db.post("/api/sessions")
        assert r.status_code == 507 and r.json()["reason"] == "data_root_full", r.text
        assert "data root" in r.json()["message"] and "full" in r.json()["message"], r.text
        r = db.put(f"/api/sessions/{sid}/files/new.bin", data=os.urandom(1 << 20))
        assert r.status_code == 507 and r.json()["reason"] == "quota_exceeded", r.text
        assert "full" in r.json()["message"], r.text
        r = db.run(sid, "open('/mnt/data/big.bin', 'wb').write(b'x' * 4_000_000)")
        assert r["status"] == "error" and "No space left on device" in r["error"]["evalue"], r
        r = db.shell(sid, "head -c 4000000 /dev/zero > big2.bin; echo exit=$?")
        assert "No space left on device" in r["stderr"] and "exit=1" in r["stdout"], r
        r = db.run(sid, "print('still answering')")
        assert r["status"] == "success" and r["stdout"] == "still answering\n", r
        # Nothing already there is harmed; the transcript on disk is the last whole one.
        assert db.get(f"/api/sessions/{sid}/files/kept.bin").content == kept
        nb = read_transcript(db, sid)
        assert len(nb.cells) >= 1
        assert not [f for f in os.listdir(db.data_dir(sid)) if ".upload-" in f]
        assert not [f for f in os.listdir(os.path.join(db.data_root, sid)) if f.startswith((".transcript", ".meta"))]
    finally:
        os.unlink(os.path.join(small_root, "filler"))
    with open(db.log_path, errors="replace") as fh:
        fh.seek(mark)
        log = fh.read()
    assert "could not write transcript" in log, log[-2000:]

    # Space is back: everything works again, and the transcript catches up
    # with every call, including those made while the disk was full.
    t0 = time.monotonic()
    db.shell(sid, "rm -f big.bin big2.bin")
    assert db.put(f"/api/sessions/{sid}/files/new.bin", data=b"new").status_code == 201
    r = db.run(sid, "print(len(open('/mnt/data/kept.bin', 'rb').read()))")
    assert r["stdout"] == f"{len(kept)}\n", r
    cells = wait_for(lambda: len(read_transcript(db, sid).cells) == 6 and 6, timeout=30,
                     what="the transcript to catch up")
    resumed = time.monotonic() - t0
    other = db.create_session()
    assert db.run(other, "print('new session')")["stdout"] == "new session\n"
    record("fault: data root's file system full (24 MiB tmpfs)", filled_bytes=filled, create_status=507,
           upload_status=507,
           exec_error="OSError ENOSPC", shell_error="No space left on device", files_corrupted=0,
           transcript_cells_after=cells, resumed_s=round(resumed, 2))
    db.delete_session(other)
    db.delete_session(sid)
