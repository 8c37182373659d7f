"""The audit hook: friendly refusals for process and network calls.

This is the user-experience layer, not the wall.  Code in the kernel can
neutralise any Python audit hook (CPython's own documentation says so); the
refusals that matter come from seccomp, the namespaces and Landlock, and the
test suite re-runs every attack with this hook disabled to prove it.  What
the hook adds is a clear ``PermissionError`` that says what is blocked and
what to use instead, at the point in the user's code where it happened.
"""

from __future__ import annotations

import sys

AF_UNIX = 1

PROCESS_HINT = (
    "code in this session cannot start processes. Run shell commands with the "
    "RunShellCommand tool (it has its own sandbox with the same /mnt/data); "
    "keep Python work in this kernel."
)
NETWORK_HINT = (
    "this session has no network access. Bring data in as files: upload them with "
    "the UploadFileToSession tool and read them from /mnt/data."
)

_PROCESS_EVENTS = {
    "subprocess.Popen": "subprocess",
    "os.system": "os.system",
    "os.exec": "os.exec*",
    "os.posix_spawn": "os.posix_spawn",
    "os.spawn": "os.spawn*",
    "os.fork": "os.fork",
    "os.forkpty": "os.forkpty",
    "pty.spawn": "pty.spawn",
    "_posixsubprocess.fork_exec": "_posixsubprocess.fork_exec",
}

_RESOLVER_EVENTS = {
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
    "socket.gethostbyaddr", "socket.getnameinfo",
}
_ADDRESS_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}


class SandboxPermissionError(PermissionError):
    """Raised by the audit hook; a PermissionError so existing handlers work."""


def _refuse_process(what: str):
    raise SandboxPermissionError(f"[sandbox] {what} is blocked: {PROCESS_HINT}")


def _refuse_network(what: str):
    raise SandboxPermissionError(f"[sandbox] {what} is blocked: {NETWORK_HINT}")


def _audit_hook(event: str, args: tuple) -> None:
    # Hot path: every audited event in the process passes through here, so
    # the common case (an event we do not care about) returns after one or
    # two set lookups.
    what = _PROCESS_EVENTS.get(event)
    if what is not None:
        _refuse_process(what)
    if not event.startswith("socket."):
        return
    if event == "socket.__new__":
        family = args[1] if len(args) > 1 else None
        if family != AF_UNIX:
            _refuse_network(f"creating a socket (family {family})")
    elif event in _ADDRESS_EVENTS:
        address = args[1] if len(args) > 1 else None
        # AF_UNIX addresses are paths (str/bytes); anything else is an
        # internet address.
        if not isinstance(address, (str, bytes, bytearray)):
            _refuse_network(f"{event.split('.', 1)[1]} to {address!r}")
    elif event in _RESOLVER_EVENTS:
        _refuse_network(f"name resolution ({event})")


def _audit_fork_exec() -> None:
    """Before CPython 3.13 ``_posixsubprocess.fork_exec`` raises no audit
    event (gh-115322), and multiprocessing's spawn and forkserver start
    methods call it directly: wrap it so the hook sees the event and refuses
    with the hint.  seccomp refuses the fork either way."""
    import _posixsubprocess

    native = _posixsubprocess.fork_exec

    def fork_exec(*args, **kwargs):
        sys.audit("_posixsubprocess.fork_exec")
        return native(*args, **kwargs)

    _posixsubprocess.fork_exec = fork_exec


def install() -> None:
    """Install the hook.  ``ctypes`` is imported first: importing it raises
    audit events of its own, and libraries the kernel loads later use it."""
    import ctypes  # noqa: F401

    if sys.version_info < (3, 13):
        _audit_fork_exec()
    sys.addaudithook(_audit_hook)
