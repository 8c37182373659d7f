"""The provisioner's own resources: uid leases, the quota image, temporary
folders and their clean-up, with real kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
from jupyter_client.manager import KernelManager

from broker.sandbox import volume

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="uids and quota images are root-only features")


def _run(km, code):
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive(code, timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()


def _mounts_under(path):
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(path)]


@root_only
def test_uid_follows_a_data_folder_with_its_quota_image(tmp_path):
    """A session's files keep their owner across kernel starts: the uid is
    read from inside the mounted image, not from the empty mount point."""
    data, rt = tmp_path / "data", tmp_path / "rt"
    data.mkdir()
    opts = {"data_dir": str(data), "rt_dir": str(rt), "managed": True}
    uids = []
    for _ in range(2):
        km = KernelManager(kernel_name="python3-sandbox")
        km.start_kernel(sandbox=opts)
        try:
            assert volume.is_mounted(str(data))
            uids.append(km.provisioner._identity.uid)
            _run(km, "open('f.txt', 'a').write('x')")
        finally:
            km.shutdown_kernel(now=True)
        assert not volume.is_mounted(str(data)) and not volume.is_mounted(str(rt))
    assert uids[0] == uids[1], uids
    assert os.path.exists(volume.image_path(str(data)))
    os.unlink(volume.image_path(str(data)))


@root_only
def test_a_named_data_folder_gets_no_image_over_it(tmp_path):
    """A folder you name yourself stays a plain folder: files the kernel
    writes are there on the host, during and after the kernel."""
    from traitlets.config import Config

    named = tmp_path / "mine"
    named.mkdir()
    c = Config()
    c.SandboxProvisioner.data_dir = str(named)
    km = KernelManager(kernel_name="python3-sandbox", config=c)
    km.start_kernel()
    try:
        assert not volume.is_mounted(str(named))
        _run(km, "open('/mnt/data/out.txt', 'w').write('kept')")
        assert (named / "out.txt").read_text() == "kept"
    finally:
        km.shutdown_kernel(now=True)
    assert (named / "out.txt").read_text() == "kept"
    assert not os.path.exists(volume.image_path(str(named)))


ABANDON = r"""
import os, sys
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name="python3-sandbox")
km.start_kernel()
kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
print(km.provisioner._own_root, flush=True)
os._exit(0)      # a client that goes away without shutting its kernel down
"""


def test_an_abandoned_kernels_folder_is_swept_by_the_next_start():
    out = subprocess.run([sys.executable, "-c", ABANDON], capture_output=True, text=True, timeout=120)
    root = out.stdout.strip().splitlines()[-1]
    assert os.path.isdir(root), out.stderr[-2000:]
    # The kernel died with its parent (bwrap --die-with-parent) ...
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", root], capture_output=True).returncode == 0:
        time.sleep(0.1)
    km = KernelManager(kernel_name="python3-sandbox")
    km.start_kernel()
    try:
        # ... and the next kernel start removed what it left behind.
        assert not os.path.exists(root)
        assert not _mounts_under(root)
    finally:
        km.shutdown_kernel(now=True)
    assert tempfile.gettempdir()  # the sweeper looks there
