"""/api/sessions: create, list, get and delete sessions."""

from __future__ import annotations

from broker.web.base import SID, BaseHandler
from broker.web.events import stream_tool_call, wants_events


class SessionsHandler(BaseHandler):
    async def get(self):
        self.write_json([s.model() for s in self.sessions.list(self.current_user)])

    async def post(self):
        self.json_body()    # no fields yet, but a body that is not JSON is a 400, not ignored
        s = await self.sessions.create(self.current_user)
        self.set_header("Location", f"/api/sessions/{s.id}")
        self.write_json(s.model(), 201)


class SessionHandler(BaseHandler):
    async def get(self, sid):
        s = self.sessions.get(sid, self.current_user)
        self.write_json(s.model())

    async def delete(self, sid):
        await self.sessions.delete(sid, self.current_user)
        self.set_status(204)
        self.finish()


class ToolHandler(BaseHandler):
    async def post(self, sid, name):
        from broker.tools import ToolContext, call_tool, get_tool

        s = self.sessions.get(sid, self.current_user)
        get_tool(name)  # 404 with the known tools before reading the body
        mode = self.get_query_argument("images", self.state.inline_images)
        if mode not in ("url", "data"):
            from broker.errors import InvalidArgument

            raise InvalidArgument("query parameter 'images' must be 'url' or 'data'", "images", "url, data")
        if wants_events(self.request.headers.get("Accept")):
            await stream_tool_call(self, ToolContext(s, self.links, mode), name, self.json_body(),
                                   getattr(self.state, "event_keepalive", 15.0))
            return
        result = await call_tool(ToolContext(s, self.links, mode), name, self.json_body())
        self.write_json(result)


routes = [
    (r"/api/sessions/?", SessionsHandler),
    (rf"/api/sessions/{SID}/?", SessionHandler),
    (rf"/api/sessions/{SID}/tools/(?P<name>[^/]+)/?", ToolHandler),
]


class TranscriptHandler(BaseHandler):
    async def get(self, sid):
        s = self.sessions.get(sid, self.current_user)
        await s.transcript.flush()
        self.set_header("Content-Type", "application/x-ipynb+json")
        self.set_header("Content-Disposition", f'attachment; filename="session-{sid}.ipynb"')
        self.finish(s.transcript.to_json())


routes.append((rf"/api/sessions/{SID}/transcript/?", TranscriptHandler))
