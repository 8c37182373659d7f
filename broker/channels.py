"""Kernel channels for notebook-style clients: the per-session IOPub hub and
one ``ChannelConnection`` per WebSocket client.

- The hub holds the session's one IOPub subscription and fans every message
  out to all connected clients (several clients on one kernel each get the
  whole stream, REST executions included).  It caps what one execution may
  send, and when an execution that a client started goes idle it first tells
  the clients, through the messaging protocol, which files in /mnt/data the
  execution wrote: a ``display_data`` whose data holds
  ``application/vnd.broker.files+json`` (see docs/jupyter.md).
- A connection owns its shell, control and stdin DEALER sockets (identity =
  the client's ``session_id``), signs what the client sends with the kernel's
  key (clients never see the key) and relays replies back.  When the client
  goes away its sockets stay open for ``reconnect_window`` seconds and buffer
  what arrives (bounded), so a client that reconnects with the same
  ``session_id`` still gets the output of a cell that was running.

Nothing here knows about WebSockets: the web layer hands in a ``deliver``
callback and does the framing.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Callable

import zmq
from jupyter_client.session import Session as JSession
from jupyter_client.session import json_packer
from traitlets import Float, List, Unicode
from traitlets.config import LoggingConfigurable
from zmq.eventloop.zmqstream import ZMQStream

from broker.sandbox.settings import ByteSize

FILES_MIME = "application/vnd.broker.files+json"
CHANNELS = ("shell", "control", "stdin")


@dataclass
class KernelMessage:
    """A message as ZMQ parts: header, parent_header, metadata, content, *buffers."""

    channel: str
    parts: list

    _header: dict | None = None
    _parent: dict | None = None

    @property
    def header(self) -> dict:
        if self._header is None:
            self._header = json.loads(self.parts[0])
        return self._header

    @property
    def parent_header(self) -> dict:
        if self._parent is None:
            self._parent = json.loads(self.parts[1]) if self.parts[1] else {}
        return self._parent

    @property
    def msg_type(self) -> str:
        return self.header.get("msg_type", "")

    @property
    def parent_id(self) -> str:
        return self.parent_header.get("msg_id", "")

    def content(self) -> dict:
        return json.loads(self.parts[3])

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)


class ChannelSettings(LoggingConfigurable):
    """Limits for WebSocket clients of a kernel."""

    max_message_bytes = ByteSize(32 << 20, config=True, help="""Largest single message relayed between a kernel
        and a WebSocket client, either way. A larger message from the kernel is replaced by a notice; a larger
        frame from a client closes that socket (1009).""")
    max_output_bytes = ByteSize(8 << 20, config=True, help="""Stream output (stdout/stderr) relayed to WebSocket
        clients per execution; past it output is dropped and one notice says so.""")
    reconnect_window = Float(30.0, min=0, config=True, help="""Seconds a disconnected client's channels stay open,
        buffering its messages, for a reconnect with the same session_id.""")
    max_buffered_bytes = ByteSize(16 << 20, config=True, help="Most bytes buffered for one disconnected client.")
    blocked_message_types = List(Unicode(), default_value=["debug_request"], config=True, help="""Client message
        types never forwarded to the kernel (the debugger is not available in the sandbox).""")
    kernel_env_allowlist = List(Unicode(), default_value=["KERNEL_USERNAME"], config=True, help="""KERNEL_*
        variables from POST /api/kernels that are passed into the kernel's environment (values at most 256
        printable characters). Every other variable is ignored; none can change the sandbox.""")


def _loads(b: bytes) -> dict:
    return json.loads(b) if b else {}


class IOPubHub:
    def __init__(self, session, settings: ChannelSettings, jsession: JSession):
        self.session = session
        self.settings = settings
        self.jsession = jsession
        self.listeners: dict[str, "ChannelConnection"] = {}
        self.execution_state = "starting"
        self.tracked: dict[str, dict] = {}          # msg_id -> {"header", "recording", "links", ...}
        self._out_bytes: dict[str, int] = {}
        self._notified: set[str] = set()
        self.observers: list[Callable[[KernelMessage], None]] = []
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(session.kernel_address("iopub"))
        self.stream = ZMQStream(sock)
        self.stream.on_recv(self._on_recv, copy=True)

    def close(self) -> None:
        for info in self.tracked.values():
            self._end_recording(info)
        self.tracked.clear()
        for conn in list(self.listeners.values()):
            conn.close()
        self.listeners.clear()
        self.stream.close()

    # -- executions started by clients ------------------------------------------
    def track(self, header: dict, content: dict, links) -> None:
        from broker.transcripts import now_iso

        try:
            recording = self.session.changes.begin()
        except Exception:  # a broken folder must not stop the execution
            recording = None
        self.tracked[header.get("msg_id", "")] = {"header": header, "recording": recording, "links": links,
                                                  "code": content.get("code", ""), "msgs": [],
                                                  "started": now_iso(), "silent": bool(content.get("silent"))}
        if len(self.tracked) > 1000:
            self._end_recording(self.tracked.pop(next(iter(self.tracked))))

    @staticmethod
    def _end_recording(info: dict) -> None:
        rec = info.pop("recording", None)
        if rec is not None:
            rec.tracker.discard(rec)

    def _files_message(self, info: dict) -> KernelMessage | None:
        from broker.files import guess_type

        rec = info.pop("recording", None)
        if rec is None:
            return None
        try:
            changed = rec.tracker.end(rec)
        except Exception:
            return None
        if not changed:
            return None
        files = [{"path": f"/mnt/data/{c.path}", "size": c.size, "type": guess_type(c.path),
                  "url": info["links"].file(self.session.id, c.path) if info["links"] else None}
                 for c in changed[:200]]
        md = "Files written to /mnt/data:\n\n" + "\n".join(
            f"- [{f['path'][len('/mnt/data/'):]}]({f['url']}) ({f['size']} bytes)" if f["url"] else
            f"- {f['path']} ({f['size']} bytes)" for f in files)
        content = {"data": {FILES_MIME: {"files": files, "more": max(0, len(changed) - 200)},
                            "text/markdown": md,
                            "text/plain": "\n".join(f"{f['path']} ({f['size']} bytes)" for f in files)},
                   "metadata": {}, "transient": {}}
        header = self.jsession.msg_header("display_data")
        parts = [json_packer(header), json_packer(info["header"]), json_packer({}), json_packer(content)]
        return KernelMessage("iopub", parts)

    def _record(self, info: dict) -> None:
        from broker.transcripts import now_iso

        if info["silent"] or not info["code"].strip():
            return
        status = "error" if any(m["msg_type"] == "error" for m in info["msgs"]) else "success"
        try:
            self.session.transcript.add_ws_execution(info["code"], info["msgs"], info["started"], now_iso(), status)
        except Exception:
            import logging

            logging.getLogger("broker").exception("could not record a WebSocket execution in the transcript")

    def _notice(self, parent_parts: list, text: str) -> KernelMessage:
        header = self.jsession.msg_header("stream")
        return KernelMessage("iopub", [json_packer(header), parent_parts[1], json_packer({}),
                                       json_packer({"name": "stderr", "text": text})])

    # -- the stream -------------------------------------------------------------
    def _on_recv(self, frames) -> None:
        try:
            _, msg_list = self.jsession.feed_identities(frames, copy=True)
        except ValueError:
            return
        msg = KernelMessage("iopub", list(msg_list[1:]))  # [0] is the signature
        try:
            mtype = msg.msg_type
        except ValueError:
            return
        out = [msg]
        if msg.size > self.settings.max_message_bytes:
            out = [self._notice(msg.parts, f"[broker: a {mtype} message of {msg.size} bytes was dropped; the limit "
                                           f"is {self.settings.max_message_bytes}]\n")]
        elif mtype == "stream":
            pid = msg.parent_id
            used = self._out_bytes.get(pid, 0) + len(msg.parts[3])
            self._out_bytes[pid] = used
            if used > self.settings.max_output_bytes:
                if pid in self._notified:
                    return
                self._notified.add(pid)
                out = [self._notice(msg.parts, f"\n[broker: output of this execution passed "
                                               f"{self.settings.max_output_bytes} bytes; the rest is dropped]\n")]
        if out[0] is msg and mtype in ("execute_input", "stream", "display_data", "execute_result", "error",
                                       "clear_output"):
            info = self.tracked.get(msg.parent_id)
            if info is not None and len(info["msgs"]) < 10_000:
                info["msgs"].append({"header": msg.header, "msg_type": mtype, "content": msg.content()})
        finished = None
        if mtype == "status":
            state = msg.content().get("execution_state")
            if state:
                self.execution_state = state
                # A cell that ran longer than the idle cooldown must not end
                # its session the moment it finishes: its end counts as activity.
                self.session.touch()
            if state == "idle":
                info = self.tracked.pop(msg.parent_id, None)
                self._out_bytes.pop(msg.parent_id, None)
                self._notified.discard(msg.parent_id)
                if info is not None:
                    finished = info
                    files_msg = self._files_message(info)
                    if files_msg is not None:
                        out = [files_msg, msg]
        for m in out:
            for obs in self.observers:
                try:
                    obs(m)
                except Exception:
                    pass
            for conn in list(self.listeners.values()):
                conn.deliver(m)
        if finished is not None:
            # After the clients have their idle: the transcript write (a whole
            # notebook rewrite) is not part of the execution's latency.
            self._record(finished)


class ChannelConnection:
    """One client's channels to the kernel."""

    def __init__(self, hub: IOPubHub, session_id: str, deliver: Callable[[KernelMessage], None]):
        self.hub = hub
        self.session_id = session_id
        self.settings = hub.settings
        self._deliver = deliver
        self._buffer: list[KernelMessage] = []
        self._buffered = 0
        self._detached_at: float | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.closed = False
        # Called once when these channels close (kernel deleted, broker
        # shutting down, replaced by a newer client): the web layer closes
        # the WebSocket instead of leaving it open and silent.
        self.on_closed: Callable[[], None] | None = None
        self.jsession = JSession(key=hub.jsession.key, signature_scheme=hub.jsession.signature_scheme,
                                 session=session_id, username="broker")
        ctx = zmq.Context.instance()
        self.streams: dict[str, ZMQStream] = {}
        for channel in CHANNELS:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # One identity for all three: ipykernel sends input_request to the
            # identity that sent the execute_request.
            sock.setsockopt(zmq.IDENTITY, session_id.encode())
            sock.connect(hub.session.kernel_address(channel))
            stream = ZMQStream(sock)
            stream.on_recv(lambda frames, ch=channel: self._on_recv(ch, frames), copy=True)
            self.streams[channel] = stream
        hub.listeners[session_id] = self

    def _on_recv(self, channel: str, frames) -> None:
        try:
            _, msg_list = self.jsession.feed_identities(frames, copy=True)
        except ValueError:
            return
        msg = KernelMessage(channel, list(msg_list[1:]))
        if msg.size > self.settings.max_message_bytes:
            msg = self.hub._notice(msg.parts, f"[broker: a {channel} reply of {msg.size} bytes was dropped]\n")
        self.deliver(msg)

    def deliver(self, msg: KernelMessage) -> None:
        if self.closed:
            return
        if self._detached_at is None:
            self._deliver(msg)
            return
        if self._buffered + msg.size <= self.settings.max_buffered_bytes:
            self._buffer.append(msg)
            self._buffered += msg.size

    # -- from the client ----------------------------------------------------------
    def send(self, channel: str, parts: list, links=None) -> None:
        """Sign and send a client message (parts: header, parent, metadata,
        content, *buffers) to the kernel.  Raises ValueError when malformed."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; use shell, control or stdin")
        if len(parts) < 4:
            raise ValueError("a message needs header, parent_header, metadata and content")
        header = json.loads(parts[0])
        if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str):
            raise ValueError("header must be an object with msg_type")
        for p in parts[1:4]:
            if not isinstance(json.loads(p or b"{}"), dict):
                raise ValueError("parent_header, metadata and content must be objects")
        if header["msg_type"] in self.settings.blocked_message_types:
            return
        if header["msg_type"] == "execute_request" and channel == "shell":
            self.hub.track(header, json.loads(parts[3]), links)
            self.hub.session.mark_kernel_state()
        self.jsession.send_raw(self.streams[channel], [bytes(p) for p in parts])

    # -- lifetime -------------------------------------------------------------------
    def detach(self) -> None:
        """The client went away: keep channels and buffer, for a while."""
        self._detached_at = time.monotonic()
        loop = asyncio.get_event_loop()
        self._expiry = loop.call_later(self.settings.reconnect_window, self.close)

    def attach(self, deliver: Callable[[KernelMessage], None]) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._deliver = deliver
        self._detached_at = None
        buffered, self._buffer, self._buffered = self._buffer, [], 0
        for m in buffered:
            deliver(m)

    @property
    def attached(self) -> bool:
        return self._detached_at is None and not self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._expiry is not None:
            self._expiry.cancel()
        for s in self.streams.values():
            s.close()
        if self.hub.listeners.get(self.session_id) is self:
            del self.hub.listeners[self.session_id]
        callback, self.on_closed = self.on_closed, None
        if callback is not None:
            callback()
