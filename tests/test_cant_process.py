"""Escape corpus, processes: code in a kernel cannot start a process, enter
new namespaces, or reach another process.

Every case runs twice through the parametrized ``kernel`` fixture.  With the
audit hook in place the refusal must be the friendly ``[sandbox]`` one that
names RunShellCommand; after the hook is neutralised it must come from the
kernel-enforced layers (EPERM, or ENOSYS for clone3, from seccomp).  In both
modes the operation must not have happened: each attack would create a
marker file in the data folder (checked from the host) if a child ever ran.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import textwrap
import uuid

PROCESS_HINT = "RunShellCommand"   # the friendly refusal names what to use instead
MARK = "@@CANT-PROC@@"

# Kernel-side helpers prepended to every probe (see test_cant_network.py).
PRELUDE = r'''
import ctypes as _ctypes, json as _json, os as _os
_libc = _ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = _ctypes.c_long
_PID = _os.getpid()

def attempt(fn):
    try:
        return ["ok", repr(fn())]
    except BaseException as exc:
        return ["err", type(exc).__name__, getattr(exc, "errno", None), str(exc)]

def sys_call(nr, *args):
    _ctypes.set_errno(0)
    ret = _libc.syscall(_ctypes.c_long(nr), *[_ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    err = _ctypes.get_errno()
    if ret == 0 and _os.getpid() != _PID:   # a child the filter let through leaves at once
        _os._exit(0)
    return [ret, err if ret < 0 else 0]

def cstrings(*items):
    arr = (_ctypes.c_char_p * (len(items) + 1))()
    for i, item in enumerate(items):
        arr[i] = item.encode()
    return arr
'''


def probe(kernel, code: str, timeout: float = 60, **params) -> dict:
    """Run *code* after the prelude with ``P`` = *params*; it fills ``out``."""
    body = (PRELUDE + f"P = _json.loads({json.dumps(json.dumps(params))})\nout = {{}}\n"
            + textwrap.dedent(code) + f"\nprint({MARK!r} + _json.dumps(out))\n")
    r = kernel.run(body, timeout=timeout)
    assert r.status == "ok", r
    lines = [line for line in r.stdout.splitlines() if line.startswith(MARK)]
    assert lines, r
    return json.loads(lines[-1][len(MARK):])


class Marker:
    """A file a child would create in /mnt/data, checked on the host side."""

    def __init__(self, kernel, name: str):
        self.name = f"cant-{name}-{uuid.uuid4().hex[:8]}"
        self.inside = f"/mnt/data/{self.name}"
        self.host = os.path.join(kernel.data_dir, self.name)

    def assert_absent(self):
        assert not os.path.exists(self.host), f"a child process ran: {self.host} exists"


def friendly(message: str) -> bool:
    return message.startswith("[sandbox]") and PROCESS_HINT in message


def assert_refused(kernel, res, errnos=(errno.EPERM,)):
    """With the hook: the friendly refusal.  Without: an errno from the kernel."""
    assert res[0] == "err", f"not refused: {res}"
    if kernel.hooked:
        assert friendly(res[3]), res
    else:
        assert res[2] in errnos, res


def assert_run_refused(kernel, r, errnos=(errno.EPERM,)):
    """The same for a whole cell (magics)."""
    assert r.status == "error", r
    if kernel.hooked:
        assert friendly(r.evalue), r
    else:
        assert any(r.evalue.startswith(f"[Errno {e}]") for e in errnos), r


def assert_eperm(res, err=errno.EPERM):
    assert res == [-1, err], res


# --- the standard library -------------------------------------------------------------

def test_cant_subprocess_run(kernel):
    m = Marker(kernel, "run")
    out = probe(kernel, """
        import subprocess
        out["run"] = attempt(lambda: subprocess.run(["touch", P["m"]]).returncode)
        out["check_output"] = attempt(lambda: subprocess.check_output(f"touch {P['m']}", shell=True))
        out["call"] = attempt(lambda: subprocess.call(["/usr/bin/touch", P["m"]], close_fds=False))
    """, m=m.inside)
    for key in ("run", "check_output", "call"):
        assert_refused(kernel, out[key])
    m.assert_absent()
    assert kernel.answers()


def test_cant_subprocess_popen(kernel):
    m = Marker(kernel, "popen")
    out = probe(kernel, """
        import subprocess
        def popen(**kw):
            p = subprocess.Popen(["/bin/sh", "-c", f"touch {P['m']}"], **kw)
            return p.wait(10)
        out["plain"] = attempt(popen)
        out["setsid"] = attempt(lambda: popen(start_new_session=True, stdout=subprocess.PIPE))
        out["preexec"] = attempt(lambda: popen(preexec_fn=lambda: None))
    """, m=m.inside)
    for key in ("plain", "setsid", "preexec"):
        assert_refused(kernel, out[key])
    m.assert_absent()
    assert kernel.answers()


def test_cant_os_system(kernel):
    m = Marker(kernel, "system")
    out = probe(kernel, """
        out["system"] = attempt(lambda: _os.system(f"touch {P['m']}"))
    """, m=m.inside)
    if kernel.hooked:
        assert_refused(kernel, out["system"])
    else:
        # glibc's system() reports a shell it could not start as status 127.
        assert out["system"] == ["ok", str(127 << 8)], out
    m.assert_absent()
    assert kernel.answers()


def test_cant_os_popen(kernel):
    m = Marker(kernel, "ospopen")
    out = probe(kernel, """
        out["popen"] = attempt(lambda: _os.popen(f"touch {P['m']}; echo done").read())
    """, m=m.inside)
    assert_refused(kernel, out["popen"])
    m.assert_absent()
    assert kernel.answers()


FORK_AND_TOUCH = """
def fork_touch(fork):
    pid = fork()
    if isinstance(pid, tuple):
        pid = pid[0]
    if pid == 0:                       # the child: leave a mark and go
        try:
            open(P["m"], "w").close()
        finally:
            _os._exit(0)
    _os.waitpid(pid, 0)
    return pid
"""


def test_cant_os_fork(kernel):
    m = Marker(kernel, "fork")
    out = probe(kernel, FORK_AND_TOUCH + textwrap.dedent("""
        out["fork"] = attempt(lambda: fork_touch(_os.fork))
    """), m=m.inside)
    assert_refused(kernel, out["fork"])
    m.assert_absent()
    assert kernel.answers()


def test_cant_os_forkpty(kernel):
    m = Marker(kernel, "forkpty")
    out = probe(kernel, FORK_AND_TOUCH + textwrap.dedent("""
        out["forkpty"] = attempt(lambda: fork_touch(_os.forkpty))
    """), m=m.inside)
    # Without the hook the pty is refused first: /dev is read-only to Landlock.
    assert_refused(kernel, out["forkpty"], errnos=(errno.EPERM, errno.EACCES))
    m.assert_absent()
    assert kernel.answers()


def test_cant_pty_fork(kernel):
    m = Marker(kernel, "ptyfork")
    out = probe(kernel, FORK_AND_TOUCH + textwrap.dedent("""
        import pty
        out["pty_fork"] = attempt(lambda: fork_touch(pty.fork))
    """), m=m.inside)
    # pty.fork swallows os.forkpty's PermissionError (the friendly one too)
    # and falls back to openpty + fork; the pty is refused by Landlock first.
    res = out["pty_fork"]
    assert res[0] == "err" and res[1] in ("OSError", "PermissionError", "SandboxPermissionError"), res
    if res[1] != "OSError" or res[3] != "out of pty devices":
        assert_refused(kernel, res, errnos=(errno.EPERM, errno.EACCES))
    m.assert_absent()
    assert kernel.answers()


def test_cant_pty_spawn(kernel):
    m = Marker(kernel, "ptyspawn")
    out = probe(kernel, """
        import pty
        out["spawn"] = attempt(lambda: pty.spawn(["/usr/bin/touch", P["m"]]))
    """, m=m.inside)
    if kernel.hooked:
        assert_refused(kernel, out["spawn"])
    else:
        assert out["spawn"][0] == "err", out
    m.assert_absent()
    assert kernel.answers()


def test_cant_posix_spawn(kernel):
    m = Marker(kernel, "spawn")
    out = probe(kernel, """
        out["posix_spawn"] = attempt(lambda: _os.waitpid(_os.posix_spawn("/usr/bin/touch", ["touch", P["m"]], {}), 0))
        out["setsid"] = attempt(lambda: _os.posix_spawn("/usr/bin/touch", ["touch", P["m"]], {}, setsid=True))
    """, m=m.inside)
    assert_refused(kernel, out["posix_spawn"])
    assert_refused(kernel, out["setsid"])
    m.assert_absent()
    assert kernel.answers()


def test_cant_posix_spawnp(kernel):
    m = Marker(kernel, "spawnp")
    out = probe(kernel, """
        out["posix_spawnp"] = attempt(lambda: _os.waitpid(_os.posix_spawnp("touch", ["touch", P["m"]], dict(_os.environ)), 0))
    """, m=m.inside)
    assert_refused(kernel, out["posix_spawnp"])
    m.assert_absent()
    assert kernel.answers()


def test_cant_exec(kernel):
    """exec would replace the kernel itself with touch: the marker would
    appear and the kernel would be gone."""
    m = Marker(kernel, "exec")
    out = probe(kernel, """
        out["execv"] = attempt(lambda: _os.execv("/usr/bin/touch", ["touch", P["m"]]))
        out["execve"] = attempt(lambda: _os.execve("/usr/bin/touch", ["touch", P["m"]], {}))
        out["execlp"] = attempt(lambda: _os.execlp("touch", "touch", P["m"]))
        fd = _os.open("/usr/bin/touch", _os.O_RDONLY)
        out["fexecve"] = attempt(lambda: _os.execve(fd, ["touch", P["m"]], {}))
    """, m=m.inside)
    for key in ("execv", "execve", "execlp", "fexecve"):
        assert_refused(kernel, out[key])
    m.assert_absent()
    assert kernel.answers()


def test_cant_os_spawnv(kernel):
    m = Marker(kernel, "spawnv")
    out = probe(kernel, """
        out["spawnv"] = attempt(lambda: _os.spawnv(_os.P_WAIT, "/usr/bin/touch", ["touch", P["m"]]))
        out["spawnlp"] = attempt(lambda: _os.spawnlp(_os.P_NOWAIT, "touch", "touch", P["m"]))
    """, m=m.inside)
    assert_refused(kernel, out["spawnv"])
    assert_refused(kernel, out["spawnlp"])
    m.assert_absent()
    assert kernel.answers()


def test_cant_posixsubprocess_fork_exec(kernel):
    """The call under subprocess and multiprocessing, called directly: no
    audit event of its own before CPython 3.13 (the boot script adds one)."""
    m = Marker(kernel, "forkexec")
    out = probe(kernel, """
        import _posixsubprocess
        def fork_exec():
            r, w = _os.pipe()
            args = [[b"/usr/bin/touch", P["m"].encode()], [b"/usr/bin/touch"], True, (), None, None,
                    -1, -1, -1, -1, -1, -1, r, w, False, False, -1, None, None, None, -1, None]
            try:
                try:
                    pid = _posixsubprocess.fork_exec(*args, False)     # 3.11/3.12: allow_vfork
                except TypeError:
                    pid = _posixsubprocess.fork_exec(*args)
                return _os.waitpid(pid, 0)
            finally:
                _os.close(r)
                _os.close(w)
        out["fork_exec"] = attempt(fork_exec)
        # Where the boot script wrapped it (to raise the audit event), the
        # native function is one closure cell away: seccomp refuses it too.
        wrapper = _posixsubprocess.fork_exec
        if getattr(wrapper, "__closure__", None):
            _posixsubprocess.fork_exec = wrapper.__closure__[0].cell_contents
            try:
                out["native"] = attempt(fork_exec)
            finally:
                _posixsubprocess.fork_exec = wrapper
    """, m=m.inside)
    assert_refused(kernel, out["fork_exec"])
    if "native" in out:
        assert out["native"][0] == "err" and out["native"][2] == errno.EPERM, out
    m.assert_absent()
    assert kernel.answers()


def multiprocessing_start(kernel, method: str):
    m = Marker(kernel, f"mp-{method}")
    out = probe(kernel, """
        import multiprocessing, pathlib
        def start():
            ctx = multiprocessing.get_context(P["method"])
            p = ctx.Process(target=pathlib.Path(P["m"]).touch)
            p.start()
            p.join(10)
            return p.exitcode
        out["start"] = attempt(start)
    """, m=m.inside, method=method)
    assert_refused(kernel, out["start"])
    m.assert_absent()
    assert kernel.answers()


def test_cant_multiprocessing_fork(kernel):
    multiprocessing_start(kernel, "fork")


def test_cant_multiprocessing_spawn(kernel):
    multiprocessing_start(kernel, "spawn")


def test_cant_multiprocessing_forkserver(kernel):
    multiprocessing_start(kernel, "forkserver")


def test_cant_process_pool_executor(kernel):
    m = Marker(kernel, "pool")
    out = probe(kernel, """
        import concurrent.futures, multiprocessing, pathlib
        def pool(method):
            ctx = multiprocessing.get_context(method) if method else None
            ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx)
            try:
                return ex.submit(pathlib.Path(P["m"]).touch).result(timeout=10)
            finally:
                ex.shutdown(wait=False, cancel_futures=True)
        out["default"] = attempt(lambda: pool(None))
        out["spawn"] = attempt(lambda: pool("spawn"))
    """, m=m.inside)
    assert_refused(kernel, out["default"])
    assert_refused(kernel, out["spawn"])
    m.assert_absent()
    assert kernel.answers()


# --- IPython ----------------------------------------------------------------------

def test_cant_run_shell_with_bang(kernel):
    """!cmd is refused with the hint in both modes (the kernel's IPython
    profile replaces the shell hooks, not the audit hook)."""
    m = Marker(kernel, "bang")
    r = kernel.run(f"!touch {m.inside}")
    assert r.status == "error" and friendly(r.evalue), r
    r = kernel.run(f"files = !touch {m.inside}")
    assert r.status == "error" and friendly(r.evalue), r
    m.assert_absent()
    assert kernel.answers()


def test_cant_run_bash_cell_magic(kernel):
    """Shell cells are skipped with a note naming RunShellCommand (in both
    modes: the kernel's IPython profile replaces the magics); IPython's own
    script magic, called past that, reaches the hook, then seccomp."""
    m = Marker(kernel, "bash")
    for head in ("%%bash", "%%sh", "%%script sh"):
        r = kernel.run(f"{head}\ntouch {m.inside}\n")
        assert r.status in ("ok", "error"), r
        assert friendly(r.stderr if r.status == "ok" else r.evalue), (head, r)
    out = probe(kernel, """
        from IPython.core.magics.script import ScriptMagics
        magics = ScriptMagics(shell=get_ipython())
        out["shebang"] = attempt(lambda: magics.shebang("bash", f"touch {P['m']}\\n"))
    """, m=m.inside)
    assert_refused(kernel, out["shebang"])
    m.assert_absent()
    assert kernel.answers()


def test_cant_run_shell_with_sx(kernel):
    m = Marker(kernel, "sx")
    r = kernel.run(f"%sx touch {m.inside}")
    assert r.status == "error" and friendly(r.evalue), r
    r = kernel.run(f"%system touch {m.inside}")
    assert r.status == "error" and friendly(r.evalue), r
    m.assert_absent()
    assert kernel.answers()


def test_cant_run_shell_with_get_ipython_system(kernel):
    """get_ipython().system is refused; calling IPython's own implementations
    past the profile's replacement reaches the hook, then seccomp."""
    m = Marker(kernel, "ipsystem")
    out = probe(kernel, """
        from IPython.core.interactiveshell import InteractiveShell
        ip = get_ipython()
        out["system"] = attempt(lambda: ip.system(f"touch {P['m']}"))
        out["getoutput"] = attempt(lambda: ip.getoutput(f"touch {P['m']}"))
        out["system_raw"] = attempt(lambda: InteractiveShell.system_raw(ip, f"touch {P['m']}"))
        out["orig_getoutput"] = attempt(lambda: InteractiveShell.getoutput(ip, f"touch {P['m']}"))
        out["system_piped"] = attempt(lambda: InteractiveShell.system_piped(ip, f"touch {P['m']}"))
    """, m=m.inside)
    assert friendly(out["system"][3]) and friendly(out["getoutput"][3]), out
    assert_refused(kernel, out["system_raw"])
    assert_refused(kernel, out["orig_getoutput"])
    # system_piped goes through pexpect and a pty: refused before any fork.
    assert out["system_piped"][0] == "err", out
    m.assert_absent()
    assert kernel.answers()


def test_cant_pip_install(kernel):
    for line in ("%pip install requests", "%pip install --user ./wheel.whl", "%conda install numpy",
                 "%mamba install numpy", "%uv pip install requests"):
        r = kernel.run(line)
        assert r.status == "error", (line, r)
        assert r.evalue.startswith("[sandbox] package installation is unavailable"), (line, r)
        assert "Preinstalled:" in r.evalue, r
    m = Marker(kernel, "pip")
    r = kernel.run(f"!pip install --target {m.inside} requests")
    assert r.status == "error" and friendly(r.evalue), r
    m.assert_absent()
    assert kernel.answers()


# --- raw system calls ---------------------------------------------------------------

SIGCHLD = 17


def test_cant_fork_with_raw_clone_fork_or_vfork(kernel):
    out = probe(kernel, """
        out["clone"] = sys_call(56, P["sigchld"], 0, 0, 0, 0)                  # fork
        out["clone_vm"] = sys_call(56, 0x100 | 0x4000 | P["sigchld"], 0, 0, 0, 0)  # CLONE_VM|CLONE_VFORK
        out["clone_files"] = sys_call(56, 0x400 | P["sigchld"], 0, 0, 0, 0)    # CLONE_FILES
        out["fork"] = sys_call(57)
        out["vfork"] = sys_call(58)
        _libc.fork.restype = _ctypes.c_int
        _ctypes.set_errno(0)
        pid = _libc.fork()
        if pid == 0:
            _os._exit(0)
        out["libc_fork"] = [pid, _ctypes.get_errno() if pid < 0 else 0]
    """, sigchld=SIGCHLD)
    for key in ("clone", "clone_vm", "clone_files", "fork", "vfork", "libc_fork"):
        assert_eperm(out[key])
    assert kernel.answers()


def test_cant_exec_with_raw_execve_or_execveat(kernel):
    m = Marker(kernel, "rawexec")
    out = probe(kernel, """
        argv, envp = cstrings("touch", P["m"]), cstrings()
        out["execve"] = sys_call(59, b"/usr/bin/touch", argv, envp)
        out["execveat"] = sys_call(322, -100, b"/usr/bin/touch", argv, envp, 0)      # AT_FDCWD
        fd = _os.open("/usr/bin/touch", _os.O_PATH)
        out["execveat_fd"] = sys_call(322, fd, b"", argv, envp, 0x1000)             # AT_EMPTY_PATH
        memfd = _os.memfd_create("x")
        with open("/usr/bin/touch", "rb") as fh:
            _os.write(memfd, fh.read())
        out["execveat_memfd"] = sys_call(322, memfd, b"", argv, envp, 0x1000)
    """, m=m.inside)
    for key in ("execve", "execveat", "execveat_fd", "execveat_memfd"):
        assert_eperm(out[key])
    m.assert_absent()
    assert kernel.answers()


def test_cant_clone3(kernel):
    """clone3's flags live in memory the filter cannot read: ENOSYS, so that
    glibc falls back to clone(2) for threads.  This is a real fork request."""
    out = probe(kernel, """
        args = _ctypes.create_string_buffer(88)                 # struct clone_args, VER2
        _ctypes.c_uint64.from_buffer(args, 32).value = P["sigchld"]   # exit_signal
        out["clone3"] = sys_call(435, args, 88)
        newuser = _ctypes.create_string_buffer(88)
        _ctypes.c_uint64.from_buffer(newuser, 0).value = 0x10000000   # CLONE_NEWUSER
        _ctypes.c_uint64.from_buffer(newuser, 32).value = P["sigchld"]
        out["clone3_newuser"] = sys_call(435, newuser, 88)
        import threading
        t = threading.Thread(target=lambda: None)
        t.start(); t.join()
        out["threads"] = "ok"
    """, sigchld=SIGCHLD)
    assert_eperm(out["clone3"], errno.ENOSYS)
    assert_eperm(out["clone3_newuser"], errno.ENOSYS)
    assert out["threads"] == "ok"
    assert kernel.answers()


def test_cant_unshare_namespaces(kernel):
    out = probe(kernel, """
        for name, flag in (("newuser", 0x10000000), ("newns", 0x20000), ("newnet", 0x40000000),
                           ("newpid", 0x20000000), ("newuser_newns", 0x10020000), ("files", 0x400)):
            out[name] = sys_call(272, flag)
        out["clone_newuser"] = sys_call(56, 0x10000000 | P["sigchld"], 0, 0, 0, 0)
        out["clone_newnet"] = sys_call(56, 0x40000000 | P["sigchld"], 0, 0, 0, 0)
    """, sigchld=SIGCHLD)
    for key, res in out.items():
        assert_eperm(res)
    assert kernel.answers()


def test_cant_setns(kernel):
    out = probe(kernel, """
        out["bad_fd"] = sys_call(308, -1, 0)
        for ns in ("net", "mnt", "user", "pid"):
            fd = _os.open(f"/proc/self/ns/{ns}", _os.O_RDONLY)
            out[ns] = sys_call(308, fd, 0)
            _os.close(fd)
        pidfd = sys_call(434, 1, 0)[0]                     # pidfd_open(1)
        out["pidfd"] = sys_call(308, pidfd, 0x40000000) if pidfd >= 0 else [-1, 1]
    """)
    for key, res in out.items():
        assert_eperm(res)
    assert kernel.answers()


def test_cant_mount_or_unmount(kernel):
    out = probe(kernel, """
        out["mount"] = sys_call(165, b"none", b"/nonexistent-cant", b"tmpfs", 0, 0)
        out["remount_rw"] = sys_call(165, 0, b"/", 0, 0x20 | 0x1000, 0)             # MS_REMOUNT|MS_BIND
        out["umount2"] = sys_call(166, b"/mnt/data", 0x80000000)
        out["umount2_detach"] = sys_call(166, b"/proc", 2)
        out["open_tree"] = sys_call(428, -100, b"/nonexistent-cant", 1)
        out["move_mount"] = sys_call(429, -1, b"", -1, b"", 0)
        out["fsopen"] = sys_call(430, b"tmpfs", 0)
        out["fsconfig"] = sys_call(431, -1, 0, 0, 0, 0)
        out["fsmount"] = sys_call(432, -1, 0, 0)
        out["fspick"] = sys_call(433, -100, b"/nonexistent-cant", 0)
        out["mount_setattr"] = sys_call(442, -100, b"/nonexistent-cant", 0, 0, 0)
    """)
    for key, res in out.items():
        assert_eperm(res)
    assert kernel.answers()


def test_cant_chroot_or_pivot_root(kernel):
    out = probe(kernel, """
        out["chroot"] = sys_call(161, b"/nonexistent-cant")
        out["chroot_tmp"] = sys_call(161, b"/tmp")
        out["pivot_root"] = sys_call(155, b"/tmp", b"/tmp")
        out["os_chroot"] = attempt(lambda: _os.chroot("/tmp"))
    """)
    for key in ("chroot", "chroot_tmp", "pivot_root"):
        assert_eperm(out[key])
    assert out["os_chroot"][0] == "err" and out["os_chroot"][2] == errno.EPERM, out
    assert kernel.answers()


def test_cant_ptrace(kernel):
    out = probe(kernel, """
        out["traceme"] = sys_call(101, 0, 0, 0, 0)           # PTRACE_TRACEME
        out["attach_1"] = sys_call(101, 16, 1, 0, 0)         # PTRACE_ATTACH pid 1
        out["seize_1"] = sys_call(101, 0x4206, 1, 0, 0)      # PTRACE_SEIZE
        out["pidfd_getfd"] = sys_call(438, -1, 0, 0)
        out["kcmp"] = sys_call(312, _PID, 1, 0, 0, 0)
    """)
    for key, res in out.items():
        assert_eperm(res)
    assert kernel.answers()


def test_cant_process_vm_writev(kernel):
    """Even into the kernel's own memory (which the kernel would allow)."""
    out = probe(kernel, """
        class iovec(_ctypes.Structure):
            _fields_ = [("base", _ctypes.c_void_p), ("len", _ctypes.c_size_t)]
        src, dst = _ctypes.create_string_buffer(b"escaped!", 8), _ctypes.create_string_buffer(8)
        local = iovec(_ctypes.cast(src, _ctypes.c_void_p), 8)
        remote = iovec(_ctypes.cast(dst, _ctypes.c_void_p), 8)
        out["writev_self"] = sys_call(311, _PID, _ctypes.byref(local), 1, _ctypes.byref(remote), 1, 0)
        out["writev_1"] = sys_call(311, 1, _ctypes.byref(local), 1, _ctypes.byref(remote), 1, 0)
        out["readv_1"] = sys_call(310, 1, _ctypes.byref(local), 1, _ctypes.byref(remote), 1, 0)
        out["dst"] = dst.raw.hex()
    """)
    for key in ("writev_self", "writev_1", "readv_1"):
        assert_eperm(out[key])
    assert out["dst"] == "00" * 8
    assert kernel.answers()


def test_cant_bpf(kernel):
    out = probe(kernel, """
        out["bad_cmd"] = sys_call(321, 9999, 0, 0)            # natively EINVAL
        attr = _ctypes.create_string_buffer(128)
        for i, v in enumerate((2, 4, 4, 1)):                  # BPF_MAP_CREATE: array, 4-byte key/value, 1 entry
            _ctypes.c_uint32.from_buffer(attr, 4 * i).value = v
        out["map_create"] = sys_call(321, 0, attr, 128)
    """)
    assert_eperm(out["bad_cmd"])
    assert_eperm(out["map_create"])
    assert kernel.answers()


def test_cant_perf_event_open(kernel):
    out = probe(kernel, """
        out["null_attr"] = sys_call(298, 0, 0, -1, -1, 0)     # natively EFAULT
        attr = _ctypes.create_string_buffer(128)
        _ctypes.c_uint32.from_buffer(attr, 0).value = 1       # PERF_TYPE_SOFTWARE, config 0: cpu-clock
        _ctypes.c_uint32.from_buffer(attr, 4).value = 128
        _ctypes.c_uint64.from_buffer(attr, 40).value = 1 << 5 | 1 << 6  # exclude_kernel|exclude_hv
        out["self"] = sys_call(298, attr, 0, -1, -1, 0)
    """)
    assert_eperm(out["null_attr"])
    assert_eperm(out["self"])
    assert kernel.answers()


def test_cant_use_kernel_keyrings(kernel):
    out = probe(kernel, """
        out["keyctl"] = sys_call(250, 0, -3, 0)                                    # GET_KEYRING_ID session
        out["add_key"] = sys_call(248, b"user", b"cant", b"secret", 6, -3)
        out["request_key"] = sys_call(249, b"user", b"cant", 0, 0)
    """)
    for key, res in out.items():
        assert_eperm(res)
    assert kernel.answers()


def test_cant_userfaultfd(kernel):
    out = probe(kernel, """
        out["user_mode_only"] = sys_call(323, 1 | 0o2000000)      # UFFD_USER_MODE_ONLY|O_CLOEXEC
        out["plain"] = sys_call(323, 0o2000000)
        try:
            fd = _os.open("/dev/userfaultfd", _os.O_RDWR)
            out["dev"] = [fd, 0]
        except OSError as exc:
            out["dev"] = [-1, exc.errno]
    """)
    assert_eperm(out["user_mode_only"])
    assert_eperm(out["plain"])
    assert out["dev"][0] == -1, out
    assert kernel.answers()


def test_cant_set_personality(kernel):
    out = probe(kernel, """
        out["read_implies_exec"] = sys_call(135, 0x0400000)
        out["addr_no_randomize"] = sys_call(135, 0x0040000)
        out["per_linux32"] = sys_call(135, 0x0008)
        out["after"] = open("/proc/self/personality").read().strip()
    """)
    for key in ("read_implies_exec", "addr_no_randomize", "per_linux32"):
        assert_eperm(out[key])
    assert int(out["after"], 16) == 0, out
    assert kernel.answers()


def test_cant_take_over_the_sandbox_init(kernel):
    """No unfiltered process shares the sandbox.  bwrap runs with --as-pid-1
    (no bwrap init: same uid, no filter of its own, so code could write its
    memory through /proc/1/mem wherever Landlock is not there to refuse it).
    pid 1 is the boot script's own init (kernel_profile/boot.py), which
    forks the kernel (pid 2) and then locks itself down: the kernel's seccomp
    program, Landlock with no file-system access, and not dumpable, so its
    /proc files are closed to the kernel's uid and ptrace is refused."""
    out = probe(kernel, """
        out["pid"] = _os.getpid()
        out["ppid"] = _os.getppid()
        pids = sorted(int(p) for p in _os.listdir("/proc") if p.isdigit())
        out["pids"] = pids
        out["seccomp"] = {}
        for pid in pids:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("Seccomp:"):
                    out["seccomp"][str(pid)] = line.split()[1]
        out["attach"] = sys_call(101, 16, 1, 0, 0)
        for name, flags in (("mem_rw", _os.O_RDWR), ("mem_r", _os.O_RDONLY)):
            try:
                _os.close(_os.open("/proc/1/mem", flags))
                out[name] = "opened"
            except OSError as exc:
                out[name] = exc.errno
        try:
            out["environ"] = open("/proc/1/environ", "rb").read().decode()
        except OSError as exc:
            out["environ"] = exc.errno
    """)
    assert out["pid"] == 2 and out["ppid"] == 1, out
    assert out["pids"] == [1, 2], out
    assert out["seccomp"] == {"1": "2", "2": "2"}, out
    assert_eperm(out["attach"])
    assert out["mem_rw"] in (errno.EACCES, errno.EPERM), out
    assert out["mem_r"] in (errno.EACCES, errno.EPERM), out
    assert out["environ"] in (errno.EACCES, errno.EPERM), out
    assert kernel.answers()


HOST_CHILD = r"""
import signal, sys, time
signal.signal(signal.SIGWINCH, lambda *a: print("SIGWINCH", flush=True))
signal.signal(signal.SIGURG, lambda *a: print("SIGURG", flush=True))
print("ready", flush=True)
time.sleep(60)
"""


def test_cant_signal_processes_outside(kernel):
    """A host process of the sandbox's own uid (which a sandbox without its
    pid namespace could signal) gets nothing from kill(pid), kill(-1), and
    kill(1) only reaches the sandbox's own init, which cannot be SIGKILLed
    from inside (or, with Landlock's signal scoping, not signalled at all)."""
    uid = os.stat(kernel.data_dir).st_uid
    kw = {"user": uid, "group": uid, "extra_groups": []} if os.geteuid() == 0 and uid != 0 else {}
    child = subprocess.Popen(["/usr/bin/python3", "-c", HOST_CHILD], stdout=subprocess.PIPE, text=True,
                             cwd="/", **kw)
    try:
        assert child.stdout.readline().strip() == "ready"
        out = probe(kernel, """
            import signal
            out["pids"] = sorted(int(p) for p in _os.listdir("/proc") if p.isdigit())
            out["kill_host"] = sys_call(62, P["pid"], signal.SIGWINCH)
            out["kill_all"] = sys_call(62, -1, signal.SIGWINCH)
            out["kill_1"] = sys_call(62, 1, signal.SIGKILL)
            out["pidfd_signal"] = sys_call(424, -1, signal.SIGWINCH, 0, 0)
        """, pid=child.pid)
        # The sandbox sees itself (its init, pid 1, and the kernel), nothing else.
        assert out["pids"] == [1, 2], out
        assert out["kill_host"] == [-1, errno.ESRCH], out
        # Nothing else to signal in the pid namespace (or Landlock scoping).
        assert out["kill_all"][0] == -1 or out["kill_all"] == [0, 0], out
        assert out["kill_1"] in ([-1, errno.EPERM], [0, 0]), out
        assert kernel.answers(), "kill(1, SIGKILL) brought the sandbox down"
        # Control: the child reports the signals that reach it (SIGURG from here).
        os.kill(child.pid, signal.SIGURG)
        seen = []
        while not seen or seen[-1] != "SIGURG":
            seen.append(child.stdout.readline().strip())
        assert "SIGWINCH" not in seen, "a signal from the sandbox reached a host process"
    finally:
        child.kill()
        child.wait(5)
        child.stdout.close()
    assert kernel.answers()
