"""Running code on a session's kernel: the IOPub loop, deadlines, deaths.

Follows nbclient: one request, messages matched by ``parent_header.msg_id``,
done when both the ``execute_reply`` and the matching ``status: idle`` have
arrived, all against one monotonic deadline.  Rich outputs are kept as the
kernel's messages and converted with ``nbformat.v4.output_from_msg`` by the
transcript, after the call has answered.

At the deadline the execution is interrupted through the control channel; if
the kernel is not idle within ``interrupt_grace`` seconds it is restarted.  A
kernel that dies mid-execution is detected by its process exiting (not by the
heartbeat, which a half-dead kernel can keep) and restarted.  ``/mnt/data``
survives both.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from traitlets import Float, Integer
from traitlets.config import LoggingConfigurable

from broker.sandbox.settings import ByteSize

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/svg+xml", "image/webp")
SANDBOX_KERNEL = "python3-sandbox"
# Said where a stream passed max_stream_bytes (in the stream and in the result's markdown).
DROPPED = "\n[{name} truncated: {n} more characters not shown]\n"


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


class BrokerKernelSpecManager(KernelSpecManager):
    """Serves the python3-sandbox spec from memory, so the broker needs no
    installed kernelspec and always uses this interpreter and provisioner."""

    def _sandbox_spec(self) -> KernelSpec:
        from broker.kernelspec import kernel_json

        d = kernel_json()
        return KernelSpec(resource_dir="", **d)

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name == SANDBOX_KERNEL:
            return self._sandbox_spec()
        raise NoSuchKernel(kernel_name)

    def find_kernel_specs(self) -> dict[str, str]:
        return {SANDBOX_KERNEL: ""}

    def get_all_specs(self) -> dict:
        return {SANDBOX_KERNEL: {"resource_dir": "", "spec": self._sandbox_spec().to_dict()}}


class SessionKernel:
    """One session's kernel: manager, client and the facts about its deaths."""

    def __init__(self, parent, data_dir: str, rt_dir: str, kernel_id: str, env: dict | None = None,
                 log_path: str | None = None, on_restart: Callable[[], None] | None = None):
        self.km = AsyncKernelManager(kernel_name=SANDBOX_KERNEL, kernel_spec_manager=BrokerKernelSpecManager(),
                                     parent=parent, kernel_id=kernel_id)
        self.opts = {"data_dir": data_dir, "rt_dir": rt_dir, "env": dict(env or {}), "managed": True}
        self.log_path = log_path or os.path.join(os.path.dirname(data_dir), "kernel.log")
        self.client = None
        self.restarts = 0
        self.on_restart = on_restart        # called after every restart (the new kernel holds no state)

    async def start(self) -> None:
        # The kernel's own stdout/stderr (start-up notes, crashes) go to a log
        # beside the session, not into the broker's output.
        self._log = open(self.log_path, "ab", buffering=0)
        await self.km.start_kernel(sandbox=self.opts, stdout=self._log, stderr=self._log)
        await self._connect()

    async def _connect(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        self.client = self.km.client()
        self.client.start_channels()
        await self.client.wait_for_ready(timeout=60)

    async def restart(self) -> None:
        self.restarts += 1
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        await self.km.restart_kernel(now=True)
        if self.on_restart is not None:
            self.on_restart()
        await self._connect()

    async def shutdown(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        if self.km.has_kernel:
            await self.km.shutdown_kernel(now=True)
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()

    async def is_alive(self) -> bool:
        return await self.km.is_alive()

    @property
    def provisioner(self):
        return self.km.provisioner

    def death_reason(self) -> str:
        """Why the kernel process is gone, as far as the host can tell."""
        prov = self.km.provisioner
        code = prov.process.returncode if prov is not None and prov.process is not None else None
        oom = False
        cg = getattr(prov, "_cgroup", None)
        if cg is not None:
            ev = cg.memory_events()
            oom = bool(ev.get("oom_kill") or ev.get("oom"))
        if oom:
            return "it ran out of memory (the session's memory limit was reached)"
        if code is None:
            return "its process exited"
        if code in (159, -31):
            return "it made a system call the sandbox forbids (killed by SIGSYS)"
        if code in (137, -9):
            return "it was killed (SIGKILL; often the memory limit)"
        if code == 139 or code == -11:
            return "it crashed with a segmentation fault"
        return f"its process exited with status {code}"


@dataclass
class Outcome:
    status: str = "success"          # success | error | timeout
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    error: dict | None = None
    outputs: list = field(default_factory=list)
    images: list = field(default_factory=list)   # {"mime", "data": bytes, "saved_as": [paths], "output"}
    execution_count: int | None = None
    duration_ms: int = 0
    truncated: dict = field(default_factory=dict)
    kernel_restarted: bool = False
    notice: str = ""


class _Collector:
    def __init__(self, ex: "Executor"):
        self.ex = ex
        self.o = Outcome()
        self.bytes = {"stdout": 0, "stderr": 0}
        self.dropped = {"stdout": 0, "stderr": 0}
        self.idle = False
        self.reply = None

    def stream(self, name: str, text: str) -> None:
        limit = self.ex.max_stream_bytes
        used = self.bytes[name]
        if used >= limit:
            self.dropped[name] += len(text)
            return
        if used + len(text) > limit:
            keep = limit - used
            self.dropped[name] += len(text) - keep
            text = text[:keep]
        self.bytes[name] += len(text)
        setattr(self.o, name, getattr(self.o, name) + text)
        outs = self.o.outputs
        if outs and outs[-1].get("output_type") == "stream" and outs[-1].get("name") == name:
            outs[-1]["text"] += text
        else:
            outs.append({"output_type": "stream", "name": name, "text": text})

    def handle(self, msg: dict) -> None:
        t, c = msg["msg_type"], msg["content"]
        if t == "status":
            if c.get("execution_state") == "idle":
                self.idle = True
            return
        if t == "execute_input":
            self.o.execution_count = c.get("execution_count")
            return
        if t == "stream":
            self.stream(c.get("name", "stdout"), c.get("text", ""))
            return
        if t == "clear_output":
            self.o.outputs = [x for x in self.o.outputs if x.get("msg", {}).get("msg_type") == "error"]
            return
        if t not in ("display_data", "execute_result", "error", "update_display_data"):
            return
        if len(self.o.outputs) >= self.ex.max_outputs:
            self.o.truncated["outputs"] = self.o.truncated.get("outputs", 0) + 1
            return
        if t == "update_display_data":
            t = "display_data"
        # Kept as the message: the transcript converts it with
        # nbformat.v4.output_from_msg after the call has answered.
        out = {"msg": {"header": {"msg_type": t}, "msg_type": t, "content": c}}
        if t == "error":
            tb = strip_ansi("\n".join(c.get("traceback", [])))
            self.o.error = {"ename": c.get("ename", ""), "evalue": c.get("evalue", ""), "traceback": tb}
        else:
            data = c.get("data", {})
            if t == "execute_result":
                self.o.result = data.get("text/plain")
            for mime in IMAGE_MIMES:
                if mime in data:
                    raw = data[mime]
                    blob = raw.encode() if mime == "image/svg+xml" else base64.b64decode(raw)
                    if len(blob) > self.ex.max_image_bytes:
                        self.o.truncated["images"] = self.o.truncated.get("images", 0) + 1
                        break
                    saved = c.get("metadata", {}).get("broker_saved_as")
                    self.o.images.append({"mime": mime, "data": blob, "output": out,
                                          "saved_as": saved if isinstance(saved, list) else []})
                    break
        self.o.outputs.append(out)


class Progress:
    """Turns a running execution's IOPub messages into progress events for a
    caller that shows them as they happen (server-sent events, the CLI).

    Each event is a small JSON-ready dict with a ``type``: ``status``
    (``state``: busy or idle), ``stdout``/``stderr`` (``text``), ``display``
    (``mimes``, ``text``: the text/plain form; ``kind``: display_data or
    execute_result), ``image`` (``mime``, ``size`` in bytes, ``data``: the
    bytes in base64) or ``exception`` (``ename``, ``evalue``).  Streams keep to
    the same per-execution character cap as the result.  A failing callback
    is logged and dropped: it never disturbs the execution.
    """

    def __init__(self, callback: Callable[[dict], None], max_stream: int, max_image: int, log=None):
        self.callback = callback
        self.max_stream = max_stream
        self.max_image = max_image
        self.log = log
        self.sent = {"stdout": 0, "stderr": 0}

    def emit(self, event: dict) -> None:
        if self.callback is None:
            return
        try:
            self.callback(event)
        except Exception:
            if self.log:
                self.log.exception("progress callback failed; no more progress events for this call")
            self.callback = None

    def message(self, msg: dict) -> None:
        t, c = msg["msg_type"], msg["content"]
        if t == "status":
            self.emit({"type": "status", "state": c.get("execution_state", "")})
        elif t == "stream":
            name = "stderr" if c.get("name") == "stderr" else "stdout"
            room = self.max_stream - self.sent[name]
            text = c.get("text", "")[:max(room, 0)]
            if text:
                self.sent[name] += len(text)
                self.emit({"type": name, "text": text})
        elif t == "error":
            self.emit({"type": "exception", "ename": c.get("ename", ""), "evalue": c.get("evalue", "")})
        elif t in ("display_data", "update_display_data", "execute_result"):
            data = c.get("data", {})
            for mime in IMAGE_MIMES:
                raw = data.get(mime)
                if isinstance(raw, str):
                    if mime == "image/svg+xml":       # the kernel sends SVG as text
                        raw = base64.b64encode(raw.encode()).decode()
                    raw = raw.replace("\n", "")
                    size = len(raw) * 3 // 4 - raw[-2:].count("=")
                    if size <= self.max_image:
                        ev = {"type": "image", "mime": mime, "size": size, "data": raw}
                        saved = c.get("metadata", {}).get("broker_saved_as")
                        if isinstance(saved, list) and saved:
                            ev["saved_as"] = saved     # a figure saved with savefig and left open
                        self.emit(ev)
                        return
            self.emit({"type": "display", "kind": "execute_result" if t == "execute_result" else "display_data",
                       "mimes": sorted(data), "text": data.get("text/plain", "")})


async def _next_msg(channel) -> dict:
    """The channel's next message, received straight from its ZeroMQ socket.
    ``get_iopub_msg()`` and ``get_shell_msg()`` would poll the socket before
    each receive (a second future per message: about a tenth of the broker's
    CPU per small call); without a timeout the poll adds nothing."""
    parts = await channel.socket.recv_multipart()
    _, msg_list = channel.session.feed_identities(parts)
    return _deserialize(channel.session, msg_list)


def _deserialize(session, msg_list: list[bytes]) -> dict:
    """``Session.deserialize`` with the same signature and replay checks,
    but the headers' dates left as the strings they arrived as: jupyter_client
    runs every header string through its date parser (about 0.7 ms of the
    broker's CPU per small call, measured with py-spy) and the broker never
    reads a message's date.  The kernels are ours and speak protocol 5, so
    no version adapting either."""
    if len(msg_list) < 5:
        raise TypeError("malformed message, must have at least 5 elements")
    if session.auth is not None:
        signature = msg_list[0]
        if not signature:
            raise ValueError("Unsigned Message")
        if signature in session.digest_history:
            raise ValueError(f"Duplicate Signature: {signature!r}")
        session._add_digest(signature)
        if not hmac.compare_digest(signature, session.sign(msg_list[1:5])):
            raise ValueError(f"Invalid Signature: {signature!r}")
    unpack = session.unpack
    header = unpack(msg_list[1])
    return {"header": header, "msg_id": header["msg_id"], "msg_type": header["msg_type"],
            "parent_header": unpack(msg_list[2]), "metadata": unpack(msg_list[3]),
            "content": unpack(msg_list[4]), "buffers": [memoryview(b) for b in msg_list[5:]]}


class Executor(LoggingConfigurable):
    """Runs one request at a time on a SessionKernel."""

    max_stream_bytes = ByteSize(256 * 1024, config=True, help="""Characters of stdout (and, separately,
        of stderr) kept per execution; the rest is dropped and the result says how much.""")
    max_image_bytes = ByteSize(16 << 20, config=True, help="Largest image kept from one display_data.")
    max_outputs = Integer(200, min=1, config=True, help="Rich outputs (display_data, results) kept per execution.")
    interrupt_grace = Float(3.0, min=0.1, config=True, help="""Seconds a timed-out execution gets to
        stop after the interrupt before the kernel is restarted.""")
    death_poll_interval = Float(0.2, min=0.01, config=True, help="How often a running execution checks the kernel process.")

    async def run(self, kernel: SessionKernel, code: str, timeout: float,
                  progress: Callable[[dict], None] | None = None) -> Outcome:
        """*progress*, if given, is called with each output as it arrives
        (see :class:`Progress`); it must not block."""
        start = time.monotonic()
        kc = kernel.client
        col = _Collector(self)
        report = Progress(progress, self.max_stream_bytes, self.max_image_bytes, self.log) if progress else None
        msg_id = kc.execute(code, silent=False, store_history=True, allow_stdin=False, stop_on_error=False)

        async def iopub():
            while not col.idle:
                msg = await _next_msg(kc.iopub_channel)
                if msg.get("parent_header", {}).get("msg_id") == msg_id:
                    col.handle(msg)
                    if report:
                        report.message(msg)

        async def shell():
            while True:
                msg = await _next_msg(kc.shell_channel)
                if msg.get("parent_header", {}).get("msg_id") == msg_id:
                    col.reply = msg
                    return

        async def death():
            while True:
                await asyncio.sleep(self.death_poll_interval)
                if not await kernel.is_alive():
                    return

        work = asyncio.ensure_future(asyncio.gather(iopub(), shell()))
        watcher = asyncio.ensure_future(death())
        try:
            done, _ = await asyncio.wait({work, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            o = col.o
            if work in done:
                work.result()
                o.status = "success" if col.reply["content"].get("status") == "ok" else "error"
                if o.status == "error" and o.error is None:
                    c = col.reply["content"]
                    o.error = {"ename": c.get("ename", "Error"), "evalue": c.get("evalue", ""),
                               "traceback": strip_ansi("\n".join(c.get("traceback", [])))}
            elif watcher in done:
                reason = kernel.death_reason()
                o.status = "error"
                o.error = {"ename": "KernelDied", "evalue": f"The Python kernel died while running this code: {reason}.",
                           "traceback": ""}
                o.notice = (f"The kernel died ({reason}) and was restarted: variables and imports are lost; "
                            "files in /mnt/data are kept.")
                await self._restart(kernel, o, "died")
            else:
                o.status = "timeout"
                await kernel.km.interrupt_kernel()
                try:
                    await asyncio.wait_for(asyncio.shield(work), self.interrupt_grace)
                    o.notice = (f"The execution exceeded its timeout of {timeout:g} s and was interrupted; "
                                "the kernel and its variables are kept.")
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    o.notice = (f"The execution exceeded its timeout of {timeout:g} s and did not stop when "
                                "interrupted, so the kernel was restarted: variables and imports are lost; "
                                "files in /mnt/data are kept.")
                    await self._restart(kernel, o, "timeout")
                if o.error is None or o.error.get("ename") == "KeyboardInterrupt":
                    o.error = {"ename": "TimeoutError",
                               "evalue": f"Execution exceeded timeoutSeconds={timeout:g}", "traceback": ""}
        finally:
            for t in (work, watcher):
                if not t.done():
                    t.cancel()
            await asyncio.gather(work, watcher, return_exceptions=True)
        for name, n in col.dropped.items():
            if n:
                col.o.truncated[name] = n
                notice = DROPPED.format(name=name, n=n)
                setattr(col.o, name, getattr(col.o, name) + notice)
        col.o.duration_ms = int((time.monotonic() - start) * 1000)
        return col.o

    async def _restart(self, kernel: SessionKernel, o: Outcome, reason: str) -> None:
        try:
            await kernel.restart()
            o.kernel_restarted = True
            count = getattr(self.parent, "count", None)     # the SessionManager's, for /metrics
            if count is not None:
                count("kernel_restarted", reason)
        except Exception as exc:  # the next call will try again
            self.log.error("kernel restart failed: %s", exc)
            o.notice += f" Restarting the kernel failed ({exc}); the next call will try again."
