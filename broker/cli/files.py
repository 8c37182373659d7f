"""``broker files ls|get|put|rm``: a session's /mnt/data from the command line."""

from __future__ import annotations

import dataclasses
import os
import sys

from traitlets import Unicode

from broker.cli.common import EXIT_OK, ClientApp, UsageError, human_size, table


class FilesCommand(ClientApp):
    session = Unicode("", config=True, help="The session (default: $BROKER_SESSION).")
    aliases = {**ClientApp.aliases, "session": "FilesCommand.session", "s": "FilesCommand.session"}

    @property
    def classes(self):
        return [type(self), FilesCommand, *super().classes[1:]]

    @property
    def remote(self):
        return self.client.session(self.session_id(self.session))


class FilesLsApp(FilesCommand):
    name = "broker-files-ls"
    description = "List the files in /mnt/data (below FOLDER, if given)."
    usage = "broker files ls [FOLDER] [--session ID] [--json]"

    def run(self) -> int:
        a = self.args(0, 1)
        files = self.remote.files(a[0] if a else "")
        if self.json:
            self.print_json([dataclasses.asdict(f) for f in files])
        elif files:
            print(table([[human_size(f.size), f.modified or "", f.path] for f in files], ["SIZE", "MODIFIED", "PATH"]))
        return EXIT_OK


class FilesGetApp(FilesCommand):
    name = "broker-files-get"
    description = "Download a file from /mnt/data (to ./NAME, to -o DEST, or to standard output with -o -)."
    usage = "broker files get PATH [-o DEST | -o -] [--session ID]"
    output = Unicode("", config=True, help="Where to write: a file, a folder, or - for standard output.")
    aliases = {**FilesCommand.aliases, "o": "FilesGetApp.output", "output": "FilesGetApp.output"}

    def run(self) -> int:
        path, = self.args(1, 1)
        s = self.remote
        if self.output == "-":
            s.download_to(path, sys.stdout.buffer)
            sys.stdout.flush()
            return EXIT_OK
        dest = self.output or os.path.basename(path.rstrip("/"))
        if os.path.isdir(dest):
            dest = os.path.join(dest, os.path.basename(path.rstrip("/")))
        part = dest + ".part"
        try:
            with open(part, "wb") as fh:
                n = s.download_to(path, fh)
            os.replace(part, dest)
        except OSError as exc:
            raise UsageError(f"cannot write {dest}: {exc}") from None
        finally:
            if os.path.exists(part):
                os.unlink(part)
        if self.json:
            self.print_json({"path": path, "saved_as": dest, "size": n})
        else:
            print(f"{dest} ({human_size(n)})")
        return EXIT_OK


class FilesPutApp(FilesCommand):
    name = "broker-files-put"
    description = "Upload a local file (or - for standard input) into /mnt/data, as REMOTE or under its own name."
    usage = "broker files put LOCAL|- [REMOTE] [--session ID] [--json]"

    def run(self) -> int:
        a = self.args(1, 2)
        local = a[0]
        remote = a[1] if len(a) == 2 else ""
        if local == "-" and (not remote or remote.endswith("/")):
            raise UsageError("uploading standard input needs a REMOTE file name")
        if not remote or remote.endswith("/"):
            remote += os.path.basename(local)
        s = self.remote
        if local == "-":
            info = s.upload(remote, sys.stdin.buffer.read())
        else:
            try:
                fh = open(local, "rb")
            except OSError as exc:
                raise UsageError(f"cannot read {local}: {exc}") from None
            with fh:
                info = s.upload(remote, fh)
        if self.json:
            self.print_json(dataclasses.asdict(info))
        else:
            print(f"{info.path} ({human_size(info.size)}, sha256 {info.sha256})")
        return EXIT_OK


class FilesRmApp(FilesCommand):
    name = "broker-files-rm"
    description = "Delete files from /mnt/data."
    usage = "broker files rm PATH [PATH ...] [--session ID]"

    def run(self) -> int:
        paths = self.args(1)
        s = self.remote
        for p in paths:
            s.delete_file(p)
            if not self.json:
                print(f"deleted {p}")
        if self.json:
            self.print_json({"deleted": paths})
        return EXIT_OK


class FilesApp(ClientApp):
    name = "broker-files"
    description = "A session's /mnt/data: broker files ls|get|put|rm (session from --session or $BROKER_SESSION)."
    subcommands = {
        "ls": (FilesLsApp, FilesLsApp.description),
        "get": (FilesGetApp, FilesGetApp.description),
        "put": (FilesPutApp, FilesPutApp.description),
        "rm": (FilesRmApp, FilesRmApp.description),
    }

    def start(self):
        if self.subapp is None:
            self.print_subcommands()
            self.exit(2)
        return self.subapp.start()
