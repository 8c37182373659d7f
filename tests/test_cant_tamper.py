"""Escape corpus, audit-hook tampering: disabling the friendly layer gains nothing.

The audit hook is user experience, not the wall (kernel_profile/audit.py).
Each case here tampers with it the way an attacker would (object-graph
surgery, rewritten globals and closure cells, a second hook, a trace function
that jumps over the refusal, raw memory writes) and then re-runs the same
attacks: a TCP connection to a host listener, a raw socket(2), a fork, an
exec and a subprocess.  Every one must still be refused by the kernel-
enforced layers (EPERM from seccomp), nothing may reach the listener or leave
a file behind, and the kernel must answer afterwards.

Where the tampering works, the test also asserts that it did (the refusals
are no longer the friendly ones), so that it cannot pass by never getting past
the hook.  Each case undoes its tampering inside the kernel; a check after
every test restarts the module's kernel if something was left changed.
"""

from __future__ import annotations

import errno
import json
import os
import textwrap
import time
import uuid

import pytest

MARK = "@@CANT-TAMPER@@"

PRELUDE = r'''
import ctypes as _ctypes, gc as _gc, json as _json, os as _os, socket as _socket, sys as _sys, types as _types
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
    if ret == 0 and _os.getpid() != _PID:
        _os._exit(0)
    return [ret, err if ret < 0 else 0]

def find_hook():
    found = [o for o in _gc.get_objects() if isinstance(o, _types.FunctionType)
             and o.__name__ == "_audit_hook" and o.__module__ == "kernel_profile.audit"]
    assert len(found) == 1, found
    return found[0]

def _noop(event, args):
    return None

def layers():
    """The attacks every case re-runs once the hook is tampered with."""
    res = {}
    def connect():
        s = _socket.create_connection(("127.0.0.1", P["port"]), timeout=2)
        return s.recv(64)
    res["socket"] = attempt(connect)
    res["raw_socket"] = sys_call(41, 2, 1, 0)
    def fork():
        pid = _os.fork()
        if pid == 0:
            try:
                open(P["m"], "w").close()
            finally:
                _os._exit(0)
        _os.waitpid(pid, 0)
        return pid
    res["fork"] = attempt(fork)
    res["exec"] = attempt(lambda: _os.execv("/usr/bin/touch", ["touch", P["m"]]))
    import subprocess
    res["subprocess"] = attempt(lambda: subprocess.run(["/usr/bin/touch", P["m"]]).returncode)
    return res
'''


def probe(kernel, code: str, timeout: float = 60, **params) -> dict:
    body = (PRELUDE + f"P = _json.loads({json.dumps(json.dumps(params))})\nout = {{}}\n"
            + textwrap.dedent(code) + f"\nprint({MARK!r} + _json.dumps(out))\n")
    r = kernel.run(body, timeout=timeout)
    assert r.status == "ok", r
    lines = [line for line in r.stdout.splitlines() if line.startswith(MARK)]
    assert lines, r
    return json.loads(lines[-1][len(MARK):])


def friendly(res, hint: str) -> bool:
    return res[0] == "err" and res[3].startswith("[sandbox]") and hint in res[3]


def assert_layers_hold(res, *, hook_active: bool) -> None:
    """Every attack refused.  *hook_active*: the hook still runs, so the
    refusals are the friendly ones; otherwise EPERM from seccomp."""
    hints = {"socket": "UploadFileToSession", "fork": "RunShellCommand", "exec": "RunShellCommand",
             "subprocess": "RunShellCommand"}
    for key, hint in hints.items():
        assert res[key][0] == "err", (key, res[key])
        if hook_active:
            assert friendly(res[key], hint), (key, res[key])
        else:
            assert res[key][2] == errno.EPERM, (key, res[key])
    assert res["raw_socket"] == [-1, errno.EPERM], res


class Scene:
    """Per test: a marker file a child would leave, the tcp4 listener."""

    def __init__(self, kernel, listeners):
        self.kernel = kernel
        self.listener = listeners["tcp4"]
        name = f"cant-tamper-{uuid.uuid4().hex[:8]}"
        self.params = {"m": f"/mnt/data/{name}", "port": self.listener.address[1]}
        self.host_marker = os.path.join(kernel.data_dir, name)
        self.before = self.listener.connections

    def probe(self, code: str) -> dict:
        return probe(self.kernel, code, **self.params)

    def assert_nothing_happened(self) -> None:
        time.sleep(0.01)
        assert self.listener.connections == self.before, "the host listener was reached"
        assert not os.path.exists(self.host_marker), "a child process ran"
        assert self.kernel.answers()


@pytest.fixture
def scene(kernel, host_listeners):
    return Scene(kernel, host_listeners)


INTACT = """
import socket as _s
try:
    _s.socket(_s.AF_INET)
    _a = "created"
except Exception as exc:
    _a = str(exc)
try:
    get_ipython().system("true")
    _b = "ran"
except Exception as exc:
    _b = str(exc)
print(_a.startswith("[sandbox]"), _b.startswith("[sandbox]"))
"""


@pytest.fixture(autouse=True)
def _untampered_afterwards(kernel):
    """Restart the module's kernel if a case left its hook or profile changed."""
    yield
    if not kernel.km.is_alive():
        return  # the kernel fixture restarts it
    r = kernel.run(INTACT, timeout=30)
    expected = f"{kernel.hooked} True"
    if r.status != "ok" or r.stdout.strip() != expected:
        hooked = kernel.hooked
        kernel.restart()
        if not hooked:
            kernel.neutralise_hook()


# --- the cases ---------------------------------------------------------------------

def test_cant_escape_after_code_swap(kernel, scene):
    """gc finds the hook; its __code__ becomes a no-op (research B01)."""
    out = scene.probe("""
        hook = find_hook()
        saved = hook.__code__
        hook.__code__ = _noop.__code__
        try:
            out["layers"] = layers()
        finally:
            hook.__code__ = saved
    """)
    assert_layers_hold(out["layers"], hook_active=False)
    scene.assert_nothing_happened()


def test_cant_escape_after_rewriting_hook_globals(kernel, scene):
    """The hook's tables and refusal helpers are module globals: empty the
    tables and make the helpers return."""
    out = scene.probe("""
        hook = find_hook()
        g = hook.__globals__
        names = ("_PROCESS_EVENTS", "_ADDRESS_EVENTS", "_RESOLVER_EVENTS", "_refuse_process", "_refuse_network")
        saved = {k: g[k] for k in names}
        g.update(_PROCESS_EVENTS={}, _ADDRESS_EVENTS=set(), _RESOLVER_EVENTS=set(),
                 _refuse_process=lambda what: None, _refuse_network=lambda what: None)
        try:
            out["layers"] = layers()
        finally:
            g.update(saved)
    """)
    assert_layers_hold(out["layers"], hook_active=False)
    scene.assert_nothing_happened()


def test_cant_escape_through_closure_cells(kernel, scene):
    """Closure cells are writable: the profile's `!cmd` refusal is a closure
    over the audit module, and the fork_exec wrapper a closure over the
    native function.  Rewritten, `!cmd` runs IPython's real shell and the
    native fork_exec is called: the hook (when present), then seccomp."""
    out = scene.probe("""
        import types
        from IPython.core.interactiveshell import InteractiveShell
        ip = get_ipython()
        refusal = ip.system
        cell = refusal.__closure__[refusal.__code__.co_freevars.index("audit")]
        saved = cell.cell_contents

        def run_it(what):
            # The shell command is in the caller's frame (the refusal's *args).
            cmd = _sys._getframe(1).f_locals["args"][0]
            return InteractiveShell.system_raw(ip, cmd)

        cell.cell_contents = types.SimpleNamespace(_refuse_process=run_it)
        try:
            out["bang"] = attempt(lambda: ip.system(f"touch {P['m']}"))
        finally:
            cell.cell_contents = saved
        out["restored"] = attempt(lambda: ip.system("true"))

        import _posixsubprocess
        wrapper = _posixsubprocess.fork_exec
        if getattr(wrapper, "__closure__", None):
            native = wrapper.__closure__[0].cell_contents
            r, w = _os.pipe()
            args = [[b"/usr/bin/touch", P["m"].encode()], [b"/usr/bin/touch"], True, (), None, None,
                    -1, -1, -1, -1, -1, -1, r, w, False, False, -1, None, None, None, -1, None]
            try:
                out["native_fork_exec"] = attempt(lambda: native(*args, False))
            finally:
                _os.close(r)
                _os.close(w)
    """)
    bang = out["bang"]
    assert bang[0] == "err", bang
    if kernel.hooked:
        # The cell rewrite bypassed the profile's refusal: this one is the hook's.
        assert bang[3].startswith("[sandbox] subprocess is blocked"), bang
    else:
        assert bang[2] == errno.EPERM, bang
    assert friendly(out["restored"], "RunShellCommand"), out
    if "native_fork_exec" in out:
        assert out["native_fork_exec"][0] == "err" and out["native_fork_exec"][2] == errno.EPERM, out
    scene.assert_nothing_happened()


def test_cant_escape_with_swallowing_audit_hook(kernel, scene):
    """A second hook cannot pre-empt the first (hooks run in order, and the
    first to raise wins); one that swallows every event changes nothing."""
    out = scene.probe("""
        seen = []
        def swallow(event, args):
            if globals().get("_cant_swallow_on", False) and len(seen) < 1000:
                seen.append(event)
            return None
        globals()["_cant_swallow_on"] = True
        _sys.addaudithook(swallow)
        try:
            out["layers"] = layers()
        finally:
            globals()["_cant_swallow_on"] = False
        out["seen"] = sorted(set(seen))
    """)
    assert_layers_hold(out["layers"], hook_active=kernel.hooked)
    if not kernel.hooked:
        # Added and called: it saw the attacks (the first hook did not refuse them).
        assert "os.fork" in out["seen"] and "socket.__new__" in out["seen"], out["seen"]
    scene.assert_nothing_happened()


def test_cant_escape_by_jumping_over_the_hook_with_settrace(kernel, scene):
    """Hooks are not traced unless they have __cantrace__; set it, and a
    trace function can move the hook's frame past its refusals."""
    out = scene.probe("""
        import dis
        hook = find_hook()
        code = hook.__code__
        first_return = next(i.positions.lineno for i in dis.get_instructions(code) if i.opname == "RETURN_VALUE")

        def tracer(frame, event, arg):
            if frame.f_code is not code:
                return None
            def jump(frame, event, arg):
                if event == "line" and frame.f_lineno < first_return:
                    frame.f_lineno = first_return
                return jump
            return jump

        hook.__cantrace__ = True
        _sys.settrace(tracer)
        try:
            out["layers"] = layers()
        finally:
            _sys.settrace(None)
            del hook.__cantrace__
    """)
    assert_layers_hold(out["layers"], hook_active=False)
    scene.assert_nothing_happened()


def test_cant_write_proc_self_mem_via_dir_fd(kernel, scene):
    """The hook sees only "mem" when /proc/self/mem is opened relative to a
    directory fd (research A15).  Landlock keeps /proc read-only, so the
    open is refused; without Landlock the write goes on to disable the
    hook, and seccomp must still hold."""
    out = scene.probe("""
        out["abi"] = int(_os.environ.get("BROKER_SANDBOX_LANDLOCK_ABI", "0"))
        proc = _os.open("/proc/self", _os.O_RDONLY | _os.O_DIRECTORY)
        opened = {}
        for name, how in (("dir_fd", lambda: _os.open("mem", _os.O_RDWR, dir_fd=proc)),
                          ("path", lambda: _os.open("/proc/self/mem", _os.O_RDWR)),
                          ("thread_self", lambda: _os.open("/proc/thread-self/mem", _os.O_WRONLY)),
                          ("pid_1", lambda: _os.open("/proc/1/mem", _os.O_RDWR))):
            try:
                opened[name] = how()
                out[name] = ["ok"]
            except OSError as exc:
                out[name] = ["err", type(exc).__name__, exc.errno, str(exc)]
        out["layers_before"] = layers()
        if "dir_fd" in opened:
            hook = find_hook()
            slot = id(hook) + 48                         # PyFunctionObject.func_code on 3.11
            if _ctypes.c_void_p.from_address(slot).value == id(hook.__code__):
                saved = _ctypes.c_void_p.from_address(slot).value
                _os.pwrite(opened["dir_fd"], id(_noop.__code__).to_bytes(8, _sys.byteorder), slot)
                try:
                    out["layers_after"] = layers()
                finally:
                    _os.pwrite(opened["dir_fd"], saved.to_bytes(8, _sys.byteorder), slot)
        for fd in opened.values():
            _os.close(fd)
    """)
    if out["abi"] > 0:
        for name in ("dir_fd", "path", "thread_self", "pid_1"):
            assert out[name][0] == "err" and out[name][2] in (errno.EACCES, errno.EPERM), (name, out[name])
    else:
        assert out["pid_1"][0] == "err", out  # another process's memory: never
        if "layers_after" in out:
            assert_layers_hold(out["layers_after"], hook_active=False)
    assert_layers_hold(out["layers_before"], hook_active=kernel.hooked)
    scene.assert_nothing_happened()


def test_cant_escape_after_ctypes_patch_of_hook(kernel, scene):
    """ctypes writes the hook function's code pointer directly (no
    object.__setattr__ audit event on the way)."""
    out = scene.probe("""
        hook = find_hook()
        slot = None
        for offset in range(16, 128, 8):                 # find func_code in the function object
            if _ctypes.c_void_p.from_address(id(hook) + offset).value == id(hook.__code__):
                slot = _ctypes.c_void_p.from_address(id(hook) + offset)
                break
        out["found"] = slot is not None
        if slot is not None:
            keep = _noop.__code__
            saved = slot.value
            slot.value = id(keep)
            try:
                out["patched"] = hook.__code__ is keep
                out["layers"] = layers()
            finally:
                slot.value = saved
    """)
    assert out["found"] and out["patched"], out
    assert_layers_hold(out["layers"], hook_active=False)
    scene.assert_nothing_happened()


def test_cant_lift_seccomp_or_landlock_by_stacking_permissive_ones(kernel, scene):
    """A process may add seccomp filters and Landlock domains but never
    remove one: an allow-everything filter and an empty ruleset, stacked on
    top, change nothing."""
    out = scene.probe("""
        class SockFprog(_ctypes.Structure):
            _fields_ = [("len", _ctypes.c_ushort), ("filter", _ctypes.c_void_p)]
        # One instruction, BPF_RET|BPF_K SECCOMP_RET_ALLOW: {code, jt, jf, k}.
        allow_all = _ctypes.create_string_buffer((0x06).to_bytes(2, "little") + bytes(2)
                                                 + (0x7FFF0000).to_bytes(4, "little"), 8)
        prog = SockFprog(1, _ctypes.cast(allow_all, _ctypes.c_void_p))
        out["seccomp_allow_all"] = sys_call(317, 1, 0, _ctypes.byref(prog))    # SECCOMP_SET_MODE_FILTER
        out["no_new_privs_off"] = sys_call(157, 38, 0, 0, 0, 0)                 # PR_SET_NO_NEW_PRIVS 0
        attr = (_ctypes.c_uint64 * 3)(1 << 13, 0, 0)                              # handles REFER only
        ruleset = sys_call(444, attr, 8, 0)
        out["landlock_ruleset"] = ruleset
        if ruleset[0] >= 0:
            out["landlock_restrict"] = sys_call(446, ruleset[0], 0)
            _os.close(ruleset[0])
        out["abi"] = int(_os.environ.get("BROKER_SANDBOX_LANDLOCK_ABI", "0"))
        out["status"] = [line for line in open("/proc/self/status").read().splitlines()
                         if line.startswith(("Seccomp", "NoNewPrivs"))]
        hook = find_hook()
        saved = hook.__code__
        hook.__code__ = _noop.__code__
        try:
            out["layers"] = layers()
            out["mem"] = attempt(lambda: _os.open("/proc/self/mem", _os.O_RDWR))
        finally:
            hook.__code__ = saved
    """)
    assert out["no_new_privs_off"][0] == -1, out   # no_new_privs cannot be cleared
    assert "NoNewPrivs:\t1" in out["status"], out
    assert_layers_hold(out["layers"], hook_active=False)
    if out["abi"] > 0:    # the boot script's Landlock domain is still there
        assert out["mem"][0] == "err" and out["mem"][2] == errno.EACCES, out
    scene.assert_nothing_happened()
    # The stacked filter and domain stay with the process: start a clean one.
    hooked = kernel.hooked
    kernel.restart()
    if not hooked:
        kernel.neutralise_hook()
    assert kernel.answers()
