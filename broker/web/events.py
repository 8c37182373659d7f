"""Server-sent events for a tool call: progress while code runs.

A tool call made with ``Accept: text/event-stream`` answers with a stream of
events as output happens (``status``, ``stdout``, ``stderr``, ``display``,
``image``, ``exception``; see :class:`broker.execution.Progress` and
:func:`broker.sandbox.shell.run_shell`), then the whole result as the last
event, ``result`` (or ``error`` if the call failed after the stream began).
docs/streaming.md is the reference.

The call runs in a task of its own, so a client that goes away stops only
the writing: the call goes on until it finishes or its timeout interrupts it,
is recorded in the transcript as usual, and releases the session for the
next call.  The response's status and headers are sent with the first event,
so an error that comes before any output (a bad argument, a refused command)
is an ordinary JSON error with its HTTP status.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging

from tornado.iostream import StreamClosedError

from broker.errors import BrokerError
from broker.tools import call_tool
from broker.web.base import error_body

log = logging.getLogger("broker")


def wants_events(accept: str | None) -> bool:
    """True when the Accept header asks for text/event-stream."""
    return any(part.split(";")[0].strip().lower() == "text/event-stream" for part in (accept or "").split(","))


def sse(event: str, data: dict) -> bytes:
    # json.dumps never emits a raw newline, so one data line carries the event.
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _error_event(exc: BaseException) -> dict:
    if not isinstance(exc, BrokerError):
        return {"message": "internal error (see the broker's log)", "reason": "internal_error", "status": 500}
    return {**error_body(exc), "status": exc.status}


async def stream_tool_call(handler, ctx, name: str, args, keepalive: float) -> None:
    """Run the call and write its events to *handler*'s response."""
    pending: collections.deque[dict] = collections.deque()
    wake = asyncio.Event()

    def progress(event: dict) -> None:
        pending.append(event)
        wake.set()

    task = asyncio.ensure_future(call_tool(ctx, name, args, progress=progress))
    started = False
    gone = False

    async def send(chunk: bytes) -> None:
        nonlocal started, gone
        if gone:
            return
        if not started:
            started = True
            handler.set_header("Content-Type", "text/event-stream; charset=utf-8")
            handler.set_header("X-Accel-Buffering", "no")      # nginx: do not hold events back
        try:
            handler.write(chunk)
            await handler.flush()
        except StreamClosedError:
            gone = True
            log.info("%s: the client left the event stream; the call goes on to its end", name)

    try:
        while True:
            wake.clear()
            while pending:
                e = pending.popleft()
                await send(sse(e.get("type", "progress"), e))
            if task.done():
                break
            if pending:
                continue
            waiter = asyncio.ensure_future(wake.wait())
            done, _ = await asyncio.wait({waiter, task}, timeout=keepalive, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not done:
                # A comment line: keeps proxies from closing a quiet stream,
                # and finds out early when the client has gone.
                await send(b": keep-alive\n\n")
    finally:
        # Never cancelled with the request: the call ends as it would without us.
        if not task.done():
            await asyncio.wait({task})
    exc = task.exception()
    if exc is not None and not started:
        raise exc       # nothing sent yet: the base handler answers with the error's status
    if exc is not None:
        if not isinstance(exc, BrokerError):
            log.error("tool call %s failed", name, exc_info=exc)
        await send(sse("error", _error_event(exc)))
    else:
        await send(sse("result", task.result()))
    if not gone:
        handler.finish()
