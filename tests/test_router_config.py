"""Session ids that name their broker, readiness checks, and `broker router-config` (no broker started)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest
from traitlets import TraitError

from broker.health import readiness
from broker.ids import GATEWAY_KERNEL_ID_RE, ID_RE, broker_of, default_broker_name, new_id
from broker.router import RouterConfigError, parse_brokers, render
from broker.sessions import SessionManager
from tests.broker_server import BROKER_BIN
from tests.router_support import HAPROXY


def test_ids_carry_the_broker_name_and_suit_jupyter_servers_gateway_client():
    sid = new_id("b02")
    assert sid.startswith("b02_") and ID_RE.match(sid) and GATEWAY_KERNEL_ID_RE.match(sid)
    assert broker_of(sid) == "b02"
    plain = new_id("")
    assert ID_RE.match(plain) and GATEWAY_KERNEL_ID_RE.match(plain) and broker_of(plain) == ""
    for bad in ("B02_" + str(uuid.uuid4()), "b-2_" + str(uuid.uuid4()), "../" + str(uuid.uuid4()), "b02_x"):
        assert not ID_RE.match(bad), bad


def test_default_name_is_the_statefulset_ordinal_on_kubernetes_only():
    assert default_broker_name("broker-2", True) == "b02"
    assert default_broker_name("broker-13", True) == "b13"
    assert default_broker_name("broker-2", False) == ""
    assert default_broker_name("laptop", True) == ""


def test_bad_broker_name_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(TraitError, match="SessionManager.broker_name 'B-1'.*lowercase letters and digits"):
        SessionManager(data_root=str(tmp_path), broker_name="B-1")


def test_plain_uuid_sessions_on_disk_keep_working(tmp_path):
    """A broker given a name still reads back the sessions it made before it had one."""
    old, named = str(uuid.uuid4()), new_id("b00")
    for sid in (old, named):
        os.makedirs(tmp_path / sid / "data")
        (tmp_path / sid / "meta.json").write_text(json.dumps(
            {"id": sid, "owner": "alice", "created": time.time(), "last_activity": time.time()}))
    m = SessionManager(data_root=str(tmp_path), broker_name="b01")
    assert m.restore() == 2
    assert m.get(old, "alice").id == old and m.get(named, "alice").id == named


def test_readiness_reports_an_unwritable_data_root(tmp_path):
    m = SessionManager(data_root=str(tmp_path), broker_name="b00")
    report = readiness(m)
    assert report["ready"] is True and report["problems"] == [] and report["broker"] == "b00"
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    m = SessionManager(data_root=str(blocked), broker_name="b00")
    report = readiness(m)
    assert report["ready"] is False and "data root not writable" in report["problems"][0]
    m.last_start = (time.time(), False, "SandboxError: no bwrap")
    assert "the latest kernel start failed: SandboxError: no bwrap" in readiness(m)["problems"]


@pytest.mark.parametrize("spec, field", [
    ("", "give at least one"), ("b00", "NAME=HOST:PORT"), ("B0=h:1", "lowercase"),
    ("b00=host", "not host:port"), ("b00=h:1,b00=h:2", "given twice"), ("b00=h:70000", "not host:port")])
def test_bad_brokers_option_is_refused(spec, field):
    with pytest.raises(RouterConfigError, match=field):
        parse_brokers(spec)


def test_router_config_command_writes_a_config_haproxy_accepts(tmp_path):
    out, mp = tmp_path / "haproxy.cfg", tmp_path / "overrides.map"
    r = subprocess.run([BROKER_BIN, "router-config", "--brokers=b00=127.0.0.1:9001,b01=[::1]:9002",
                        "--bind=127.0.0.1:9100", f"--runtime-api={tmp_path / 'admin.sock'}", f"--map-file={mp}",
                        "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "server b01 [::1]:9002 check" in text and "use-server b00 if { var(txn.target) -m str b00 }" in text
    assert mp.read_text() == ""
    check = subprocess.run([HAPROXY, "-c", "-f", str(out)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    bad = subprocess.run([BROKER_BIN, "router-config", "--brokers=b00=nowhere"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--brokers b00: 'nowhere' is not host:port" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_render_refuses_a_relative_map_file():
    with pytest.raises(RouterConfigError, match="--map-file"):
        render(parse_brokers("b00=h:1"), bind="0.0.0.0:80", runtime_api="/x.sock", map_file="rel.map")
