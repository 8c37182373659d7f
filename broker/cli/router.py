"""``broker router-config``: the HAProxy configuration for a router in front of several brokers.

    broker router-config --brokers b00=10.0.0.5:8888,b01=10.0.0.6:8888 \\
        --bind 0.0.0.0:8080 --runtime-api /run/broker-router/admin.sock \\
        --map-file /etc/haproxy/broker-overrides.map -o /etc/haproxy/haproxy.cfg

writes the configuration (and an empty override map when the map file does
not exist yet); ``--keep-overrides`` first reads the live overrides from the
running router's runtime API and writes them to the map file, so that a reload
after adding or removing a broker keeps every re-pointed session.  The routing
rules are in deploy/haproxy/haproxy.cfg.tmpl and docs/scale.md.
"""

from __future__ import annotations

import os
import sys

from traitlets import Bool, Integer, Unicode
from traitlets.config import Application

from broker.router import RouterConfigError, RuntimeApi, configmap, parse_brokers, render, render_map


class RouterConfigApp(Application):
    name = "broker-router-config"
    description = "Write the HAProxy configuration for a router in front of several brokers (docs/scale.md)."

    brokers = Unicode("", config=True, help="""The brokers: NAME=HOST:PORT,... where NAME is each broker's
        SessionManager.broker_name (the prefix of the session ids it makes).""")
    bind = Unicode("0.0.0.0:8080", config=True, help="Address the router listens on (HOST:PORT).")
    runtime_api = Unicode("/run/broker-router/admin.sock", config=True, help="""HAProxy's runtime API (its
        admin-level stats socket): a unix socket path, or HOST:PORT for brokers on other hosts to update
        the override map through (keep that port on a private network: it administers the router).""")
    map_file = Unicode("/etc/haproxy/broker-overrides.map", config=True, help="""The exact-id override map
        (one 'SESSION_ID BROKER_NAME' line each), read at start and changed at runtime.""")
    peer_name = Unicode("router", config=True, help="""This router's name in the peers section (HAProxy's
        localpeer), which keeps the Azure identifiers' stick table across reloads.""")
    peer_address = Unicode("127.0.0.1:10000", config=True, help="HOST:PORT of the local peer (stick table hand-over).")
    check_interval = Unicode("2s", config=True, help="Interval between readiness checks (GET /api/ready) per broker.")
    maxconn = Integer(4000, min=1, config=True, help="""Connections the router holds at once (HAProxy's global
        maxconn; it needs about twice as many open files). Each open kernel WebSocket or MCP stream holds one.""")
    configmap = Unicode("", config=True, help="""Write the configuration as a Kubernetes ConfigMap of this name
        (deploy/kubernetes/router-configmap.yaml is made so).""")
    output = Unicode("", config=True, help="Write the configuration here instead of standard output.")
    keep_overrides = Bool(False, config=True, help="""Read the running router's overrides through the runtime
        API and write them to the map file before writing the configuration (use before a reload).""")
    log_requests = Bool(False, config=True, help="Log every request to standard output (HAProxy's httplog format).")

    aliases = {"brokers": "RouterConfigApp.brokers", "bind": "RouterConfigApp.bind",
               "runtime-api": "RouterConfigApp.runtime_api", "map-file": "RouterConfigApp.map_file",
               "peer-name": "RouterConfigApp.peer_name", "peer-address": "RouterConfigApp.peer_address",
               "check-interval": "RouterConfigApp.check_interval", "maxconn": "RouterConfigApp.maxconn", "configmap": "RouterConfigApp.configmap", "o": "RouterConfigApp.output",
               "output": "RouterConfigApp.output"}
    flags = {"keep-overrides": ({"RouterConfigApp": {"keep_overrides": True}}, keep_overrides.help),
             "log-requests": ({"RouterConfigApp": {"log_requests": True}}, log_requests.help)}

    def start(self):
        try:
            brokers = parse_brokers(self.brokers)
            text = render(brokers, bind=self.bind, runtime_api=self.runtime_api, map_file=self.map_file,
                          peer_name=self.peer_name, peer_address=self.peer_address,
                          check_interval=self.check_interval, maxconn=self.maxconn,
                          log=self.log_requests)
            if self.configmap:
                text = configmap(text, self.configmap)
            elif self.keep_overrides:
                live = RuntimeApi(self.runtime_api, self.map_file).overrides()
                _write(self.map_file, render_map(live))
            elif not os.path.exists(self.map_file):
                _write(self.map_file, "")
        except RouterConfigError as exc:
            print(f"broker router-config: {exc}", file=sys.stderr)
            self.exit(2)
        except OSError as exc:
            print(f"broker router-config: {exc}", file=sys.stderr)
            self.exit(1)
        if self.output:
            _write(self.output, text)
        else:
            sys.stdout.write(text)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
