"""Escape corpus, the shell sandbox (research/sandbox.md §5e and §6, "S").

Each command runs through :func:`broker.sandbox.shell.run_shell` over a
temporary data folder owned by a leased uid from the sandbox range (as
run_shell does for a session: it takes the folder owner's uid).  Every case
asserts the refusal and then that the next command works; cases that make
processes also prove nothing is left behind.  Every case runs twice: through
a session's long-lived shell sandbox ("helper", what RunShellCommand uses:
one sandbox per session whose pid 1 forks each command) and with a fresh
sandbox per command ("fresh", SandboxSettings.shell_helper = False).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import subprocess
import tempfile
import time

import psutil
import pytest

from broker.sandbox.provisioner import python_paths
from broker.sandbox.shell import SHELL_ENV, shell_ro_paths
from tests.cant_support import Canary, ShellBox, record_cgroups, token, uid_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["helper", "fresh"])
def box(request):
    b = ShellBox(helper=request.param == "helper")
    yield b
    b.close()


def still_works(box, started_after: float | None = None) -> None:
    """The next command runs normally."""
    r = box.run("echo next-ok; pwd; id -u", timeout=15)
    assert r.exit_code == 0 and r.stdout.split() == ["next-ok", "/mnt/data", "1000"], r
    assert r.duration_ms < 5000, f"the next command took {r.duration_ms} ms"


def no_leftovers(box, made_cgroups=()) -> None:
    left = box.leftovers()
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"
    for group in made_cgroups:
        for d in group.dirs:
            assert not os.path.exists(d), f"cgroup {d} left behind"


# --- network ---------------------------------------------------------------------

def _wait_count(listener, want: int, timeout: float = 2.0) -> int:
    deadline = time.monotonic() + timeout
    while listener.connections < want and time.monotonic() < deadline:
        time.sleep(0.02)
    return listener.connections


def test_cant_reach_network_from_shell(box, host_listeners):
    tcp4 = host_listeners["tcp4"]
    port = tcp4.address[1]
    # Positive control: the listener counts a connection from the host.
    base = tcp4.connections
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert _wait_count(tcp4, base + 1) == base + 1
    base = tcp4.connections
    tcp6_port = host_listeners["tcp6"].address[1] if "tcp6" in host_listeners else port
    abstract = host_listeners["abstract"].address[1:]
    r = box.run(f"""
        echo hi > /dev/tcp/127.0.0.1/{port} && echo TCP4-CONNECTED
        echo hi > /dev/tcp/::1/{tcp6_port} && echo TCP6-CONNECTED
        python3 - <<'EOF'
import socket
for what, make in [
        ("PY-TCP4", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2)),
        ("PY-TCP6", lambda: socket.create_connection(("::1", {tcp6_port}), timeout=2)),
        ("PY-UDP", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 53))),
        ("PY-RAW", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
        ("PY-ABSTRACT", lambda: socket.socket(socket.AF_UNIX).connect("\\0{abstract}"))]:
    try:
        make()
        print(what + "-CONNECTED")
    except OSError as exc:
        print(what, "refused", exc.errno)
EOF
        getent hosts example.com && echo DNS-RESOLVED
        getent hosts localhost && echo LOCALHOST-RESOLVED
        test -e /etc/resolv.conf && echo RESOLV-CONF
        echo done
    """, timeout=30)
    assert "done" in r.stdout, r
    assert "CONNECTED" not in r.stdout and "RESOLVED" not in r.stdout and "RESOLV-CONF" not in r.stdout, r
    assert "PY-TCP4 refused 1" in r.stdout, r  # EPERM from seccomp, not a mere refusal
    assert "Operation not permitted" in r.stderr, r  # bash's /dev/tcp socket()
    assert _wait_count(tcp4, base + 1, timeout=0.5) == base, "the host listener saw a connection"
    still_works(box)


# --- namespaces, mounts, privileges -----------------------------------------------------

def test_cant_create_namespaces_from_shell(box):
    r = box.run("""
        for f in -r -U -n -m -p -i -u -C "-r -n"; do
            unshare $f true 2>/dev/null && echo "UNSHARE[$f]-OK" || echo "UNSHARE[$f]-REFUSED"
        done
        bwrap --ro-bind / / true 2>/dev/null && echo BWRAP-OK || echo BWRAP-REFUSED
        python3 - <<'EOF'
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for name, flag in (("NEWUSER", 0x10000000), ("NEWNET", 0x40000000), ("NEWNS", 0x20000)):
    r = libc.unshare(flag)
    print("PY-UNSHARE", name, r, ctypes.get_errno())
print("PY-GETPID", os.getpid() > 0)
EOF
    """)
    assert r.exit_code == 0, r
    assert r.stdout.count("-REFUSED") == 10 and "-OK" not in r.stdout, r.stdout
    for name in ("NEWUSER", "NEWNET", "NEWNS"):
        assert f"PY-UNSHARE {name} -1 1" in r.stdout, r.stdout  # EPERM
    assert "PY-GETPID True" in r.stdout
    # On the host the same uid may create user namespaces (bwrap relies on it).
    host = subprocess.run(["setpriv", f"--reuid={box.uid}", f"--regid={box.uid}", "--clear-groups",
                           "unshare", "-r", "true"], capture_output=True, cwd="/")
    assert host.returncode == 0, "the host refuses unshare -r too: the test would prove nothing"
    still_works(box)


def test_cant_mount_from_shell(box):
    r = box.run("""
        before=$(wc -l < /proc/self/mountinfo)
        mkdir -p /tmp/m
        mount -t tmpfs none /tmp/m 2>/dev/null && echo MOUNT-TMPFS-OK
        mount --bind /mnt/data /tmp/m 2>/dev/null && echo MOUNT-BIND-OK
        mount -o remount,rw / 2>/dev/null && echo REMOUNT-ROOT-OK
        mount -o remount,bind,rw /usr 2>/dev/null && echo REMOUNT-USR-OK
        umount /mnt/data 2>/dev/null && echo UMOUNT-DATA-OK
        umount -l /proc 2>/dev/null && echo UMOUNT-PROC-OK
        python3 - <<'EOF'
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
r = libc.mount(b"none", b"/tmp/m", b"tmpfs", 0, None)
print("PY-MOUNT", r, ctypes.get_errno())
r = libc.syscall(428, -100, b"/usr", 0)  # open_tree
print("PY-OPEN-TREE", r, ctypes.get_errno())
r = libc.syscall(430, b"tmpfs", 0)        # fsopen
print("PY-FSOPEN", r, ctypes.get_errno())
EOF
        touch /usr/cant-after-mount 2>/dev/null && echo TOUCH-USR-OK
        after=$(wc -l < /proc/self/mountinfo)
        [ "$before" = "$after" ] && echo MOUNTS-UNCHANGED
    """)
    assert "-OK" not in r.stdout, r.stdout
    for name in ("PY-MOUNT", "PY-OPEN-TREE", "PY-FSOPEN"):
        assert f"{name} -1 1" in r.stdout, r.stdout
    assert "MOUNTS-UNCHANGED" in r.stdout, r.stdout
    assert not os.path.exists("/usr/cant-after-mount")
    still_works(box)


def test_cant_gain_privileges_via_setuid(box):
    # su is setuid root; on the host, started by this uid, it waits for a
    # password with euid 0.  In the sandbox it must run as plain uid 1000.
    host = subprocess.Popen(["setpriv", f"--reuid={box.uid}", f"--regid={box.uid}", "--clear-groups", "--",
                             "/bin/sh", "-c", "sleep 1 | su root -c true >/dev/null 2>&1 & sleep 0.4; "
                             "grep ^Uid /proc/$!/status; kill $! 2>/dev/null"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd="/")
    out, _ = host.communicate(timeout=10)
    assert out.split()[1:3] == [str(box.uid), "0"], f"control: setuid su on the host gives euid 0 ({out!r})"
    r = box.run("""
        stat -c '%A' /usr/bin/su
        grep -E '^(NoNewPrivs|CapEff|CapBnd)' /proc/self/status | tr -s '\\t' ' '
        for b in su mount; do
            sleep 1 | /usr/bin/$b root >/dev/null 2>&1 &
            p=$!
            sleep 0.4
            echo "$b $(grep '^Uid' /proc/$p/status | tr -s '\\t' ' ')"
            kill $p 2>/dev/null
        done
        id -u
    """, timeout=30)
    lines = r.stdout.splitlines()
    assert lines[0] == "-rwsr-xr-x", r  # the binary is setuid; the bit is just not honoured
    assert "NoNewPrivs: 1" in lines and "CapEff: 0000000000000000" in lines, r
    assert "su Uid: 1000 1000 1000 1000" in lines, r
    assert lines[-1] == "1000", r
    assert not any(line.split()[-4:] != ["1000"] * 4 for line in lines if " Uid: " in line), r
    still_works(box)


# --- process containment ------------------------------------------------------------

def test_cant_fork_bomb_past_pids_limit(box, monkeypatch):
    made = record_cgroups(monkeypatch)
    peak = [0]

    async def scenario():
        done = asyncio.Event()

        async def sample():
            while not done.is_set():
                peak[0] = max(peak[0], len(uid_processes(box.uid)))
                await asyncio.sleep(0.05)

        sampler = asyncio.ensure_future(sample())
        try:
            return await box.shell("bomb() { bomb | bomb & }; bomb; sleep 2; echo BOMB-END", timeout=20)
        finally:
            done.set()
            await sampler

    r = box.drive(scenario())
    assert r.duration_ms < 20000, r.duration_ms
    assert "Resource temporarily unavailable" in r.stderr, "the bomb never hit a limit"
    assert 16 < peak[0] <= box.settings.pids_limit, f"peak {peak[0]} processes"
    assert box.helper or (made and all(g.name.startswith("sh-") for g in made))
    no_leftovers(box, made)
    still_works(box)


def test_cant_kill_host_processes_from_shell(box):
    # A host process of the very same uid: only the pid namespace protects it.
    victim = subprocess.Popen(["setpriv", f"--reuid={box.uid}", f"--regid={box.uid}", "--clear-groups", "--",
                               "sleep", "60"], cwd="/")
    try:
        time.sleep(0.1)
        r = box.run(f"""
            kill -9 {victim.pid} 2>/dev/null && echo KILLED-BY-PID
            kill -9 -1 2>/dev/null; echo "kill-all-rc=$?"
        """)
        assert "KILLED-BY-PID" not in r.stdout, r
        time.sleep(0.2)
        assert victim.poll() is None, "a host process was killed from the shell sandbox"
        assert psutil.Process(victim.pid).status() != psutil.STATUS_ZOMBIE
    finally:
        victim.kill()
        victim.wait()
    still_works(box)


def test_cant_flood_shell_output(box, monkeypatch):
    made = record_cgroups(monkeypatch)
    start = time.monotonic()
    r = box.run("(setsid yes > /dev/null &); yes FLOOD; yes ERR >&2", timeout=30, output_limit=4096)
    assert r.truncated, r
    assert len(r.stdout) + len(r.stderr) <= 4096
    assert r.stdout.startswith("FLOOD\n")
    assert time.monotonic() - start < 10 and not r.timed_out, r.duration_ms
    no_leftovers(box, made)
    still_works(box)


@pytest.mark.alone  # bounds a wall time to within a few seconds
def test_cant_outlive_shell_timeout(box, monkeypatch):
    made = record_cgroups(monkeypatch)
    marker = token("sleeper").split("-")[1][:6]
    seconds = {i: f"7{int(marker, 16) % 100000:05d}{i}" for i in range(3)}
    r = box.run(f"""
        setsid sleep {seconds[0]} &
        (trap '' TERM INT HUP; exec sleep {seconds[1]}) &
        nohup sleep {seconds[2]} >/dev/null 2>&1 &
        echo started
        while :; do :; done
    """, timeout=1.5)
    assert r.timed_out and r.exit_code is None, r
    assert 1500 <= r.duration_ms < 6500, r.duration_ms
    assert "started" in r.stdout
    no_leftovers(box, made)
    stragglers = [p for p in psutil.process_iter(["cmdline"])
                  if p.info["cmdline"] and any(s in p.info["cmdline"] for s in seconds.values())]
    assert not stragglers, stragglers
    still_works(box)


# --- files and environment ------------------------------------------------------------

def _sandbox_private(path: str) -> bool:
    """Is *path* inside the sandbox's own writable tmpfs (/tmp, /dev/shm) and
    outside every read-only bind?  A checkout under /tmp is such a place: the
    sandbox shows an empty /tmp of its own there (with the interpreter's binds
    below it), so a write there lands in the sandbox's tmpfs, not on the host."""
    def inside(p, q):
        return p == q or p.startswith(q.rstrip("/") + "/")
    binds = [os.path.normpath(b) for b in shell_ro_paths()]
    return any(inside(path, t) for t in ("/tmp", "/dev/shm")) and not any(inside(path, b) for b in binds)


def test_cant_write_outside_data_from_shell(box):
    name = token("cant-sh-write")
    prefixes = [p for p in python_paths() if os.path.isdir(p)]
    # A host folder anyone may write to, outside every bind: proves the
    # refusal does not depend on where the checkout lies.
    open_dir = tempfile.mkdtemp(prefix="cant-sh-", dir="/var/tmp") if os.path.isdir("/var/tmp") else None
    if open_dir:
        os.chmod(open_dir, 0o777)
    targets = ["/", "/usr", "/usr/bin", "/etc", "/mnt", "/run", "/var", "/root", "/home", "/proc", "/dev",
               "/work", REPO, os.path.join(REPO, "kernel_profile")] + prefixes + ([open_dir] if open_dir else [])
    repo_cfg = os.path.join(REPO, "setup.cfg")
    try:
        r = box.run(f"""
            for d in {' '.join(shlex.quote(t) for t in targets)}; do
                touch "$d/{name}" 2>/dev/null && echo "WROTE $d"
                mkdir "$d/{name}.d" 2>/dev/null && echo "MKDIR $d"
            done
            # Opened for appending, nothing written: a success changes no host file.
            : >> /etc/passwd 2>/dev/null && echo "OPENED /etc/passwd"
            : >> /usr/bin/env 2>/dev/null && echo "OPENED /usr/bin/env"
            : >> {shlex.quote(repo_cfg)} 2>/dev/null && echo "OPENED {repo_cfg}"
            touch /mnt/data/{name} /tmp/{name} /dev/shm/{name} && echo OWN-OK
        """)
        assert "OWN-OK" in r.stdout, r  # positive control: the writable places are writable
        # A write into the sandbox's own tmpfs (the checkout under /tmp) is no
        # escape; the host-side checks below still hold for it.
        bad = [line for line in r.stdout.splitlines()
               if line != "OWN-OK" and not _sandbox_private(line.split(" ", 1)[1])]
        assert not bad, bad
        for d in targets:
            assert not os.path.lexists(os.path.join(d, name)), f"{d}/{name} appeared on the host"
            assert not os.path.lexists(os.path.join(d, name + ".d"))
        assert os.path.exists(os.path.join(box.data, name))
    finally:
        for d in targets:
            for p in (os.path.join(d, name), os.path.join(d, name + ".d")):
                if os.path.isdir(p):
                    os.rmdir(p)
                elif os.path.lexists(p):
                    os.unlink(p)
        if open_dir:
            os.rmdir(open_dir)
    still_works(box)


def test_cant_read_host_secrets_from_shell(box):
    canary = Canary("/tmp")
    try:
        files = ["/etc/shadow", "/root/.bashrc", "/root/.gitconfig", canary.path, os.path.join(REPO, "setup.cfg"),
                 os.path.join(REPO, ".git", "HEAD"), os.path.join(REPO, "broker", "sandbox", "provisioner.py"),
                 os.path.join(REPO, "tests", "conftest.py")]
        files = [f for f in files if os.path.isfile(f)]
        assert len(files) >= 6
        r = box.run("for f in " + " ".join(shlex.quote(f) for f in files) + """; do
                cat "$f" 2>/dev/null && echo "READ $f"
            done
            echo "LS-ROOT $(ls -A /root 2>/dev/null | tr '\\n' ' ')"
            echo "LS-HOME $(ls -A /home 2>/dev/null | tr '\\n' ' ')"
            echo "LS-REPO $(ls -A """ + shlex.quote(REPO) + """ 2>/dev/null | tr '\\n' ' ')"
            echo "LS-TMP $(ls -A /tmp 2>/dev/null | tr '\\n' ' ')"
            echo "OWN $(echo mine > /mnt/data/own && cat /mnt/data/own)"
        """)
        assert "OWN mine" in r.stdout, r
        assert "READ " not in r.stdout, r.stdout
        assert canary.secret not in r.stdout and "name = broker" not in r.stdout and "ref: " not in r.stdout
        listing = {line.split(" ", 1)[0]: set(line.split()[1:]) for line in r.stdout.splitlines()
                   if line.startswith("LS-")}

        def allowed(folder):
            return {p[len(folder) + 1:].split("/")[0] for p in python_paths() if p.startswith(folder + "/")}

        assert listing["LS-ROOT"] <= allowed("/root"), listing["LS-ROOT"]
        assert listing["LS-HOME"] <= allowed("/home"), listing["LS-HOME"]
        assert listing["LS-REPO"] <= allowed(REPO), listing["LS-REPO"]
        assert os.path.basename(canary.path) not in listing["LS-TMP"]
    finally:
        canary.remove()
    still_works(box)


def test_cant_see_host_environment_from_shell(box, monkeypatch):
    secret = token("SHELL-HOST-SECRET")
    monkeypatch.setenv("BROKER_CANT_SHELL_SECRET", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    r = box.run("""
        echo "PID1 $(tr '\\0' ' ' < /proc/1/environ)"
        for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < "$f"; done 2>/dev/null | sort -u | sed 's/^/ANY /'
        env | sed 's/^/ENV /'
    """)
    assert r.exit_code == 0, r
    assert secret not in r.stdout + r.stderr, "a host environment variable reached the shell sandbox"
    assert "BROKER_CANT_SHELL_SECRET" not in r.stdout and "AWS_SECRET" not in r.stdout
    pid1 = next(line for line in r.stdout.splitlines() if line.startswith("PID1 "))
    # pid 1 is bash itself (bwrap --as-pid-1) or bwrap's init: the allow-list only.
    assert {kv.split("=", 1)[0] for kv in pid1.split()[1:]} <= set(SHELL_ENV) | {"PWD"}, pid1
    env = {line[4:].split("=", 1)[0] for line in r.stdout.splitlines() if line.startswith("ENV ")}
    assert "ENV HOME=/mnt/data" in r.stdout  # positive control: the environment is readable
    assert env - set(SHELL_ENV) <= {"PWD", "SHLVL", "_", "OLDPWD"}, sorted(env - set(SHELL_ENV))
    still_works(box)


# --- kernel attack surface ---------------------------------------------------------------

def test_cant_use_io_uring_from_shell(box):
    r = box.run("""
        python3 - <<'EOF'
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
for name, nr, args in (("SETUP", 425, (8, params)), ("ENTER", 426, (0, 1, 0, 0, None, 0)),
                       ("REGISTER", 427, (0, 0, None, 0))):
    r = libc.syscall(nr, *args)
    print("IO_URING", name, r, ctypes.get_errno())
print("GETPID", libc.syscall(39) > 0)
EOF
    """)
    assert r.exit_code == 0, r
    for name in ("SETUP", "ENTER", "REGISTER"):
        assert f"IO_URING {name} -1 1" in r.stdout, r.stdout  # EPERM, not ENOSYS/EBADF
    assert "GETPID True" in r.stdout
    still_works(box)


def test_cant_ptrace_from_shell(box):
    r = box.run("""
        strace -f -o /dev/null true 2>/dev/null && echo STRACE-OK || echo STRACE-REFUSED
        sleep 5 & victim=$!
        python3 - $victim <<'EOF'
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
victim = int(sys.argv[1])
for name, req, pid in (("TRACEME", 0, 0), ("ATTACH", 16, victim), ("SEIZE", 0x4206, victim)):
    r = libc.ptrace(req, pid, None, None)
    print("PTRACE", name, r, ctypes.get_errno())
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
local = iovec(ctypes.cast(buf, ctypes.c_void_p), 8)
remote = iovec(0x400000, 8)
r = libc.process_vm_readv(victim, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
print("VM_READV", r, ctypes.get_errno())
EOF
        kill $victim
    """)
    assert "STRACE-REFUSED" in r.stdout, r
    for name in ("TRACEME", "ATTACH", "SEIZE"):
        assert f"PTRACE {name} -1 1" in r.stdout, r.stdout
    assert "VM_READV -1 1" in r.stdout, r.stdout
    still_works(box)


# --- what must keep working ------------------------------------------------------------------

def test_cant_block_ordinary_pipelines(box):
    """The walls must not stop real work: pipelines, ;, && and || and the
    working directory behave as in any shell."""
    r = box.run("""
        printf 'INFO a\\nERROR disk\\nERROR net\\nINFO b\\nERROR disk\\nWARN x\\nERROR disk\\n' > log.txt
        grep ERROR log.txt | sort | uniq -c | sort -rn
        tail -n 2 log.txt
        echo one; echo two
        false && echo never; true && echo yes
        false || echo fallback
        pwd
        wc -l < log.txt | tr -d ' '
        ls
    """)
    assert r.exit_code == 0, r
    lines = [line.strip() for line in r.stdout.splitlines()]
    assert lines[:2] == ["3 ERROR disk", "1 ERROR net"], lines
    assert lines[2:4] == ["WARN x", "ERROR disk"], lines
    assert lines[4:9] == ["one", "two", "yes", "fallback", "/mnt/data"], lines
    assert lines[9] == "7" and lines[10] == "log.txt", lines
    assert os.path.exists(os.path.join(box.data, "log.txt"))
    st = os.stat(os.path.join(box.data, "log.txt"))
    assert st.st_uid == box.uid, "files made in the shell belong to the session's uid"
    still_works(box)


# --- the session's long-lived shell sandbox (helper mode only) ---------------------------------

@pytest.fixture
def hbox():
    b = ShellBox(helper=True)
    yield b
    b.close()


def test_cant_leave_anything_for_the_next_command(hbox):
    """Processes (even ones that left the command's session with setsid),
    /tmp and /dev/shm files, a locked-down folder in /tmp and System V IPC
    objects of one command are gone before the next command starts."""
    r = hbox.run("""
        setsid sleep 300 & (trap '' TERM HUP; sleep 301) &
        echo left > /tmp/left; echo left > /dev/shm/left
        mkdir -p /tmp/locked/deep && touch /tmp/locked/deep/f && chmod 000 /tmp/locked/deep /tmp/locked
        ipcmk -M 4096 >/dev/null && echo SHM-MADE
        echo done
    """, timeout=15)
    assert r.exit_code == 0 and "done" in r.stdout and "SHM-MADE" in r.stdout, r
    starts = hbox.shell_sandbox.starts
    r = hbox.run("ls -A /tmp /dev/shm; ps -e -o pid=,comm=; ipcs -m | grep -c '^0x' || true", timeout=15)
    lines = r.stdout.split()
    assert "left" not in lines and "locked" not in lines, r.stdout
    assert "sleep" not in lines, r.stdout
    assert lines[-1] == "0", f"System V shared memory survived: {r.stdout}"
    # A SysV object cannot be removed from inside the helper's walls, so the
    # helper ended its sandbox: the command after it ran in a fresh one.
    assert hbox.shell_sandbox.starts == starts + 1
    assert not hbox.leftovers()
    still_works(hbox)


def test_cant_kill_or_read_the_shell_helper(hbox):
    """The helper is pid 1 of the shell sandbox, of the command's own uid:
    signals from inside do not reach it, its /proc files and memory are
    closed, and its rlimits cannot be lowered for the commands after."""
    r = hbox.run("""
        kill -9 1 2>&1; kill -STOP 1 2>&1; kill -9 -1 2>&1; echo SIGNALS-SENT
        cat /proc/1/environ >/dev/null 2>&1 && echo ENVIRON-READ
        ls /proc/1/fd >/dev/null 2>&1 && echo FDS-LISTED
        dd if=/proc/1/mem bs=1 count=1 skip=4194304 >/dev/null 2>&1 && echo MEM-READ
        echo 0 > /proc/1/oom_score_adj 2>/dev/null && echo OOM-ADJ-WRITTEN
        echo done
    """, timeout=15)
    assert "SIGNALS-SENT" in r.stdout and "done" in r.stdout, r
    for leak in ("ENVIRON-READ", "FDS-LISTED", "MEM-READ", "OOM-ADJ-WRITTEN"):
        assert leak not in r.stdout, r.stdout
    assert hbox.shell_sandbox.starts == 1, "the helper died from a signal sent inside"
    r = hbox.run("prlimit --pid 1 --nofile=16:16 && echo LOWERED", timeout=15)
    assert "LOWERED" in r.stdout, r      # allowed (same uid): the helper must notice
    r = hbox.run("prlimit --pid $$ --nofile --noheadings -o SOFT,HARD", timeout=15)
    assert r.exit_code == 0 and r.stdout.split() == ["1024", "1024"], r
    assert hbox.shell_sandbox.starts == 2
    still_works(hbox)


def test_cant_break_the_session_by_killing_its_shell_sandbox(hbox):
    """The helper dying under a command (as an OOM kill would do) ends that
    command with SIGKILL; the next command gets a fresh shell sandbox."""
    hbox.run("true")
    pids = hbox.helper_pids()

    async def scenario():
        task = asyncio.ensure_future(hbox.shell("echo started; sleep 60", timeout=30))
        await asyncio.sleep(1.0)
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        return await task

    r = hbox.drive(scenario())
    assert r.signal == 9 and r.exit_code is None and r.duration_ms < 10000, r
    assert not hbox.leftovers()
    still_works(hbox)
    assert hbox.shell_sandbox.starts == 2
