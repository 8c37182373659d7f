"""Kernel-enforced lockdown applied by the boot script: seccomp and Landlock.

Both are per-thread on the kernels we target, so both run while the process
has exactly one thread.  Everything goes through libc's ``syscall`` via
ctypes, with no library lookups (``find_library`` would start ``ldconfig``).
"""

from __future__ import annotations

import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_MACHINE = platform.machine()
# Syscall numbers differ per architecture; these are the only ones we call.
_NR = {
    "x86_64": {"seccomp": 317, "prctl": 157, "landlock_create_ruleset": 444,
               "landlock_add_rule": 445, "landlock_restrict_self": 446},
    "aarch64": {"seccomp": 277, "prctl": 167, "landlock_create_ruleset": 444,
                "landlock_add_rule": 445, "landlock_restrict_self": 446},
}[_MACHINE]

PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE = 4
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1


class LockdownError(RuntimeError):
    """A lockdown step that must succeed did not: the kernel must not start."""


def _syscall(name: str, *args) -> int:
    ret = _libc.syscall(ctypes.c_long(_NR[name]), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def set_dumpable(dumpable: bool) -> None:
    """Not dumpable: /proc/<pid>/mem, environ and the like belong to root, and
    ptrace_may_access refuses processes of the same uid."""
    if _libc.prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE): {os.strerror(err)}")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(program: bytes) -> None:
    """Load a compiled classic-BPF filter for every thread of this process."""
    if not program or len(program) % 8:
        raise LockdownError(f"seccomp program has {len(program)} bytes; expected a multiple of 8")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    # bwrap already set no_new_privs; setting it again is harmless and keeps
    # this function correct on its own.
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    try:
        ret = _syscall("seccomp", ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                       ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog))
    except OSError as exc:
        raise LockdownError(f"could not load the seccomp filter: {exc}") from exc
    if ret != 0:
        # With TSYNC a positive return is the id of a thread that could not
        # be synchronised.
        raise LockdownError(f"seccomp TSYNC failed for thread {ret}")


# --- Landlock --------------------------------------------------------------

LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13          # ABI 2
FS_TRUNCATE = 1 << 14       # ABI 3
FS_IOCTL_DEV = 1 << 15      # ABI 5

NET_BIND_TCP = 1 << 0       # ABI 4
NET_CONNECT_TCP = 1 << 1

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0   # ABI 6
SCOPE_SIGNAL = 1 << 1

_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
_WRITE = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG
          | FS_MAKE_SYM | FS_MAKE_SOCK | FS_MAKE_FIFO)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The Landlock ABI version the running kernel offers, 0 if none."""
    try:
        return _syscall("landlock_create_ruleset", None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except OSError:
        return 0


def apply_landlock(read_paths, write_paths, socket_paths=()) -> int:
    """Restrict this thread to the given trees, best effort by ABI.

    Returns the ABI applied (0 when Landlock is unavailable).  The mount
    namespace already hides everything else; Landlock is a second wall
    against a mistake in the mount layout, and on ABI >= 4/6 it also denies
    TCP and scopes abstract unix sockets and signals.

    *socket_paths* (the ipc folder the broker connects to from the host) get
    only what binding a unix socket needs: no symlinks, files or folders the
    broker could be led through.
    """
    abi = landlock_abi()
    if abi <= 0:
        return 0
    fs = _READ | _WRITE | FS_MAKE_CHAR | FS_MAKE_BLOCK
    if abi >= 2:
        fs |= FS_REFER
    if abi >= 3:
        fs |= FS_TRUNCATE
    write_rights = _WRITE | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = _syscall("landlock_create_ruleset", ctypes.byref(attr), ctypes.c_size_t(size),
                       ctypes.c_uint32(0))
    try:
        for paths, rights in ((read_paths, _READ), (write_paths, _READ | write_rights),
                              (socket_paths, _READ | FS_MAKE_SOCK | FS_REMOVE_FILE)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = rights
                    if not os.path.isdir(path):
                        # Directory rights on a file are EINVAL.
                        allowed &= FS_EXECUTE | FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE
                    rule = _PathBeneath(allowed & fs, fd)
                    _syscall("landlock_add_rule", ctypes.c_int(ruleset),
                             ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                             ctypes.c_uint32(0))
                finally:
                    os.close(fd)
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _syscall("landlock_restrict_self", ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return abi
