"""pytest plugin for nbclient's own test suite: every kernel it starts is
``python3-sandbox``, whatever name the test asks for ("python", "python3",
"" or the notebook's metadata), as the author of issue 14 ran it.

Loaded with ``-p force_sandbox`` by tests/test_nbclient_suite.py.  Each
sandboxed launch appends a line to the file named by
``BROKER_NBCLIENT_SUITE_LOG``, so the caller can check the kernels really
were sandboxed.
"""

from __future__ import annotations

import os

from jupyter_client.kernelspec import KernelSpecManager

from broker.sandbox.provisioner import SandboxProvisioner

SANDBOX = "python3-sandbox"
_get_kernel_spec = KernelSpecManager.get_kernel_spec
_launch_kernel = SandboxProvisioner.launch_kernel


def _sandbox_spec(self, kernel_name, *args, **kwargs):
    return _get_kernel_spec(self, SANDBOX, *args, **kwargs)


async def _logged_launch(self, cmd, **kwargs):
    info = await _launch_kernel(self, cmd, **kwargs)
    log = os.environ.get("BROKER_NBCLIENT_SUITE_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {self.kernel_id}\n")
    return info


def pytest_configure(config):
    KernelSpecManager.get_kernel_spec = _sandbox_spec
    SandboxProvisioner.launch_kernel = _logged_launch
