"""The deployment files: Kubernetes manifests validated offline against the
bundled schemas (kubernetes-validate), and the generated router ConfigMap equal
to what `broker router-config` makes now."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml

from tests.broker_server import BROKER_BIN, REPO
from tests.router_support import HAPROXY

K8S = os.path.join(REPO, "deploy", "kubernetes")
MANIFESTS = sorted(glob.glob(os.path.join(K8S, "*.yaml")))
# The versions docs/scale.md names: 1.30 (user namespaces beta, appArmorProfile field) and 1.35.
VERSIONS = ("1.30.0", "1.35.0")
CONFIGMAP_CMD = ["router-config", "--brokers=b00=broker-0.brokers:8888,b01=broker-1.brokers:8888,"
                 "b02=broker-2.brokers:8888", "--bind=0.0.0.0:8080", "--runtime-api=0.0.0.0:9999",
                 "--map-file=/usr/local/etc/haproxy/overrides.map", "--configmap=broker-router"]

VALIDATE = """
import sys, kubernetes_validate, yaml
failures = 0
for version in sys.argv[1].split(","):
    for path in sys.argv[2:]:
        with open(path) as fh:
            for doc in yaml.safe_load_all(fh):
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    failures += 1
                    print(version, path, doc["kind"], exc.message)
print("validated")
sys.exit(1 if failures else 0)
"""


def test_manifests_validate_offline(tmp_path):
    """In a network namespace of its own (no network at all): the schemas come with the package.
    A copy with one wrong field must fail, so that the check can fail."""
    assert MANIFESTS
    bad = tmp_path / "bad.yaml"
    with open(os.path.join(K8S, "brokers.yaml")) as fh:
        docs = list(yaml.safe_load_all(fh))
    docs[1]["spec"]["template"]["spec"]["hostUsers"] = "no"
    bad.write_text(yaml.safe_dump_all(docs))
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", VALIDATE, ",".join(VERSIONS), *MANIFESTS,
                        str(bad)], capture_output=True, text=True, timeout=300)
    assert "validated" in r.stdout, r.stdout + r.stderr
    failures = [line for line in r.stdout.splitlines() if line != "validated"]
    assert failures and all(str(bad) in f and "StatefulSet" in f for f in failures), r.stdout
    assert len(failures) == len(VERSIONS)


def test_manifests_hold_what_the_issue_asks_for():
    docs = {}
    for path in MANIFESTS:
        with open(path) as fh:
            for doc in yaml.safe_load_all(fh):
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    sts = docs[("StatefulSet", "broker")]["spec"]
    pod = sts["template"]["spec"]
    assert pod["hostUsers"] is False and sts["volumeClaimTemplates"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/api/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/api/live"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert docs[("Service", "brokers")]["spec"]["clusterIP"] == "None"
    assert docs[("Deployment", "broker-router")]["spec"]["replicas"] >= 2
    assert ("PodDisruptionBudget", "broker") in docs and ("Secret", "broker-tokens") in docs


def test_router_configmap_is_what_router_config_makes(tmp_path):
    out = tmp_path / "cm.yaml"
    r = subprocess.run([BROKER_BIN, *CONFIGMAP_CMD, "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(K8S, "router-configmap.yaml")) as fh:
        committed = fh.read()
    assert committed == out.read_text(), ("deploy/kubernetes/router-configmap.yaml is stale: run "
                                          f"broker {' '.join(CONFIGMAP_CMD)} -o deploy/kubernetes/router-configmap.yaml")
    cfg = tmp_path / "haproxy.cfg"
    (tmp_path / "overrides.map").write_text("")
    cfg.write_text(yaml.safe_load(committed)["data"]["haproxy.cfg"].replace(
        "/usr/local/etc/haproxy/overrides.map", str(tmp_path / "overrides.map")))
    check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
