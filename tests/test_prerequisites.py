"""A missing sandbox prerequisite fails with one clear message naming the
piece and the fix, and never starts an unsandboxed kernel.

Every case runs in a subprocess: the checks in broker/sandbox/prereq.py are
cached with functools.lru_cache, so an in-process failure (or success) would
leak into other tests.  Each missing piece is caused for real, for that
subprocess only:

- bubblewrap: SandboxProvisioner.bwrap / SandboxSettings.bwrap names a
  program that does not exist;
- user namespaces: the subprocess runs in a user namespace of its own
  (uids mapped 1:1, so it is still "root" there) whose
  user.max_user_namespaces is 0, so bwrap cannot create one;
- seccomp: the subprocess runs in a private mount namespace where the
  libseccomp shared object is an empty file and the dynamic-linker cache no
  longer lists it, as on a machine without the libseccomp2 package.

The host's sysctls, files and mounts are never changed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKER = os.path.join(os.path.dirname(sys.executable), "broker")
PREFIX = "sandbox prerequisite missing: "

# Starts python3-sandbox with KernelManager(config=...) and reports what
# happened, including every process still running below this one.
KM_PROBE = r"""
import json, sys
import psutil
from traitlets.config import Config
from jupyter_client.manager import KernelManager
from broker.errors import SandboxUnavailable

km = KernelManager(kernel_name="python3-sandbox", config=Config(json.loads(sys.argv[1])))
out = {"started": False}
try:
    km.start_kernel()
    out["started"] = True
except SandboxUnavailable as exc:
    out.update(error="SandboxUnavailable", message=exc.message, piece=exc.piece, fix=exc.fix)
except BaseException as exc:
    out.update(error=type(exc).__name__, message=str(exc))
out["has_kernel"] = km.has_kernel
out["children"] = [" ".join(p.cmdline()) or p.name() for p in psutil.Process().children(recursive=True)]
if out["started"]:
    km.shutdown_kernel(now=True)
print(json.dumps(out))
"""

# Runs argv[2:] as uid 0 of a new user namespace with every uid and gid
# mapped 1:1, after writing argv[1] (unless "-") to that namespace's
# /proc/sys/user/max_user_namespaces.  The limit is per user namespace and
# applies to namespaces created below it; the host's value is untouched.
USERNS_WRAPPER = r"""
import ctypes, os, sys
CLONE_NEWUSER = 0x10000000
limit, argv = sys.argv[1], sys.argv[2:]
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(go_w); os.close(ready_r)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        sys.stderr.write("unshare(CLONE_NEWUSER): %s\n" % os.strerror(ctypes.get_errno()))
        os._exit(99)
    os.write(ready_w, b"1")
    os.read(go_r, 1)                      # the parent has written the id maps
    if os.getuid() != 0:
        os._exit(98)
    if limit != "-":
        with open("/proc/sys/user/max_user_namespaces", "w") as fh:
            fh.write(limit)
    os.execv(argv[0], argv)
os.close(go_r); os.close(ready_w)
if os.read(ready_r, 1) == b"1":
    for name in ("uid_map", "gid_map"):
        with open("/proc/%d/%s" % (pid, name), "w") as fh:
            fh.write("0 0 4294967295\n")
    os.write(go_w, b"1")
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""

# Runs "$@" in a private mount namespace in which libseccomp is gone: the
# library file is covered by an empty file and /etc/ld.so.cache by a cache
# rebuilt without it (-X: ldconfig must not touch the host's symlinks).
HIDE_LIBSECCOMP = r"""
set -e
lib=$1; cache=$2; shift 2
mount --bind /dev/null "$lib"
ldconfig -X -C "$cache" 2>/dev/null
mount --bind "$cache" /etc/ld.so.cache
if ldconfig -p | grep -q libseccomp; then echo "libseccomp still listed" >&2; exit 97; fi
exec "$@"
"""


def run(argv, timeout=120, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)


def km_probe_argv(config: dict | None = None) -> list[str]:
    return [sys.executable, "-c", KM_PROBE, json.dumps(config or {})]


def km_probe(argv) -> dict:
    r = run(argv)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_one_clear_message(text: str, piece_words: list[str], fix_words: list[str]) -> None:
    """Exactly one line: 'sandbox prerequisite missing: <piece>. Fix: <fix>'."""
    text = text.strip()
    assert "\n" not in text, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    m = re.fullmatch(re.escape(PREFIX) + r"(.+?)\. Fix: (.+)", text)
    assert m, text
    piece, fix = m.groups()
    for w in piece_words:
        assert w in piece, (w, piece)
    for w in fix_words:
        assert w in fix, (w, fix)


def assert_no_kernel(out: dict, piece_words: list[str], fix_words: list[str]) -> None:
    assert out["started"] is False, "a kernel started without its sandbox"
    assert out["error"] == "SandboxUnavailable", out
    assert_one_clear_message(out["message"], piece_words, fix_words)
    assert out["has_kernel"] is False
    assert out["children"] == [], f"processes left running: {out['children']}"


# --- (a) bubblewrap missing -------------------------------------------------------

BWRAP_PIECE = ["bubblewrap", "'nope-no-such-bwrap'", "not found"]
BWRAP_FIX = ["apt-get install -y bubblewrap"]


def test_bwrap_missing_kernel_manager():
    out = km_probe(km_probe_argv({"SandboxProvisioner": {"bwrap": "nope-no-such-bwrap"}}))
    assert_no_kernel(out, BWRAP_PIECE, BWRAP_FIX)
    assert out["piece"] == "bubblewrap ('nope-no-such-bwrap' not found on PATH)"


def test_bwrap_missing_broker_check():
    r = run([BROKER, "check", "--SandboxSettings.bwrap=nope-no-such-bwrap"])
    assert r.returncode == 1
    assert r.stdout == ""
    assert_one_clear_message(r.stderr, BWRAP_PIECE, BWRAP_FIX)


def test_bwrap_not_a_bubblewrap_broker_check():
    """A program that is not bubblewrap (no version) is refused just as clearly."""
    r = run([BROKER, "check", "--SandboxSettings.bwrap=/bin/true"])
    assert r.returncode == 1
    assert_one_clear_message(r.stderr, ["bubblewrap >= 0.8.0", "found"], ["bubblewrap"])


def test_prerequisites_present_control():
    """The same probes pass on this machine when nothing is missing, so the
    failures above are caused by what each test takes away."""
    r = run([BROKER, "check"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bwrap"].endswith("bwrap")


# --- (b) user namespaces unavailable ------------------------------------------------

@pytest.fixture(scope="module")
def userns_wrapper():
    if os.geteuid() != 0:
        pytest.skip("mapping every uid 1:1 into a test user namespace needs root")
    probe = run([sys.executable, "-c", USERNS_WRAPPER, "-", "/usr/bin/true"])
    if probe.returncode == 99:
        pytest.skip(f"this machine cannot create user namespaces at all: {probe.stderr.strip()}")
    assert probe.returncode == 0, probe.stderr
    return [sys.executable, "-c", USERNS_WRAPPER]


USERNS_PIECE = ["unprivileged user namespaces", "bwrap said", "max_"]
USERNS_FIX = ["user.max_user_namespaces", "kernel.unprivileged_userns_clone"]


def test_userns_control_check_passes(userns_wrapper):
    r = run(userns_wrapper + ["-", BROKER, "check"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["root"] is True


def test_userns_unavailable_broker_check(userns_wrapper):
    r = run(userns_wrapper + ["0", BROKER, "check"])
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert_one_clear_message(r.stderr, USERNS_PIECE, USERNS_FIX)
    assert "ENOSPC" in r.stderr or "No space left" in r.stderr


def test_userns_unavailable_kernel_manager(userns_wrapper):
    out = km_probe(userns_wrapper + ["0"] + km_probe_argv())
    assert_no_kernel(out, USERNS_PIECE, USERNS_FIX)


# --- (c) seccomp (libseccomp) unavailable -----------------------------------------

@pytest.fixture(scope="module")
def libseccomp_file() -> str:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    m = re.search(r"libseccomp\.so\.2 .*=> (\S+)", out)
    if not m:
        pytest.skip("libseccomp is not installed, so it cannot be hidden")
    return os.path.realpath(m.group(1))


@pytest.fixture
def hide_libseccomp(libseccomp_file, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace needs root")
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", HIDE_LIBSECCOMP,
            "hide-libseccomp", libseccomp_file, str(tmp_path / "ld.so.cache")]


SECCOMP_PIECE = ["libseccomp"]
SECCOMP_FIX = ["libseccomp2"]


def test_libseccomp_missing_broker_check(hide_libseccomp):
    r = run(hide_libseccomp + [BROKER, "check"])
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert_one_clear_message(r.stderr, SECCOMP_PIECE + ["Unable to find libseccomp"], SECCOMP_FIX)


def test_libseccomp_missing_kernel_manager(hide_libseccomp):
    out = km_probe(hide_libseccomp + km_probe_argv())
    assert_no_kernel(out, SECCOMP_PIECE, SECCOMP_FIX)


def test_libseccomp_unloadable_broker_check(libseccomp_file):
    """Still listed by the linker cache but not loadable (a broken install)."""
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace needs root")
    r = run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             'mount --bind /dev/null "$1" && shift && exec "$@"', "break-libseccomp", libseccomp_file,
             BROKER, "check"])
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert_one_clear_message(r.stderr, SECCOMP_PIECE, SECCOMP_FIX)
