"""The broker that ``broker mcp`` starts when it is given no URL.

A supervisor process, in a session of its own (an MCP host may kill the
whole process group of ``broker mcp`` seconds after closing its stdin):
it starts ``broker serve`` on a free loopback port in a fresh temporary
folder, prints the URL, waits for its stdin (a pipe from ``broker mcp``) to
close, however ``broker mcp`` ends, then stops the broker and removes the
folder.  Kept apart from ``broker/cli/mcp.py`` so that it starts without
importing the MCP SDK.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

LISTENING = re.compile(r"listening on (http://\S+?)/?\s*$", re.M)


def _say(msg: str) -> None:
    print(f"broker mcp: {msg}", file=sys.stderr, flush=True)


def supervise(spec: dict) -> int:
    """The supervisor (``python -m broker.cli.mcp_supervisor SPEC``): start
    ``broker serve`` on a free loopback port in a fresh temporary folder,
    print its URL, wait for stdin to close, then stop it and remove the
    folder.  The token comes in BROKER_TOKEN."""
    tmp = tempfile.mkdtemp(prefix="broker-mcp-")
    os.chmod(tmp, 0o711)
    log_path = spec["log"] or os.path.join(tmp, "broker.log")
    cmd = [sys.executable, "-m", "broker.app", "serve", "--ip", "127.0.0.1", "--port", "0",
           "--data-root", spec["data_root"] or os.path.join(tmp, "sessions")]
    if spec["config"]:
        cmd += ["--config", spec["config"]]
    else:
        # One MCP session, made at the first tool call: no warm pool.
        cmd += ["--SessionManager.pool_size=0"]
    with open(log_path, "ab") as log:
        broker = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  preexec_fn=_die_with_parent)
    _say(f"started a broker (pid {broker.pid}); its log: {log_path}")
    try:
        url = _wait_listening(broker, log_path, spec["timeout"])
        if url is None:
            with open(log_path, errors="replace") as fh:
                tail = "".join(fh.readlines()[-20:])
            _say(f"the broker did not start within {spec['timeout']:.0f} s; its log ends:\n{tail}")
            return 1
        print(url, flush=True)
        sys.stdin.buffer.read()     # until the relay ends
        return 0
    finally:
        if broker.poll() is None:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(60)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_listening(broker: subprocess.Popen, log_path: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and broker.poll() is None:
        with open(log_path, errors="replace") as fh:
            m = LISTENING.search(fh.read())
        if m:
            return m.group(1)
        time.sleep(0.1)
    return None


def _die_with_parent() -> None:
    """In the broker, before exec: SIGTERM when the supervisor dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


if __name__ == "__main__":
    sys.exit(supervise(json.loads(sys.argv[1])))
