"""/api/sessions/{id}/files: list, download, upload (raw PUT or multipart
POST) and delete, all through the session's safe resolver."""

from __future__ import annotations

import os
from urllib.parse import quote

from tornado import httputil, web

from broker.errors import InvalidArgument
from broker.files import FileError, FileTooLarge, guess_type, is_image, normalise
from broker.web.base import SID, BaseHandler, BrokerErrorWithStatus

SLACK = 1 << 20  # multipart framing around the file


def content_disposition(name: str, inline: bool = False) -> str:
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    kind = "inline" if inline else "attachment"
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"


@web.stream_request_body
class FilesHandler(BaseHandler):
    """GET lists; POST takes a multipart upload (field ``file``, optional
    ``path`` for the destination folder or name)."""

    def prepare(self):
        restoring = super().prepare()
        self._chunks, self._size = [], 0
        if self.request.method in ("POST", "PUT"):
            cap = self.sessions.max_upload_bytes + (SLACK if self.request.method == "POST" else 0)
            length = int(self.request.headers.get("Content-Length", 0) or 0)
            if length > cap:
                raise FileTooLarge(f"upload of {length} bytes is over the {self.sessions.max_upload_bytes} byte limit "
                                   "(SessionManager.max_upload_bytes)")
            # Tornado's own limit sits above the cap, so that a body without a
            # Content-Length (chunked) reaches data_received, which answers 413.
            self.request.connection.set_max_body_size(cap + SLACK)
            self._cap = cap
        return restoring

    def data_received(self, chunk):
        if self._finished:
            return
        self._size += len(chunk)
        if self._size > self._cap:
            # Answer 413 at once (raising here would only drop the connection);
            # tornado then stops delivering the body and closes the connection.
            self._chunks = []
            self._handle_request_exception(FileTooLarge(
                f"upload is over the {self.sessions.max_upload_bytes} byte limit (SessionManager.max_upload_bytes)"))
            return
        self._chunks.append(chunk)

    async def get(self, sid):
        s = self.sessions.get(sid, self.current_user)
        s.touch()
        files = []
        for info in s.files.list(""):
            d = info.as_dict()
            d["url"] = self.links.file(sid, info.path)
            files.append(d)
        self.write_json(files)

    async def post(self, sid):
        s = self.sessions.get(sid, self.current_user)
        body = b"".join(self._chunks)
        args, files = {}, {}
        ctype = self.request.headers.get("Content-Type", "")
        if not ctype.lower().startswith("multipart/form-data") or "boundary=" not in ctype:
            raise InvalidArgument(f"a POST upload must be multipart/form-data with a boundary; got Content-Type "
                                  f"{ctype[:100]!r} (or PUT the raw bytes to /api/sessions/{{id}}/files/{{path}})",
                                  "file", "a file part in a multipart/form-data body (with its boundary)")
        try:
            httputil.parse_body_arguments(ctype, body, args, files)
        except (httputil.HTTPInputError, ValueError) as exc:
            raise InvalidArgument(f"the multipart body could not be parsed: {exc}", "file",
                                  "a multipart/form-data file part") from None
        uploads = [f for fs in files.values() for f in fs]
        if not uploads:
            raise InvalidArgument("multipart upload has no file part (send the file in a field named 'file')",
                                  "file", "a multipart/form-data file part")
        dest = args.get("path", [b""])[0].decode()
        written = []
        for f in uploads:
            name = os.path.basename(f["filename"] or "upload.bin")
            target = dest if dest and len(uploads) == 1 and not dest.endswith("/") else \
                (dest.rstrip("/") + "/" + name if dest else name)
            r = s.files.write(target, f["body"])
            r["path"] = f"/mnt/data/{r['path']}"
            s.transcript.add_event("uploads", dict(r))
            written.append(r)
        s.touch()
        self.write_json(written if len(written) > 1 else written[0], 201)


@web.stream_request_body
class FileHandler(FilesHandler):
    allow_signed = True
    # POST (a multipart upload) goes to the folder, /files; here it is 405, not FilesHandler.post.
    SUPPORTED_METHODS = ("GET", "PUT", "DELETE")

    def signed_ok(self) -> bool:
        if self.request.method != "GET":
            return False
        a = self.path_kwargs
        g = self.get_query_argument
        try:
            path = normalise(a.get("path", ""))
        except FileError:
            return False
        return self.state.signer.verify(a.get("sid", ""), path, g("name", ""), g("exp", ""), g("sig", ""))

    def _session(self, sid):
        if self.current_user is None:
            # A valid signature stands for the session's owner.
            s = self.sessions.sessions.get(sid)
            if s is None or s.deleted:
                raise BrokerErrorWithStatus(404, "session_not_found", f"no session {sid!r}")
            return s
        return self.sessions.get(sid, self.current_user)

    async def get(self, sid, path):
        s = self._session(sid)
        files = s.files
        fd, st, rel = files.open_read(path)
        try:
            if st.st_size > self.sessions.max_read_bytes:
                raise FileTooLarge(f"{rel!r} is {st.st_size} bytes; downloads are capped at "
                                   f"{self.sessions.max_read_bytes} (SessionManager.max_read_bytes)")
            name = self.get_query_argument("name", "") or os.path.basename(rel)
            ctype = guess_type(name if name.lower().endswith(os.path.splitext(rel)[1].lower()) else rel)
            self.set_header("Content-Type", ctype)
            self.set_header("Content-Disposition", content_disposition(name, inline=is_image(rel)))
            # User content never runs as the broker's origin.
            self.set_header("Content-Security-Policy", "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'")
            self.set_header("Content-Length", str(st.st_size))
            left = st.st_size
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
                self.write(chunk)
                await self.flush()
        finally:
            os.close(fd)
        s.touch()
        if self.current_user is not None:
            # Token downloads are recorded; signed-link fetches (images shown
            # inline, again and again) are not.
            s.transcript.add_event("downloads", {"path": f"/mnt/data/{rel}", "name": name, "size": st.st_size})
        self.finish()

    async def put(self, sid, path):
        s = self.sessions.get(sid, self.current_user)
        r = s.files.write(path, self._chunks)
        r["path"] = f"/mnt/data/{r['path']}"
        s.transcript.add_event("uploads", dict(r))
        s.touch()
        self.write_json(r, 201)

    async def delete(self, sid, path):
        s = self.sessions.get(sid, self.current_user)
        s.files.delete(path)
        s.touch()
        self.set_status(204)
        self.finish()


routes = [
    (rf"/api/sessions/{SID}/files/?", FilesHandler),
    (rf"/api/sessions/{SID}/files/(?P<path>.+)", FileHandler),
]
