"""Escape corpus, network: no path from a kernel to any network.

Every case runs twice through the parametrized ``kernel`` fixture: with the
audit hook in place (the refusal must be the friendly ``[sandbox]`` one that
names the upload tool) and after the hook was neutralised (the refusal must
come from the kernel-enforced layers: EPERM from seccomp, the empty network
namespace, Landlock).  Real listeners on the host's loopback, owned by the
tests, count what reaches them: every case asserts they saw nothing.

Attacks are written so that they would *succeed* against a weaker sandbox:
each one goes on to connect or send when its socket is unexpectedly created.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import textwrap
import threading
import time

import pytest

from tests.conftest import Listener

NETWORK_HINT = "UploadFileToSession"   # the friendly refusal names what to use instead
MARK = "@@CANT-NET@@"

# Kernel-side helpers, prepended to every probe.  ``attempt`` records what
# happened instead of raising; ``sys_call`` is a raw syscall through libc (no
# audit event on CPython 3.11); ``libc_connect`` connects an fd without the
# socket module.
PRELUDE = r'''
import ctypes as _ctypes, json as _json, os as _os, socket as _socket, struct as _struct
_libc = _ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = _ctypes.c_long
_PID = _os.getpid()

def attempt(fn):
    try:
        return ["ok", repr(fn())]
    except BaseException as exc:
        inner = getattr(exc, "reason", None)          # urllib wraps the socket error
        if isinstance(inner, BaseException):
            exc = inner
        return ["err", type(exc).__name__, getattr(exc, "errno", None), str(exc)]

def sys_call(nr, *args):
    _ctypes.set_errno(0)
    ret = _libc.syscall(_ctypes.c_long(nr), *[_ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    err = _ctypes.get_errno()
    if ret == 0 and _os.getpid() != _PID:
        _os._exit(0)
    return [ret, err if ret < 0 else 0]

def sockaddr(family, host, port=0):
    if family == 2:
        return _struct.pack("=HH4s8x", 2, _socket.htons(port), _socket.inet_aton(host))
    if family == 10:
        return _struct.pack("=HHI16sI", 10, _socket.htons(port), 0, _socket.inet_pton(10, host), 0)
    return _struct.pack("=H", 1) + host.encode()

def libc_connect(fd, addr):
    buf = _ctypes.create_string_buffer(addr, len(addr))
    _ctypes.set_errno(0)
    ret = _libc.connect(fd, buf, len(addr))
    return [ret, _ctypes.get_errno() if ret < 0 else 0]

SYS_socket, SYS_connect, SYS_sendto, SYS_socketpair = 41, 42, 44, 53
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


def assert_refused(kernel, res, errnos=(errno.EPERM,)):
    """With the hook: the friendly refusal.  Without: an errno from the kernel."""
    assert res[0] == "err", f"not refused: {res}"
    if kernel.hooked:
        assert res[3].startswith("[sandbox]") and NETWORK_HINT in res[3], res
    else:
        assert res[2] in errnos, res


def assert_eperm(res):
    """A raw syscall refused by seccomp: [-1, EPERM]."""
    assert res == [-1, errno.EPERM], res


def restart_like_fixture(kernel) -> None:
    hooked = kernel.hooked
    kernel.restart()
    if not hooked:
        kernel.neutralise_hook()


def assert_died_contained(kernel, r) -> None:
    """The kernel process was killed by seccomp (SIGSYS), nothing of it is left
    in its cgroup, and the provisioner starts it again."""
    assert r.dead, f"the attack did not kill the kernel: {r}"
    rc = kernel.provisioner.process.wait(10)
    assert rc in (128 + signal.SIGSYS, -signal.SIGSYS), f"kernel exited with {rc}, not SIGSYS"
    group = getattr(kernel.provisioner, "_cgroup", None)
    if group is not None:
        deadline = time.monotonic() + 5
        while group.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not group.pids(), f"processes left in the sandbox's cgroup: {group.pids()}"
    restart_like_fixture(kernel)
    assert kernel.answers()


# --- host-side listeners -------------------------------------------------------

class DatagramCounter:
    """A UDP socket on the host's loopback that counts what it receives."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self.datagrams = 0
        self._stop = False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop:
            try:
                self.sock.recvfrom(65536)
            except OSError:
                continue
            self.datagrams += 1

    def close(self):
        self._stop = True
        self._t.join(2)
        self.sock.close()


def _wait_for(predicate, timeout=3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def listeners(host_listeners):
    """The session's host listeners (tcp4, tcp6, abstract unix), each first
    shown to count a connection made from the host, so that "zero new
    connections" below means something."""
    families = {"tcp4": socket.AF_INET, "tcp6": socket.AF_INET6, "abstract": socket.AF_UNIX}
    for name, listener in host_listeners.items():
        before = listener.connections
        with socket.socket(families[name], socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(listener.address)
            assert s.recv(64).startswith(b"HELLO")   # read it, or the listener's send may hit EPIPE
        assert _wait_for(lambda: listener.connections > before), f"{name} listener does not count"
    return host_listeners


@pytest.fixture(scope="module")
def udp():
    """A UDP listener on 127.0.0.1 (random port), shown to count a datagram."""
    counter = DatagramCounter(("127.0.0.1", 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"control", counter.address)
    assert _wait_for(lambda: counter.datagrams == 1)
    counter.datagrams = 0
    yield counter
    counter.close()


@pytest.fixture(scope="module")
def fake_dns():
    """A counting 'DNS server' on 127.0.0.1:53, where glibc sends queries when
    there is no resolv.conf.  None when the port is taken on this host."""
    try:
        counter = DatagramCounter(("127.0.0.1", 53))
    except OSError:
        yield None
        return
    yield counter
    counter.close()


@contextlib.contextmanager
def untouched(*counters):
    """Assert that no listener counted a new connection or datagram."""
    def counts():
        return [getattr(c, "connections", getattr(c, "datagrams", None)) for c in counters]

    before = counts()
    yield
    time.sleep(0.01)  # let an accept that raced the kernel's reply be counted
    assert counts() == before, "a host listener was reached from the sandbox"


def tcp_params(listeners) -> dict:
    params = {"port4": listeners["tcp4"].address[1]}
    if "tcp6" in listeners:
        params["port6"] = listeners["tcp6"].address[1]
    return params


def tcp_counters(listeners):
    return [listeners[k] for k in ("tcp4", "tcp6") if k in listeners]


# --- Python sockets --------------------------------------------------------------

def test_cant_connect_tcp4_to_host_listener(kernel, listeners):
    with untouched(*tcp_counters(listeners)):
        out = probe(kernel, """
            out["create_connection"] = attempt(lambda: _socket.create_connection(("127.0.0.1", P["port4"]), timeout=2))
            out["socket"] = attempt(lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM))
        """, **tcp_params(listeners))
    assert_refused(kernel, out["create_connection"])
    assert_refused(kernel, out["socket"])
    assert kernel.answers()


def test_cant_connect_tcp6_to_host_listener(kernel, listeners):
    if "tcp6" not in listeners:
        pytest.skip("no IPv6 loopback on this host")
    with untouched(*tcp_counters(listeners)):
        out = probe(kernel, """
            def connect6():
                s = _socket.socket(_socket.AF_INET6, _socket.SOCK_STREAM)
                s.settimeout(2)
                s.connect(("::1", P["port6"]))
                return s.recv(64)
            out["tcp6"] = attempt(connect6)
        """, **tcp_params(listeners))
    assert_refused(kernel, out["tcp6"])
    assert kernel.answers()


def test_cant_connect_through_ipv4_mapped_ipv6(kernel, listeners):
    with untouched(*tcp_counters(listeners)):
        out = probe(kernel, """
            def mapped():
                s = _socket.socket(_socket.AF_INET6, _socket.SOCK_STREAM)
                s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0)
                s.settimeout(2)
                s.connect(("::ffff:127.0.0.1", P["port4"]))
                return s.recv(64)
            out["mapped"] = attempt(mapped)
        """, **tcp_params(listeners))
    assert_refused(kernel, out["mapped"])
    assert kernel.answers()


def test_cant_send_udp_datagrams(kernel, udp):
    with untouched(udp):
        out = probe(kernel, """
            def send4():
                s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
                return s.sendto(b"escaped", ("127.0.0.1", P["port"]))
            def send6():
                s = _socket.socket(_socket.AF_INET6, _socket.SOCK_DGRAM)
                return s.sendto(b"escaped", ("::ffff:127.0.0.1", P["port"]))
            out["udp4"] = attempt(send4)
            out["udp6"] = attempt(send6)
        """, port=udp.address[1])
    assert_refused(kernel, out["udp4"])
    assert_refused(kernel, out["udp6"])
    assert kernel.answers()


def test_cant_bind_and_listen(kernel):
    # A port free on the host: a kernel that could listen on it in the host's
    # network namespace would be reachable from the host below.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = probe(kernel, """
        def serve(family, host):
            s = _socket.socket(family, _socket.SOCK_STREAM)
            s.bind((host, P["port"]))
            s.listen(4)
            globals().setdefault("_cant_servers", []).append(s)   # keep it open
            return s.getsockname()
        out["tcp4"] = attempt(lambda: serve(_socket.AF_INET, "127.0.0.1"))
        out["any4"] = attempt(lambda: serve(_socket.AF_INET, "0.0.0.0"))
        out["tcp6"] = attempt(lambda: serve(_socket.AF_INET6, "::"))
    """, port=port)
    for key in ("tcp4", "any4", "tcp6"):
        assert_refused(kernel, out[key])
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
    assert kernel.answers()


def test_cant_make_socketpair_other_than_unix(kernel):
    out = probe(kernel, """
        out["control"] = attempt(lambda: len(_socket.socketpair(_socket.AF_UNIX)))
        for name in ("AF_INET", "AF_INET6"):
            out[name] = attempt(lambda: _socket.socketpair(getattr(_socket, name)))
        fds = (_ctypes.c_int * 2)()
        out["raw"] = {fam: sys_call(SYS_socketpair, fam, 1, 0, fds) for fam in (2, 10, 16, 17, 40)}
    """)
    assert out["control"] == ["ok", "2"], out
    # The kernel itself answers EOPNOTSUPP for these; EPERM is seccomp's.
    # (_socket.socketpair raises no audit event, so no friendly message.)
    for name in ("AF_INET", "AF_INET6"):
        assert out[name][0] == "err" and out[name][2] == errno.EPERM, out[name]
    for fam, res in out["raw"].items():
        assert_eperm(res)
    assert kernel.answers()


def test_cant_find_an_inherited_network_socket(kernel):
    """Every socket the kernel holds (ZeroMQ's, the ones it inherited) is a
    unix socket: no TCP descriptor leaked in from the launcher."""
    out = probe(kernel, """
        domains = {}
        for name in _os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                target = _os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if not target.startswith("socket:"):
                continue
            value, size = _ctypes.c_int(0), _ctypes.c_uint(4)
            if _libc.getsockopt(fd, 1, 39, _ctypes.byref(value), _ctypes.byref(size)) == 0:  # SO_DOMAIN
                domains[fd] = value.value
        out["domains"] = domains
    """)
    assert out["domains"], "the kernel holds no sockets at all: the probe is broken"
    assert set(out["domains"].values()) <= {socket.AF_UNIX, socket.AF_NETLINK}, out
    assert kernel.answers()


# --- HTTP clients ------------------------------------------------------------------

def test_cant_fetch_from_host_with_urllib(kernel, listeners):
    with untouched(*tcp_counters(listeners)):
        out = probe(kernel, """
            import urllib.request
            out["v4"] = attempt(lambda: urllib.request.urlopen(f"http://127.0.0.1:{P['port4']}/", timeout=3).read())
            out["v6"] = attempt(lambda: urllib.request.urlopen(f"http://[::1]:{P.get('port6', 1)}/", timeout=3).read())
            out["name"] = attempt(lambda: urllib.request.urlopen(f"http://localhost:{P['port4']}/", timeout=3).read())
        """, **tcp_params(listeners))
    assert_refused(kernel, out["v4"])
    assert_refused(kernel, out["v6"])
    # By name: the hook refuses the lookup; without it there is no resolver.
    assert out["name"][0] == "err", out
    if kernel.hooked:
        assert_refused(kernel, out["name"])
    assert kernel.answers()


def test_cant_fetch_from_host_with_http_client(kernel, listeners):
    with untouched(*tcp_counters(listeners)):
        out = probe(kernel, """
            import http.client
            def get(host, port):
                conn = http.client.HTTPConnection(host, port, timeout=3)
                conn.request("GET", "/")
                return conn.getresponse().status
            out["v4"] = attempt(lambda: get("127.0.0.1", P["port4"]))
            out["v6"] = attempt(lambda: get("::1", P.get("port6", 1)))
        """, **tcp_params(listeners))
    assert_refused(kernel, out["v4"])
    assert_refused(kernel, out["v6"])
    assert kernel.answers()


# --- DNS ---------------------------------------------------------------------------

def test_cant_resolve_names_with_getaddrinfo(kernel, fake_dns):
    counters = [fake_dns] if fake_dns else []
    with untouched(*counters):
        out = probe(kernel, """
            out["example"] = attempt(lambda: _socket.getaddrinfo("example.com", 443))
            out["localhost"] = attempt(lambda: _socket.getaddrinfo("localhost", 80, type=_socket.SOCK_STREAM))
            out["resolver_socket"] = attempt(lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM))
        """)
    for key in ("example", "localhost"):
        if kernel.hooked:
            assert_refused(kernel, out[key])
        else:
            assert out[key][0] == "err" and out[key][1] == "gaierror", out[key]
    # The socket glibc's stub resolver would query with.
    assert_refused(kernel, out["resolver_socket"])
    assert kernel.answers()


def test_cant_resolve_names_with_gethostbyname(kernel, fake_dns):
    counters = [fake_dns] if fake_dns else []
    with untouched(*counters):
        out = probe(kernel, """
            out["byname"] = attempt(lambda: _socket.gethostbyname("example.com"))
            out["byname_ex"] = attempt(lambda: _socket.gethostbyname_ex("localhost"))
            out["byaddr"] = attempt(lambda: _socket.gethostbyaddr("8.8.8.8"))
        """)
    for key in ("byname", "byname_ex", "byaddr"):
        if kernel.hooked:
            assert_refused(kernel, out[key])
        else:
            assert out[key][0] == "err" and out[key][1] in ("gaierror", "herror"), out[key]
    assert kernel.answers()


# --- unix sockets ------------------------------------------------------------------

def test_cant_connect_to_host_abstract_unix_socket(kernel, listeners):
    name = listeners["abstract"].address
    with untouched(listeners["abstract"]):
        out = probe(kernel, """
            def connect():
                s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                s.settimeout(2)
                s.connect(P["name"])
                return s.recv(64)
            out["python"] = attempt(connect)
            fd = _libc.socket(1, 1, 0)
            out["libc"] = libc_connect(fd, sockaddr(1, P["name"]))
        """, name=name)
    # Abstract names are per network namespace (ECONNREFUSED: no such name
    # here); Landlock ABI 6 scoping would answer EPERM.
    ok = (errno.ECONNREFUSED, errno.EPERM)
    assert out["python"][0] == "err" and out["python"][2] in ok, out
    assert out["libc"][0] == -1 and out["libc"][1] in ok, out
    assert kernel.answers()


HOST_DAEMON_SOCKETS = ["/run/docker.sock", "/var/run/docker.sock", "/run/dbus/system_bus_socket",
                       "/var/run/dbus/system_bus_socket", "/var/run/dbus", "/tmp/.X11-unix",
                       "/tmp/.X11-unix/X0", "/run/systemd/private", "/run/user", "/var/run/nscd/socket"]


def test_cant_reach_host_path_unix_sockets(kernel):
    """Path sockets ignore the network namespace: only what is mounted can be
    reached.  Test-owned listeners stand in for host daemons in the host's
    /tmp, in the kernel's own runtime root beside its data folder, in the
    broker's state folder and in Jupyter's runtime folder."""
    from jupyter_core.paths import jupyter_runtime_dir

    folders = [tempfile.mkdtemp(prefix="cant-net-"),
               os.path.dirname(os.path.abspath(kernel.data_dir)),
               kernel.provisioner.state_dir, jupyter_runtime_dir()]
    made, listeners_ = [], []
    try:
        for folder in folders:
            if not os.path.isdir(folder):
                continue
            path = os.path.join(folder, f"cant-net-{os.getpid()}.sock")
            listener = Listener(socket.AF_UNIX, path)
            os.chmod(path, 0o777)
            made.append(path)
            listeners_.append(listener)
        os.chmod(folders[0], 0o755)
        assert made, "no folder to put a listener in"
        with untouched(*listeners_):
            out = probe(kernel, """
                def connect(path):
                    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                    s.settimeout(2)
                    s.connect(path)
                    return s.recv(64)
                out["connect"] = {p: attempt(lambda: connect(p)) for p in P["paths"]}
                out["visible"] = [p for p in P["paths"] + P["daemons"] if _os.path.lexists(p)]
                out["run"] = attempt(lambda: sorted(_os.listdir("/run")))
            """, paths=made, daemons=HOST_DAEMON_SOCKETS)
        for path, res in out["connect"].items():
            assert res[0] == "err" and res[2] in (errno.ENOENT, errno.EACCES, errno.EPERM), (path, res)
        assert out["visible"] == [], out
        # /run holds only the kernel's own folders (Landlock hides the listing).
        assert out["run"][0] == "err" or out["run"][1] == "['kernel', 'sandbox']", out
    finally:
        for listener in listeners_:
            listener.close()
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(folders[0], ignore_errors=True)
    assert kernel.answers()


def test_cant_see_host_services_in_proc_net(kernel, listeners, udp):
    out = probe(kernel, """
        def read(name):
            try:
                with open(f"/proc/net/{name}") as fh:
                    return fh.read().splitlines()
            except OSError as exc:
                return [f"unreadable: {exc}"]
        out.update({name: read(name) for name in ("tcp", "tcp6", "udp", "udp6", "raw", "unix", "dev")})
    """)
    for table in ("tcp", "tcp6", "udp", "udp6", "raw"):
        # Only the header: the kernel's network namespace has no IP sockets.
        assert len(out[table]) == 1 and "local_address" in out[table][0], (table, out[table])
    text = "\n".join(out["unix"])
    assert listeners["abstract"].address.lstrip("\0") not in text
    assert all(line.split()[-1].startswith("/run/kernel/") for line in out["unix"][1:]
               if len(line.split()) == 8), out["unix"]
    interfaces = [line.split(":")[0].strip() for line in out["dev"][2:]]
    assert interfaces == ["lo"], out["dev"]
    assert kernel.answers()


# --- ctypes and raw syscalls ---------------------------------------------------------

def test_cant_open_sockets_with_libc_socket_and_connect(kernel, listeners):
    with untouched(*tcp_counters(listeners)):
        out = probe(kernel, """
            _libc.socket.restype = _ctypes.c_int
            out["control"] = _libc.socket(1, 1, 0)
            for fam, host, port in ((2, "127.0.0.1", P["port4"]), (10, "::1", P.get("port6", 1))):
                _ctypes.set_errno(0)
                fd = _libc.socket(fam, 1, 0)
                res = [fd, _ctypes.get_errno() if fd < 0 else 0]
                if fd >= 0:
                    res.append(libc_connect(fd, sockaddr(fam, host, port)))
                out[str(fam)] = res
        """, **tcp_params(listeners))
    assert out["control"] >= 0, "libc socket(AF_UNIX) failed: the probe is broken"
    assert_eperm(out["2"])
    assert_eperm(out["10"])
    assert kernel.answers()


def raw_sockets(kernel, listeners, cases) -> dict:
    """socket(2) through syscall() for each (family, type, protocol); a socket
    that is created anyway goes on to connect to the host listener."""
    with untouched(*tcp_counters(listeners)):
        return probe(kernel, """
            out["control"] = sys_call(SYS_socket, 1, 1, 0)
            for fam, typ, proto in P["cases"]:
                res = sys_call(SYS_socket, fam, typ, proto)
                if res[0] >= 0 and (fam & 0xffffffff) in (2, 10):
                    host = "127.0.0.1" if (fam & 0xffffffff) == 2 else "::1"
                    res.append(libc_connect(res[0], sockaddr(fam & 0xffffffff, host, P["port4"])))
                out[f"{fam:#x}/{typ}/{proto}"] = res
        """, cases=cases, **tcp_params(listeners))


def assert_raw_refused(out) -> None:
    assert out.pop("control")[0] >= 0, "raw socket(AF_UNIX) failed: the probe is broken"
    for case, res in out.items():
        assert res == [-1, errno.EPERM], (case, res)


def test_cant_open_inet_sockets_with_raw_syscall(kernel, listeners):
    out = raw_sockets(kernel, listeners, [(2, 1, 0), (2, 2, 0), (10, 1, 0), (10, 2, 0), (2, 3, 1), (10, 3, 58)])
    assert_raw_refused(out)
    assert kernel.answers()


def test_cant_open_packet_sockets(kernel, listeners):
    out = raw_sockets(kernel, listeners, [(17, 3, 0x0300), (17, 2, 0x0300), (2, 10, 0x0300)])
    assert_raw_refused(out)
    assert kernel.answers()


def test_cant_open_vsock_sockets(kernel, listeners):
    out = raw_sockets(kernel, listeners, [(40, 1, 0), (40, 2, 0), (40, 5, 0)])
    assert_raw_refused(out)
    assert kernel.answers()


def test_cant_open_netlink_sockets_other_than_route(kernel, listeners):
    NETLINK_SOCK_DIAG, NETLINK_AUDIT, NETLINK_KOBJECT_UEVENT = 4, 9, 15
    out = raw_sockets(kernel, listeners, [(16, 3, p) for p in (NETLINK_SOCK_DIAG, NETLINK_AUDIT,
                                                               NETLINK_KOBJECT_UEVENT, 1, 6, 12, 16, 21)]
                      + [(16, 2, NETLINK_SOCK_DIAG)])
    assert_raw_refused(out)
    assert kernel.answers()


def test_cant_open_any_other_address_family(kernel, listeners):
    """Every family but AF_UNIX (1) and AF_NETLINK (16): AF_UNSPEC, AF_AX25,
    AF_KEY, AF_RDS, AF_CAN, AF_TIPC, AF_BLUETOOTH, AF_ALG, AF_XDP, ... and
    numbers past AF_MAX, each of which the kernel itself would answer with
    something other than EPERM."""
    families = [f for f in range(0, 64) if f not in (1, 16)] + [255, 4096, 0x7fffffff]
    out = raw_sockets(kernel, listeners, [(f, 2, 0) for f in families])
    assert_raw_refused(out)
    assert kernel.answers()


def test_cant_smuggle_family_in_upper_32_bits(kernel, listeners):
    """The kernel truncates the family to an int; the filter compares all 64
    bits and must fail closed (0x1_00000002 is AF_INET to the kernel)."""
    cases = [(0x1_00000002, 1, 0), (0x1_0000000A, 1, 0), (0xFFFFFFFF_00000002, 1, 0),
             (0x8000_0000_0000_0002, 2, 0), (0x1_00000011, 3, 0), (0x1_00000001, 1, 0),
             (0x1_00000010, 3, 0), (16, 3, 0x1_00000000), (16, 3, 0x1_00000004)]
    out = raw_sockets(kernel, listeners, cases)
    assert_raw_refused(out)
    assert kernel.answers()


def test_cant_use_io_uring(kernel):
    """io_uring opens sockets in kernel context (IORING_OP_SOCKET/CONNECT),
    out of the filter's sight: the whole interface is refused."""
    out = probe(kernel, """
        params = _ctypes.create_string_buffer(120)
        out["setup"] = sys_call(425, 8, params)
        out["enter"] = sys_call(426, -1, 0, 0, 0, 0, 0)
        out["register"] = sys_call(427, -1, 0, 0, 0)
    """)
    for key in ("setup", "enter", "register"):     # natively: an fd, EBADF, EBADF/EINVAL
        assert_eperm(out[key])
    assert kernel.answers()


# Hand-written i386 code: socket(AF_INET, SOCK_STREAM, 0) through `int 0x80`
# (i386 socket is 359), returning the fd:
#   push rbx; mov eax,359; mov ebx,2; mov ecx,1; xor edx,edx; int 0x80; pop rbx; ret
INT80_SOCKET = "53" "b867010000" "bb02000000" "b901000000" "31d2" "cd80" "5b" "c3"

NATIVE_CALL = """
import mmap
code = bytes.fromhex(P["code"])
mem = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
mem.write(code)
fn = _ctypes.CFUNCTYPE(_ctypes.c_long)(_ctypes.addressof(_ctypes.c_char.from_buffer(mem)))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="i386 compat syscalls are an x86_64 matter")
def test_cant_open_socket_through_i386_int80(kernel, listeners):
    """A 64-bit process may still enter the kernel through the i386 ABI,
    which an x86_64-only filter would not see: the filter's bad-arch action
    kills the whole kernel process (SIGSYS), and the broker restarts it."""
    with untouched(*tcp_counters(listeners)):
        r = kernel.run(PRELUDE + f"P = {json.dumps({'code': INT80_SOCKET, **tcp_params(listeners)})}\n"
                       + NATIVE_CALL + textwrap.dedent("""
            fd = fn()
            print("int 0x80 socket() returned", fd, flush=True)
            if fd >= 0:
                print(libc_connect(fd, sockaddr(2, "127.0.0.1", P["port4"])), flush=True)
        """), timeout=30)
        assert "returned" not in r.stdout, r
    assert_died_contained(kernel, r)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x32 is an x86_64 ABI")
def test_cant_open_socket_through_x32_abi(kernel, listeners):
    """x32 system calls are x86_64 calls with bit 30 set in the number: the
    filter must not take them for something else.  Killed like int 0x80."""
    with untouched(*tcp_counters(listeners)):
        r = kernel.run(PRELUDE + f"P = {json.dumps(tcp_params(listeners))}\n" + textwrap.dedent("""
            res = sys_call(0x40000000 | SYS_socket, 2, 1, 0)
            print("x32 socket() returned", res, flush=True)
            if res[0] >= 0:
                print(libc_connect(res[0], sockaddr(2, "127.0.0.1", P["port4"])), flush=True)
        """), timeout=30)
        assert "returned" not in r.stdout, r
    assert_died_contained(kernel, r)
