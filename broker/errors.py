"""The broker's own exceptions.

The core raises these; the web layer maps them to HTTP in exactly one place.
Every message says what was wrong and, where there is one, the fix.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base class.  ``status`` is the HTTP status the web layer answers with."""

    status = 500
    reason = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class SandboxUnavailable(BrokerError):
    """A sandbox prerequisite is missing.  The broker never starts a kernel
    without its sandbox; it raises this instead."""

    status = 503
    reason = "sandbox_unavailable"

    def __init__(self, piece: str, fix: str):
        super().__init__(f"sandbox prerequisite missing: {piece}. Fix: {fix}")
        self.piece = piece
        self.fix = fix


class SandboxError(BrokerError):
    """Setting up a sandbox failed for a reason other than a missing piece."""

    status = 500
    reason = "sandbox_error"


class InvalidArgument(BrokerError):
    """A request field is missing, of the wrong type or out of range."""

    status = 400
    reason = "invalid_argument"

    def __init__(self, message: str, field: str | None = None, allowed: str | None = None):
        super().__init__(message)
        self.field = field
        self.allowed = allowed


class NotFound(BrokerError):
    status = 404
    reason = "not_found"


class SessionNotFound(NotFound):
    reason = "session_not_found"

    def __init__(self, session_id: str):
        super().__init__(f"no session {session_id!r} (it may have expired after its idle timeout, or belong to another owner)")


class TooManySessions(BrokerError):
    status = 429
    reason = "too_many_sessions"


class SessionBusy(BrokerError):
    status = 409
    reason = "session_busy"


class MemoryLow(BrokerError):
    """Too little memory is available to start another kernel (broker/admission.py).
    ``retry_after`` is the seconds the client is told to wait."""

    status = 503
    reason = "memory_low"

    def __init__(self, message: str, retry_after: int = 30):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(BrokerError):
    """The broker is stopping (SIGTERM): new calls are refused, running ones
    get a grace period (ServeApp.shutdown_grace)."""

    status = 503
    reason = "shutting_down"


class DataRootFull(BrokerError):
    """The file system of the data root (sessions' meta.json, transcripts) is full."""

    status = 507
    reason = "data_root_full"
