"""What the client commands share: where the broker is, output for people or
``--json``, and exit codes that say what happened.

Exit codes (docs/client.md):

====  ==============================================================
0     success
1     the code raised / the command failed (``broker shell``: the
      command's own exit status)
2     usage: a bad argument, here or as the broker judged it (400),
      no token, an unreadable config file
3     the token was refused (401)
4     no such session or file (404)
5     the broker refused for a limit (409, 413, 429, 507)
6     the broker could not be reached, or failed (5xx)
124   the execution hit its timeout
====  ==============================================================
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable

from traitlets import Bool, Float, Unicode
from traitlets.config import Application, Configurable

from broker.client import ApiError, BrokerClientError, Client, ConnectionFailed, NotFound, ToolResult, Unauthorized

ENV_SESSION = "BROKER_SESSION"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5, 6
EXIT_TIMEOUT = 124


class ClientConfig(Configurable):
    """Where the client commands (``broker sessions``, ``exec``, ``shell``,
    ``files``, ``transcript --url``) find the broker.  Each setting falls back
    to the environment, then to the client config file."""

    url = Unicode("", config=True, help="""The broker's URL. Default: $BROKER_URL, then "url" in the client
        config file, then http://127.0.0.1:8888.""")
    token = Unicode("", config=True, help="""The API token. Default: $BROKER_TOKEN, then "token" in the client
        config file.""")
    config_file = Unicode("", config=True, help="""The client config file, JSON {"url": ..., "token": ...}.
        Default: $BROKER_CONFIG, then ~/.config/broker/client.json (if it exists).""")
    timeout = Float(60.0, min=1, config=True, help="""Seconds to wait for calls that run no code (tool calls
        wait for their own timeoutSeconds plus a minute).""")

    def client(self) -> Client:
        return Client(self.url or None, self.token or None, config=self.config_file or None, timeout=self.timeout)


def exit_code_for(exc: BrokerClientError) -> int:
    if isinstance(exc, ApiError):
        if isinstance(exc, Unauthorized):
            return EXIT_AUTH
        if exc.status == 404:
            return EXIT_NOT_FOUND
        if exc.status >= 500:
            return EXIT_UNAVAILABLE
        if exc.status in (409, 413, 429, 507):
            return EXIT_REFUSED
        return EXIT_USAGE
    if isinstance(exc, ConnectionFailed):
        return EXIT_UNAVAILABLE
    return EXIT_USAGE       # ConfigError


def exit_code_for_result(r: ToolResult) -> int:
    if r.status == "success":
        return EXIT_OK
    if r.status == "timeout":
        return EXIT_TIMEOUT
    if r.tool == "RunShellCommand" and isinstance(r.exit_code, int) and 0 < r.exit_code < 256:
        return r.exit_code
    return EXIT_FAILED


class UsageError(Exception):
    """A command line that cannot run: printed with the usage, exit 2."""


class ClientApp(Application):
    """Base of the client commands: connection options, --json, errors to
    exit codes.  Subclasses implement ``run()`` and return an exit code."""

    usage = ""              # one line: "broker exec [CODE | -f FILE | -] ..."
    json = Bool(False, config=True, help="Print JSON (for scripts) instead of text for people.")

    aliases = {"url": "ClientConfig.url", "token": "ClientConfig.token", "client-config": "ClientConfig.config_file"}
    flags = {"json": ({"ClientApp": {"json": True}}, "Print JSON for scripts instead of text for people.")}

    @property
    def classes(self):
        return [type(self), ClientConfig]

    @property
    def command(self) -> str:
        return self.name.replace("-", " ")

    def start(self):
        if self.subapp is not None:
            return self.subapp.start()
        try:
            code = self.run()
        except UsageError as exc:
            print(f"{self.command}: {exc}", file=sys.stderr)
            if self.usage:
                print(f"usage: {self.usage}", file=sys.stderr)
            self.exit(EXIT_USAGE)
        except BrokerClientError as exc:
            self.fail(exc)
        except KeyboardInterrupt:
            print(f"\n{self.command}: interrupted (a running call goes on in the broker until it ends or times out)",
                  file=sys.stderr)
            self.exit(130)
        finally:
            if self._client is not None:
                self._client.close()
        self.exit(code or EXIT_OK)

    _client: Client | None = None

    @property
    def client(self) -> Client:
        """The connection, made on first use (after the arguments are checked)."""
        if self._client is None:
            self._client = ClientConfig(parent=self).client()
        return self._client

    def run(self) -> int:
        raise NotImplementedError

    def fail(self, exc: BrokerClientError):
        code = exit_code_for(exc)
        if self.json:
            body = {"message": exc.message}
            if isinstance(exc, ApiError):
                body.update(exc.body)
                body["status"] = exc.status
            self.print_json({"error": body})
        where = ""
        if isinstance(exc, ApiError) and exc.field and exc.field not in exc.message:
            where = f" (field {exc.field!r}: {exc.allowed or 'see docs/api.md'})"
        hint = ""
        if isinstance(exc, Unauthorized):
            hint = "\n  (set the URL and token with --url/--token, BROKER_URL/BROKER_TOKEN, or ~/.config/broker/client.json)"
        print(f"{self.command}: {exc.message}{where}{hint}", file=sys.stderr)
        self.exit(code)

    # -- helpers for subclasses ---------------------------------------------------------
    def print_json(self, obj) -> None:
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
        sys.stdout.flush()

    def print_listing(self, items: list, render: Callable[[list], str], empty: str) -> int:
        """A list command's output: JSON, a table, or *empty* when there is nothing."""
        if self.json:
            self.print_json([dataclasses.asdict(i) for i in items])
        elif items:
            print(render(items))
        else:
            print(empty)
        return EXIT_OK

    def remove_each(self, ids: list[str], remove: Callable[[str], None], done: str) -> int:
        """Remove sessions one by one; report each (*done* or why not) and exit 4 if any was missing."""
        missing = {}
        for sid in ids:
            try:
                remove(sid)
            except NotFound as exc:
                missing[sid] = exc.message
        if self.json:
            self.print_json({done: [i for i in ids if i not in missing], "not_found": list(missing)})
        else:
            for sid in ids:
                print(f"{sid}: {missing.get(sid, done)}")
        return EXIT_NOT_FOUND if missing else EXIT_OK

    def args(self, least: int, most: int | None = None) -> list[str]:
        """The positional arguments, checked for count."""
        a = list(self.extra_args)
        if len(a) < least or (most is not None and len(a) > most):
            raise UsageError("wrong number of arguments" if a else "missing argument")
        return a

    def session_id(self, given: str = "", required: bool = True) -> str:
        sid = given or os.environ.get(ENV_SESSION, "")
        if not sid and required:
            raise UsageError(f"which session? pass --session ID or set {ENV_SESSION} "
                             "(`broker sessions new` makes one)")
        return sid


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join(lines)
