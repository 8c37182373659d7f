"""The ``broker`` command line: the composition root.

Subcommands:
  broker serve                run the broker service (what `make run` starts)
  broker kernelspec install   install the python3-sandbox kernelspec
  broker check                check every sandbox prerequisite and say what is missing
  broker openapi              print the OpenAPI document
  broker transcript ID        print a session's transcript (.ipynb), local or with --url from a broker
  broker replay NB.ipynb      re-run a transcript in a fresh session and compare
  broker mcp                  the tools over MCP on stdio (relays to a broker, or starts one)
  broker sessions             list (ls), create (new), show and delete (rm) sessions on a broker
  broker exec CODE            run Python in a session; output as it comes (docs/client.md)
  broker shell COMMAND        run a shell command in a session
  broker files ls|get|put|rm  a session's /mnt/data
  broker admin sessions|end   every owner's sessions with their resources; end one (admin token)
  broker router-config        the HAProxy configuration for several brokers (docs/scale.md)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from traitlets import Bool, Unicode
from traitlets.config import Application
from traitlets.utils.importstring import import_item

from broker import __version__
from broker.sandbox.settings import SandboxSettings


class KernelspecInstallApp(Application):
    name = "broker-kernelspec-install"
    description = "Install the python3-sandbox kernelspec (a locked-down kernel for any Jupyter client)."
    user = Bool(False, config=True, help="Install for the current user instead of system-wide.")
    sys_prefix = Bool(False, config=True, help="Install into sys.prefix (the virtualenv) instead of system-wide.")
    prefix = Unicode("", config=True, help="Install under this prefix.")
    data_dir = Unicode("", config=True, help="Host folder the kernel sees as /mnt/data (default: a fresh temporary folder per kernel).")
    kernel_name = Unicode("python3-sandbox", config=True, help="Name of the kernelspec.")
    flags = {
        "user": ({"KernelspecInstallApp": {"user": True}}, "Install for the current user."),
        "sys-prefix": ({"KernelspecInstallApp": {"sys_prefix": True}}, "Install into sys.prefix."),
    }
    aliases = {"prefix": "KernelspecInstallApp.prefix", "data-dir": "KernelspecInstallApp.data_dir",
               "name": "KernelspecInstallApp.kernel_name"}

    def start(self):
        from broker import kernelspec

        prefix = sys.prefix if self.sys_prefix else (self.prefix or None)
        config = {"data_dir": self.data_dir} if self.data_dir else {}
        dest = kernelspec.install(user=self.user, prefix=prefix, name=self.kernel_name, provisioner_config=config)
        print(f"Installed kernelspec {self.kernel_name} in {dest}")


class KernelspecApp(Application):
    name = "broker-kernelspec"
    description = "Manage the python3-sandbox kernelspec."
    subcommands = {"install": (KernelspecInstallApp, KernelspecInstallApp.description)}

    def start(self):
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        return self.subapp.start()


class CheckApp(Application):
    name = "broker-check"
    description = "Check every sandbox prerequisite; exit 1 naming the first missing piece and its fix."
    classes = [SandboxSettings]

    def start(self):
        from broker.errors import SandboxUnavailable
        from broker.sandbox import cgroups, prereq
        from kernel_profile import lockdown

        settings = SandboxSettings(parent=self)
        try:
            bwrap = prereq.check_all(settings.bwrap)
        except SandboxUnavailable as exc:
            print(exc.message, file=sys.stderr)
            self.exit(1)
        print(json.dumps({"bwrap": bwrap, "root": prereq.is_root(), "cgroups": cgroups.detect(),
                          "landlock_abi": lockdown.landlock_abi()}, indent=2))


class TranscriptApp(Application):
    name = "broker-transcript"
    description = "Write a session's transcript (.ipynb) from the data root: broker transcript SESSION_ID [-o FILE]."
    output = Unicode("", config=True, help="Write here instead of standard output.")
    aliases = {"data-root": "SessionManager.data_root", "o": "TranscriptApp.output",
               "output": "TranscriptApp.output"}

    @property
    def classes(self):
        from broker.sessions import SessionManager

        return [TranscriptApp, SessionManager]

    def start(self):
        from broker.sessions import ID_RE, SessionManager

        if len(self.extra_args) != 1 or not ID_RE.match(self.extra_args[0]):
            print("usage: broker transcript SESSION_ID [--data-root DIR] [-o FILE]", file=sys.stderr)
            self.exit(2)
        path = os.path.join(SessionManager(parent=self).data_root, self.extra_args[0], "transcript.ipynb")
        if not os.path.isfile(path):
            print(f"no transcript for session {self.extra_args[0]} ({path} does not exist)", file=sys.stderr)
            self.exit(1)
        with open(path) as fh:
            text = fh.read()
        if self.output:
            with open(self.output, "w") as fh:
                fh.write(text)
        else:
            sys.stdout.write(text)


class ReplayApp(Application):
    name = "broker-replay"
    description = ("Re-run a transcript in a fresh session and compare outputs: "
                   "broker replay TRANSCRIPT.ipynb [--files DIR] [--url URL --token T] [-o OUT.ipynb]. "
                   "Exit 0 only when every cell matches.")
    files = Unicode("", config=True, help="Folder holding the transcript's uploaded input files (checked by sha256).")
    url = Unicode("", config=True, help="Replay on this running broker instead of in-process.")
    token = Unicode("", config=True, help="Token for --url (default: $BROKER_TOKEN).")
    output = Unicode("", config=True, help="Where to write the replayed notebook (default: NAME.replayed.ipynb).")
    aliases = {"files": "ReplayApp.files", "url": "ReplayApp.url", "token": "ReplayApp.token",
               "o": "ReplayApp.output", "output": "ReplayApp.output"}

    @property
    def classes(self):
        # Imported here for the measured cost named in BrokerApp.classes.
        from broker.cli.serve import serve_classes

        return [ReplayApp] + serve_classes()[1:]

    def start(self):
        from broker import replay

        if len(self.extra_args) != 1:
            print("usage: broker replay TRANSCRIPT.ipynb [--files DIR] [--url URL --token T] [-o OUT]",
                  file=sys.stderr)
            self.exit(2)
        src = self.extra_args[0]
        try:
            nb = replay.load(src)
            uploads = replay.check_inputs(nb, self.files or None)
        except replay.ReplayError as exc:
            print(f"broker replay: {exc.message}", file=sys.stderr)
            self.exit(2)
        out = self.output or (src[:-6] if src.endswith(".ipynb") else src) + ".replayed.ipynb"
        from broker.errors import BrokerError

        try:
            reports = asyncio.run(self._run(replay, nb, uploads, out))
        except (BrokerError, OSError) as exc:
            # The replay could not run (broker unreachable or refusing, no
            # sandbox): one line, not a traceback.  OSError covers requests'.
            why = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            print(f"broker replay: {why}", file=sys.stderr)
            self.exit(2)
        bad = [r for r in reports if not r.match]
        print(f"{len(reports) - len(bad)} of {len(reports)} cells match; replayed notebook: {out}")
        self.exit(0 if not bad else 1)

    async def _run(self, replay, nb, uploads, out):
        if self.url:
            client = replay.HttpClient(self.url, self.token or os.environ.get("BROKER_TOKEN", ""))
        else:
            client = replay.InProcessClient(parent=self)
        try:
            await client.start()
            reports, _ = await replay.replay(nb, uploads, client, out)
        finally:
            await client.close()
        return reports


class OpenAPIApp(Application):
    name = "broker-openapi"
    description = "Print the OpenAPI document (the same one served at /api/openapi.json)."

    def start(self):
        from broker.web.openapi import document

        print(json.dumps(document(), indent=2, sort_keys=True))


class BrokerApp(Application):
    name = "broker"
    version = __version__
    description = "A self-hosted code interpreter: one locked-down IPython kernel per session."
    subcommands = {
        # broker serve (broker/cli/serve.py): named by path, like the client commands below.
        "serve": ("broker.cli.serve.ServeApp", "Run the broker: sessions with a sandboxed kernel each, over REST."),
        "kernelspec": (KernelspecApp, KernelspecApp.description),
        "check": (CheckApp, CheckApp.description),
        "openapi": (OpenAPIApp, OpenAPIApp.description),
        # transcript: the local form (TranscriptApp) plus a remote one with --url.
        "transcript": ("broker.cli.transcript.TranscriptCommand",
                       "Write a session's transcript (.ipynb), from the data root or with --url from a broker."),
        "replay": (ReplayApp, ReplayApp.description),
        "mcp": ("broker.cli.mcp.McpApp", "Serve the tools over MCP on stdio (relays to a broker, or starts one)."),
        # Client commands (broker/cli/, on broker.client): named by path so `broker serve` never imports them.
        "sessions": ("broker.cli.sessions.SessionsApp", "List, create, show and delete sessions on a broker."),
        "exec": ("broker.cli.run.ExecApp", "Run Python in a session, output as it comes."),
        "shell": ("broker.cli.run.ShellApp", "Run a shell command in a session, output as it comes."),
        "files": ("broker.cli.files.FilesApp", "A session's /mnt/data: ls, get, put, rm."),
        "admin": ("broker.cli.admin.AdminApp", "The operator's view: every owner's sessions, end one (admin token)."),
        "router-config": ("broker.cli.router.RouterConfigApp",
                          "Write the HAProxy configuration for a router in front of several brokers."),
    }

    @property
    def classes(self):
        # Imported here, not at the top: `broker check`, `kernelspec` and the
        # client commands load this module and must not pay for the server's
        # web stack and nbformat/jsonschema (about 3.5 s of CPU, measured).
        from broker.cli.serve import serve_classes

        return serve_classes()

    def start(self):
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        return self.subapp.start()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    sub = BrokerApp.subcommands.get(argv[0]) if argv else None
    if sub and isinstance(sub[0], str):
        # A subcommand named by import path starts on its own: BrokerApp would
        # first import every server class (nbformat's jsonschema alone costs
        # ~3 s of CPU), which a client command like `broker exec` never needs.
        app = import_item(sub[0]).instance()
        app.initialize(argv[1:])
        app.start()
        return
    app = BrokerApp.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()
