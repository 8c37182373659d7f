"""Download links for session files.

Markdown shown to a model or a person carries plain URLs, and whoever follows
one cannot add an ``Authorization`` header.  So every link the broker hands
out is signed: ``?exp=<unix time>&sig=<HMAC-SHA256>`` over the session id,
the path, the download name and the expiry, with a key that never leaves the
broker.  A signed link grants a read of that one file until it expires; the
file endpoints accept either a valid signature or the owner's token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import quote, urlencode


class LinkSigner:
    def __init__(self, key: bytes | None = None, ttl: float = 24 * 3600):
        self.key = key or secrets.token_bytes(32)
        self.ttl = ttl

    def _mac(self, sid: str, path: str, name: str, exp: int) -> str:
        msg = "\n".join((sid, path, name, str(exp))).encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()[:32]

    def sign(self, sid: str, path: str, name: str = "") -> dict:
        exp = int(time.time() + self.ttl)
        q = {"exp": str(exp), "sig": self._mac(sid, path, name, exp)}
        if name:
            q["name"] = name
        return q

    def verify(self, sid: str, path: str, name: str, exp: str, sig: str) -> bool:
        try:
            e = int(exp)
        except (TypeError, ValueError):
            return False
        if e < time.time():
            return False
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, so a 500).
        return hmac.compare_digest(self._mac(sid, path, name or "", e).encode(), (sig or "").encode())


class Links:
    """Builds absolute URLs for one request's base URL."""

    def __init__(self, base_url: str, signer: LinkSigner):
        self.base = base_url.rstrip("/")
        self.signer = signer

    def file(self, sid: str, path: str, name: str = "") -> str:
        q = urlencode(self.signer.sign(sid, path, name))
        return f"{self.base}/api/sessions/{sid}/files/{quote(path)}?{q}"
