"""The per-session shell helper: runs INSIDE the shell sandbox, as its pid 1.

This file is not imported by the broker: its text is passed into the
sandbox as a read-only file (``/run/sandbox/shell-helper.py``) and run by the
kernel's interpreter with ``-I -S`` (isolated, no site: standard-library
modules only).  The sandbox around it is the one every
shell command used to get on its own (same bwrap flags, shell seccomp
profile, uid, cgroup, rlimits); the helper is started once per session and
spawns each command on request, so a command pays a ``posix_spawn`` instead of
a bwrap launch and a cgroup join.

Protocol on the SOCK_SEQPACKET socket (fd in argv[1]) the broker holds:

  broker -> helper  b"R" + command (UTF-8), with two fds: stdout, stderr
                    b"K"  kill the running command (deadline, output cap)
  helper -> broker  b"H"  ready (once, at start)
                    b"S"  the command started
                    b"F" + message  the command could not start
                    b"E" + wait status (decimal)  the command ended; every
                          process it left is dead and /tmp, /dev/shm are empty

Per command: ``bash --noprofile --norc -c COMMAND`` in a new session (own
process group), stdin /dev/null, the sandbox's clean environment, cwd
/mnt/data, default signal dispositions.  When its bash exits (or on b"K") the
helper SIGKILLs every other process of the sandbox (``kill(-1)`` from pid 1
reaches every process of the pid namespace, including any that left the
command's process group with setsid), reaps them, and empties /tmp and
/dev/shm, so nothing of one command is left for the next but /mnt/data.

The helper is not dumpable (its /proc files and memory are closed to the
commands, which share its uid) and, being pid 1 of its namespace, receives no
signal from inside it but the ones it handles (SIGCHLD only, a wake-up).  Any
doubt (its rlimits changed, /tmp cannot be emptied, a write fails) and it
exits: the sandbox dies with it, and the broker starts a fresh one.
"""

import ctypes
import os
import resource
import select
import signal
import socket
import sys

SIG_DEFAULT = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD)
SCRUB = ("/tmp", "/dev/shm")
LIMITS = [resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE, resource.RLIMIT_CORE,
          resource.RLIMIT_NPROC]


def rlimits():
    return [resource.getrlimit(r) for r in LIMITS]


def kill_rest(reaped):
    """SIGKILL every process of the namespace but this one; reap them all
    (their wait statuses go into *reaped*)."""
    for _ in range(1000):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:
            try:
                pid, st = os.waitpid(-1, 0)
                reaped[pid] = st
            except ChildProcessError:
                break
        try:
            os.kill(-1, 0)
        except ProcessLookupError:
            return
    raise SystemExit("processes survive SIGKILL")


def empty(path, dev=None):
    """Remove everything below *path* (owned by this uid; modes restored)
    but the sandbox's own mounts: a folder on another device is a read-only
    bind that bwrap made (a checkout or virtualenv under the host's /tmp is
    shown at its own path), kept with the folders leading to it.  Returns
    whether *path* is left empty.  Anything else that cannot be removed
    raises OSError, and the helper ends its sandbox."""
    if dev is None:
        dev = os.lstat(path).st_dev
    with os.scandir(path) as it:
        entries = list(it)
    emptied = True
    for e in entries:
        st = e.stat(follow_symlinks=False)
        if st.st_dev != dev:
            emptied = False
        elif e.is_dir(follow_symlinks=False):
            if st.st_uid == os.getuid():
                os.chmod(e.path, 0o700)
            if empty(e.path, dev):
                os.rmdir(e.path)
            else:
                emptied = False
        else:
            os.unlink(e.path)
    return emptied


def sysv_left():
    for name in ("shm", "msg", "sem"):
        try:
            with open(f"/proc/sysvipc/{name}") as fh:
                if len(fh.read().splitlines()) > 1:
                    return True
        except OSError:
            pass
    return False


def main():
    ctl = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(ctl.fileno(), False)
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:      # PR_SET_DUMPABLE 0
        raise SystemExit("cannot make the helper non-dumpable")
    env = dict(os.environ)
    limits = rlimits()
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    ctl.send(b"H")
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    poller.register(rfd, select.POLLIN)
    while True:
        msg, fds, _, _ = socket.recv_fds(ctl, 1 << 20, 4)
        if not msg:
            return
        if msg[:1] != b"R" or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        if rlimits() != limits:
            raise SystemExit("rlimits changed")
        try:
            pid = os.posix_spawn(
                "/bin/bash", ["/bin/bash", "--noprofile", "--norc", "-c", msg[1:].decode("utf-8", "surrogateescape")],
                env, setsid=True, setsigdef=SIG_DEFAULT, setsigmask=(),
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, fds[0], 1), (os.POSIX_SPAWN_DUP2, fds[1], 2),
                              (os.POSIX_SPAWN_CLOSE, fds[0]), (os.POSIX_SPAWN_CLOSE, fds[1])])
        except OSError as exc:
            ctl.send(b"F" + str(exc).encode())
            continue
        finally:
            for fd in fds:
                os.close(fd)
        ctl.send(b"S")
        status = None
        while status is None:
            for fd, _ in poller.poll():
                if fd == rfd:
                    try:
                        os.read(rfd, 4096)
                    except BlockingIOError:
                        pass
                    # Reap: the command's bash, and orphans that pid 1 inherits.
                    while True:
                        try:
                            p, st = os.waitpid(-1, os.WNOHANG)
                        except ChildProcessError:
                            break
                        if p == 0:
                            break
                        if p == pid:
                            status = st
                else:
                    m = ctl.recv(16)
                    if not m:
                        return
                    if m == b"K":
                        reaped = {}
                        kill_rest(reaped)
                        if pid in reaped:
                            status = reaped[pid]
        reaped = {}
        kill_rest(reaped)
        clean = True
        try:
            for path in SCRUB:
                empty(path)
        except OSError:
            clean = False
        clean = clean and not sysv_left()
        ctl.send(b"E" + str(status).encode())
        if not clean:
            # Something of this command would outlive it: end the sandbox
            # (the broker starts a fresh one for the next command).
            return


if __name__ == "__main__":
    main()
