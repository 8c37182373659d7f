"""The web page at ``/``: plain HTML, CSS and JavaScript modules from
``broker/static`` (no build step), the headers that keep it safe, and the
short-lived tickets a browser uses to open the kernel WebSocket.

``GET /`` answers the page to browsers (``Accept`` naming ``text/html``) and
the old JSON description to everyone else, so API callers see no change.

Security model (docs/page.md): the page and its files carry a strict
Content-Security-Policy (scripts and styles from this origin only, no inline
script, no eval, no framing by others); output of user code is never inserted
as HTML into the page: text goes in as text, images as ``data:`` URLs, HTML in
an ``<iframe sandbox srcdoc>`` (a unique opaque origin, no scripts).  The token
lives in the tab's sessionStorage and travels in ``Authorization`` headers only.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time

from tornado import web

from broker import __version__
from broker.web.base import SID, BaseHandler

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")

# The page's policy.  connect-src 'self' covers the same-origin ws:/wss: URL
# of the kernel WebSocket (CSP level 3).  srcdoc frames inherit this policy, so
# even without the sandbox attribute no script in an HTML output could run.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; frame-src 'self'; child-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

CONTENT_TYPES = {
    ".html": "text/html; charset=UTF-8",
    ".js": "text/javascript; charset=UTF-8",
    ".css": "text/css; charset=UTF-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

TICKET_TTL = 30.0      # seconds a WebSocket ticket stays valid
MAX_TICKETS = 10_000   # outstanding tickets kept at most (oldest dropped first)


def set_security_headers(handler: web.RequestHandler) -> None:
    for name, value in SECURITY_HEADERS.items():
        handler.set_header(name, value)


class WsTickets:
    """Single-use, short-lived tickets for the kernel WebSocket.

    Browsers cannot set ``Authorization`` on a WebSocket, and the long-lived
    token must never travel in a URL.  The page asks ``POST
    /api/sessions/{id}/ws-ticket`` (with its token, in a header) for a ticket
    and opens ``/api/kernels/{id}/channels?ticket=...`` within TICKET_TTL
    seconds.  A ticket opens that one session's socket, for that owner, once.
    Only a hash of each ticket is kept, so a lookup leaks nothing useful
    through its timing.
    """

    def __init__(self, ttl: float = TICKET_TTL, clock=time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._tickets: dict[bytes, tuple[str, str, float]] = {}

    @staticmethod
    def _key(ticket: str) -> bytes:
        return hashlib.sha256(ticket.encode()).digest()

    def issue(self, sid: str, owner: str) -> str:
        self._expire()
        while len(self._tickets) >= MAX_TICKETS:
            self._tickets.pop(next(iter(self._tickets)))
        ticket = secrets.token_urlsafe(32)
        self._tickets[self._key(ticket)] = (sid, owner, self.clock() + self.ttl)
        return ticket

    def redeem(self, ticket: str, sid: str) -> str | None:
        """The owner the ticket was issued to, if it is valid for *sid*; the
        ticket is used up either way."""
        if not ticket or len(ticket) > 100:
            return None
        entry = self._tickets.pop(self._key(ticket), None)
        if entry is None:
            return None
        t_sid, owner, expires = entry
        if t_sid != sid or self.clock() > expires:
            return None
        return owner

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, (_s, _o, exp) in self._tickets.items() if exp < now]:
            del self._tickets[key]


def wants_html(accept: str | None) -> bool:
    """Browsers name text/html; API callers (curl, requests: ``*/*``,
    ``application/json``) keep the JSON answer ``GET /`` always gave."""
    if not accept:
        return False
    for part in accept.split(","):
        kind, _, params = part.strip().partition(";")
        refused = params.replace(" ", "") in ("q=0", "q=0.0")
        if kind.strip().lower() in ("text/html", "application/xhtml+xml") and not refused:
            return True
    return False


class PageHandler(BaseHandler):
    """``GET /``: the page for browsers, the service description as JSON otherwise."""

    def prepare(self):
        pass  # the page itself is public; everything it shows needs the token

    def get(self):
        self.set_header("Vary", "Accept")
        if not wants_html(self.request.headers.get("Accept")):
            self.write_json({"name": "broker", "version": __version__, "openapi": "/api/openapi.json",
                             "tools": "/api/sessions/{id}/tools/{ToolName}", "page": "/"})
            return
        set_security_headers(self)
        self.set_header("Content-Type", CONTENT_TYPES[".html"])
        self.set_header("Cache-Control", "no-cache")
        with open(os.path.join(STATIC_DIR, "index.html"), "rb") as fh:
            self.finish(fh.read())


class StaticHandler(web.StaticFileHandler):
    """The page's scripts, styles and images, with the same security headers.

    The JavaScript modules import each other by plain relative paths (no build
    step, no hashed names), so browsers must revalidate every file on each load
    (``no-cache`` with the ETag and Last-Modified tornado sends): an upgraded
    broker never runs a mix of old and new modules."""

    def set_default_headers(self):
        set_security_headers(self)

    def set_extra_headers(self, path):
        self.set_header("Cache-Control", "no-cache")

    def get_content_type(self):
        ext = os.path.splitext(self.absolute_path)[1].lower()
        return CONTENT_TYPES.get(ext, "application/octet-stream")

    def validate_absolute_path(self, root, absolute_path):
        # Only the page's own kinds of file; never a listing, never anything else.
        if os.path.splitext(absolute_path)[1].lower() not in CONTENT_TYPES:
            raise web.HTTPError(404, "no such file")
        return super().validate_absolute_path(root, absolute_path)

    def write_error(self, status_code, **kwargs):
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.finish(f"{status_code}: not found\n" if status_code == 404 else f"{status_code}\n")


class WsTicketHandler(BaseHandler):
    """``POST /api/sessions/{id}/ws-ticket`` -> ``{"ticket", "expires_in"}``."""

    def post(self, sid):
        s = self.sessions.get(sid, self.current_user)  # 404 for another owner's session
        tickets: WsTickets = self.settings["ws_tickets"]
        self.write_json({"ticket": tickets.issue(s.id, self.current_user), "expires_in": tickets.ttl,
                         "url": f"/api/kernels/{s.id}/channels"})


routes = [
    (r"/", PageHandler),
    (r"/static/(.*)", StaticHandler, {"path": STATIC_DIR}),
    (rf"/api/sessions/{SID}/ws-ticket/?", WsTicketHandler),
]
