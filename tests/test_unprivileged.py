"""The provisioner works when the broker is not root: the unprivileged
user-namespace path (bwrap as the broker's own user, no uid lease, no loop
quota, rlimits instead of cgroups where none is writable).

The trap is in the set-up, not the product: this machine's interpreter lives
under /root (mode 0700, pyenv), so an unprivileged user cannot even start
Python.  The test solves it for one child process only:

1. as root, create a throw-away system user (removed at the end);
2. in a private mount namespace (``unshare --mount --propagation private``),
   cover each folder that blocks the way (here /root) with an empty tmpfs
   and bind back only the paths the broker needs (sys.base_prefix, the
   virtualenv, the repository), staged through a private tmpfs;
3. drop to that user with setpriv (no groups, no capabilities, empty
   environment) and run a probe that starts ``python3-sandbox`` with
   KernelManager and reports what the kernel sees.

The host's mount table, files and /root are never changed.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent(r"""
    import json, os, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    caps = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if l.startswith("Cap"))
    out = {"euid": os.geteuid(), "egid": os.getegid(), "groups": os.getgroups(),
           "caps": {k: v.strip() for k, v in caps.items() if k != "CapBnd"},
           "base_prefix": sys.base_prefix, "prefix": sys.prefix}
    # A machine that forbids unprivileged user namespaces cannot run this path.
    probe = subprocess.run(["unshare", "--user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        print("SKIP unprivileged user namespaces are disabled here: " + probe.stderr.strip())
        sys.exit(0)

    import psutil
    from tests.harness import SandboxKernel

    k = SandboxKernel()
    try:
        prov = k.provisioner
        out["sandbox_process_uids"] = list(psutil.Process(prov.pid).uids())
        out["has_cgroup"] = prov._cgroup is not None
        data_dir = k.data_dir
        r = k.run('''
            import json, os, socket
            st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
            try:
                socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                refusal = None
            except PermissionError as e:
                refusal = str(e)
            open('/mnt/data/proof.txt', 'w').write('written by the sandbox')
            print(json.dumps({'cwd': os.getcwd(), 'seccomp': st['Seccomp'].strip(),
                              'no_new_privs': st['NoNewPrivs'].strip(), 'cap_eff': st['CapEff'].strip(),
                              'uid': os.getuid(), 'refusal': refusal}))
        ''')
        out["kernel"] = json.loads(r.stdout.strip().splitlines()[-1]) if r.status == "ok" else str(r)
        k.neutralise_hook()
        r = k.run('''
            import socket
            try:
                socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                print('created')
            except OSError as e:
                print(type(e).__name__, e.errno)
        ''')
        out["unhooked_socket"] = r.stdout.strip() if r.status == "ok" else str(r)
        proof = os.path.join(data_dir, "proof.txt")
        out["proof"] = open(proof).read()
        out["proof_owner"] = os.stat(proof).st_uid
    finally:
        k.shutdown()
    out["data_dir_removed"] = not os.path.exists(data_dir)
    print("RESULT " + json.dumps(out))
""")

SETUP_FAILED = 90


def _traversable(path: str, uid: int, gid: int) -> bool:
    st = os.stat(path)
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _blocker(path: str, uid: int, gid: int) -> str | None:
    """The outermost folder on the way to *path* that *uid* cannot pass."""
    cur = "/"
    for part in os.path.normpath(path).split("/")[1:]:
        if not _traversable(cur, uid, gid):
            return cur
        cur = os.path.join(cur, part)
    return None if _traversable(cur, uid, gid) else cur


def _needed_paths() -> list[str]:
    paths = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, REPO,
                                            os.path.dirname(os.path.realpath(sys.executable)))}
    out: list[str] = []
    for p in sorted(paths, key=len):
        if not any(p == q or p.startswith(q + "/") for q in out):
            out.append(p)
    return out


@pytest.fixture(scope="module")
def unprivileged_user():
    if os.geteuid() != 0:
        pytest.skip("creating a throw-away user and a private mount namespace needs root")
    for tool in ("useradd", "userdel", "unshare", "setpriv", "mount"):
        if not shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin"):
            pytest.skip(f"{tool} is not installed")
    name = f"brkunpriv{os.getpid() % 100000}"
    r = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "--user-group", name], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"useradd failed: {r.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)  # if USERGROUPS_ENAB left it


@pytest.fixture(scope="module")
def workspace(unprivileged_user):
    """HOME/TMPDIR for the user (everything the probe creates lands here) and
    a root-only staging folder for the bind mounts."""
    u = unprivileged_user
    home = tempfile.mkdtemp(prefix="broker-unpriv-home-")
    stage = tempfile.mkdtemp(prefix="broker-unpriv-stage-")
    os.makedirs(os.path.join(home, "tmp"))
    with open(os.path.join(home, "probe.py"), "w") as fh:
        fh.write(PROBE)
    for root, dirs, files in os.walk(home):
        for p in [root] + [os.path.join(root, n) for n in dirs + files]:
            os.chown(p, u.pw_uid, u.pw_gid)
    os.chmod(home, 0o700)
    try:
        yield home, stage
    finally:
        shutil.rmtree(home, ignore_errors=True)
        os.rmdir(stage)


def _launcher(user, home: str, stage: str) -> str:
    """The root half: private mounts, then setpriv to the user and the probe."""
    uid, gid = user.pw_uid, user.pw_gid
    q = shlex.quote
    blocked: dict[str, list[str]] = {}
    for path in _needed_paths():
        b = _blocker(path, uid, gid)
        if b is None:
            continue
        if b == path:
            pytest.skip(f"{path} itself is not readable by other users; a bind mount cannot change that")
        blocked.setdefault(b, []).append(path)
    lines = ["set -e", "umask 022", "fail() { echo \"setup: $*\" >&2; exit %d; }" % SETUP_FAILED]
    if blocked:
        lines.append(f"mount -t tmpfs -o mode=0700,size=64k broker-unpriv-stage {q(stage)} || fail stage tmpfs")
        i = 0
        staged = []
        for b, paths in blocked.items():
            for p in paths:
                s = os.path.join(stage, str(i))
                lines += [f"mkdir {q(s)}", f"mount --bind {q(p)} {q(s)} || fail bind {q(p)}"]
                staged.append((b, p, s))
                i += 1
        for b in blocked:
            # An empty, world-traversable tmpfs hides everything else in b.
            lines.append(f"mount -t tmpfs -o mode=0755,size=64k broker-unpriv-hide {q(b)} || fail hide {q(b)}")
        for b, p, s in staged:
            lines += [f"mkdir -p {q(p)}", f"mount --bind {q(s)} {q(p)} || fail bind back {q(p)}",
                      f"umount {q(s)}"]
        lines.append(f"umount {q(stage)}")
    python = os.path.join(sys.prefix, "bin", "python")
    env = {"HOME": home, "TMPDIR": os.path.join(home, "tmp"), "PATH": "/usr/bin:/bin",
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "JUPYTER_PLATFORM_DIRS": "1"}
    lines.append(
        f"exec setpriv --reuid={uid} --regid={gid} --clear-groups --inh-caps=-all -- "
        f"env -i {' '.join(q(f'{k}={v}') for k, v in env.items())} "
        f"{q(python)} {q(os.path.join(home, 'probe.py'))} {q(REPO)}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def probe(unprivileged_user, workspace):
    home, stage = workspace
    script = _launcher(unprivileged_user, home, stage)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
                       capture_output=True, text=True, timeout=240, cwd="/")
    if r.returncode == SETUP_FAILED or (r.returncode != 0 and "unshare failed" in r.stderr):
        pytest.skip(f"this machine does not allow the private mount set-up: {r.stderr.strip()[-400:]}")
    skip = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIP ")]
    if skip:
        pytest.skip(skip[0][5:])
    result = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and result, f"probe failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(result[0][len("RESULT "):])


def test_setup_needed_the_workaround(unprivileged_user):
    """Documents the trap: without the mount set-up the user could not run
    the interpreter (if this ever fails, the set-up is simply not needed)."""
    u = unprivileged_user
    blocked = [p for p in _needed_paths() if _blocker(p, u.pw_uid, u.pw_gid)]
    if not blocked:
        pytest.skip("the interpreter and virtualenv are already reachable by other users here")
    # (through env: it execs the given path and nothing else)
    r = subprocess.run(["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups",
                        "--inh-caps=-all", "--", "/usr/bin/env", "-i",
                        os.path.join(sys.prefix, "bin", "python"), "-c", "print('ran')"],
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode != 0 and "ran" not in r.stdout
    assert "Permission denied" in r.stderr


def test_broker_side_runs_unprivileged(probe, unprivileged_user):
    u = unprivileged_user
    assert probe["euid"] == u.pw_uid != 0
    assert probe["egid"] == u.pw_gid
    assert probe["groups"] == []
    assert set(probe["caps"].values()) == {"0000000000000000"}, probe["caps"]
    # The same interpreter and virtualenv as the test run, reached through
    # the private mounts.
    assert probe["base_prefix"] == sys.base_prefix
    assert probe["prefix"] == sys.prefix
    # bwrap (the provisioner's process) runs as the broker's own user: no
    # uid lease, no setpriv, no root launcher.
    assert probe["sandbox_process_uids"] == [u.pw_uid] * 3


def test_kernel_is_locked_down(probe):
    kernel = probe["kernel"]
    assert isinstance(kernel, dict), kernel
    assert kernel["cwd"] == "/mnt/data"
    assert kernel["seccomp"] == "2"
    assert kernel["no_new_privs"] == "1"
    assert kernel["cap_eff"] == "0000000000000000"
    assert kernel["uid"] == 1000  # the sandbox's own view of the user


def test_network_refused(probe):
    assert probe["kernel"]["refusal"].startswith("[sandbox]"), probe["kernel"]
    assert "no network access" in probe["kernel"]["refusal"]
    # With the audit hook neutralised the kernel (seccomp) still refuses.
    assert probe["unhooked_socket"] == "PermissionError 1"


def test_data_folder_is_the_users_and_cleaned_up(probe, unprivileged_user):
    assert probe["proof"] == "written by the sandbox"
    assert probe["proof_owner"] == unprivileged_user.pw_uid
    assert probe["data_dir_removed"] is True
