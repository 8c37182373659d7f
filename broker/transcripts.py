"""Each session's transcript: an nbformat v4 notebook kept beside the session,
outside the sandbox's reach, rewritten atomically after every tool call and
every WebSocket execution.

Format (see docs/transcripts.md):

- Python executions are code cells with their outputs (from
  ``nbformat.v4.output_from_msg``; images embedded as ``image/png``) and
  execution counts.  ``metadata.execution`` holds the timing keys nbclient
  records; ``metadata.broker`` holds ``tool``, ``status``, ``duration_ms`` and,
  per tool, its arguments.
- Shell commands are code cells whose source is ``%%bash`` and the command,
  with ``metadata.broker.tool = "RunShellCommand"`` and ``exit_code``.
- PDF reports carry ``metadata.broker.pdf`` (path, saveAsFilename, size,
  sha256); uploads and downloads are listed in the notebook's
  ``metadata.broker.uploads`` / ``downloads`` with the index of the cell they
  came before.
- Output text longer than ``max_output_chars`` and images larger than
  ``max_image_bytes`` are cut with a visible notice so the file stays
  openable.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import io
import json
import logging
import os
import secrets
import threading

import nbformat
import nbformat.v4
from nbformat.corpus.words import generate_corpus_id as random_cell_id
from nbformat.v4 import new_notebook, output_from_msg
from traitlets import Float, Integer
from traitlets.config import LoggingConfigurable

from broker.sandbox.settings import ByteSize

NOTICE = "\n[transcript: output truncated, {n} more characters not kept]\n"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def set_aside(path: str, session_id: str, why: str, log=None) -> str:
    """Rename a transcript that cannot be read to ``transcript.corrupt-<UTC time>.ipynb``
    beside it, with a log line naming it; the session starts a new one."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest = os.path.join(os.path.dirname(path), f"transcript.corrupt-{stamp}.ipynb")
    os.replace(path, dest)
    (log or logging.getLogger("broker")).warning("session %s: transcript %s is %s; set aside as %s and a new "
                                                 "one begun", session_id, path, why, dest)
    return dest


def set_aside_if_unreadable(path: str, session_id: str, log=None) -> str | None:
    """The broker's start-up check of a session's transcript: it must be a
    JSON notebook (a torn or truncated file is set aside).  Only JSON is
    parsed here; nbformat reads it in full when the session next records."""
    try:
        with open(path, "rb") as fh:
            nb = json.load(fh)
        if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list) or nb.get("nbformat") != 4:
            raise ValueError("not an nbformat 4 notebook")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        try:
            return set_aside(path, session_id, f"unreadable ({exc.__class__.__name__}: {str(exc)[:200]})", log)
        except OSError:
            return None
    return None


class TranscriptSettings(LoggingConfigurable):
    """How much of each output a session's transcript keeps."""

    max_output_chars = Integer(100_000, min=1000, config=True, help="""Characters of text kept per output in a
        transcript (stream text and text/* data); the rest is cut with a visible notice.""")
    max_image_bytes = ByteSize(4 << 20, config=True, help="""Largest image (decoded) kept in a transcript; larger
        ones are replaced by a text notice.""")
    write_delay = Float(0.5, min=0, max=10, config=True, help="""Seconds the broker waits after a change before
        rewriting a transcript file, so the calls of that moment make one write (a session running many small
        cells would otherwise rewrite and fsync its whole notebook after each). The transcript endpoint, and
        a clean shutdown, wait for every change to be written. 0: write after each change.""")


class Transcript:
    """One session's notebook.

    Each change is recorded at once and the file is replaced atomically
    (write, fsync, rename) after it.  Under an event loop the write runs in a
    worker thread, coalesced (the changes of ``write_delay`` seconds, and
    several during one write, make one write), so a long transcript never
    stalls the broker and many small calls do not each rewrite it; without a
    loop (the CLI, plain use) it is written before the call returns.
    ``flush()`` waits for the file to hold every change.

    The cells live in the file, not in the broker's memory: a cell is encoded
    once, when it is recorded, and kept only until a write has put it in the
    file; the next write copies the cells already written from the previous
    file (by the offset where they end) and adds the new ones.  The broker's
    memory therefore stays flat however long a session runs (a 10-minute soak
    held the whole notebook as objects before, 4x its size on disk).  The
    upload and download lists in the metadata are kept encoded the same way."""

    HEAD = b'{\n "cells": ['
    CELLS_END = b'\n ],\n "metadata": '

    def __init__(self, path: str, settings: TranscriptSettings, session_id: str):
        self.path = path
        self.settings = settings
        self._lock = threading.Lock()
        self._queue: list = []
        self._writer: asyncio.Task | None = None
        self._error: Exception | None = None
        self._hurry: asyncio.Event | None = None     # set while a flush() waits: no write delay
        self._flushing = 0
        self._pending: list[bytes] = []   # encoded cells not in the file yet
        self._cells_end: int | None = None  # offset in self.path where its cells end (our layout)
        self._count = 0
        self._mark = f"@@events-{secrets.token_hex(8)}:"
        nb = None
        raw = b""
        if os.path.exists(path):
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
                nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
            except Exception as exc:
                # Never written over: kept aside for a person to look at.
                try:
                    set_aside(path, session_id, f"unreadable ({exc.__class__.__name__}: {str(exc)[:200]})")
                except OSError as err:
                    raise OSError(err.errno, f"transcript {path} is unreadable and could not be set aside: "
                                  f"{err.strerror}") from exc
        if nb is None:
            nb = new_notebook()
            nb.metadata["kernelspec"] = {"name": "python3-sandbox", "display_name": "Python 3 (sandbox)",
                                         "language": "python"}
            nb.metadata["language_info"] = {"name": "python"}
            nb.metadata["broker"] = {"session": session_id, "created": now_iso(), "uploads": [], "downloads": []}
        self._minor = nb.nbformat_minor
        self._count = len(nb.cells)
        self._meta = nb.metadata
        broker_meta = self._meta.setdefault("broker", {})
        # Lists in metadata.broker (uploads, downloads) grow with the session:
        # kept encoded, spliced into the metadata when it is written.
        self._events = {k: [self._encode(e, "    ").encode() for e in v]
                        for k, v in broker_meta.items() if isinstance(v, list)}
        for k in self._events:
            broker_meta[k] = self._mark + k
        if nb.cells:
            at = raw.find(self.CELLS_END)
            if raw.startswith(self.HEAD) and at > len(self.HEAD):
                self._cells_end = at            # written in our layout: copied as it is
            else:
                self._pending = [self._encode(c).encode() for c in nb.cells]

    @staticmethod
    def _encode(obj, indent: str = "  ") -> str:
        text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False)
        return indent + text.replace("\n", "\n" + indent)

    @property
    def cell_count(self) -> int:
        """Cells recorded so far (written or not)."""
        return self._count

    def cells(self) -> list:
        """Every cell, read back (for replay and tests; the broker keeps none)."""
        return nbformat.reads(self.to_json(), as_version=4).cells

    # -- helpers -----------------------------------------------------------------
    def _cut(self, text: str) -> str:
        limit = self.settings.max_output_chars
        if len(text) <= limit:
            return text
        return text[:limit] + NOTICE.format(n=len(text) - limit)

    def _clean_output(self, out: dict) -> dict:
        out = copy.deepcopy(dict(out))
        if out.get("output_type") == "stream":
            out["text"] = self._cut(out.get("text", ""))
        elif out.get("output_type") in ("display_data", "execute_result"):
            data = out.get("data", {})
            for mime in list(data):
                value = data[mime]
                if mime.startswith("image/") and mime != "image/svg+xml":
                    if len(value) * 3 // 4 > self.settings.max_image_bytes:
                        del data[mime]
                        # Visible even when the output has its own text/plain
                        # (matplotlib's "<Figure size ...>").
                        notice = (f"[transcript: {mime} image larger than {self.settings.max_image_bytes} "
                                  "bytes not kept]")
                        plain = data.get("text/plain")
                        if isinstance(plain, list):
                            plain = "".join(plain)
                        data["text/plain"] = f"{plain}\n{notice}" if plain else notice
                elif isinstance(value, str):
                    data[mime] = self._cut(value)
        elif out.get("output_type") == "error":
            out["traceback"] = [self._cut(line) for line in out.get("traceback", [])][:200]
        return out

    def _tail(self) -> bytes:
        """Everything after the cells: the metadata (nbformat's layout:
        indent 1, sorted keys), with the event lists spliced in."""
        meta = json.dumps(self._meta, indent=1, sort_keys=True, ensure_ascii=False).replace("\n", "\n ")
        for kind, entries in self._events.items():
            listed = "[\n" + ",\n".join(e.decode() for e in entries) + "\n   ]" if entries else "[]"
            meta = meta.replace(json.dumps(self._mark + kind), listed, 1)
        return (self.CELLS_END + meta.encode() +
                f',\n "nbformat": 4,\n "nbformat_minor": {self._minor}\n}}\n'.encode())

    def _compose(self, out, pending: list[bytes], tail: bytes) -> int:
        """Write the notebook to the binary file *out*: the cells already in
        the file, then *pending*, then *tail*.  Returns the offset where the
        cells end.  Called with the lock held, or by the only writer."""
        out.write(self.HEAD)
        have = False
        if self._cells_end is not None:
            left = self._cells_end - len(self.HEAD)
            with open(self.path, "rb") as old:
                old.seek(len(self.HEAD))
                while left > 0:
                    chunk = old.read(min(left, 1 << 20))
                    if not chunk:
                        raise OSError(f"transcript {self.path} is shorter than the broker wrote it")
                    out.write(chunk)
                    left -= len(chunk)
            have = True
        for cell in pending:
            out.write(b",\n" if have else b"\n")
            out.write(cell)
            have = True
        end = out.tell()
        out.write(tail)
        return end

    def _save(self) -> None:
        d = os.path.dirname(self.path)
        if not os.path.isdir(d):
            return   # the session was deleted meanwhile
        with self._lock:
            pending = list(self._pending)
            tail = self._tail()
        tmp = os.path.join(d, f".transcript.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as fh:
                end = self._compose(fh, pending, tail)
                fh.flush()
                os.fsync(fh.fileno())
            with self._lock:
                os.replace(tmp, self.path)
                self._cells_end = end if (self._cells_end is not None or pending) else None
                del self._pending[:len(pending)]
        except BaseException:
            # A failed write (disk full) leaves the previous version and no
            # temporary file; the cells not written wait for the next write.
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _enqueue(self, item) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # No event loop (the CLI, plain use): record and write now.
            self._process([item])
            self._save()
            return
        self._queue.append(item)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_loop())

    def _process_and_save(self, items: list) -> None:
        self._process(items)
        self._save()

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.settings.write_delay:
                # The changes of the next moment join this write.
                if self._hurry is None:
                    self._hurry = asyncio.Event()
                try:
                    await asyncio.wait_for(self._hurry.wait(), self.settings.write_delay)
                except asyncio.TimeoutError:
                    pass
            items, self._queue = self._queue, []
            try:
                await loop.run_in_executor(None, self._process_and_save, items)
            except Exception as exc:
                # The previous version stays whole; the next change writes
                # again, with everything recorded so far.
                self._error = exc
                logging.getLogger("broker").error("could not write transcript %s: %s", self.path, exc)

    async def flush(self) -> None:
        """Wait until the file holds every change made so far."""
        if self._hurry is None:
            self._hurry = asyncio.Event()
        self._flushing += 1
        self._hurry.set()
        try:
            while (self._writer is not None and not self._writer.done()) or self._queue:
                if self._writer is None or self._writer.done():
                    self._writer = asyncio.get_running_loop().create_task(self._write_loop())
                await asyncio.shield(self._writer)
        finally:
            self._flushing -= 1
            if not self._flushing:
                self._hurry.clear()

    async def discard(self) -> None:
        """The session ends and its folder goes: drop the changes not yet
        written and wait for a write in progress, so that no write lands in
        (or re-creates) a folder being removed."""
        self._queue.clear()
        if self._hurry is not None:
            self._hurry.set()
        if self._writer is not None and not self._writer.done():
            await asyncio.gather(asyncio.shield(self._writer), return_exceptions=True)

    # -- recording -------------------------------------------------------------------
    # Callers hand over what happened; turning it into cells (output_from_msg,
    # nbformat's validating constructors, JSON encoding) and writing the file
    # happen after the call has answered, in the writer thread.
    def add_code(self, code: str, outputs: list, *, tool: str, status: str, execution_count=None,
                 started: str | None = None, ended: str | None = None, extra: dict | None = None) -> None:
        """*outputs*: nbformat output dicts, or ``{"msg": <kernel message>}``
        items converted with ``nbformat.v4.output_from_msg``."""
        self._enqueue(("code", code, list(outputs), tool, status, execution_count, started, ended, extra))

    def add_shell(self, command: str, result: dict, started: str, ended: str, explanation=None) -> None:
        outputs = []
        if result.get("stdout"):
            outputs.append({"output_type": "stream", "name": "stdout", "text": result["stdout"]})
        if result.get("stderr"):
            outputs.append({"output_type": "stream", "name": "stderr", "text": result["stderr"]})
        extra = {"exit_code": result.get("exit_code"), "duration_ms": result.get("duration_ms")}
        if explanation:
            extra["explanation"] = explanation
        self.add_code(f"%%bash\n{command}", outputs, tool="RunShellCommand", status=result["status"],
                      started=started, ended=ended, extra=extra)

    def add_event(self, kind: str, entry: dict) -> None:
        self._enqueue(("event", kind, dict(entry, time=now_iso())))

    def add_ws_execution(self, code: str, msgs: list, started: str, ended: str, status: str) -> None:
        outputs, count = [], None
        for m in msgs:
            t = m["msg_type"]
            if t == "execute_input":
                count = m["content"].get("execution_count")
            elif t in ("stream", "display_data", "execute_result", "error"):
                if t == "display_data" and "application/vnd.broker.files+json" in m["content"].get("data", {}):
                    continue
                outputs.append({"msg": m})
            elif t == "clear_output":
                outputs = []
        self.add_code(code, outputs, tool="websocket", status=status, execution_count=count, started=started,
                      ended=ended)

    def _outputs(self, items: list) -> list:
        outs = []
        for item in items:
            out = output_from_msg(item["msg"]) if "msg" in item else item
            if out.get("output_type") == "stream" and outs and outs[-1].get("output_type") == "stream" \
                    and outs[-1].get("name") == out.get("name"):
                outs[-1]["text"] += out["text"]
                continue
            outs.append(dict(out))
        return [nbformat.from_dict(self._clean_output(o)) for o in outs]

    def _process(self, items: list) -> None:
        for item in items:
            if item[0] == "event":
                _, kind, entry = item
                with self._lock:
                    entry["before_cell"] = self._count
                    if kind not in self._events:
                        self._events[kind] = []
                        self._meta["broker"][kind] = self._mark + kind
                    self._events[kind].append(self._encode(entry, "    ").encode())
                continue
            _, code, outputs, tool, status, count, started, ended, extra = item
            # The fields of nbformat's new_code_cell, without its validation
            # of each new cell (the outputs are validated as they are made):
            # it was a tenth of the broker's CPU per small call.
            cell = nbformat.NotebookNode(id=random_cell_id(), cell_type="code", metadata=nbformat.NotebookNode(),
                                         execution_count=count, source=code, outputs=self._outputs(outputs))
            cell.metadata["execution"] = {"iopub.status.busy": started, "iopub.execute_input": started,
                                          "shell.execute_reply": ended, "iopub.status.idle": ended}
            meta = {"tool": tool, "status": status}
            meta.update(extra or {})
            cell.metadata["broker"] = meta
            encoded = self._encode(cell).encode()
            with self._lock:
                self._pending.append(encoded)
                self._count += 1

    def to_json(self) -> str:
        """The notebook as written to disk (nbformat's layout), so what the
        endpoint serves and what ``broker transcript`` prints are the same bytes."""
        buf = io.BytesIO()
        with self._lock:
            self._compose(buf, self._pending, self._tail())
        return buf.getvalue().decode("utf-8")
