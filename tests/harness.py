"""Test harness: real sandboxed kernels driven through jupyter_client.

``SandboxKernel`` starts ``python3-sandbox`` with the stock KernelManager (the
same path nbclient and papermill use) and runs code with ``run()``, which
collects the IOPub messages of that one request into a :class:`Run`.
"""

from __future__ import annotations

import os
import queue
import re
import textwrap
import time
from dataclasses import dataclass, field

from jupyter_client.manager import KernelManager

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Neutralises the audit hook the way an attacker would (research/sandbox.md
# B01): find the hook function through the garbage collector and swap its
# code for a no-op.  After this every refusal must come from the kernel-
# enforced layers.
NEUTRALISE_HOOK = textwrap.dedent("""
    import gc, types
    def _noop(event, args):
        return None
    _n = 0
    for _o in gc.get_objects():
        if isinstance(_o, types.FunctionType) and _o.__name__ == "_audit_hook" \\
                and _o.__module__ == "kernel_profile.audit":
            _o.__code__ = _noop.__code__
            _n += 1
    print("neutralised", _n)
""")


@dataclass
class Run:
    status: str
    stdout: str = ""
    stderr: str = ""
    ename: str = ""
    evalue: str = ""
    traceback: str = ""
    result: str = ""
    displays: list = field(default_factory=list)
    display_metadata: list = field(default_factory=list)
    dead: bool = False

    @property
    def error(self) -> str:
        return f"{self.ename}: {self.evalue}"

    def __str__(self):
        return (f"Run(status={self.status}, error={self.error!r}, stdout={self.stdout[-800:]!r}, "
                f"stderr={self.stderr[-800:]!r}, dead={self.dead})")


class SandboxKernel:
    def __init__(self, kernel_name: str = "python3-sandbox", config=None, **start_kwargs):
        self.km = KernelManager(kernel_name=kernel_name, **({"config": config} if config is not None else {}))
        self.km.start_kernel(**start_kwargs)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.hooked = True

    @property
    def data_dir(self) -> str:
        return self.km.provisioner.sandbox_data_dir

    @property
    def provisioner(self):
        return self.km.provisioner

    def run(self, code: str, timeout: float = 60) -> Run:
        code = textwrap.dedent(code)
        msg_id = self.kc.execute(code, allow_stdin=False, stop_on_error=False)
        out = Run(status="unknown")
        deadline = time.monotonic() + timeout
        got_reply = got_idle = False
        while not (got_reply and got_idle):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                out.status = "timeout"
                return out
            if not self.km.is_alive():
                out.status, out.dead = "dead", True
                return out
            try:
                msg = self.kc.get_iopub_msg(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not got_reply:
                    try:
                        reply = self.kc.get_shell_msg(timeout=0.01)
                        if reply["parent_header"].get("msg_id") == msg_id:
                            got_reply = True
                            out.status = reply["content"]["status"]
                    except queue.Empty:
                        pass
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            t, c = msg["msg_type"], msg["content"]
            if t == "stream":
                if c["name"] == "stdout":
                    out.stdout += c["text"]
                else:
                    out.stderr += c["text"]
            elif t == "error":
                out.ename, out.evalue = c["ename"], c["evalue"]
                out.traceback = ANSI.sub("", "\n".join(c["traceback"]))
            elif t == "execute_result":
                out.result = c["data"].get("text/plain", "")
            elif t == "display_data":
                out.displays.append(c["data"])
                out.display_metadata.append(c.get("metadata", {}))
            elif t == "status" and c["execution_state"] == "idle":
                got_idle = True
            if got_idle and not got_reply:
                reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
                if reply["parent_header"].get("msg_id") == msg_id:
                    got_reply = True
                    out.status = reply["content"]["status"]
        return out

    def answers(self) -> bool:
        """The kernel is alive and executes code."""
        if not self.km.is_alive():
            return False
        r = self.run("print(6 * 7)", timeout=30)
        return r.status == "ok" and r.stdout.strip() == "42"

    def restart(self) -> None:
        self.kc.stop_channels()
        self.km.restart_kernel(now=True)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.hooked = True

    def neutralise_hook(self) -> None:
        r = self.run(NEUTRALISE_HOOK)
        assert r.stdout.strip() == "neutralised 1", r
        self.hooked = False

    def shutdown(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=True)


def host_file(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def is_root() -> bool:
    return os.geteuid() == 0
