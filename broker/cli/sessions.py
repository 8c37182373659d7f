"""``broker sessions``: list, create, show and delete sessions on a broker."""

from __future__ import annotations

import dataclasses

from broker.client import SessionInfo
from broker.cli.common import EXIT_OK, ClientApp, table


def _rows(sessions: list[SessionInfo]) -> str:
    return table([[s.id, s.state, s.created, s.expires_at] for s in sessions], ["ID", "STATE", "CREATED", "EXPIRES"])


class SessionsListApp(ClientApp):
    name = "broker-sessions-ls"
    description = "List your sessions on the broker."
    usage = "broker sessions [ls] [--json]"

    def run(self) -> int:
        self.args(0, 0)
        return self.print_listing(self.client.sessions(), _rows, "no sessions")


class SessionsNewApp(ClientApp):
    name = "broker-sessions-new"
    description = "Start a session and print its id (export BROKER_SESSION=$(broker sessions new))."
    usage = "broker sessions new [--json]"

    def run(self) -> int:
        self.args(0, 0)
        s = self.client.create_session()
        if self.json:
            self.print_json(dataclasses.asdict(s.info()))
        else:
            print(s.id)
        return EXIT_OK


class SessionsShowApp(ClientApp):
    name = "broker-sessions-show"
    description = "Show one session."
    usage = "broker sessions show ID [--json]"

    def run(self) -> int:
        sid, = self.args(1, 1)
        info = self.client.session(sid).info()
        if self.json:
            self.print_json(dataclasses.asdict(info))
        else:
            print(_rows([info]))
        return EXIT_OK


class SessionsRmApp(ClientApp):
    name = "broker-sessions-rm"
    description = "Delete sessions (their kernels stop and their files are deleted)."
    usage = "broker sessions rm ID [ID ...] [--json]"

    def run(self) -> int:
        return self.remove_each(self.args(1), self.client.delete_session, "deleted")


class SessionsApp(SessionsListApp):
    name = "broker-sessions"
    description = "List (default), create, show and delete sessions on a broker: broker sessions [ls|new|show|rm]."
    subcommands = {
        "ls": (SessionsListApp, SessionsListApp.description),
        "new": (SessionsNewApp, SessionsNewApp.description),
        "show": (SessionsShowApp, SessionsShowApp.description),
        "rm": (SessionsRmApp, SessionsRmApp.description),
    }
