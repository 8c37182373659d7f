"""The OpenAPI 3 document, generated from the tool definitions so the two
cannot drift; served at /api/openapi.json and kept in docs/openapi.json."""

from __future__ import annotations

from broker import __version__
from broker.tools import TOOLS
from broker.web.base import BaseHandler

ERROR = {"$ref": "#/components/schemas/Error"}


def _resp(desc, schema=None, ctype="application/json"):
    r = {"description": desc}
    if schema is not None:
        r["content"] = {ctype: {"schema": schema}}
    return r


def _errors(*codes):
    text = {400: "Bad input: the message names the field and what is allowed", 401: "Missing or wrong token",
            404: "No such session (or it belongs to another owner), tool or file", 409: "Conflict",
            413: "Too large", 429: "Session limit reached",
            503: "Sandbox prerequisite missing, or too little memory to start a kernel (memory_low, with "
                 "Retry-After; docs/admission.md)",
            507: "/mnt/data is full"}
    return {str(c): _resp(text[c], ERROR) for c in codes}


def _tool_ok() -> dict:
    r = _resp("Tool result. With Accept: text/event-stream: server-sent events as output happens, the result "
              "last (docs/streaming.md)", {"$ref": "#/components/schemas/ToolResult"})
    r["content"]["text/event-stream"] = {"schema": {
        "type": "string", "description": "events status, stdout, stderr, display, image, exception, then result "
                                         "(the ToolResult) or error; data lines are JSON"}}
    return r


def document() -> dict:
    sid = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Session id"}
    fpath = {"name": "path", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "File path relative to /mnt/data"}
    paths: dict = {
        "/api/ready": {"get": {"summary": "Readiness, for routers and orchestrators (no token): may this broker take "
                                          "new sessions (kernel start works, data root writable, memory admission "
                                          "open)?", "security": [], "responses": {
            "200": _resp("Ready: {ready: true, broker, problems: []}", {"type": "object"}),
            "503": _resp("Not ready: problems says why", {"type": "object"})}}},
        "/api/live": {"get": {"summary": "Liveness (no token): the process serves HTTP", "security": [],
                              "responses": {"200": _resp("{live: true, broker}", {"type": "object"})}}},
        "/api/sessions": {
            "get": {"summary": "List the caller's sessions", "responses": {
                "200": _resp("Sessions", {"type": "array", "items": {"$ref": "#/components/schemas/Session"}}),
                **_errors(401)}},
            "post": {"summary": "Create a session (a sandboxed kernel and its /mnt/data)", "responses": {
                "201": _resp("Created; Location header points at it", {"$ref": "#/components/schemas/Session"}),
                **_errors(401, 429, 503)}},
        },
        "/api/sessions/{id}": {
            "parameters": [sid],
            "get": {"summary": "Get a session", "responses": {
                "200": _resp("Session", {"$ref": "#/components/schemas/Session"}), **_errors(401, 404)}},
            "delete": {"summary": "Delete a session, its kernel and its files", "responses": {
                "204": _resp("Deleted"), **_errors(401, 404)}},
        },
        "/api/sessions/{id}/files": {
            "parameters": [sid],
            "get": {"summary": "List files in /mnt/data", "responses": {
                "200": _resp("Files", {"type": "array", "items": {"$ref": "#/components/schemas/FileInfo"}}),
                **_errors(401, 404)}},
            "post": {"summary": "Multipart upload (field 'file'; optional field 'path')",
                     "requestBody": {"content": {"multipart/form-data": {"schema": {
                         "type": "object", "properties": {"file": {"type": "string", "format": "binary"},
                                                          "path": {"type": "string"}}}}}},
                     "responses": {"201": _resp("Uploaded", {"$ref": "#/components/schemas/Upload"}),
                                   **_errors(400, 401, 404, 413, 507)}},
        },
        "/api/sessions/{id}/files/{path}": {
            "parameters": [sid, fpath],
            "get": {"summary": "Download a file (token, or a signed link from a tool result)",
                    "parameters": [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
                                   for q in ("exp", "sig", "name")],
                    "responses": {"200": _resp("The file", {"type": "string", "format": "binary"},
                                               "application/octet-stream"), **_errors(400, 401, 404, 413)}},
            "put": {"summary": "Upload a file (raw body)", "requestBody": {"content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                    "responses": {"201": _resp("Uploaded", {"$ref": "#/components/schemas/Upload"}),
                                  **_errors(400, 401, 404, 413, 507)}},
            "delete": {"summary": "Delete a file or folder", "responses": {"204": _resp("Deleted"),
                                                                           **_errors(400, 401, 404)}},
        },
    }
    schemas: dict = {
        "Error": {"type": "object", "required": ["message", "reason"], "properties": {
            "message": {"type": "string"}, "reason": {"type": "string"}, "field": {"type": "string"},
            "allowed": {"type": "string"}}},
        "Session": {"type": "object", "required": ["id", "created", "last_activity", "expires_at", "state"],
                    "properties": {"id": {"type": "string"}, "created": {"type": "string", "format": "date-time"},
                                   "last_activity": {"type": "string", "format": "date-time"},
                                   "expires_at": {"type": "string", "format": "date-time"},
                                   "state": {"type": "string", "enum": ["idle", "busy", "stopped"]}}},
        "FileInfo": {"type": "object", "properties": {
            "name": {"type": "string"}, "path": {"type": "string"}, "size": {"type": "integer"},
            "modified": {"type": "string", "format": "date-time"}, "type": {"type": "string"},
            "url": {"type": "string"}}},
        "Upload": {"type": "object", "properties": {"path": {"type": "string"}, "size": {"type": "integer"},
                                                    "sha256": {"type": "string"}}},
        "ToolResult": {"type": "object", "required": ["status", "markdown", "tool"], "properties": {
            "tool": {"type": "string"},
            "status": {"type": "string", "enum": ["success", "error", "timeout"]},
            "markdown": {"type": "string", "description": "Ready to show: output, inline images, file links"},
            "stdout": {"type": "string"}, "stderr": {"type": "string"},
            "result": {"type": "string", "nullable": True},
            "error": {"type": "object", "nullable": True, "properties": {
                "ename": {"type": "string"}, "evalue": {"type": "string"}, "traceback": {"type": "string"}}},
            "images": {"type": "array", "items": {"$ref": "#/components/schemas/FileInfo"}},
            "files": {"type": "array", "items": {"$ref": "#/components/schemas/FileInfo"}},
            "execution_count": {"type": "integer", "nullable": True},
            "duration_ms": {"type": "integer"}, "exit_code": {"type": "integer", "nullable": True},
            "notice": {"type": "string", "description": "What the broker did or cut, and where the rest is"},
            "outputs": {"type": "array", "description": "Every output in the order the code produced it",
                        "items": {"$ref": "#/components/schemas/Output"}},
            "image_count": {"type": "integer", "description": "Images shown or saved (exact, even when listed "
                            "rather than inlined)"},
            "file_count": {"type": "integer", "description": "Other files created or changed (exact, even when "
                           "summarised by folder)"},
            "truncated": {"oneOf": [{"type": "object", "additionalProperties": True}, {"type": "boolean"}],
                          "description": "What was cut, per field, with exact counts and where the whole is "
                                         "(see docs/results.md); the file tools (ReadSessionFile, "
                                         "SearchSessionFiles, ListSessionFiles) answer true or false"}},
            "additionalProperties": True},
        "Output": {"type": "object", "required": ["type", "mimes", "text"], "properties": {
            "type": {"type": "string", "enum": ["stream", "display_data", "execute_result", "error"]},
            "name": {"type": "string", "description": "stdout or stderr (streams)"},
            "mimes": {"type": "array", "items": {"type": "string"}, "description": "The MIME bundle's keys"},
            "text": {"type": "string", "description": "The text shown in markdown for this output"},
            "shown_as": {"type": "string", "description": "The MIME type the text was made from"},
            "image": {"type": "object", "description": "The image file this output shows ({path}; its "
                      "entry in images has the url)"},
            "full": {"type": "string", "nullable": True,
                     "description": "Where the whole text is when it was cut (/mnt/data/outputs/...)"}}},
    }
    admin_404 = {"404": _resp("Not found: also the answer to a token without the admin role", ERROR)}
    paths["/api/whoami"] = {"get": {"summary": "The caller's owner name and whether its token has the admin role",
                                    "responses": {"200": _resp("Who the token speaks for",
                                                               {"$ref": "#/components/schemas/WhoAmI"}),
                                                  **_errors(401)}}}
    paths["/api/admin/sessions"] = {"get": {
        "summary": "Every session of every owner, with its resources (admin tokens only; docs/admin.md)",
        "responses": {"200": _resp("Sessions", {"type": "object", "required": ["sessions"], "properties": {
            "sessions": {"type": "array", "items": {"$ref": "#/components/schemas/AdminSession"}},
            "pooled": {"type": "integer", "description": "Kernels waiting in the warm pool (nobody's yet)"}}}),
                      **_errors(401), **admin_404}}}
    paths["/api/admin/sessions/{id}"] = {
        "parameters": [sid],
        "get": {"summary": "One session of any owner, with its resources (admin tokens only)",
                "responses": {"200": _resp("Session", {"$ref": "#/components/schemas/AdminSession"}),
                              **_errors(401), **admin_404}},
        "delete": {"summary": "End a session of any owner: its kernel stops and its files are deleted "
                              "(admin tokens only)",
                   "responses": {"204": _resp("Ended"), **_errors(401), **admin_404}}}
    paths["/metrics"] = {"get": {
        "summary": "Metrics in the Prometheus text format (docs/metrics.md); who may read them is "
                   "ServeApp.metrics_auth (default: any token)",
        "responses": {"200": _resp("Prometheus text exposition format 0.0.4", {"type": "string"}, "text/plain"),
                      **_errors(401), "404": _resp("With ServeApp.metrics_auth=admin: a token without the "
                                                   "admin role", ERROR)}}}
    schemas["WhoAmI"] = {"type": "object", "required": ["owner", "admin"], "properties": {
        "owner": {"type": "string"}, "admin": {"type": "boolean"}}}
    schemas["AdminSession"] = {
        "type": "object",
        "required": ["id", "owner", "state", "created", "age_seconds", "idle_seconds", "memory_bytes", "cpu_seconds",
                     "disk_bytes", "executing"],
        "properties": {
            "id": {"type": "string"}, "owner": {"type": "string"},
            "state": {"type": "string", "enum": ["idle", "busy", "stopped"]},
            "created": {"type": "string", "format": "date-time"},
            "last_activity": {"type": "string", "format": "date-time"},
            "age_seconds": {"type": "number"}, "idle_seconds": {"type": "number"},
            "memory_bytes": {"type": "integer", "nullable": True,
                             "description": "Memory charged to the session's cgroups (kernel and shell); null "
                                            "without a cgroup (kernel not running, or cgroups off)"},
            "cpu_seconds": {"type": "number", "nullable": True,
                            "description": "CPU time of the session's sandboxes (see docs/admin.md)"},
            "disk_bytes": {"type": "integer", "description": "Bytes allocated to the files in /mnt/data"},
            "executing": {"type": "boolean", "description": "Code is running now (REST call or WebSocket cell)"}}}
    for name, tool in TOOLS.items():
        schemas[name] = tool.input_schema()
        for pname, prop in schemas[name]["properties"].items():
            if pname not in schemas[name]["required"]:
                prop["nullable"] = True     # null stands for the default (Tool.validate)
        paths[f"/api/sessions/{{id}}/tools/{name}"] = {
            "parameters": [sid],
            "post": {"summary": tool.summary, "description": tool.description, "operationId": name,
                     "parameters": [{"name": "images", "in": "query", "required": False,
                                     "schema": {"type": "string", "enum": ["url", "data"]},
                                     "description": "Return images as signed URLs (default) or data: URIs"}],
                     # A tool without required fields also takes an empty body (all defaults).
                     "requestBody": {"required": any(p.required for p in tool.params), "content": {
                         "application/json": {
                         "schema": {"$ref": f"#/components/schemas/{name}"}}}},
                     "responses": {"200": _tool_ok(), **_errors(400, 401, 404, 409, 413, 503, 507)}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "broker", "version": __version__,
                 "description": "A self-hosted code interpreter: sessions with a sandboxed Python kernel and "
                                "/mnt/data, and the eight code-interpreter tools."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <token> "
                       "(or: token <token>)"}}},
    }


class OpenAPIHandler(BaseHandler):
    def prepare(self):  # public: describes the API, holds no data
        pass

    def get(self):
        self.write_json(document())


routes = [(r"/api/openapi.json", OpenAPIHandler)]
