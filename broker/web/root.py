"""GET /: what this server is and where its API document lives."""

from broker import __version__
from broker.web.base import BaseHandler


class RootHandler(BaseHandler):
    def prepare(self):
        pass

    def get(self):
        self.write_json({"name": "broker", "version": __version__, "openapi": "/api/openapi.json",
                         "tools": "/api/sessions/{id}/tools/{ToolName}"})
