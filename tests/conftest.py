"""Shared fixtures: real sandboxed kernels, real listeners on loopback."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import threading

import pytest

from tests.harness import SandboxKernel


@pytest.fixture(scope="session", autouse=True)
def _kernelspec_installed():
    """The suite runs against the installed python3-sandbox kernelspec."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    # pytest-xdist workers start together: one checks and installs at a time
    # (an install replaces the folder another worker may be reading).
    with open(os.path.join(sys.prefix, ".kernelspec-install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            spec = KernelSpecManager().get_kernel_spec("python3-sandbox")
        except NoSuchKernel:
            from broker import kernelspec

            kernelspec.install(prefix=sys.prefix)
            spec = KernelSpecManager().get_kernel_spec("python3-sandbox")
    # Another checkout's kernelspec (a --user install, JUPYTER_PATH) would run
    # that checkout's interpreter and kernel_profile: say so rather than test it.
    if os.path.realpath(os.path.dirname(spec.argv[0])) != os.path.realpath(os.path.dirname(sys.executable)):
        pytest.exit(f"the python3-sandbox kernelspec in {spec.resource_dir} runs {spec.argv[0]}, not this "
                    f"checkout's {sys.executable}: remove it, or run `{sys.executable} -m broker.app kernelspec "
                    "install --sys-prefix` and unset JUPYTER_PATH / JUPYTER_PREFER_ENV_PATH", returncode=4)


# -- running under pytest-xdist (`make test` runs a worker per CPU, at most 4) -----
# A test marked `alone` measures something machine-wide (free memory, all the
# mounts, every process, wall times under a deadline): while it runs, the other
# workers start no test.  Every test takes a shared lock, an `alone` test the
# exclusive one; a turnstile lock taken first keeps an `alone` test from
# waiting forever behind a stream of shared ones.  The lock files live in the
# run's temp root, which the workers share.  Without xdist this costs nothing.

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    root = item.config._tmp_path_factory.getbasetemp().parent
    alone = item.get_closest_marker("alone") is not None
    with open(root / "alone.turnstile", "a") as turnstile, open(root / "alone.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


def _kernel(request, hooked: bool):
    k = SandboxKernel()
    if not hooked:
        k.neutralise_hook()
    request.addfinalizer(k.shutdown)
    return k


@pytest.fixture(scope="module")
def hooked_kernel(request):
    return _kernel(request, True)


@pytest.fixture(scope="module")
def unhooked_kernel(request):
    return _kernel(request, False)


@pytest.fixture(params=["hook", "no-hook"])
def kernel(request):
    """A module-scoped sandboxed kernel, once with the audit hook in place and
    once after the test neutralised it.  A case that kills the kernel gets
    it restarted (and the hook neutralised again) for the next case."""
    k = request.getfixturevalue("hooked_kernel" if request.param == "hook" else "unhooked_kernel")
    if not k.km.is_alive() or not k.answers():
        k.restart()
        if request.param == "no-hook":
            k.neutralise_hook()
    yield k


@pytest.fixture
def sandbox_kernel():
    """A fresh kernel for one test."""
    k = SandboxKernel()
    yield k
    k.shutdown()


class Listener:
    """A TCP or unix listener on the host that records every connection."""

    def __init__(self, family, address):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(address)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self.connections = 0
        self._stop = False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            try:
                conn.sendall(b"HELLO-FROM-HOST\n")
            finally:
                conn.close()

    def close(self):
        self._stop = True
        self._t.join(2)
        self.sock.close()


@pytest.fixture(scope="session")
def host_listeners():
    """Host services the sandbox must not reach: TCP on 127.0.0.1 and [::1],
    and an abstract unix socket."""
    made = {"tcp4": Listener(socket.AF_INET, ("127.0.0.1", 0))}
    try:
        made["tcp6"] = Listener(socket.AF_INET6, ("::1", 0))
    except OSError:
        pass
    name = f"\0broker-test-{os.getpid()}"
    made["abstract"] = Listener(socket.AF_UNIX, name)
    made["abstract"].address = name
    yield made
    for item in made.values():
        item.close()


# -- the REST API against a real `broker serve` subprocess (tests/test_api_*.py) --

@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One broker with the default configuration, shared by the API test
    modules (each test makes its own sessions)."""
    from tests.broker_server import BrokerProcess

    b = BrokerProcess(str(tmp_path_factory.mktemp("broker")))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def session(broker):
    """A fresh session of owner alice on the shared broker, deleted afterwards."""
    sid = broker.create_session("alice")
    yield sid
    broker.delete_session(sid, "alice")


def pytest_sessionfinish(session, exitstatus):
    """Safety net: a loop-mounted /mnt/data or a runtime tmpfs left under
    this run's temp folder (a broker killed mid-test) would make pytest's
    clean-up of old temp folders fail in a later run.  Unmount them, and say
    so: a leak is a bug to look at."""
    import subprocess

    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    try:
        base = str(factory.getbasetemp())
    except (OSError, ValueError):
        return
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    leaked = sorted((p for p in points if p.startswith(base + "/")), key=len, reverse=True)
    for p in leaked:
        subprocess.run(["umount", "-l", p], capture_output=True)
    if leaked:
        print(f"\nconftest: unmounted {len(leaked)} mount(s) left under {base}: {leaked[:5]}")


# Longest first: under pytest-xdist (--dist loadfile) files are handed to
# workers in collection order, so a long file collected last becomes the run's
# tail while the other workers idle (nbclient's own suite alone takes about
# 3 minutes).  The order inside each file is kept.
LONG_FILES = ("test_nbclient_suite.py", "test_router.py", "test_faults.py", "test_aca.py", "test_continuity.py",
              "test_client_cli.py", "test_replay.py", "test_transcripts.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)
    items.sort(key=rank)      # stable: files and tests keep their order otherwise
