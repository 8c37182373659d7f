"""The call log: one line per call, human-readable or JSON.

Every HTTP request (REST, MCP, the Azure API, file transfers, the WebSocket
upgrade) and every ``execute_request`` over the kernel WebSocket leaves one
line with its time, session, owner, endpoint (the route pattern, never the
raw path: a signed link's query string is a credential), duration, outcome
and sizes.  A tool result the sandbox refused (the audit hook's
PermissionError, seccomp's EPERM...) leaves a ``refusal`` line with the
session.  An unexpected exception leaves an ``error`` line with its
traceback.  Never logged: tokens, Authorization headers, query strings,
request or response bodies, file contents.

The web layer fills in the fields; this module only shapes and writes them
(no tornado here).  Lines go to the ``broker.calls`` logger, which writes to
standard error unless the operator configured logging otherwise.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

LOGGER = "broker.calls"

# The call being served (set by the web layer for the request's task), so
# that the tool layer can say which tool ran and how it ended.
_current: contextvars.ContextVar[dict | None] = contextvars.ContextVar("broker_call", default=None)

# Field order of a human-readable line after its fixed head.
_HUMAN_FIELDS = ("tool", "outcome", "session", "owner", "bytes_in", "bytes_out")


def begin_call() -> dict:
    """Start collecting facts about the current call (for its log line)."""
    facts: dict = {}
    _current.set(facts)
    return facts


def note_tool(tool: str, outcome: str, session: str) -> None:
    """The tool layer's part of the current call's line (no-op outside a call)."""
    facts = _current.get()
    if facts is not None:
        facts.update(tool=tool, outcome=outcome, session=session)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    if n < 1 << 20:
        return f"{n / 1024:.1f}kB"
    return f"{n / (1 << 20):.1f}MB"


class CallLog:
    """Writes call lines in one format: 'human' (default) or 'json'."""

    def __init__(self, fmt: str = "human", logger: logging.Logger | None = None):
        if fmt not in ("human", "json"):
            raise ValueError(f"log format {fmt!r}: must be 'human' or 'json'")
        self.format = fmt
        self.logger = logger or logging.getLogger(LOGGER)

    @classmethod
    def to_stderr(cls, fmt: str) -> "CallLog":
        """The service's call log: the ``broker.calls`` logger, given a plain
        handler on standard error if the operator did not configure one."""
        logger = logging.getLogger(LOGGER)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(logging.INFO)
        return cls(fmt, logger)

    def line(self, kind: str, fields: dict, traceback: str | None = None) -> str:
        """Shape one line (and the traceback, if any); returns it as written."""
        now = time.time()
        if self.format == "json":
            record = {"time": _iso(now), "kind": kind}
            record.update((k, v) for k, v in fields.items() if v is not None and v != "")
            if traceback:
                record["traceback"] = traceback
            return json.dumps(record, separators=(",", ":"), default=str)
        head = [_iso(now), kind]
        if kind == "http" or kind == "ws":
            head += [str(fields.get("method") or ""), str(fields.get("endpoint") or ""), str(fields.get("status", ""))]
            dur = fields.get("duration_ms")
            if dur is not None:
                head.append(f"{dur:.1f}ms")
        rest = []
        for k in _HUMAN_FIELDS:
            v = fields.get(k)
            if v is None or v == "" or (k.startswith("bytes") and not v):
                continue
            rest.append(f"{k}={_size(v) if k.startswith('bytes') else v}")
        for k, v in fields.items():
            if k not in _HUMAN_FIELDS and k not in ("method", "endpoint", "status", "duration_ms") \
                    and v is not None and v != "":
                rest.append(f"{k}={json.dumps(v) if isinstance(v, str) and (' ' in v or not v) else v}")
        text = " ".join(head + rest)
        if traceback:
            text += "\n" + traceback.rstrip("\n")
        return text

    def write(self, kind: str, fields: dict, level: int = logging.INFO, traceback: str | None = None) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(level, self.line(kind, fields, traceback))

    def call(self, **fields) -> None:
        """One HTTP request: method, endpoint, status, duration_ms, session,
        owner, tool, outcome, bytes_in, bytes_out."""
        status = fields.get("status") or 0
        self.write("http", fields, logging.WARNING if status >= 500 else logging.INFO)

    def ws_execute(self, **fields) -> None:
        """One execute_request over the kernel WebSocket, logged at its reply."""
        self.write("ws", fields)

    def refusal(self, session: str, owner: str, tool: str, error: dict) -> None:
        """A tool result the sandbox refused: the error's name and the first
        line of its message (bounded), never the code or file contents."""
        evalue = str(error.get("evalue") or "").splitlines()[0:1]
        self.write("refusal", {"session": session, "owner": owner, "tool": tool,
                               "error": str(error.get("ename") or ""), "message": (evalue[0] if evalue else "")[:200]},
                   logging.WARNING)

    def error(self, fields: dict, traceback: str) -> None:
        """An unexpected exception in a handler, with its traceback."""
        self.write("error", fields, logging.ERROR, traceback)
