"""The base handler: authentication, JSON in, JSON errors out.

Every error leaves as ``{"message": ..., "reason": ...}`` (plus ``field`` and
``allowed`` for a bad argument) with the right status; a traceback never
reaches the client.  Broker errors are mapped to HTTP here and nowhere else.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import traceback
from typing import NamedTuple

import orjson
from tornado import httputil, web

from broker import logs
from broker.errors import BrokerError, InvalidArgument, SessionNotFound
from broker.links import Links


# A session id in a route (broker/ids.py says what a valid one is; the
# handlers answer 404 for anything else that matches here).
SID = r"(?P<sid>[A-Za-z0-9_-]+)"


def dumps(obj) -> bytes:
    """JSON as the API sends it: orjson (UTF-8, about ten times faster than the
    json module); what orjson refuses (integers past 64 bits, keys that are not
    strings) goes through the json module as before."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(obj).encode()


class Identity(NamedTuple):
    """Who a token speaks for: an owner, and whether it may see every owner's sessions."""
    owner: str
    admin: bool = False


def parse_tokens(data, source: str) -> dict[str, Identity]:
    """A tokens file's JSON: each entry is ``"token": "owner"`` or
    ``"token": {"owner": "name", "admin": true}``.  A bad entry is named by
    its position and owner, never by its token (the message may be logged)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: must be a JSON object mapping tokens to owners, e.g. "
                         '{"tok-alice": "alice", "tok-ops": {"owner": "ops", "admin": true}}')
    allowed = 'an owner name (a non-empty string) or {"owner": "name", "admin": true|false}'
    out: dict[str, Identity] = {}
    for n, (token, value) in enumerate(data.items(), 1):
        where = f"{source}: entry {n}"
        if not token.strip():
            raise ValueError(f"{where}: the token is empty; a token must be a non-empty string")
        if isinstance(value, str) and value:
            out[token] = Identity(value)
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{where}: the value is {json.dumps(value)[:60]}; it must be {allowed}")
        owner = value.get("owner")
        where += f" (owner {owner!r})" if isinstance(owner, str) else ""
        unknown = sorted(set(value) - {"owner", "admin"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; the keys allowed are "
                             "'owner' and 'admin'")
        if not isinstance(owner, str) or not owner:
            raise ValueError(f"{where}: 'owner' must be a non-empty string (the owner's name)")
        admin = value.get("admin", False)
        if not isinstance(admin, bool):
            raise ValueError(f"{where}: 'admin' is {json.dumps(admin)[:40]}; it must be true or false")
        out[token] = Identity(owner, admin)
    return out


class Auth:
    """Tokens to identities (owner, admin).  Comparison is constant-time over every token."""

    def __init__(self, tokens: dict[str, str | Identity]):
        if not tokens:
            raise ValueError("at least one token is required; the broker is never open")
        self.tokens = {t: v if isinstance(v, Identity) else Identity(v) for t, v in tokens.items()}

    def identify(self, header: str | None) -> Identity | None:
        if not header:
            return None
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() not in ("bearer", "token") or not value.strip():
            return None
        given = value.strip().encode()
        found = None
        for token, who in self.tokens.items():
            if hmac.compare_digest(token.encode(), given):
                found = who
        return found

    def owner_for(self, header: str | None) -> str | None:
        who = self.identify(header)
        return who.owner if who is not None else None


def error_body(e: BrokerError) -> dict:
    """The JSON an error leaves as: message and reason, plus field and allowed
    for a bad argument."""
    body = {"message": e.message, "reason": e.reason}
    if isinstance(e, InvalidArgument):
        if e.field:
            body["field"] = e.field
        if e.allowed:
            body["allowed"] = e.allowed
    return body


class BaseHandler(web.RequestHandler):
    # Handlers that accept a signed link instead of a token set this.
    allow_signed = False

    @property
    def state(self):
        return self.settings["broker"]

    @property
    def sessions(self):
        return self.state.sessions

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")

    def get_current_user(self):
        who = self.state.auth.identify(self.request.headers.get("Authorization"))
        self.identity = who
        return who.owner if who is not None else None

    @property
    def is_admin(self) -> bool:
        """The caller's token carries the admin role (tokens file)."""
        return self.current_user is not None and self.identity.admin

    def prepare(self):
        self.call_facts = logs.begin_call()
        if self.current_user is None and not (self.allow_signed and self.signed_ok()):
            raise BrokerErrorWithStatus(401, "unauthorized",
                                        "missing or wrong token: send 'Authorization: Bearer <token>'")
        return self.restore_if_missing()

    def restore_if_missing(self):
        """An awaitable when the session the path names is not here but may be
        restored from its snapshot (broker/snapshots.py); else None."""
        sid = self.path_kwargs.get("sid")
        sessions = self.sessions
        if sid and self.current_user and sessions.snapshots is not None and sid not in sessions.sessions:
            return self._restore(sid)
        return None

    async def _restore(self, sid):
        try:
            await self.sessions.find(sid, self.current_user)
        except SessionNotFound:
            pass    # the handler answers 404 as usual

    def signed_ok(self) -> bool:
        return False

    @property
    def links(self) -> Links:
        base = self.state.public_url or f"{self.request.protocol}://{self.request.host}"
        return Links(base, self.state.signer)

    def json_body(self):
        if not self.request.body:
            return {}
        try:
            return orjson.loads(self.request.body)
        except ValueError as exc:
            raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None

    def write_json(self, obj, status: int = 200):
        self.set_status(status)
        self.finish(dumps(obj))

    def flush(self, include_footers: bool = False):
        # Response bytes for the call log and /metrics (tornado keeps no count).
        self.bytes_sent = getattr(self, "bytes_sent", 0) + sum(len(c) for c in self._write_buffer)
        return super().flush(include_footers)

    # -- errors --------------------------------------------------------------
    def log_exception(self, typ, value, tb):
        """An unexpected exception: one ``error`` line with the traceback, on
        the call log (tornado's own would print the raw URI, query string
        and all)."""
        if isinstance(value, web.HTTPError) or (isinstance(value, BrokerError) and value.status < 500):
            return
        call_log = getattr(self.state, "call_log", None)
        text = "".join(traceback.format_exception(typ, value, tb))
        if call_log is None:
            logging.getLogger("broker").error("unexpected error in %s %s\n%s", self.request.method,
                                              route_of(self), text)
            return
        call_log.error(call_fields(self), text)

    def _handle_request_exception(self, e):
        if isinstance(e, BrokerError):
            if self._finished:
                return
            body = error_body(e)
            if e.status >= 500:
                self.log_exception(type(e), e, e.__traceback__)
            self.clear()
            self.set_default_headers()
            self.set_status(e.status)
            if getattr(e, "retry_after", None):
                self.set_header("Retry-After", str(e.retry_after))
            self.finish(json.dumps(body))
            return
        super()._handle_request_exception(e)

    def write_error(self, status_code, **kwargs):
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        message = self._reason
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        elif status_code >= 500:
            message = "internal error (see the broker's log)"
        self.finish(json.dumps({"message": message, "reason": self._reason.lower().replace(" ", "_")}))


class BrokerErrorWithStatus(BrokerError):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason


class NotFoundHandler(BaseHandler):
    def prepare(self):
        raise BrokerErrorWithStatus(404, "not_found", f"no such endpoint: {self.request.method} {self.request.path}")


# -- the call log and metrics of every request ----------------------------------

_GROUP = re.compile(r"\(\?P<(\w+)>[^()]*(?:\([^()]*\)[^()]*)*\)")


def route_label(pattern: str) -> str:
    """A route regex as a bounded label: ``/api/sessions/{sid}/tools/{name}``."""
    text = _GROUP.sub(lambda m: "{" + m.group(1) + "}", pattern)
    for tail in ("/?$", "/?", "$"):
        if text.endswith(tail):
            text = text[: -len(tail)]
    return text.lstrip("^") or "/"


def route_table(rules) -> dict:
    """Handler class -> [(compiled pattern, label)] from an application's route list."""
    table: dict = {}
    for rule in rules:
        pattern, cls = rule[0], rule[1]
        table.setdefault(cls, []).append((re.compile(pattern if pattern.endswith("$") else pattern + "$"),
                                          route_label(pattern)))
    return table


def route_of(handler) -> str:
    """The route pattern that served *handler* (``(unmatched)`` for the 404 of no route)."""
    routes = getattr(handler.settings.get("broker"), "routes", None) or {}
    entries = routes.get(type(handler))
    if not entries:
        return "(unmatched)"
    if len(entries) == 1:
        return entries[0][1]
    for rx, label in entries:
        if rx.match(handler.request.path):
            return label
    return entries[0][1]


def call_fields(handler) -> dict:
    """The facts of one request for its log line: never its query string,
    headers or body."""
    facts = getattr(handler, "call_facts", None) or {}
    kwargs = handler.path_kwargs or {}
    who = getattr(handler, "identity", None)
    request = handler.request
    try:
        bytes_in = len(request.body) if request.body else int(request.headers.get("Content-Length") or 0)
    except ValueError:
        bytes_in = 0
    return {"method": request.method, "endpoint": route_of(handler), "status": handler.get_status(),
            "duration_ms": round(request.request_time() * 1000, 1),
            "session": facts.get("session") or kwargs.get("sid"),
            "owner": who.owner if who is not None else None,
            "tool": facts.get("tool"), "outcome": facts.get("outcome"),
            "bytes_in": bytes_in, "bytes_out": getattr(handler, "bytes_sent", 0)}


def log_request(handler) -> None:
    """The application's log_function: one call-log line and the metrics of
    every finished request (every handler, WebSocket upgrades included)."""
    state = handler.settings.get("broker")
    call_log = getattr(state, "call_log", None)
    observer = getattr(state, "observer", None)
    if call_log is None and observer is None:
        return
    fields = call_fields(handler)
    if observer is not None:
        observer.http_request(fields["method"], fields["endpoint"], fields["status"],
                              fields["duration_ms"] / 1000, fields["bytes_in"], fields["bytes_out"])
    if call_log is not None:
        call_log.call(**fields)


class BodyCap(httputil.HTTPMessageDelegate):
    """Answers 413 to a request whose Content-Length is over the broker's body limit, for every
    route (tornado alone would reset the connection, so the client never learns why).  The body is
    read and dropped (up to DISCARD_MAX), not buffered, so the client, which sends it before it
    reads an answer, gets the 413 rather than a reset.  Bodies without a Content-Length (chunked)
    are bounded by the upload handlers themselves."""

    DISCARD_MAX = 1 << 30

    def __init__(self, inner: httputil.HTTPMessageDelegate, connection, cap: int):
        self.inner, self.connection, self.cap = inner, connection, cap
        self.refused: int | None = None

    def headers_received(self, start_line, headers):
        try:
            length = int(headers.get("Content-Length", "") or 0)
        except ValueError:
            length = 0      # tornado answers a malformed Content-Length with 400 itself
        if length > self.cap:
            self.refused = length
            if length <= self.DISCARD_MAX:
                self.connection.set_max_body_size(length)
            return None
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk):
        if self.refused is None:
            return self.inner.data_received(chunk)
        return None

    def finish(self):
        if self.refused is None:
            return self.inner.finish()
        body = json.dumps({"message": f"the request body is {self.refused} bytes; at most {self.cap} are accepted "
                                      "(SessionManager.max_upload_bytes plus 1 MiB for the envelope)",
                           "reason": "payload_too_large"}).encode()
        self.connection.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", 413, "Payload Too Large"),
            httputil.HTTPHeaders({"Content-Type": "application/json; charset=UTF-8", "Content-Length": str(len(body)),
                                  "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}), body)
        self.connection.finish()
        return None

    def on_connection_close(self):
        if self.refused is None:
            return self.inner.on_connection_close()
        return None


class BrokerApplication(web.Application):
    """tornado's Application with :class:`BodyCap` in front of every request
    (``max_body_bytes`` in the settings; without it, no cap here)."""

    def start_request(self, server_conn, request_conn):
        inner = super().start_request(server_conn, request_conn)
        cap = self.settings.get("max_body_bytes")
        return BodyCap(inner, request_conn, cap) if cap else inner
