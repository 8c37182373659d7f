"""The Jupyter Kernel Gateway API on the broker: kernelspecs, kernels and the
``/api/kernels/{id}/channels`` WebSocket.  A kernel *is* a session: same id,
same /mnt/data, same owner.  ``jupyter server --gateway-url`` and JupyterLab
work against it; see docs/jupyter.md."""

from __future__ import annotations

import datetime
import json
import os
import struct
import time

from tornado import websocket

from broker.channels import ChannelConnection, KernelMessage
from broker.errors import InvalidArgument, NotFound, SessionNotFound
from broker.execution import SANDBOX_KERNEL, BrokerKernelSpecManager
from broker.web.base import SID, BaseHandler, Identity

V1 = "v1.kernel.websocket.jupyter.org"


def _gateway_time(ts: float) -> str:
    # jupyter_server parses this with "%Y-%m-%dT%H:%M:%S.%fZ".
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def kernel_model(s) -> dict:
    return {"id": s.id, "name": SANDBOX_KERNEL, "last_activity": _gateway_time(s.last_activity),
            "execution_state": s.execution_state, "connections": s.connections}


def _spec_model() -> dict:
    spec = BrokerKernelSpecManager().get_kernel_spec(SANDBOX_KERNEL).to_dict()
    return {"name": SANDBOX_KERNEL, "spec": spec,
            "resources": {"logo-32x32": f"/kernelspecs/{SANDBOX_KERNEL}/logo-32x32.png",
                          "logo-64x64": f"/kernelspecs/{SANDBOX_KERNEL}/logo-64x64.png"}}


class KernelSpecsHandler(BaseHandler):
    def get(self):
        self.write_json({"default": SANDBOX_KERNEL, "kernelspecs": {SANDBOX_KERNEL: _spec_model()}})


class KernelSpecHandler(BaseHandler):
    def get(self, name):
        if name != SANDBOX_KERNEL:
            raise NotFound(f"no kernelspec {name!r}; the broker offers {SANDBOX_KERNEL!r}")
        self.write_json(_spec_model())


class KernelSpecResourceHandler(BaseHandler):
    def get(self, name, path):
        import ipykernel

        if name != SANDBOX_KERNEL or path not in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
            raise NotFound(f"no resource {path!r} for kernelspec {name!r}")
        f = os.path.join(os.path.dirname(ipykernel.__file__), "resources", path)
        if not os.path.isfile(f):
            raise NotFound(f"no resource {path!r}")
        self.set_header("Content-Type", "image/svg+xml" if path.endswith(".svg") else "image/png")
        with open(f, "rb") as fh:
            self.finish(fh.read())


class KernelsHandler(BaseHandler):
    def get(self):
        self.write_json([kernel_model(s) for s in self.sessions.list(self.current_user)])

    async def post(self):
        body = self.json_body()
        if not isinstance(body, dict):
            raise InvalidArgument("the body must be a JSON object like {\"name\": \"python3-sandbox\"}")
        name = body.get("name") or SANDBOX_KERNEL
        if name != SANDBOX_KERNEL:
            raise InvalidArgument(f"no kernelspec {name!r}; the broker offers {SANDBOX_KERNEL!r}", "name",
                                  SANDBOX_KERNEL)
        env = body.get("env") or {}
        if not isinstance(env, dict):
            raise InvalidArgument("'env' must be an object of strings", "env", "an object of KERNEL_* strings")
        allowed = set(self.state.channels.kernel_env_allowlist)
        kept = {k: v for k, v in env.items() if k in allowed and isinstance(v, str)}
        s = await self.sessions.create(self.current_user, env=kept)
        self.set_header("Location", f"/api/kernels/{s.id}")
        self.write_json(kernel_model(s), 201)


class KernelHandler(BaseHandler):
    def get(self, sid):
        self.write_json(kernel_model(self.sessions.get(sid, self.current_user)))

    async def delete(self, sid):
        await self.sessions.delete(sid, self.current_user)
        self.set_status(204)
        self.finish()


class KernelActionHandler(BaseHandler):
    async def post(self, sid, action):
        s = self.sessions.get(sid, self.current_user)
        s.touch()
        if action == "interrupt":
            await s.interrupt_kernel()
            self.set_status(204)
            self.finish()
        else:
            await s.restart_kernel()
            self.write_json(kernel_model(s))


# -- WebSocket framing ---------------------------------------------------------------

def _dumps(obj) -> bytes:
    return json.dumps(obj, default=str, ensure_ascii=False).encode()


def encode_v1(msg: KernelMessage) -> bytes:
    parts = [msg.channel.encode()] + [bytes(p) for p in msg.parts]
    offsets = [8 * (1 + len(parts) + 1)]
    for p in parts:
        offsets.append(offsets[-1] + len(p))
    head = struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets)
    return head + b"".join(parts)


def decode_v1(frame: bytes) -> tuple[str, list]:
    if len(frame) < 8:
        raise ValueError("v1 frame shorter than its header")
    (n,) = struct.unpack_from("<Q", frame, 0)
    if not 6 <= n <= 1 + 1 + 4 + 1000 or len(frame) < 8 * (n + 1):
        raise ValueError("v1 frame has a bad offset count")
    offsets = list(struct.unpack_from(f"<{n}Q", frame, 8))
    if offsets != sorted(offsets) or offsets[0] != 8 * (n + 1) or offsets[-1] != len(frame):
        raise ValueError("v1 frame offsets are inconsistent")
    channel = frame[offsets[0]:offsets[1]].decode()
    return channel, [frame[offsets[i]:offsets[i + 1]] for i in range(1, n - 1)]


def encode_legacy(msg: KernelMessage):
    """Legacy framing: a JSON text frame; binary only when there are buffers."""
    header, parent, metadata, content = (json.loads(p) if p else {} for p in msg.parts[:4])
    d = {"header": header, "parent_header": parent, "metadata": metadata, "content": content,
         "msg_id": header.get("msg_id"), "msg_type": header.get("msg_type"), "channel": msg.channel, "buffers": []}
    buffers = [bytes(b) for b in msg.parts[4:]]
    if not buffers:
        return json.dumps(d, default=str, ensure_ascii=False), False
    body = _dumps(d)
    bufs = [body] + buffers
    offsets = [4 * (len(bufs) + 1)]
    for b in bufs[:-1]:
        offsets.append(offsets[-1] + len(b))
    return struct.pack(f"!{len(bufs) + 1}I", len(bufs), *offsets) + b"".join(bufs), True


def decode_legacy(frame) -> tuple[str, list]:
    buffers: list = []
    if isinstance(frame, bytes):
        if len(frame) < 4:
            raise ValueError("binary frame shorter than its header")
        (n,) = struct.unpack_from("!I", frame, 0)
        if not 1 <= n <= 1000 or len(frame) < 4 * (n + 1):
            raise ValueError("binary frame has a bad buffer count")
        offsets = list(struct.unpack_from(f"!{n}I", frame, 4)) + [len(frame)]
        if offsets != sorted(offsets):
            raise ValueError("binary frame offsets are inconsistent")
        chunks = [frame[offsets[i]:offsets[i + 1]] for i in range(n)]
        d = json.loads(chunks[0])
        buffers = chunks[1:]
    else:
        d = json.loads(frame)
    if not isinstance(d, dict) or not isinstance(d.get("header"), dict):
        raise ValueError("a message must be a JSON object with a header")
    channel = d.get("channel") or "shell"
    parts = [_dumps(d["header"]), _dumps(d.get("parent_header") or {}), _dumps(d.get("metadata") or {}),
             _dumps(d.get("content") or {})]
    return channel, parts + [bytes(b) for b in buffers]


class ChannelsHandler(websocket.WebSocketHandler):
    """/api/kernels/{id}/channels: both framings, auth on the upgrade."""

    @property
    def state(self):
        return self.settings["broker"]

    def get_current_user(self):
        who = self.state.auth.identify(self.request.headers.get("Authorization"))
        if who is None and "ws_tickets" in self.settings:
            # Browsers cannot set headers on a WebSocket: the page brings a
            # single-use ticket from POST /api/sessions/{id}/ws-ticket instead.
            owner = self.settings["ws_tickets"].redeem(self.get_query_argument("ticket", ""),
                                                       self.path_kwargs.get("sid", ""))
            who = Identity(owner) if owner else None
        self.identity = who
        return who.owner if who is not None else None

    async def get(self, sid):
        owner = self.current_user
        if owner is None:
            self.set_status(401)
            self.finish(json.dumps({"message": "missing or wrong token: send 'Authorization: Bearer <token>' "
                                               "(or ?ticket= from POST /api/sessions/{id}/ws-ticket)",
                                    "reason": "unauthorized"}))
            return
        if self.state.sessions.snapshots is not None:
            try:
                await self.state.sessions.find(sid, owner)     # restored from its snapshot when not here
            except SessionNotFound:
                pass
        s = self.state.sessions.sessions.get(sid)
        if s is None or s.owner != owner or s.deleted:
            self.set_status(404)
            self.finish(json.dumps({"message": f"no kernel {sid!r}", "reason": "not_found"}))
            return
        self.session = s
        self.client_session_id = self.get_query_argument("session_id", "") or os.urandom(8).hex()
        self.hub = await s.get_hub(self.state.channels)
        await super().get(sid)

    def select_subprotocol(self, subprotocols):
        self.v1 = V1 in subprotocols
        return V1 if self.v1 else None

    def check_origin(self, origin):
        # Auth is a header, which a browser page on another origin cannot set
        # on a WebSocket; no cookie grants access.
        return True

    def open(self, sid):
        self.set_nodelay(True)
        self.closed_by_us = False
        from broker.links import Links

        base = self.state.public_url or f"{self.request.protocol}://{self.request.host}"
        self.links = Links(base, self.state.signer)
        old = self.hub.listeners.get(self.client_session_id)
        if old is not None and not old.closed:
            if old.attached:
                # Same session_id connected twice: the newest wins, like jupyter_server.
                old.close()
                self.conn = ChannelConnection(self.hub, self.client_session_id, self._deliver)
            else:
                old.attach(self._deliver)
                self.conn = old
        else:
            self.conn = ChannelConnection(self.hub, self.client_session_id, self._deliver)
        self.conn.on_closed = self._channels_closed
        self.session.touch()

    def _channels_closed(self) -> None:
        # The kernel was deleted, the broker is stopping, or a newer client
        # took this session_id: say so rather than stay open and silent.
        if self.ws_connection is not None and not self.ws_connection.is_closing():
            self.close(1001, "kernel channels closed: kernel deleted, broker stopping, or a newer "
                             "connection with this session_id")

    def _deliver(self, msg: KernelMessage) -> None:
        if self.pending and msg.channel == "shell" and msg.msg_type == "execute_reply":
            self._executed(msg)
        if self.ws_connection is None or self.ws_connection.is_closing():
            return
        try:
            if self.v1:
                self.write_message(encode_v1(msg), binary=True)
            else:
                data, binary = encode_legacy(msg)
                self.write_message(data, binary=binary)
        except websocket.WebSocketClosedError:
            pass

    def on_message(self, message):
        try:
            if self.v1:
                if not isinstance(message, bytes):
                    raise ValueError("the v1 protocol uses binary frames only")
                channel, parts = decode_v1(message)
            else:
                channel, parts = decode_legacy(message)
            if channel == "shell" and self.state.call_log is not None:
                self._track(parts)
            self.conn.send(channel, parts, self.links)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            self.closed_by_us = True
            self.close(1008, f"malformed message: {str(exc)[:100]}")
            return
        self.session.touch()

    # -- the call log: one line per execute_request, at its reply -------------------
    pending: dict | None = None

    def _track(self, parts: list) -> None:
        header = json.loads(parts[0])
        if header.get("msg_type") == "execute_request" and len(self.pending or ()) < 1000:
            if self.pending is None:
                self.pending = {}
            self.pending[header.get("msg_id")] = (time.monotonic(), sum(len(p) for p in parts))

    def _executed(self, msg: KernelMessage) -> None:
        started = self.pending.pop(msg.parent_id, None)
        if started is None:
            return
        seconds = time.monotonic() - started[0]
        reply = msg.content()
        outcome = str(reply.get("status") or "")
        if self.state.observer is not None:
            self.state.observer.ws_execute(self.session, outcome, seconds, reply)
        self.state.call_log.ws_execute(method="WS", endpoint="/api/kernels/{sid}/channels", status="execute_reply",
                                       duration_ms=round(seconds * 1000, 1), session=self.session.id,
                                       owner=self.session.owner, outcome=outcome, bytes_in=started[1])

    def on_close(self):
        conn = getattr(self, "conn", None)
        if conn is not None and conn.attached and conn._deliver == self._deliver:
            # Not kept for a reconnect after a malformed frame (the client's
            # close frame need not echo our 1008).
            if self.closed_by_us or self.close_code == 1008:
                conn.close()
            else:
                conn.detach()


routes = [
    (r"/api/kernelspecs/?", KernelSpecsHandler),
    (r"/api/kernelspecs/(?P<name>[^/]+)/?", KernelSpecHandler),
    (r"/kernelspecs/(?P<name>[^/]+)/(?P<path>[^/]+)", KernelSpecResourceHandler),
    (r"/api/kernels/?", KernelsHandler),
    (rf"/api/kernels/{SID}/?", KernelHandler),
    (rf"/api/kernels/{SID}/(?P<action>interrupt|restart)/?", KernelActionHandler),
    (rf"/api/kernels/{SID}/channels", ChannelsHandler),
]
