"""Checks that every piece of the sandbox is there before anything starts.

Each missing piece raises :class:`SandboxUnavailable` naming the piece and the
fix.  There is no fallback to an unsandboxed kernel.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

from broker.errors import SandboxUnavailable

MIN_BWRAP = (0, 8, 0)  # --disable-userns


def is_root() -> bool:
    return os.geteuid() == 0


def _install_hint(pkg: str) -> str:
    if is_root():
        return f"run `apt-get install -y {pkg}` (Debian/Ubuntu) or install {pkg} from your distribution"
    return f"ask an administrator to run `sudo apt-get install -y {pkg}` (Debian/Ubuntu)"


@functools.lru_cache(maxsize=8)
def find_bwrap(bwrap: str = "bwrap") -> str:
    path = shutil.which(bwrap)
    if not path:
        raise SandboxUnavailable(f"bubblewrap ({bwrap!r} not found on PATH)", _install_hint("bubblewrap"))
    out = subprocess.run([path, "--version"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", out.stdout)
    if not m or tuple(int(x) for x in m.groups()) < MIN_BWRAP:
        found = out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"  # one-line message
        raise SandboxUnavailable(
            f"bubblewrap >= {'.'.join(map(str, MIN_BWRAP))} (found {found} at {path})",
            "install a newer bubblewrap (Debian 12's 0.8.0 or later)")
    return path


@functools.lru_cache(maxsize=8)
def check_user_namespaces(bwrap_path: str) -> None:
    """Run a trivial sandbox once: proves user namespaces work here."""
    argv = [bwrap_path, "--unshare-user", "--disable-userns", "--unshare-net", "--unshare-pid",
            "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
            "--proc", "/proc", "--dev", "/dev", "--", "/usr/bin/true"]
    if is_root():
        argv = [shutil.which("setpriv") or "setpriv", "--reuid=65534", "--regid=65534",
                "--clear-groups", "--"] + argv
    r = subprocess.run(argv, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    if r.returncode != 0:
        raise SandboxUnavailable(
            f"unprivileged user namespaces (bwrap said: {r.stderr.strip() or r.returncode})",
            "enable them: `sysctl -w kernel.unprivileged_userns_clone=1` and "
            "`sysctl -w user.max_user_namespaces=15000` (and on Ubuntu 24.04+, "
            "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor profile for bwrap)")


@functools.lru_cache(maxsize=1)
def check_seccomp() -> None:
    try:
        with open("/proc/self/status") as fh:
            if "Seccomp:" not in fh.read():
                raise SandboxUnavailable("seccomp support in the Linux kernel (CONFIG_SECCOMP_FILTER)",
                                         "use a kernel built with CONFIG_SECCOMP_FILTER=y")
    except OSError as exc:
        raise SandboxUnavailable(f"/proc (could not read /proc/self/status: {exc})", "mount /proc") from None
    try:
        import broker_seccomp

        broker_seccomp.compile_profile("kernel")
        broker_seccomp.compile_profile("shell")
    except (ImportError, OSError, AttributeError, TypeError, RuntimeError) as exc:
        # pyseccomp raises RuntimeError("Unable to find libseccomp") on import
        # when the library is not installed at all.
        raise SandboxUnavailable(f"libseccomp (compiling the seccomp profiles failed: {exc})",
                                 _install_hint("libseccomp2")) from None


@functools.lru_cache(maxsize=1)
def check_root_tools() -> dict:
    """As root the launcher needs util-linux's unshare, mount, setpriv and prlimit."""
    tools = {}
    for tool in ("unshare", "mount", "setpriv", "prlimit", "mkfs.ext4"):
        path = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if not path:
            pkg = "e2fsprogs" if tool == "mkfs.ext4" else "util-linux"
            raise SandboxUnavailable(f"{tool} (needed to run sandboxes as their own uid)", _install_hint(pkg))
        tools[tool] = path
    return tools


def launch_tools() -> dict:
    """The programs the launcher runs: util-linux's set as root, prlimit otherwise."""
    if is_root():
        return check_root_tools()
    return {"prlimit": shutil.which("prlimit", path="/usr/bin:/bin") or "prlimit"}


def check_all(bwrap: str = "bwrap") -> str:
    """Every check; returns the absolute path of bwrap."""
    path = find_bwrap(bwrap)
    if is_root():
        check_root_tools()
    else:
        if not shutil.which("prlimit", path="/usr/bin:/bin"):
            raise SandboxUnavailable("prlimit (sets the sandbox's rlimits)", _install_hint("util-linux"))
    check_user_namespaces(path)
    check_seccomp()
    return path
