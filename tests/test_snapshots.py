"""Sessions that outlive their host: snapshots in a real S3 (moto's server mode on loopback).

Two real brokers (b00, b01) behind the real router share one bucket.  A
session made on b00 is snapshotted on idle; b01 refuses to restore it while
b00's lease runs (a live session is never taken); once b00 is killed with
SIGKILL and the lease has run out, a request through the router lands on b01,
which restores the session with its files and a fresh kernel, says so in the
next call's notice, and re-points the router's override map at itself.  b00,
started again, finds its copy restored elsewhere (a higher generation) and
drops it without writing over the newer snapshot.  Owners never see each
other's snapshots.  The 50 MB session's snapshot and restore times are
recorded (docs/scale.md).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import boto3
import pytest
import requests

from broker.ids import broker_of
from broker.router import RuntimeApi
from tests.broker_server import free_port
from tests.figures import record
from tests.router_support import Cluster

BUCKET = "broker-snapshots-test"
LEASE = 15


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url, timeout=2)
                break
            except requests.RequestException:
                assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket=BUCKET)
        yield url, client
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    url, _ = s3
    workdir = str(tmp_path_factory.mktemp("snapcluster"))
    router_dir = os.path.join(workdir, "router")
    extra = ("--ServeApp.log_level=INFO", "--Snapshots.enabled=True", f"--Snapshots.endpoint_url={url}", f"--Snapshots.bucket={BUCKET}",
             "--Snapshots.check_interval=0.5", "--Snapshots.idle_seconds=1", f"--Snapshots.lease_seconds={LEASE}",
             f"--Snapshots.router_runtime_api={os.path.join(router_dir, 'admin.sock')}",
             f"--Snapshots.router_map_file={os.path.join(router_dir, 'overrides.map')}")
    c = Cluster(workdir, 2, extra)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def head(client, owner, sid):
    try:
        return client.head_object(Bucket=BUCKET, Key=f"broker-snapshots/{owner}/{sid}.tar")["Metadata"]
    except client.exceptions.ClientError:
        return None


def wait_for(predicate, timeout=60.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(interval)
    return predicate()


def log_seconds(b, pattern: str) -> float | None:
    with open(b.log_path, errors="replace") as fh:
        found = re.findall(pattern, fh.read())
    return float(found[-1]) if found else None


def test_snapshot_restore_on_another_broker(cluster, s3):
    _, client = s3
    b00, b01 = cluster.brokers["b00"], cluster.brokers["b01"]
    sid = b00.create_session()
    out = b00.run(sid, "import os\nv = 42\nos.makedirs('/mnt/data/sub', exist_ok=True)\n"
                       "open('/mnt/data/sub/notes.txt', 'w').write('kept')\n"
                       "open('/mnt/data/big.bin', 'wb').write(os.urandom(50 << 20))\n"
                       "os.symlink('/etc/passwd', '/mnt/data/link')")
    assert not out.get("error"), out
    meta = wait_for(lambda: head(client, "alice", sid), timeout=90)
    assert meta and meta["holder"] == "b00" and meta["generation"] == "0", meta
    snap_s = wait_for(lambda: log_seconds(b00, rf"session {sid} snapshotted in ([\d.]+) s"), timeout=10)

    # b00 is alive and holds the lease: b01 never takes the session
    r = b01.get(f"/api/sessions/{sid}")
    assert r.status_code == 409 and r.json()["reason"] == "session_elsewhere", r.text
    assert "b00" in r.json()["message"]
    assert b00.run(sid, "print(v)")["stdout"] == "42\n"
    # another owner finds nothing, on either broker
    assert b01.get(f"/api/sessions/{sid}", owner="bob").status_code == 404
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert f"broker-snapshots/alice/{sid}.tar" in keys and not any("/bob/" in k for k in keys)

    # b00 dies; once its lease has run out, the router's request lands on b01, which restores it
    b00.proc.send_signal(signal.SIGKILL)
    b00.proc.wait(10)
    b00.proc = None
    time.sleep(LEASE)
    t0 = time.monotonic()
    r = wait_for(lambda: (lambda x: x if x.status_code == 200 else None)(cluster.router.get(f"/api/sessions/{sid}")),
                 timeout=30, interval=0.5)
    assert r is not None, cluster.router.get(f"/api/sessions/{sid}").text
    first_answer_s = time.monotonic() - t0
    restore_s = log_seconds(b01, rf"session {sid} restored from its snapshot in ([\d.]+) s")
    assert restore_s is not None
    out = cluster.router.run(sid, "import os\nprint(open('/mnt/data/sub/notes.txt').read(), "
                                  "os.path.getsize('/mnt/data/big.bin'), os.readlink('/mnt/data/link'), "
                                  "'v' in globals())")
    assert out["stdout"] == "kept 52428800 /etc/passwd False\n", out
    assert "restored on broker b01" in out["notice"], out
    # the router's override map now sends it to b01 directly
    api = RuntimeApi(cluster.haproxy.socket, cluster.haproxy.map_file)
    assert api.overrides().get(sid) == "b01"
    assert head(client, "alice", sid)["holder"] == "b01"
    assert head(client, "alice", sid)["generation"] == "1"
    record("snapshot: 50 MB session", snapshot_seconds=snap_s, restore_seconds=restore_s,
           first_request_seconds=round(first_answer_s, 2))
    print(f"\n50 MB session: snapshot {snap_s:.2f} s, restore {restore_s:.2f} s")

    # b00 comes back with its old copy on disk: it must not write over b01's newer snapshot
    b01.run(sid, "open('/mnt/data/after.txt', 'w').write('newer')")
    b00.start(wait=180)
    assert wait_for(lambda: b00.get(f"/api/sessions/{sid}").status_code in (404, 409), timeout=30), \
        "b00 kept its stale copy"
    assert not os.path.exists(os.path.join(b00.data_root, sid))
    wait_for(lambda: head(client, "alice", sid)["holder"] == "b01", timeout=10)
    meta = head(client, "alice", sid)
    assert meta["holder"] == "b01" and meta["generation"] == "1", meta
    assert b01.run(sid, "print(open('/mnt/data/after.txt').read())")["stdout"] == "newer\n"
    assert broker_of(sid) == "b00"
