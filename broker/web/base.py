"""The base handler: authentication, JSON in, JSON errors out.

Every error leaves as ``{"message": ..., "reason": ...}`` (plus ``field`` and
``allowed`` for a bad argument) with the right status; a traceback never
reaches the client.  Broker errors are mapped to HTTP here and nowhere else.
"""

from __future__ import annotations

import hmac
import json

import orjson
from tornado import web

from broker.errors import BrokerError, InvalidArgument
from broker.links import Links


def dumps(obj) -> bytes:
    """JSON as the API sends it: orjson (UTF-8, about ten times faster than the
    json module); what orjson refuses (integers past 64 bits, keys that are not
    strings) goes through the json module as before."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(obj).encode()


class Auth:
    """Tokens to owners.  Comparison is constant-time over every token."""

    def __init__(self, tokens: dict[str, str]):
        if not tokens:
            raise ValueError("at least one token is required; the broker is never open")
        self.tokens = tokens

    def owner_for(self, header: str | None) -> str | None:
        if not header:
            return None
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() not in ("bearer", "token") or not value.strip():
            return None
        given = value.strip().encode()
        found = None
        for token, owner in self.tokens.items():
            if hmac.compare_digest(token.encode(), given):
                found = owner
        return found


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
        return self.state.auth.owner_for(self.request.headers.get("Authorization"))

    def prepare(self):
        if self.current_user is None and not (self.allow_signed and self.signed_ok()):
            raise BrokerErrorWithStatus(401, "unauthorized",
                                        "missing or wrong token: send 'Authorization: Bearer <token>'")

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

    # -- errors --------------------------------------------------------------
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
