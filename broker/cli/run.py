"""``broker exec`` and ``broker shell``: run Python or a shell command in a
session and print its output as it comes."""

from __future__ import annotations

import json
import sys

from traitlets import Bool, Integer, Unicode

from broker.client import Event, Session, ToolResult
from broker.cli.common import ClientApp, UsageError, exit_code_for_result, human_size


class RunApp(ClientApp):
    """What exec and shell share: the session, the timeout, streaming and
    how a result is shown."""

    tool = ""
    session = Unicode("", config=True, help="""Session to run in (default: $BROKER_SESSION; with neither, a
        fresh session is made for this one call and deleted after it).""")
    keep = Bool(False, config=True, help="Keep the fresh session made for this call and print its id on stderr.")
    timeout_seconds = Integer(None, allow_none=True, config=True,
                              help="The call's timeoutSeconds (default: the tool's own default).")
    stream = Bool(True, config=True, help="Show output as it happens (server-sent events); --no-stream waits "
                                          "for the result.")
    events = Bool(False, config=True, help="Print every event as one JSON line as it arrives (the last is the result).")

    aliases = {**ClientApp.aliases, "session": "RunApp.session", "s": "RunApp.session",
               "timeout": "RunApp.timeout_seconds"}
    flags = {**ClientApp.flags,
             "keep": ({"RunApp": {"keep": True}}, "Keep the fresh session and print its id on stderr."),
             "no-stream": ({"RunApp": {"stream": False}}, "Wait for the result instead of streaming output."),
             "events": ({"RunApp": {"events": True}}, "Print each event as a JSON line (for scripts).")}

    def arguments(self) -> dict:
        raise NotImplementedError

    def run(self) -> int:
        args = self.arguments()
        if self.timeout_seconds is not None:
            args["timeoutSeconds"] = self.timeout_seconds
        sid = self.session_id(self.session, required=False)
        session = self.client.session(sid) if sid else self.client.create_session()
        if not sid and self.keep:
            print(f"session: {session.id}", file=sys.stderr, flush=True)
        try:
            result = self.call(session, args)
        finally:
            if not sid and not self.keep:
                session.delete()
        return exit_code_for_result(result)

    def call(self, s: Session, args: dict) -> ToolResult:
        if self.events:
            result = None
            for ev in s.stream(self.tool, args):
                print(json.dumps({"event": ev.type, "data": ev.data}), flush=True)
                result = ev.result
            assert result is not None       # stream() raises when the result is missing
            return result
        if self.json:
            result = s.call(self.tool, args)
            self.print_json(result.raw)
            return result
        if self.stream:
            result = s.call(self.tool, args, on_event=self.show_event)
            self.show(result, streamed=True)
        else:
            result = s.call(self.tool, args)
            self.show(result, streamed=False)
        return result

    # -- for people ------------------------------------------------------------------
    def show_event(self, ev: Event) -> None:
        if ev.type == "stdout":
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif ev.type == "stderr":
            sys.stderr.write(ev.text)
            sys.stderr.flush()
        elif ev.type == "display" and ev.data.get("text"):
            print(ev.data["text"], flush=True)
        elif ev.type == "image":
            # On stderr with the other links and notes: stdout stays the code's own output.
            print(f"[{ev.data.get('mime', 'image')}, {human_size(ev.data.get('size'))}]", file=sys.stderr, flush=True)

    def show(self, r: ToolResult, streamed: bool) -> None:
        if not streamed:
            sys.stdout.write(r.stdout)
            sys.stderr.write(r.stderr)
            if r.result:
                print(r.result)
        if r.error:
            if r.error.traceback:
                print(r.error.traceback.rstrip(), file=sys.stderr)
            else:
                print(f"{r.error.ename}: {r.error.evalue}", file=sys.stderr)
        for item in [*r.images, *r.files]:      # on stderr: stdout stays the code's own output
            print(f"{item.path} ({human_size(item.size)}): {item.url}", file=sys.stderr)
        if r.notice:
            print(r.notice, file=sys.stderr)
        sys.stdout.flush()


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


class ExecApp(RunApp):
    name = "broker-exec"
    description = ("Run Python in a session and print its output as it comes: broker exec CODE | -f FILE | - "
                   "(stdin) [--session ID] [--timeout N] [--json|--events]. Exit 0 on success, 1 on an error, "
                   "124 on a timeout.")
    usage = "broker exec [CODE | -f FILE | -] [--session ID] [--timeout SECONDS] [--json | --events] [--no-stream]"
    tool = "ExecutePythonCode"
    file = Unicode("", config=True, help="Read the code from this file ('-': standard input).")
    aliases = {**RunApp.aliases, "f": "ExecApp.file", "file": "ExecApp.file"}

    @property
    def classes(self):
        return [ExecApp, RunApp, *super().classes[1:]]

    def arguments(self) -> dict:
        a = list(self.extra_args)
        if self.file and a:
            raise UsageError("give the code as an argument or with -f FILE, not both")
        if self.file:
            code = _read(self.file)
        elif len(a) == 1:
            code = _read("-") if a[0] == "-" else a[0]
        elif not a and not sys.stdin.isatty():
            code = _read("-")
        else:
            raise UsageError("give the code as one argument, with -f FILE, or on standard input")
        return {"pythonCode": code}


class ShellApp(RunApp):
    name = "broker-shell"
    description = ("Run a shell command in a session's sandbox and print its output as it comes: "
                   "broker shell COMMAND | - [--session ID] [--timeout N]. Exits with the command's status "
                   "(124 on a timeout).")
    usage = "broker shell [COMMAND | -] [--session ID] [--timeout SECONDS] [--json | --events] [--no-stream]"
    tool = "RunShellCommand"

    @property
    def classes(self):
        return [ShellApp, RunApp, *super().classes[1:]]

    def arguments(self) -> dict:
        a = list(self.extra_args)
        if len(a) == 1:
            command = _read("-") if a[0] == "-" else a[0]
        elif not a and not sys.stdin.isatty():
            command = _read("-")
        else:
            raise UsageError("give the command as one (quoted) argument or on standard input")
        return {"command": command}
