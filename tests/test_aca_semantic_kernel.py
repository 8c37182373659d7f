"""Semantic Kernel's SessionsPythonTool, installed from the package registry,
against a real broker over HTTPS (the tool accepts only https:// endpoints).

Semantic Kernel runs from a virtualenv of its own (tests/aca_sk_venv.py says
why; ``make install`` makes it), as a subprocess with that virtualenv's Python
(tests/aca_sk_client.py).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import subprocess
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests import aca_sk_venv
from tests.broker_server import BrokerProcess

pytestmark = pytest.mark.timeout(1200)   # without `make install`, the first run installs Semantic Kernel

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aca_sk_client.py")


@pytest.fixture(scope="module")
def sk_python() -> str:
    return aca_sk_venv.ensure()


def self_signed(folder: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(certfile, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(keyfile, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return certfile, keyfile


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tls broker"))
    with BrokerProcess(folder, "--SessionManager.pool_size=1", tls=self_signed(folder)) as b:
        yield b


def test_semantic_kernel_sessions_tool_runs_code_and_moves_files(sk_python, tls_broker, tmp_path):
    b = tls_broker
    assert b.url.startswith("https://")
    identifier = f"sk-{uuid.uuid4()}"
    workdir = str(tmp_path)
    proc = subprocess.run([sk_python, CLIENT, f"{b.url}/azure", b.owners["alice"], b.verify, workdir, identifier],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["execute"] == "Status:\nSuccess\nResult:\n42\nStdout:\nhello from the broker\n\nStderr:\n"
    assert out["upload"] == {"filename": "upload.txt", "size": 28, "full_path": "/mnt/data/upload.txt"}
    assert "Result:\nUPLOADED BY SEMANTIC KERNEL\n" in out["read_back"]
    assert out["make"].startswith("Status:\nSuccess\nResult:\n256\n")
    assert ["upload.txt", 28] in out["list"] and ["made.bin", 256] in out["list"]
    assert base64.b64decode(out["download"]) == bytes(range(256))
    assert base64.b64decode(out["download_to_file"]) == bytes(range(256))
    assert out["failure"].startswith("Status:\nFailure\n") and "ZeroDivisionError" in out["failure"]

    # The broker side: one session of alice's, holding the uploaded file.
    r = b.get("/azure/session", params={"api-version": "2025-10-02-preview", "identifier": identifier})
    sid = r.json()["etag"]
    with open(os.path.join(b.data_dir(sid), "upload.txt")) as fh:
        assert fh.read() == "uploaded by semantic kernel\n"
    assert b.get("/azure/session", owner="bob",
                 params={"api-version": "2025-10-02-preview", "identifier": identifier}).status_code == 404
