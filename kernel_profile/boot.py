"""Boot script: the first Python code that runs inside the sandbox.

Run as ``python -I -m kernel_profile -f /run/sandbox/kernel.json [boot options]
-- [IPython/ipykernel options]`` (the provisioner checks the options after
``--`` against an allow-list; they go to ipykernel unread here).

0. The sandbox's init: bwrap runs this process as pid 1 of the sandbox's pid
   namespace (``--as-pid-1``), and pid 1 ignores every signal it has no
   handler for, SIGKILL included, when it comes from inside the namespace.
   So the process forks once, before anything else: the parent stays pid 1
   as a tiny init (see :func:`_init`) and the child (pid 2) becomes the
   kernel, which a signal ends exactly as it ends a plain ipykernel.

In order, in the kernel, while the process still has a single thread:

1. Landlock (best effort by the kernel's ABI): a file-system allow-list, and
   on newer kernels no TCP and no abstract unix sockets or signals out.
2. seccomp: the kernel profile compiled by the broker from ``seccomp/``,
   read from the read-only ``/run/sandbox/kernel.bpf`` and loaded with TSYNC.
3. The audit hook (friendly errors; see :mod:`kernel_profile.audit`).
4. ipykernel, with this package's IPython config, in the working folder the
   provisioner chose (``/mnt/data`` unless ``--cwd`` says otherwise).

A step that must succeed and does not stops the boot with a non-zero exit:
the broker reports it and never retries without the lockdown.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from kernel_profile import lockdown

HERE = os.path.dirname(os.path.abspath(__file__))
SANDBOX_DIR = "/run/sandbox"
DATA_DIR = "/mnt/data"
NOTEBOOK_DIR = "/mnt/notebook"   # the caller's working folder, read-only (docs/kernelspec.md)
READ_ONLY_TREES = ["/usr", "/etc", "/proc", "/dev", "/lib", "/lib64", "/bin", SANDBOX_DIR, NOTEBOOK_DIR]
WRITABLE_TREES = [DATA_DIR, "/tmp", "/dev/shm", "/dev/null"]
# The ZeroMQ ipc sockets: the broker connects to these paths from the host,
# so nothing but sockets may be made there (a symlink would be followed).
SOCKET_TREES = ["/run/kernel"]


# Signals the init passes on to the kernel (from the host, or from code in the
# kernel signalling pid 1).  SIGKILL and SIGSTOP cannot be caught; the init
# ignores those from inside the namespace, as every pid 1 does.
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGALRM, signal.SIGCONT, signal.SIGWINCH)


def _parse(argv):
    """Boot options come before ``--``; everything after it is ipykernel's and
    is never read here, so no kernel argument can reach --seccomp or
    --landlock (abbreviations included: allow_abbrev is off)."""
    if "--" in argv:
        cut = argv.index("--")
        own, kernel_args = argv[:cut], argv[cut + 1:]
    else:
        own, kernel_args = argv, []
    p = argparse.ArgumentParser(prog="kernel_profile", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("-f", dest="connection_file", required=True)
    p.add_argument("--seccomp", default=os.path.join(SANDBOX_DIR, "kernel.bpf"),
                   help="compiled seccomp program to load ('none' only for tests of the boot itself)")
    p.add_argument("--landlock", choices=["auto", "off"], default="auto")
    p.add_argument("--cwd", default=DATA_DIR, help="the kernel's working folder (below /mnt/data or /mnt/notebook)")
    p.add_argument("--no-init", action="store_true", help="do not fork an init when running as pid 1")
    args, rest = p.parse_known_args(own)
    return args, rest + kernel_args


def _fail(msg: str) -> None:
    sys.stderr.write(f"kernel_profile: {msg}\n")
    sys.stderr.flush()
    os._exit(70)


def lock_down(seccomp_path: str, landlock: str) -> dict:
    from kernel_profile import audit

    if lockdown.thread_count() != 1:
        _fail(f"{lockdown.thread_count()} threads before lockdown; seccomp and Landlock must be applied "
              "while the process has one thread")
    state = {"landlock_abi": 0, "seccomp": False}
    if landlock == "auto":
        read = list(READ_ONLY_TREES) + [sys.prefix, sys.base_prefix, HERE]
        read += [p for p in sys.path if p and os.path.isabs(p)]
        try:
            state["landlock_abi"] = lockdown.apply_landlock(read, WRITABLE_TREES, SOCKET_TREES)
        except OSError as exc:
            # Best effort: the namespaces are the file-system wall, Landlock
            # a second one.  Report and go on.
            sys.stderr.write(f"kernel_profile: Landlock not applied: {exc}\n")
    if seccomp_path != "none":
        try:
            with open(seccomp_path, "rb") as fh:
                program = fh.read()
        except OSError as exc:
            _fail(f"cannot read the seccomp program {seccomp_path}: {exc}")
        try:
            lockdown.load_seccomp(program)
        except lockdown.LockdownError as exc:
            _fail(str(exc))
        state["seccomp"] = True
    audit.install()
    return state


def _read_program(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        _fail(f"cannot read the seccomp program {path}: {exc}")


def _init(child: int, program: bytes | None, landlock: str, ready_w: int) -> None:
    """pid 1 of the sandbox: forward signals to the kernel, reap, and exit
    with the kernel's status (128 + signal number when a signal ended it, as
    a shell reports it; bwrap passes that on).  Its namespace dies with it.

    It is locked down at least as tightly as the kernel before the kernel
    runs a single line of boot code (the kernel waits on *ready_w*): not
    dumpable (so ``/proc/1/mem`` and ``/proc/1/environ`` are closed to the
    kernel's uid), Landlock with no file-system access at all, and the
    kernel's own seccomp program."""
    def forward(sig, _frame):
        try:
            os.kill(child, sig)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    try:
        lockdown.set_dumpable(False)
        if landlock == "auto":
            try:
                lockdown.apply_landlock([], [], [])
            except OSError:
                pass  # best effort, as for the kernel
        if program is not None:
            lockdown.load_seccomp(program)
    except (OSError, lockdown.LockdownError) as exc:
        os.kill(child, signal.SIGKILL)
        _fail(f"init: {exc}")
    os.write(ready_w, b"1")
    os.close(ready_w)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def _start_init(args) -> None:
    """Fork: the parent becomes the init and never returns; the child goes on
    as the kernel once the init has locked itself down.  lockdown (and
    ctypes) are imported before the fork: the kernel needs them too, so the
    pages stay shared and the init's lockdown is quick."""
    program = None if args.seccomp == "none" else _read_program(args.seccomp)
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child:
        os.close(ready_r)
        _init(child, program, args.landlock, ready_w)
    os.close(ready_w)
    if os.read(ready_r, 1) != b"1":
        _fail("the sandbox's init did not start")
    os.close(ready_r)


def main(argv=None) -> None:
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    if os.getpid() == 1 and not args.no_init:
        _start_init(args)
    state = lock_down(args.seccomp, args.landlock)
    os.environ["BROKER_SANDBOX_LANDLOCK_ABI"] = str(state["landlock_abi"])

    # Never let the data folder (writable by user code) shadow modules.
    sys.path[:] = [p for p in sys.path if p not in ("", ".", DATA_DIR)]
    # ipykernel prints a "Ctrl-C will not work" banner on the client's stdout
    # unless it knows its parent.  Its parent is the init (pid 1), which
    # ipykernel treats as "nothing to poll"; interrupts work (message mode).
    os.environ.setdefault("JPY_PARENT_PID", "1")
    for var in ("IPYTHONDIR", "MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        path = os.environ.get(var)
        if path:
            os.makedirs(path, exist_ok=True)
    for folder in (args.cwd, DATA_DIR):
        if folder.startswith((DATA_DIR, NOTEBOOK_DIR)):
            try:
                os.chdir(folder)
                break
            except OSError:
                continue

    import warnings

    # Expected in the sandbox: ipykernel's pipe for forked children cannot
    # bind a TCP port (no network, no fork).  Not worth a warning per start.
    warnings.filterwarnings("ignore", message="Couldn't bind IOPub Pipe")

    # The kernelspec says debugger: false, and debugpy (with pydevd, ~80
    # modules) is never used here: keep ipykernel from importing it, which
    # it does only to offer the debugger (it checks for ImportError).
    sys.modules.setdefault("debugpy", None)

    from ipykernel.kernelapp import launch_new_instance

    launch_new_instance(argv=["-f", args.connection_file,
                              f"--config={os.path.join(HERE, 'ipython_kernel_config.py')}", *rest])


if __name__ == "__main__":
    main()
