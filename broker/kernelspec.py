"""The ``python3-sandbox`` kernelspec: a locked-down kernel for any
jupyter_client caller (KernelManager, nbclient, papermill), no broker needed."""

from __future__ import annotations

import json
import os
import sys
import tempfile

from jupyter_client.kernelspec import KernelSpecManager

KERNEL_NAME = "python3-sandbox"


def kernel_json(python: str | None = None, provisioner_config: dict | None = None) -> dict:
    return {
        "argv": [python or sys.executable, "-I", "-m", "kernel_profile", "-f", "{connection_file}"],
        "display_name": "Python 3 (sandbox)",
        "language": "python",
        # SIGINT sent to bwrap is not forwarded: interrupt through the control channel.
        "interrupt_mode": "message",
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {
                "provisioner_name": "sandbox-provisioner",
                "config": provisioner_config or {},
            },
        },
    }


def install(user: bool = False, prefix: str | None = None, name: str = KERNEL_NAME,
            provisioner_config: dict | None = None) -> str:
    """Install the kernelspec; returns the folder it went to."""
    with tempfile.TemporaryDirectory() as td:
        os.chmod(td, 0o755)
        with open(os.path.join(td, "kernel.json"), "w") as fh:
            json.dump(kernel_json(provisioner_config=provisioner_config), fh, indent=2)
        return KernelSpecManager().install_kernel_spec(td, kernel_name=name, user=user, prefix=prefix)
