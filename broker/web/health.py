"""GET /api/ready and GET /api/live: for routers and orchestrators, no token.

/api/ready answers 200 when the broker may take new sessions and 503 (with
the reasons) when not; /api/live answers 200 while the process serves HTTP.
Neither names a session or an owner.
"""

from __future__ import annotations

from broker.health import readiness
from broker.web.base import BaseHandler


class ReadyHandler(BaseHandler):
    def prepare(self):
        pass    # no token: health checks carry none, and the answer holds nothing private

    def get(self):
        report = readiness(self.sessions)
        self.write_json(report, 200 if report["ready"] else 503)

    head = get


class LiveHandler(BaseHandler):
    def prepare(self):
        pass

    def get(self):
        self.write_json({"live": True, "broker": self.sessions.broker_name})

    head = get


routes = [(r"/api/ready", ReadyHandler), (r"/api/live", LiveHandler)]
