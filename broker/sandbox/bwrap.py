"""The bubblewrap command for one sandbox, and the launcher around it.

:func:`build` is pure: it turns a :class:`SandboxSpec` into the argv and the
file descriptors to pass.  The layout (see ``docs/security.md``):

- new user, pid, net, ipc, uts (and cgroup) namespaces; no nested user
  namespaces; ``--die-with-parent --new-session --as-pid-1`` (the command is
  pid 1: no unfiltered bwrap init shares the sandbox); no capabilities;
- a read-only synthetic root: ``/usr`` (with the usual symlinks), a few
  ``/etc`` files, a synthetic ``/etc/passwd``, and the Python installation
  bound at the same paths it has outside;
- ``/mnt/data`` read-write and the working directory; size-capped ``/tmp``
  and ``/dev/shm``; ``/dev`` read-only; a fresh ``/proc``;
- for kernels, ``/run/kernel`` (the ZeroMQ ipc sockets, nothing else) and a
  read-only ``/run/sandbox`` holding the connection file and the compiled
  seccomp program.

As root the launcher runs bwrap as the sandbox's own uid.  Bind sources that
uid cannot reach (the interpreter under ``/root``, a data folder under a 0700
parent) are first bound, inside a private mount namespace of the launcher
only, onto a world-readable staging folder; the host's mount table never
changes and the uid gains no access to anything else.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field

SANDBOX_UID = 1000
SANDBOX_GID = 1000
LAUNCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Every sandbox process (kernels, shell commands) starts with this
# oom_score_adj, so the host's OOM killer takes them before the broker
# (docs/admission.md).  Set by util-linux's choom at the head of the launch
# chain; as root it also becomes the floor the sandbox cannot lower.
SANDBOX_OOM_SCORE_ADJ = 1000

ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf", "/etc/mime.types",
             "/etc/fonts")


@dataclass
class SandboxSpec:
    command: list[str]
    data_dir: str
    env: dict[str, str]
    ro_paths: list[str] = field(default_factory=list)     # bound read-only at the same path
    rt_dir: str | None = None                             # -> /run/kernel
    files: dict[str, bytes] = field(default_factory=dict)  # read-only files in /run/sandbox
    tmp_size: int = 256 << 20
    shm_size: int = 64 << 20
    seccomp_fd: int | None = None                         # bwrap --seccomp (shell sandboxes)
    programs: dict[str, bytes] = field(default_factory=dict)  # read-only executables (absolute path -> bytes)
    symlinks: dict[str, str] = field(default_factory=dict)    # absolute path -> link target
    hostname: str = "sandbox"
    cap_drop: bool = True
    views: dict[str, str] = field(default_factory=dict)   # sandbox path -> host folder, read-only


@dataclass
class Launch:
    argv: list[str]
    pass_fds: list[int]
    env: dict[str, str]

    def close_fds(self) -> None:
        for fd in self.pass_fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def passwd_files() -> dict[str, bytes]:
    return {
        "/etc/passwd": f"sandbox:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox:/tmp:/bin/bash\n".encode(),
        "/etc/group": f"sandbox:x:{SANDBOX_GID}:\n".encode(),
    }


def build(spec: SandboxSpec, bwrap: str, sources: dict[str, str] | None = None) -> tuple[list[str], list[int]]:
    """bwrap argv and the fds it reads.  *sources* maps a host path to the path
    bwrap should bind it from (the staging folder) when they differ."""
    sources = sources or {}
    src = lambda p: sources.get(p, p)  # noqa: E731
    fds: list[int] = []
    a = [bwrap, "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
         "--disable-userns", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
         "--unshare-cgroup-try", "--hostname", spec.hostname, "--die-with-parent", "--new-session",
         # No bwrap init inside: it would be a process of the same uid with no
         # seccomp filter, whose memory the sandboxed code could write through
         # /proc/1/mem where Landlock is not there to stop it.  The command is
         # pid 1 itself, and the sandbox ends when it exits.
         "--as-pid-1"]
    if spec.cap_drop:
        a += ["--cap-drop", "ALL"]
    a += ["--clearenv"]
    for k, v in sorted(spec.env.items()):
        a += ["--setenv", k, v]
    # /tmp first: a later tmpfs would hide binds below it.
    a += ["--size", str(spec.tmp_size), "--perms", "1777", "--tmpfs", "/tmp"]
    a += ["--ro-bind", "/usr", "/usr"]
    for name in ("lib", "lib64", "bin", "sbin"):
        target = f"/{name}"
        if os.path.islink(target):
            a += ["--symlink", os.readlink(target), target]
        elif os.path.isdir(target):
            a += ["--ro-bind", target, target]
    for path in ETC_FILES:
        if os.path.exists(path):
            a += ["--ro-bind", path, path]
    for path, data in passwd_files().items():
        fd = _memfd(os.path.basename(path), data)
        fds.append(fd)
        a += ["--perms", "0444", "--ro-bind-data", str(fd), path]
    for path in _dedupe(spec.ro_paths):
        a += ["--ro-bind", src(path), path]
    a += ["--proc", "/proc", "--dev", "/dev",
          "--size", str(spec.shm_size), "--perms", "1777", "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
    a += ["--dir", "/mnt", "--bind", src(spec.data_dir), "/mnt/data"]
    for dest, host in sorted(spec.views.items()):
        a += ["--ro-bind", src(host), dest]
    if spec.rt_dir:
        a += ["--dir", "/run", "--bind", src(spec.rt_dir), "/run/kernel"]
    for name, data in spec.files.items():
        fd = _memfd(name, data)
        fds.append(fd)
        a += ["--perms", "0444", "--ro-bind-data", str(fd), f"/run/sandbox/{name}"]
    for path, data in spec.programs.items():
        fd = _memfd(os.path.basename(path), data)
        fds.append(fd)
        a += ["--perms", "0555", "--ro-bind-data", str(fd), path]
    for path, target in spec.symlinks.items():
        a += ["--symlink", target, path]
    if spec.seccomp_fd is not None:
        fds.append(spec.seccomp_fd)
        a += ["--seccomp", str(spec.seccomp_fd)]
    a += ["--remount-ro", "/", "--chdir", "/mnt/data", "--"]
    a += spec.command
    return a, fds


def _dedupe(paths: list[str]) -> list[str]:
    """Drop paths inside another listed path (the outer bind covers them) and
    paths already provided (/usr)."""
    out: list[str] = []
    for p in sorted({os.path.normpath(p) for p in paths if p}, key=len):
        if p == "/usr" or p.startswith("/usr/"):
            continue
        if any(p == q or p.startswith(q + "/") for q in out):
            continue
        out.append(p)
    return out


def reachable_by(path: str, uid: int, gid: int) -> bool:
    """Can *uid* (with no supplementary groups) traverse to *path*?"""
    parts = os.path.normpath(path).split("/")
    cur = "/"
    for part in parts[1:]:
        try:
            st = os.stat(cur)
        except OSError:
            return False
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return False
        cur = os.path.join(cur, part)
    return True


# The launcher script, run by /bin/sh as root inside `unshare --mount
# --propagation private`.  Arguments, all passed as argv (never interpolated):
#   STAGE  NPROCS  PROCS_FILE...  NSTAGE  SRC...  --  COMMAND...
# It joins the cgroups with its own pid (the pid bwrap will have), binds each
# SRC on STAGE/<i> (empty root-owned folders made beforehand) in its private
# mount namespace, then execs COMMAND.  Only shell built-ins and one `mount`
# per staged path: every exec here is on the start-up path of every sandbox.
_LAUNCHER = r'''
set -e
stage=$1; shift
n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n-1)); done
n=$1; shift
i=0
while [ "$i" -lt "$n" ]; do
  mount --bind "$1" "$stage/$i"
  shift; i=$((i+1))
done
[ "$1" = "--" ] && shift
exec "$@"
'''


def ensure_stage_dirs(stage_dir: str, count: int) -> None:
    """The empty mount points the launcher binds onto (root-owned, 0755)."""
    for i in range(count):
        path = os.path.join(stage_dir, str(i))
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o755, exist_ok=True)


def launch(spec: SandboxSpec, *, bwrap: str, uid: int, gid: int, as_root: bool,
           rlimits: dict[str, int], procs_files: list[str], stage_dir: str,
           tools: dict[str, str] | None = None) -> Launch:
    """The full launch: choom + [root launcher] + setpriv + prlimit + bwrap + command."""
    out = _launch(spec, bwrap=bwrap, uid=uid, gid=gid, as_root=as_root, rlimits=rlimits,
                  procs_files=procs_files, stage_dir=stage_dir, tools=tools)
    choom = (tools or {}).get("choom") or shutil.which("choom", path=LAUNCH_PATH)
    if choom:
        out.argv = [choom, "-n", str(SANDBOX_OOM_SCORE_ADJ), "--", *out.argv]
    return out


def _launch(spec: SandboxSpec, *, bwrap: str, uid: int, gid: int, as_root: bool,
            rlimits: dict[str, int], procs_files: list[str], stage_dir: str,
            tools: dict[str, str] | None = None) -> Launch:
    tools = tools or {}
    prlimit = [tools.get("prlimit", "prlimit")] + [f"--{k}={v}" for k, v in rlimits.items()] + ["--"]
    if not as_root:
        argv, fds = build(spec, bwrap)
        full = prlimit + argv
        if procs_files:
            full = ["/bin/sh", "-c", _LAUNCHER, "launch", stage_dir, str(len(procs_files)),
                    *procs_files, "0", "--", *full]
        return Launch(full, fds, {"PATH": LAUNCH_PATH})

    sources: dict[str, str] = {}
    needs = [p for p in _dedupe(spec.ro_paths) + [spec.data_dir] + ([spec.rt_dir] if spec.rt_dir else [])
             + sorted(spec.views.values()) if not reachable_by(p, uid, gid)]
    for i, path in enumerate(needs):
        sources[path] = os.path.join(stage_dir, str(i))
    ensure_stage_dirs(stage_dir, len(needs))
    argv, fds = build(spec, bwrap, sources)
    setpriv = [tools.get("setpriv", "setpriv"), f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
               "--inh-caps=-all", "--"]
    inner = setpriv + prlimit + argv
    if not needs and not procs_files:
        return Launch(inner, fds, {"PATH": LAUNCH_PATH})
    full = [tools.get("unshare", "unshare"), "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", _LAUNCHER, "launch", stage_dir, str(len(procs_files)), *procs_files,
            str(len(needs)), *needs, "--", *inner]
    return Launch(full, fds, {"PATH": LAUNCH_PATH})
