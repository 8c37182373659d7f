"""The operator's endpoints: who am I, every session of every owner, /metrics.

``/api/admin/*`` answer only tokens with the admin role (tokens file,
docs/admin.md); to any other token they are 404, exactly like an endpoint
that does not exist, so a non-admin learns nothing from them.
"""

from __future__ import annotations

import asyncio
import time

from broker.errors import SessionNotFound
from broker.metrics import CONTENT_TYPE, session_usage
from broker.web.base import SID, BaseHandler, BrokerErrorWithStatus


def _not_found(handler) -> BrokerErrorWithStatus:
    # The same answer as NotFoundHandler's: an admin endpoint does not exist for a non-admin.
    return BrokerErrorWithStatus(404, "not_found",
                                 f"no such endpoint: {handler.request.method} {handler.request.path}")


class WhoamiHandler(BaseHandler):
    def get(self):
        self.write_json({"owner": self.current_user, "admin": self.is_admin})


class AdminHandler(BaseHandler):
    def prepare(self):
        super().prepare()
        if not self.is_admin:
            raise _not_found(self)


class AdminSessionsHandler(AdminHandler):
    async def get(self):
        mgr = self.sessions
        alive = sorted(mgr.sessions.values(), key=lambda s: s.created)
        now = time.time()
        # Reads cgroup files and walks each /mnt/data: off the event loop.
        rows = await asyncio.to_thread(lambda: [session_usage(s, now) for s in alive])
        self.write_json({"sessions": rows, "pooled": len(getattr(mgr, "_pool", []))})


class AdminSessionHandler(AdminHandler):
    async def get(self, sid):
        s = self._session(sid)
        self.write_json(await asyncio.to_thread(session_usage, s))

    async def delete(self, sid):
        s = self._session(sid)
        await self.sessions.delete(sid, s.owner)
        self.set_status(204)
        self.finish()

    def _session(self, sid):
        s = self.sessions.sessions.get(sid)
        if s is None or s.deleted:
            raise SessionNotFound(sid)
        return s


class MetricsHandler(BaseHandler):
    """/metrics in the Prometheus text format; ServeApp.metrics_auth says who may read it."""

    def prepare(self):
        mode = self.state.metrics_auth
        if mode == "none":
            return
        super().prepare()
        if mode == "admin" and not self.is_admin:
            raise _not_found(self)

    def get(self):
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(self.state.metrics.render())


routes = [
    (r"/api/whoami/?", WhoamiHandler),
    (r"/api/admin/sessions/?", AdminSessionsHandler),
    (rf"/api/admin/sessions/{SID}/?", AdminSessionHandler),
    (r"/metrics/?", MetricsHandler),
]
