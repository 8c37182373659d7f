"""``broker admin``: the operator's view of a broker, over HTTP (an admin token).

  broker admin sessions [--json]   every session of every owner, with its memory, CPU and disk use
  broker admin end ID [ID ...]     end sessions of any owner (kernel stopped, files deleted)
"""

from __future__ import annotations

from broker.client import AdminSession
from broker.cli.common import ClientApp, human_size, table


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rows(sessions: list[AdminSession]) -> str:
    rows = [[s.id, s.owner, s.state + (" (executing)" if s.executing and s.state != "busy" else ""),
             _duration(s.age_seconds), _duration(s.idle_seconds), human_size(s.memory_bytes),
             "-" if s.cpu_seconds is None else f"{s.cpu_seconds:.1f}s", human_size(s.disk_bytes)]
            for s in sessions]
    return table(rows, ["ID", "OWNER", "STATE", "AGE", "IDLE", "MEMORY", "CPU", "DISK"])


class AdminSessionsApp(ClientApp):
    name = "broker-admin-sessions"
    description = "List every session of every owner with its state, age, idle time, memory, CPU and disk use."
    usage = "broker admin sessions [--json] [--url URL --token ADMIN_TOKEN]"

    def run(self) -> int:
        self.args(0, 0)
        return self.print_listing(self.client.admin_sessions(), _rows, "no sessions")


class AdminEndApp(ClientApp):
    name = "broker-admin-end"
    description = "End sessions of any owner: their kernels stop and their files are deleted."
    usage = "broker admin end ID [ID ...] [--json]"

    def run(self) -> int:
        return self.remove_each(self.args(1), self.client.admin_end_session, "ended")


class AdminApp(AdminSessionsApp):
    name = "broker-admin"
    description = "The operator's view (an admin token, docs/admin.md): broker admin [sessions|end ID]."
    subcommands = {
        "sessions": (AdminSessionsApp, AdminSessionsApp.description),
        "end": (AdminEndApp, AdminEndApp.description),
    }
