"""``broker serve``: the service, composed from the session manager, the
sandbox settings and the web layer.

Only ``broker serve`` (and ``broker --help-all`` and the configuration
document) import this module: client commands (``broker exec``, ``files``,
...) start from broker/cli/ modules of their own and never pay for the
server's web stack and nbformat/jsonschema (about 3.5 s of CPU, measured).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import signal
import ssl

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from traitlets import Bool, CaselessStrEnum, Float, Integer, Unicode, default
from traitlets.config import Application, catch_config_error

from broker import __version__
from broker.admission import Admission
from broker.changes import ChangeTracking
from broker.channels import ChannelSettings
from broker.errors import SandboxUnavailable
from broker.execution import Executor
from broker.links import LinkSigner
from broker.logs import CallLog
from broker.metrics import Metrics, Telemetry
from broker.results import ResultSettings
from broker.sandbox import prereq
from broker.sandbox.provisioner import SandboxProvisioner
from broker.sandbox.settings import SandboxSettings
from broker.sessions import SessionManager
from broker.snapshots import Snapshots
from broker.transcripts import TranscriptSettings
from broker.web import aca, admin, files, health, kernels, mcp, openapi, page, sessions
from broker.web.base import (Auth, BrokerApplication, Identity, NotFoundHandler, log_request, parse_tokens,
                             route_table)
from broker.web.mcp import McpSettings


class BrokerState:
    """What the handlers share: the collaborators the app composed."""

    def __init__(self, sessions, auth, signer, public_url: str, inline_images: str, channels=None,
                 event_keepalive: float = 15.0):
        self.event_keepalive = event_keepalive
        self.sessions = sessions
        self.channels = channels
        self.auth = auth
        self.signer = signer
        self.public_url = public_url
        self.inline_images = inline_images
        # Set by ServeApp.init_telemetry (None: nothing counted or logged per call).
        self.metrics = None
        self.observer = None
        self.call_log = None
        self.metrics_auth = "token"
        self.routes: dict = {}          # handler class -> route patterns (labels for logs and metrics)


class ServeApp(Application):
    """The broker service: address, tokens and how results link to files."""

    name = "broker-serve"
    description = "Run the broker: sessions with a sandboxed kernel each, over REST."

    ip = Unicode("127.0.0.1", config=True, help="Address to listen on.")
    port = Integer(8888, min=0, max=65535, config=True, help="Port to listen on (0 picks a free one).")
    token = Unicode(config=True, help="""The API token (owner 'default'). Also read from the BROKER_TOKEN
        environment variable. With neither a token nor a tokens_file, a random token is generated and
        printed; the broker is never open.""")
    tokens_file = Unicode("", config=True, help="""JSON file mapping tokens to owners, e.g.
        {"tok-alice": "alice", "tok-ops": {"owner": "ops", "admin": true}}. Each session belongs to the
        owner that made it; a token with "admin": true also sees and ends every owner's sessions
        (/api/admin, docs/admin.md).""")
    public_url = Unicode("", config=True, help="""Base URL used in links handed out in results (e.g. when
        behind a proxy). Default: the scheme and host of each request.""")
    inline_images = CaselessStrEnum(["url", "data"], default_value="url", config=True, help="""How tool results
        carry images by default: signed download URLs, or data: URIs. Per call: ?images=url|data.""")
    link_ttl = Float(24 * 3600, min=60, config=True, help="Seconds a signed download link stays valid.")
    certfile = Unicode("", config=True, help="""PEM certificate (chain) to serve HTTPS instead of HTTP, e.g. for
        clients that accept only https:// endpoints (Semantic Kernel's SessionsPythonTool). Needs keyfile.""")
    keyfile = Unicode("", config=True, help="PEM private key of certfile.")
    event_keepalive = Float(15.0, min=0.5, config=True, help="""Seconds of silence after which a tool call's
        event stream (Accept: text/event-stream) sends a keep-alive comment, so proxies keep it open.""")
    call_log_format = CaselessStrEnum(["human", "json"], default_value="human", config=True, help="""Format of the
        call log on standard error (one line per HTTP request and per WebSocket execute, plus sandbox
        refusals and unexpected errors): 'human' (one readable line) or 'json' (one JSON object per line).
        See docs/logs.md.""")
    metrics_auth = CaselessStrEnum(["token", "admin", "none"], default_value="token", config=True, help="""Who may
        read /metrics (Prometheus text format): 'token' (any valid token), 'admin' (a token with the admin
        role; others get 404) or 'none' (no token needed, e.g. behind a firewall that only lets Prometheus
        in). See docs/metrics.md.""")
    metrics_per_session = Bool(False, config=True, help="""Also export each session's memory and CPU on /metrics
        (labels session and owner). Off by default: every session id becomes a new series in Prometheus;
        the by-owner totals are always there.""")
    shutdown_grace = Float(10.0, min=0, config=True, help="""Seconds calls still running when the broker is
        told to stop (SIGTERM, SIGINT) get to finish. New calls are refused at once (503, reason shutting_down);
        calls still running after this are stopped and answer with an error that says so. Then transcripts
        are flushed, kernels stopped and the sessions' mounts removed (files are kept); the exit status is 0.""")

    @default("token")
    def _default_token(self):
        return os.environ.get("BROKER_TOKEN", "")

    aliases = {
        "ip": "ServeApp.ip",
        "port": "ServeApp.port",
        "token": "ServeApp.token",
        "tokens-file": "ServeApp.tokens_file",
        "data-root": "SessionManager.data_root",
        "public-url": "ServeApp.public_url",
        "certfile": "ServeApp.certfile",
        "keyfile": "ServeApp.keyfile",
        "config": "ServeApp.config_file",
    }
    config_file = Unicode("", config=True, help="Load this Python or JSON config file.")

    @property
    def classes(self):
        return serve_classes()

    @catch_config_error
    def initialize(self, argv=None):
        super().initialize(argv)
        if self.config_file:
            self.load_config_file(self.config_file)
            # the command line wins over the file
            self.update_config(self.cli_config)
        self.init_limits()
        self.init_sandbox_check()
        self.init_auth()
        self.init_sessions()
        self.init_webapp()
        self.init_telemetry()

    def init_limits(self):
        """Each session holds a few dozen descriptors (ZeroMQ sockets, the
        kernel's pipes, WebSocket clients): raise the soft open-files limit
        to the hard one so a busy broker does not run out."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            except (ValueError, OSError) as exc:
                self.log.warning("could not raise the open-files limit from %s: %s", soft, exc)

    def init_sandbox_check(self):
        try:
            prereq.check_all(SandboxSettings(parent=self).bwrap)
        except SandboxUnavailable as exc:
            self.log.critical(exc.message)
            self.exit(1)

    def init_auth(self):
        tokens = {}
        if self.tokens_file:
            with open(self.tokens_file) as fh:
                try:
                    data = json.load(fh)
                except ValueError as exc:
                    raise SystemExit(f"{self.tokens_file}: not valid JSON: {exc}") from None
            try:
                tokens.update(parse_tokens(data, self.tokens_file))
            except ValueError as exc:
                raise SystemExit(str(exc)) from None
        if self.token:
            tokens[self.token] = Identity("default")
        self.generated_token = None
        if not tokens:
            self.generated_token = secrets.token_hex(24)
            tokens[self.generated_token] = Identity("default")
        self.auth = Auth(tokens)

    def init_sessions(self):
        self.sessions = SessionManager(parent=self)
        adj = self.sessions.admission.protect_broker()
        if adj is not None:
            self.log.info("broker oom_score_adj %d: the OOM killer takes kernels (1000) first", adj)
        try:
            snapshots = Snapshots(self.sessions)
        except ValueError as exc:
            self.log.critical("%s", exc)
            self.exit(1)
        if snapshots.enabled:
            self.sessions.snapshots = snapshots
        n = self.sessions.restore()
        if n:
            self.log.info("restored %d session(s) from %s", n, self.sessions.data_root)
        self.signer = LinkSigner(ttl=self.link_ttl)

    def init_webapp(self):
        self.state = BrokerState(self.sessions, self.auth, self.signer, self.public_url.rstrip("/"),
                                 self.inline_images, ChannelSettings(parent=self), self.event_keepalive)
        self.web_app = make_web_app(self.state)

    def init_telemetry(self):
        """Metrics (/metrics) and the call log, hooked into the session
        manager (kernel starts, tool calls) and every request."""
        self.metrics = Metrics(self.sessions, per_session=self.metrics_per_session)
        self.call_log = CallLog.to_stderr(self.call_log_format.lower())
        self.state.metrics, self.state.call_log = self.metrics, self.call_log
        self.state.observer = self.sessions.observer = Telemetry(self.metrics, self.call_log)
        self.state.metrics_auth = self.metrics_auth.lower()

    def ssl_context(self):
        if not self.certfile and not self.keyfile:
            return None
        if not (self.certfile and self.keyfile):
            raise SystemExit("ServeApp.certfile and ServeApp.keyfile go together: give both, or neither for HTTP")

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.certfile, self.keyfile)
        return ctx

    def start(self):
        asyncio.run(self._serve())

    async def _serve(self):
        server = HTTPServer(self.web_app, max_body_size=max_body_bytes(self.sessions),
                            xheaders=False, ssl_options=self.ssl_context())
        sockets = bind_sockets(self.port, self.ip)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        url = f"{'https' if self.certfile else 'http'}://{host}:{port}/"
        self.sessions.start_background()
        print(f"broker {__version__} listening on {url}", flush=True)
        print(f"    data root: {self.sessions.data_root}", flush=True)
        if self.generated_token:
            print(f"    token: {self.generated_token}", flush=True)
            print(f"    try: curl -X POST -H 'Authorization: Bearer {self.generated_token}' {url}api/sessions",
                  flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        self.log.info("shutting down: letting running calls finish (up to %g s), then stopping kernels "
                      "(session files are kept)", self.shutdown_grace)
        server.stop()
        await self.sessions.shutdown(grace=self.shutdown_grace)
        # The calls stopped above answer now; then the connections close.
        try:
            await asyncio.wait_for(server.close_all_connections(), 2.0)
        except asyncio.TimeoutError:
            pass
        self.log.info("stopped")


def max_body_bytes(sessions) -> int:
    """Largest request body: an upload of max_upload_bytes plus 1 MiB of envelope (413 past it)."""
    return sessions.max_upload_bytes + (1 << 20)


def make_web_app(state):
    handlers = [*page.routes, *openapi.routes, *sessions.routes, *files.routes, *kernels.routes,
                *mcp.routes(state), *health.routes]
    handlers += aca.routes(state)  # the Azure Container Apps sessions API, at /azure
    handlers += admin.routes       # /api/whoami, /api/admin/..., /metrics
    state.routes = route_table(handlers)
    # log_function: our call log replaces tornado's access log (which prints raw URIs, signed links' too).
    return BrokerApplication(handlers, broker=state, default_handler_class=NotFoundHandler, log_function=log_request,
                             ws_tickets=page.WsTickets(), max_body_bytes=max_body_bytes(state.sessions),
                             websocket_ping_interval=30,
                             websocket_max_message_size=state.channels.max_message_bytes, compress_response=False)


def serve_classes():
    return [ServeApp, SessionManager, Admission, Executor, ResultSettings, ChannelSettings, TranscriptSettings,
            ChangeTracking, SandboxSettings, SandboxProvisioner, McpSettings, Snapshots]
