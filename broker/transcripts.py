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

    Each change is applied in memory at once and the file is replaced
    atomically (write, fsync, rename) after it.  Under an event loop the write
    runs in a worker thread, coalesced (the changes of ``write_delay`` seconds,
    and several during one write, make one write), so a long transcript never
    stalls the broker and many small calls do not each rewrite it; without a
    loop (the CLI, plain use) it is written before the call returns.
    ``flush()`` waits for the file to hold every change."""

    def __init__(self, path: str, settings: TranscriptSettings, session_id: str):
        self.path = path
        self.settings = settings
        self._lock = threading.Lock()
        self._queue: list = []
        self._writer: asyncio.Task | None = None
        self._error: Exception | None = None
        self.nb = None
        self._hurry: asyncio.Event | None = None     # set while a flush() waits: no write delay
        self._flushing = 0
        if os.path.exists(path):
            try:
                self.nb = nbformat.read(path, as_version=4)
            except Exception as exc:
                # Never written over: kept aside for a person to look at.
                try:
                    set_aside(path, session_id, f"unreadable ({exc.__class__.__name__}: {str(exc)[:200]})")
                except OSError as err:
                    raise OSError(err.errno, f"transcript {path} is unreadable and could not be set aside: "
                                  f"{err.strerror}") from exc
        if self.nb is None:
            self.nb = new_notebook()
            self.nb.metadata["kernelspec"] = {"name": "python3-sandbox", "display_name": "Python 3 (sandbox)",
                                              "language": "python"}
            self.nb.metadata["language_info"] = {"name": "python"}
            self.nb.metadata["broker"] = {"session": session_id, "created": now_iso(), "uploads": [],
                                          "downloads": []}
        # Each cell is serialised once, when it is added; a write only joins
        # these (the transcript grows by a cell per call, and re-encoding all
        # of it each time would cost more with every call).
        self._cell_json = [self._encode(c) for c in self.nb.cells]

    @staticmethod
    def _encode(obj, indent: str = "  ") -> str:
        text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False)
        return indent + text.replace("\n", "\n" + indent)

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

    def _snapshot(self) -> str:
        """The whole notebook as JSON (nbformat v4, indent 1, sorted keys)."""
        with self._lock:
            cells = list(self._cell_json)
            meta = json.dumps(self.nb.metadata, indent=1, sort_keys=True, ensure_ascii=False).replace("\n", "\n ")
            minor = self.nb.nbformat_minor
        body = ",\n".join(cells)
        return (f'{{\n "cells": [\n{body}\n ],\n "metadata": {meta},\n "nbformat": 4,\n '
                f'"nbformat_minor": {minor}\n}}\n') if cells else \
            f'{{\n "cells": [],\n "metadata": {meta},\n "nbformat": 4,\n "nbformat_minor": {minor}\n}}\n'

    def _save(self) -> None:
        d = os.path.dirname(self.path)
        if not os.path.isdir(d):
            return   # the session was deleted meanwhile
        text = self._snapshot()
        tmp = os.path.join(d, f".transcript.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            # A failed write (disk full) leaves the previous version and no temporary file.
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
        """Wait until the notebook and the file hold every change made so far."""
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
                    entry["before_cell"] = len(self.nb.cells)
                    self.nb.metadata["broker"].setdefault(kind, []).append(entry)
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
            encoded = self._encode(cell)
            with self._lock:
                self.nb.cells.append(cell)
                self._cell_json.append(encoded)

    def to_json(self) -> str:
        """The notebook as written to disk (nbformat's layout), so what the
        endpoint serves and what ``broker transcript`` prints are the same bytes."""
        return self._snapshot()
