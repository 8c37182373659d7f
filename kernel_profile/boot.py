"""Boot script: the first Python code that runs inside the sandbox.

Run as ``python -I -m kernel_profile -f /run/sandbox/kernel.json``.  In order,
while the process still has a single thread:

1. Landlock (best effort by the kernel's ABI): a file-system allow-list, and
   on newer kernels no TCP and no abstract unix sockets or signals out.
2. seccomp: the kernel profile compiled by the broker from ``seccomp/``,
   read from the read-only ``/run/sandbox/kernel.bpf`` and loaded with TSYNC.
3. The audit hook (friendly errors; see :mod:`kernel_profile.audit`).
4. ipykernel, with this package's IPython config, cwd ``/mnt/data``.

A step that must succeed and does not stops the boot with a non-zero exit:
the broker reports it and never retries without the lockdown.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SANDBOX_DIR = "/run/sandbox"
DATA_DIR = "/mnt/data"
READ_ONLY_TREES = ["/usr", "/etc", "/proc", "/dev", "/lib", "/lib64", "/bin", SANDBOX_DIR]
WRITABLE_TREES = [DATA_DIR, "/tmp", "/dev/shm", "/dev/null"]
# The ZeroMQ ipc sockets: the broker connects to these paths from the host,
# so nothing but sockets may be made there (a symlink would be followed).
SOCKET_TREES = ["/run/kernel"]


def _parse(argv):
    p = argparse.ArgumentParser(prog="kernel_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("-f", dest="connection_file", required=True)
    p.add_argument("--seccomp", default=os.path.join(SANDBOX_DIR, "kernel.bpf"),
                   help="compiled seccomp program to load ('none' only for tests of the boot itself)")
    p.add_argument("--landlock", choices=["auto", "off"], default="auto")
    return p.parse_known_args(argv)


def _fail(msg: str) -> None:
    sys.stderr.write(f"kernel_profile: {msg}\n")
    sys.stderr.flush()
    os._exit(70)


def lock_down(seccomp_path: str, landlock: str) -> dict:
    from kernel_profile import audit, lockdown

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


def main(argv=None) -> None:
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    state = lock_down(args.seccomp, args.landlock)
    os.environ["BROKER_SANDBOX_LANDLOCK_ABI"] = str(state["landlock_abi"])

    # Never let the data folder (writable by user code) shadow modules.
    sys.path[:] = [p for p in sys.path if p not in ("", ".", DATA_DIR)]
    for var in ("IPYTHONDIR", "MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        path = os.environ.get(var)
        if path:
            os.makedirs(path, exist_ok=True)
    if os.path.isdir(DATA_DIR):
        os.chdir(DATA_DIR)

    import warnings

    # Expected in the sandbox: ipykernel's pipe for forked children cannot
    # bind a TCP port (no network, no fork).  Not worth a warning per start.
    warnings.filterwarnings("ignore", message="Couldn't bind IOPub Pipe")

    from ipykernel.kernelapp import launch_new_instance

    launch_new_instance(argv=["-f", args.connection_file,
                              f"--config={os.path.join(HERE, 'ipython_kernel_config.py')}", *rest])


if __name__ == "__main__":
    main()
