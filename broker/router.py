"""The router in front of several brokers: HAProxy's configuration and its runtime API.

``render(...)`` fills ``deploy/haproxy/haproxy.cfg.tmpl`` (the routing rules
are written there, and in docs/scale.md): requests that name a session go to
the broker its id names (or to the broker an exact-id override names), the
Azure-compatible API by its ``identifier``, everything else to the
least-loaded broker whose ``GET /api/ready`` passes.

``RuntimeApi`` speaks HAProxy's runtime API (the ``stats socket``: a unix
socket or a TCP address) to re-point one session at another broker without a
reload: ``set_override(sid, broker)`` adds or replaces the exact id's line in
the override map, ``overrides()`` reads it back, so that a reload can keep
them (``broker router-config --keep-overrides``).
"""

from __future__ import annotations

import os
import re
import socket
import string

from broker.ids import BROKER_NAME_ALLOWED, BROKER_NAME_RE, ID_RE

TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "haproxy",
                        "haproxy.cfg.tmpl")
_HOSTPORT_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class RouterConfigError(ValueError):
    """A bad option: the message names it, says what was wrong and what is allowed."""


def parse_address(value: str, field: str) -> tuple[str, int]:
    m = _HOSTPORT_RE.match(value.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise RouterConfigError(f"{field}: {value!r} is not host:port (e.g. 10.0.0.5:8888, broker-0.brokers:8888, "
                                "[::1]:8888)")
    return m.group(1), int(m.group(2))


def parse_brokers(spec: str) -> list[tuple[str, str, int]]:
    """``b00=host:port,b01=host:port`` -> [(name, host, port)], names checked and unique."""
    out = []
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        name, sep, addr = item.partition("=")
        if not sep or not BROKER_NAME_RE.match(name):
            raise RouterConfigError(f"--brokers: {item!r} must be NAME=HOST:PORT, NAME being {BROKER_NAME_ALLOWED} "
                                    "(each broker's SessionManager.broker_name)")
        host, port = parse_address(addr, f"--brokers {name}")
        if any(n == name for n, _, _ in out):
            raise RouterConfigError(f"--brokers: the name {name!r} is given twice; names must be unique")
        out.append((name, host, port))
    if not out:
        raise RouterConfigError("--brokers: give at least one NAME=HOST:PORT")
    return out


def socket_spec(runtime_api: str) -> str:
    """The runtime API address as HAProxy's ``stats socket`` takes it."""
    if runtime_api.startswith("/"):
        return runtime_api
    host, port = parse_address(runtime_api, "--runtime-api")
    return f"{'ipv6' if host.startswith('[') else 'ipv4'}@{host.strip('[]')}:{port}"


def render(brokers: list[tuple[str, str, int]], *, bind: str, runtime_api: str, map_file: str,
           peer_name: str = "router", peer_address: str = "127.0.0.1:10000", check_interval: str = "2s", check_timeout: str = "10s",
           stick_expire: str = "24h", maxconn: int = 4000, server_maxconn: int = 1000, log: bool = False,
           template: str = TEMPLATE) -> str:
    """The HAProxy configuration for these brokers (see the template's header)."""
    bind_host, bind_port = parse_address(bind, "--bind")
    parse_address(peer_address, "--peer-address")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", peer_name):
        raise RouterConfigError(f"--peer-name: {peer_name!r}: use letters, digits, '.', '_' and '-'")
    if any(c.isspace() for c in map_file) or not map_file.startswith("/"):
        raise RouterConfigError(f"--map-file: {map_file!r} must be an absolute path without spaces")
    servers = "\n".join(f"    server {n} {h}:{p} check" for n, h, p in brokers)
    use_servers = "\n".join(f"    use-server {n} if {{ var(txn.target) -m str {n} }}" for n, _, _ in brokers)
    with open(template) as fh:
        tmpl = string.Template(fh.read())
    return tmpl.substitute(
        bind=f"{bind_host}:{bind_port}", runtime_api=socket_spec(runtime_api), map_file=map_file,
        peer_name=peer_name, peer_address=peer_address, check_interval=check_interval, check_timeout=check_timeout, stick_expire=stick_expire,
        maxconn=maxconn, server_maxconn=server_maxconn, servers=servers, use_servers=use_servers,
        log_global="    log stdout format raw local0" if log else "",
        log_defaults="    log global\n    option httplog" if log else "")


def render_map(overrides: dict[str, str]) -> str:
    return "".join(f"{sid} {name}\n" for sid, name in sorted(overrides.items()))


class RuntimeApi:
    """HAProxy's runtime API at a unix socket path or host:port, one command per connection."""

    def __init__(self, address: str, map_file: str, timeout: float = 5.0):
        self.address = address
        self.map_file = map_file
        self.timeout = timeout

    def command(self, cmd: str) -> str:
        if self.address.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = self.address
        else:
            host, port = parse_address(self.address, "router runtime API")
            sock = socket.socket(socket.AF_INET6 if host.startswith("[") else socket.AF_INET, socket.SOCK_STREAM)
            target = (host.strip("[]"), port)
        with sock:
            sock.settimeout(self.timeout)
            sock.connect(target)
            sock.sendall(cmd.encode() + b"\n")
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def overrides(self) -> dict[str, str]:
        """The override map as the running router holds it."""
        out = {}
        for line in self.command(f"show map {self.map_file}").splitlines():
            parts = line.split()
            # "<ref> <key> <value>"
            if len(parts) == 3 and ID_RE.match(parts[1]):
                out[parts[1]] = parts[2]
        return out

    def set_override(self, sid: str, broker: str) -> None:
        """Send session *sid* to *broker* from now on (no reload)."""
        if not ID_RE.match(sid):
            raise RouterConfigError(f"session id {sid!r} is not a session id")
        if not BROKER_NAME_RE.match(broker):
            raise RouterConfigError(f"broker name {broker!r}: use {BROKER_NAME_ALLOWED}")
        self.command(f"del map {self.map_file} {sid}")
        answer = self.command(f"add map {self.map_file} {sid} {broker}").strip()
        if answer:
            raise OSError(f"router runtime API refused 'add map': {answer[:200]}")

    def clear_override(self, sid: str) -> None:
        if ID_RE.match(sid):
            self.command(f"del map {self.map_file} {sid}")
