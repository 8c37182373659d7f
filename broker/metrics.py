"""What the broker counts and measures, for ``/metrics`` and the admin view.

One :class:`Metrics` per broker, on a ``prometheus_client`` registry of its
own (never the process-wide default), so several brokers in one process do
not clash.  Counters and histograms are updated as calls happen (a few
dictionary lookups and additions per call); everything read from the
machine (sessions alive and pooled, the sandboxes' memory and CPU from their
cgroups) is read at scrape time by :class:`SandboxCollector`.

Label sets are bounded: routes are the route patterns (``/api/sessions/{sid}``,
never a raw path or id), tools are the eight tools, owners are the tokens
file's owners, reasons and outcomes are fixed lists.  Per-session series are
off by default (``ServeApp.metrics_per_session``): a session id is a new
series each time, and a long-running Prometheus keeps every one.

:func:`session_usage` (memory, CPU and disk of one session) is shared with
the admin view.  Nothing here imports tornado.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

from broker import logs

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a quick file listing to a long shell command (240 s at most).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 240)

# HTTP statuses that mean "refused" (reason label of broker_refused_total).
REFUSED_STATUS = {401: "unauthorized", 413: "too_large", 429: "too_many"}

# What marks a tool result's error as the sandbox refusing something: the
# audit hook's PermissionError, seccomp's EPERM, Landlock's EACCES, a kernel
# killed by SIGSYS.
_REFUSAL_ENAMES = ("PermissionError", "SandboxPermissionError")
_REFUSAL_TEXTS = ("[sandbox]", "Operation not permitted", "[Errno 1]", "[Errno 13]", "system call the sandbox forbids")

# How many files a disk-use walk looks at before it stops and says so.
DISK_WALK_LIMIT = 100_000


def sandbox_refusal(result: dict) -> dict | None:
    """The error of a tool result when it is a sandbox refusal, else None."""
    err = result.get("error") if isinstance(result, dict) else None
    if not isinstance(err, dict):
        return None
    ename, evalue = str(err.get("ename") or ""), str(err.get("evalue") or "")
    if ename in _REFUSAL_ENAMES or any(t in evalue for t in _REFUSAL_TEXTS):
        return err
    return None


def _cgroups_of(session) -> list:
    groups = []
    kernel = session.kernel
    prov = kernel.km.provisioner if kernel is not None else None
    cg = getattr(prov, "_cgroup", None)
    if cg is not None:
        groups.append(cg)
    if session._shell_cgroup is not None:
        groups.append(session._shell_cgroup)
    return groups


def sandbox_usage(session) -> tuple[int | None, float | None]:
    """(memory bytes, CPU seconds) of a session's kernel and shell cgroups
    together; None when it has no cgroup (no kernel, or cgroups off)."""
    memory = cpu = None
    for cg in _cgroups_of(session):
        m, c = cg.usage()
        if m is not None:
            memory = (memory or 0) + m
        if c is not None:
            cpu = (cpu or 0.0) + c
    return memory, cpu


def disk_usage(path: str, limit: int = DISK_WALK_LIMIT) -> int:
    """Bytes allocated to the files under *path* (st_blocks, so sparse files
    count what they hold).  Links are not followed; stops after *limit* entries."""
    total, seen, stack = 0, 0, [path]
    while stack and seen < limit:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    seen += 1
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue
    return total


def session_usage(session, now: float | None = None) -> dict:
    """One session as the admin view shows it (blocking: reads cgroup files
    and walks /mnt/data; call it in a thread for many sessions)."""
    now = time.time() if now is None else now
    memory, cpu = sandbox_usage(session)
    return {"id": session.id, "owner": session.owner, "state": session.state,
            "created": _iso(session.created), "last_activity": _iso(session.last_activity),
            "age_seconds": round(now - session.created, 3), "idle_seconds": round(now - session.last_activity, 3),
            "memory_bytes": memory, "cpu_seconds": None if cpu is None else round(cpu, 3),
            "disk_bytes": disk_usage(session.data_dir),
            "executing": session.lock.locked() or session.execution_state == "busy"}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


class SandboxCollector:
    """Read at scrape time: sessions alive and pooled, memory and CPU of the
    sandboxes from their cgroups (by owner; by session when asked)."""

    def __init__(self, sessions, per_session: bool = False):
        self.sessions = sessions
        self.per_session = per_session

    def describe(self):
        return []

    def collect(self):
        mgr = self.sessions
        alive = list(mgr.sessions.values())
        pooled = list(getattr(mgr, "_pool", []))
        yield _gauge("broker_sessions_alive", "Sessions handed out to an owner and not yet ended.", len(alive))
        yield _gauge("broker_sessions_pooled", "Kernels started and waiting in the warm pool.", len(pooled))
        mem = GaugeMetricFamily("broker_sandbox_memory_bytes", "Memory charged to the sandboxes' cgroups "
                                "(kernel and shell commands), summed by owner; owner \"(pool)\" is the warm pool.",
                                labels=["owner"])
        cpu = GaugeMetricFamily("broker_sandbox_cpu_seconds", "CPU time of the sandboxes alive now (kernel and "
                                "shell cgroups), summed by owner. Falls when sessions end: a gauge, not a counter.",
                                labels=["owner"])
        biggest = 0
        by_owner: dict[str, list[float]] = {}
        per: list[tuple[str, str, int | None, float | None]] = []
        for s, owner in [(s, s.owner) for s in alive] + [(s, "(pool)") for s in pooled]:
            m, c = sandbox_usage(s)
            acc = by_owner.setdefault(owner, [0, 0.0])
            acc[0] += m or 0
            acc[1] += c or 0.0
            biggest = max(biggest, m or 0)
            if self.per_session and owner != "(pool)":
                per.append((s.id, owner, m, c))
        for owner, (m, c) in sorted(by_owner.items()):
            mem.add_metric([owner], m)
            cpu.add_metric([owner], c)
        yield mem
        yield cpu
        yield _gauge("broker_sandbox_memory_max_bytes", "Memory of the largest single sandbox (kernel and shell "
                     "cgroups of one session or pooled kernel).", biggest)
        if self.per_session:
            smem = GaugeMetricFamily("broker_session_memory_bytes", "Memory of one session's sandboxes "
                                     "(ServeApp.metrics_per_session).", labels=["session", "owner"])
            scpu = GaugeMetricFamily("broker_session_cpu_seconds", "CPU time of one session's sandboxes "
                                     "(ServeApp.metrics_per_session).", labels=["session", "owner"])
            for sid, owner, m, c in per:
                if m is not None:
                    smem.add_metric([sid, owner], m)
                if c is not None:
                    scpu.add_metric([sid, owner], c)
            yield smem
            yield scpu


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


class Metrics:
    """The broker's counters and histograms, on a registry of its own."""

    def __init__(self, sessions=None, per_session: bool = False):
        # No *_created series: they double the page and Prometheus does not need them.
        disable_created_metrics()
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.kernel_starts = Counter("broker_kernel_starts", "Kernels started, by reason.", ["reason"], registry=r)
        self.kernel_restarts = Counter("broker_kernel_restarts", "Kernels restarted, by reason.", ["reason"],
                                       registry=r)
        self.tool_calls = Counter("broker_tool_calls", "Tool calls (REST, MCP, Azure API), by tool and outcome.",
                                  ["tool", "outcome"], registry=r)
        self.tool_seconds = Histogram("broker_tool_call_duration_seconds", "Time a tool call took, by tool.",
                                      ["tool"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_requests = Counter("broker_http_requests", "HTTP requests answered, by method, route pattern "
                                     "and status code.", ["method", "route", "status"], registry=r)
        self.http_seconds = Histogram("broker_http_request_duration_seconds", "Time an HTTP request took, by "
                                      "method and route pattern.", ["method", "route"], buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.bytes_in = Counter("broker_http_received_bytes", "Request body bytes received (uploads), by route "
                                "pattern.", ["route"], registry=r)
        self.bytes_out = Counter("broker_http_sent_bytes", "Response body bytes sent (downloads), by route "
                                 "pattern.", ["route"], registry=r)
        self.ws_executes = Counter("broker_ws_executes", "execute_request messages over the kernel WebSocket, by "
                                   "outcome (ok, error, aborted).", ["outcome"], registry=r)
        self.ws_seconds = Histogram("broker_ws_execute_duration_seconds", "Time from an execute_request over the "
                                    "kernel WebSocket to its reply.", buckets=LATENCY_BUCKETS, registry=r)
        self.refused = Counter("broker_refused", "Refused operations, by reason: sandbox (a tool result the "
                               "sandbox refused), unauthorized (401), too_large (413), too_many (429).",
                               ["reason"], registry=r)
        # Children made once: the per-call path is then a dict lookup and an add.
        for reason in ("sandbox", *REFUSED_STATUS.values()):
            self.refused.labels(reason)
        if sessions is not None:
            r.register(SandboxCollector(sessions, per_session))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Telemetry:
    """What the core reports as it works (kernel starts, tool calls), fanned
    out to the metrics and the call log.  The session manager holds one as
    ``observer`` (None in-process, e.g. for replay: then nothing is counted)."""

    def __init__(self, metrics: Metrics, call_log: logs.CallLog):
        self.metrics = metrics
        self.log = call_log

    def kernel_started(self, reason: str) -> None:
        self.metrics.kernel_starts.labels(reason).inc()

    def kernel_restarted(self, reason: str) -> None:
        self.metrics.kernel_restarts.labels(reason).inc()

    def tool_call(self, session, tool: str, outcome: str, seconds: float, result: dict | None = None) -> None:
        self.metrics.tool_calls.labels(tool, outcome).inc()
        self.metrics.tool_seconds.labels(tool).observe(seconds)
        logs.note_tool(tool, outcome, session.id)
        refusal = sandbox_refusal(result) if result is not None else None
        if refusal is not None:
            self.metrics.refused.labels("sandbox").inc()
            self.log.refusal(session.id, session.owner, tool, refusal)

    def http_request(self, method: str, route: str, status: int, seconds: float, bytes_in: int,
                     bytes_out: int) -> None:
        m = self.metrics
        m.http_requests.labels(method, route, str(status)).inc()
        m.http_seconds.labels(method, route).observe(seconds)
        if bytes_in:
            m.bytes_in.labels(route).inc(bytes_in)
        if bytes_out:
            m.bytes_out.labels(route).inc(bytes_out)
        reason = REFUSED_STATUS.get(status)
        if reason is not None:
            m.refused.labels(reason).inc()

    def ws_execute(self, session, outcome: str, seconds: float, reply: dict) -> None:
        """An execute_request over the kernel WebSocket got its reply (content *reply*)."""
        self.metrics.ws_executes.labels(outcome).inc()
        self.metrics.ws_seconds.observe(seconds)
        refusal = sandbox_refusal({"error": reply}) if outcome == "error" else None
        if refusal is not None:
            self.metrics.refused.labels("sandbox").inc()
            self.log.refusal(session.id, session.owner, "(websocket)", refusal)
