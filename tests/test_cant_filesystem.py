"""Escape corpus, file system (research/sandbox.md §6 F1-F3, F6-F9, F12).

Every case runs the attack, asserts it was refused, checks the host side
where the attack would have left a trace, and proves the kernel still
answers.  Kernel cases run twice (audit hook in place / neutralised) through
the ``kernel`` fixture.  A positive control in each case shows the same code
does work on the sandbox's own files, so a refusal is not an accident of the
probe.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import os
import shutil
import stat
import subprocess
import socket
import sys
import sysconfig
import tempfile
import time

import pytest
from traitlets.config import Config

import kernel_profile
from broker.sandbox.provisioner import python_paths
from broker.sandbox.settings import SandboxSettings
from broker.sandbox.shell import run_shell
from tests.cant_support import TRY, Canary, ConfiguredKernel, probe, recover, refused, restart, token

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_PROFILE_DIR = os.path.dirname(os.path.abspath(kernel_profile.__file__))
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
STDLIB = os.path.dirname(os.__file__)


def _bound_names(folder: str) -> set[str]:
    """Names directly under *folder* that the sandbox legitimately shows
    because an interpreter path below them is bound."""
    names = set()
    for p in python_paths():
        if p.startswith(folder.rstrip("/") + "/"):
            names.add(p[len(folder.rstrip("/")) + 1:].split("/")[0])
    return names


READ_PROBE = TRY + """
files, dirs = {files!r}, {dirs!r}
out["files"] = {{p: attempt(lambda p=p: open(p, "rb").read().decode("latin-1")) for p in files}}
out["dirs"] = {{d: attempt(lambda d=d: sorted(os.listdir(d))) for d in dirs}}
with open("/mnt/data/own-file.txt", "w") as fh:
    fh.write("mine")
out["own"] = attempt(lambda: open("/mnt/data/own-file.txt").read())
"""


def _assert_nothing_read(result: dict, files: list[str], dirs: list[str]) -> None:
    assert result["own"] == ["ok", "mine"], result["own"]
    for path in files:
        got = result["files"][path]
        assert refused(got), f"host file {path} was readable from the sandbox: {got[1][:200]!r}"
    for folder in dirs:
        got = result["dirs"][folder]
        if refused(got):
            continue
        host_only = set(os.listdir(folder)) - _bound_names(folder)
        leaked = host_only & set(got[1])
        assert not leaked, f"host entries of {folder} visible in the sandbox: {sorted(leaked)}"


def _existing(paths):
    return [p for p in paths if os.path.isfile(p) and os.access(p, os.R_OK)]


@pytest.fixture
def tmp_canary():
    c = Canary("/tmp")
    yield c
    c.remove()


# --- reading host files ----------------------------------------------------------

HOST_SECRET_FILES = ["/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/hostname", "/etc/hosts",
                     "/etc/resolv.conf", "/etc/machine-id", "/etc/ssh/ssh_host_ed25519_key",
                     "/etc/ssh/ssh_host_rsa_key", "/root/.bashrc", "/root/.profile", "/root/.gitconfig",
                     "/root/.npmrc", "/root/.ssh/id_rsa", "/root/.ssh/id_ed25519", "/root/.ssh/authorized_keys"]
HOST_SECRET_DIRS = ["/root", "/home", "/etc/ssh", "/var", "/opt", "/srv", "/boot"]


def test_cant_read_host_secrets(kernel):
    files = _existing(HOST_SECRET_FILES)
    assert "/etc/shadow" in files, "the test needs a host /etc/shadow to aim at"
    dirs = [d for d in HOST_SECRET_DIRS if os.path.isdir(d)]
    for home in os.listdir("/home"):
        if os.path.isdir(os.path.join("/home", home)):
            dirs.append(os.path.join("/home", home))
    result = probe(kernel, "import os\n" + READ_PROBE.format(files=files, dirs=dirs))
    _assert_nothing_read(result, files, dirs)
    assert kernel.answers()


def test_cant_read_broker_repo(kernel):
    files = _existing([os.path.join(REPO, p) for p in (
        "setup.cfg", "Makefile", ".git/HEAD", ".git/config", "broker/sandbox/provisioner.py",
        "broker/app.py", "tests/conftest.py", "seccomp/common.json")])
    assert len(files) >= 5, files
    dirs = [REPO, os.path.join(REPO, ".git"), os.path.join(REPO, "broker"), os.path.dirname(REPO)]
    dirs = [d for d in dirs if os.path.isdir(d)]
    result = probe(kernel, "import os\n" + READ_PROBE.format(files=files, dirs=dirs))
    _assert_nothing_read(result, files, dirs)
    assert kernel.answers()


def test_cant_read_host_tmp(kernel, tmp_canary):
    result = probe(kernel, "import os\n" + TRY + f"""
out["read"] = attempt(lambda: open({tmp_canary.path!r}).read())
out["own_tmp"] = attempt(lambda: open("/tmp/own-tmp.txt", "w").write("x"))
out["list"] = attempt(lambda: os.listdir("/tmp"))
""")
    assert refused(result["read"]), result["read"]
    assert result["own_tmp"][0] == "ok", result
    if not refused(result["list"]):
        assert os.path.basename(tmp_canary.path) not in result["list"][1]
        assert "own-tmp.txt" in result["list"][1]
    with open(tmp_canary.path) as fh:
        assert fh.read().strip() == tmp_canary.secret
    assert not os.path.exists("/tmp/own-tmp.txt"), "the sandbox's /tmp is the host's /tmp"
    assert kernel.answers()


@pytest.fixture(scope="module")
def no_landlock_kernel():
    """Landlock off: the mount layout alone must hide the host (Landlock is
    the second wall, and kernels without Landlock exist)."""
    c = Config()
    c.SandboxProvisioner.landlock = False
    k = ConfiguredKernel(c, hooked=False)
    yield k
    k.shutdown()


def test_cant_read_host_files_even_without_landlock(no_landlock_kernel, tmp_canary):
    k = no_landlock_kernel
    assert probe(k, "import os\nout['abi'] = os.environ.get('BROKER_SANDBOX_LANDLOCK_ABI')")["abi"] == "0"
    files = _existing(HOST_SECRET_FILES) + [tmp_canary.path] + _existing(
        [os.path.join(REPO, p) for p in ("setup.cfg", ".git/HEAD", "broker/sandbox/provisioner.py",
                                         "tests/conftest.py")])
    dirs = [d for d in HOST_SECRET_DIRS + [REPO, os.path.dirname(REPO)] if os.path.isdir(d)]
    result = probe(k, "import os\n" + READ_PROBE.format(files=files, dirs=dirs))
    _assert_nothing_read(result, files, dirs)
    assert k.answers()


def test_cant_read_other_kernels_data(kernel, sandbox_kernel):
    other = sandbox_kernel
    secret = token("OTHER-SESSION")
    r = other.run(f"open('/mnt/data/secret.txt', 'w').write({secret!r})")
    assert r.status == "ok", r
    target = os.path.join(other.data_dir, "secret.txt")
    with open(target) as fh:
        assert fh.read() == secret
    parent = os.path.dirname(other.data_dir)
    rel = os.path.relpath(target, "/mnt/data")
    candidates = [
        target,
        "/mnt/data/" + rel,
        "/mnt/data/../../" + target.lstrip("/"),
        "/proc/self/cwd/" + rel,
        "/proc/1/root" + target,
        "/proc/2/root" + target,
        "/proc/self/root" + target,
        "/run/kernel/../../" + target.lstrip("/"),
        other.data_dir + ".img",
    ]
    result = probe(kernel, "import os, glob\n" + TRY + f"""
out["read"] = {{p: attempt(lambda p=p: open(p).read()) for p in {candidates!r}}}
out["list"] = {{p: attempt(lambda p=p: os.listdir(p)) for p in {[other.data_dir, parent, os.path.dirname(parent)]!r}}}
out["glob"] = glob.glob("/tmp/broker-kernel-*") + glob.glob("{parent}/*")
out["own"] = os.getcwd()
""")
    for path, got in result["read"].items():
        assert refused(got), f"read another kernel's data through {path}: {got!r}"
    for path, got in result["list"].items():
        assert refused(got) or "secret.txt" not in got[1], (path, got)
    assert result["glob"] == [], result["glob"]
    assert result["own"] == "/mnt/data"
    assert secret not in repr(result)
    # The other kernel still has its file, and both still work.
    r = other.run("print(open('/mnt/data/secret.txt').read())")
    assert r.stdout.strip() == secret
    assert kernel.answers() and other.answers()


# --- writing outside /mnt/data -----------------------------------------------------

# target -> an existing file in it to try to open for writing (never written)
WRITE_TARGETS = {
    "/": None,
    "/usr": "/usr/bin/env",
    "/usr/lib": None,
    "/etc": "/etc/passwd",
    "/mnt": None,
    "/run": None,
    "/run/sandbox": "/run/sandbox/kernel.json",
    "/dev": None,
    "python-prefix": os.path.join(sys.prefix, "pyvenv.cfg") if os.path.exists(
        os.path.join(sys.prefix, "pyvenv.cfg")) else None,
    "python-base-prefix": None,
    "stdlib": os.__file__,
    "site-packages": os.path.join(os.path.dirname(sysconfig.get_paths()["purelib"]), "site-packages",
                                  "ipykernel", "__init__.py"),
    "kernel_profile": os.path.join(KERNEL_PROFILE_DIR, "audit.py"),
}
TARGET_PATHS = {"python-prefix": sys.prefix, "python-base-prefix": sys.base_prefix, "stdlib": STDLIB,
                "site-packages": SITE_PACKAGES, "kernel_profile": KERNEL_PROFILE_DIR}
# Targets that are the host's own folders (bound read-only): a write would land on the host.
HOST_BACKED = {"/usr", "/usr/lib", "python-prefix", "python-base-prefix", "stdlib", "site-packages",
               "kernel_profile"}


@pytest.mark.parametrize("target", sorted(WRITE_TARGETS))
def test_cant_write_outside_data(kernel, target):
    folder = TARGET_PATHS.get(target, target)
    existing = WRITE_TARGETS[target]
    name = token("cant-write")
    host_new = os.path.join(folder, name)
    try:
        result = probe(kernel, "import os\n" + TRY + f"""
folder, name, existing = {folder!r}, {name!r}, {existing!r}
out["create"] = attempt(lambda: os.close(os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)))
out["mkdir"] = attempt(lambda: os.mkdir(os.path.join(folder, name + ".d")))
out["symlink"] = attempt(lambda: os.symlink("/mnt/data", os.path.join(folder, name + ".l")))
if existing:
    # Opened for writing only: never written, truncated or removed.
    out["open_existing"] = attempt(lambda: os.close(os.open(existing, os.O_WRONLY | os.O_APPEND)))
    out["rename_existing"] = attempt(lambda: os.rename(existing, existing))
out["control"] = attempt(lambda: os.close(os.open("/mnt/data/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)))
""")
        assert result["control"][0] == "ok", result
        for step in ("create", "mkdir", "symlink", "open_existing"):
            if step in result:
                assert refused(result[step]), f"{step} in {folder} succeeded: {result}"
                assert result[step][2] in (1, 2, 13, 30), result[step]  # EPERM ENOENT EACCES EROFS
        if "rename_existing" in result and target in HOST_BACKED:
            # rename(x, x) is a no-op the kernel may allow; it must at least not move anything.
            assert os.path.exists(existing)
        if target in HOST_BACKED:
            for suffix in ("", ".d", ".l"):
                assert not os.path.lexists(host_new + suffix), f"{host_new + suffix} appeared on the host"
        assert os.path.exists(os.path.join(kernel.data_dir, name))
    finally:
        if os.path.exists(os.path.join(kernel.data_dir, name)):
            os.unlink(os.path.join(kernel.data_dir, name))
        for suffix in ("", ".d", ".l"):
            p = host_new + suffix
            if target in HOST_BACKED and os.path.lexists(p):
                (os.rmdir if os.path.isdir(p) and not os.path.islink(p) else os.unlink)(p)
    assert kernel.answers()


# --- module shadowing ------------------------------------------------------------

PLANT = ("import os as _o\n_o.makedirs('/mnt/data/PWNED', exist_ok=True)\n"
         "open('/mnt/data/PWNED/{tag}', 'w').close()\n")
PLANTED = {
    "json.py": "json",
    "ctypes.py": "ctypes",
    "site.py": "site",
    "sitecustomize.py": "sitecustomize",
    "usercustomize.py": "usercustomize",
    "ipykernel_launcher.py": "ipykernel_launcher",
    "kernel_profile/__init__.py": "kernel_profile-init",
    "kernel_profile/__main__.py": "kernel_profile-main",
    "zmq.py": "zmq",
    "evil.pth": None,  # a .pth line: "import ..." runs if the folder is a site dir
    "ipython_config.py": "ipython_config-cwd",
    "ipython_kernel_config.py": "ipython_kernel_config-cwd",
    "jupyter_config.py": "jupyter_config-cwd",
    "profile_default/ipython_config.py": "cwd-profile-config",
    "profile_default/ipython_kernel_config.py": "cwd-profile-kernel-config",
    "profile_default/startup/00-evil.py": "cwd-profile-startup",
    ".ipython/profile_default/ipython_config.py": "home-profile-config",
    ".ipython/profile_default/ipython_kernel_config.py": "home-profile-kernel-config",
    ".ipython/profile_default/startup/00-evil.py": "home-profile-startup",
    ".jupyter/jupyter_config.py": "jupyter-dir-config",
}
# Also planted in the kernel's own writable IPYTHONDIR/config folders on /tmp:
# they must not survive a restart.
TMP_PLANTED = {
    "/tmp/.ipython/profile_default/startup/00-evil.py": "tmp-ipython-startup",
    "/tmp/.ipython/profile_default/ipython_kernel_config.py": "tmp-ipython-kernel-config",
}


def test_cant_shadow_modules_across_restart(kernel):
    files = {}
    for rel, tag in PLANTED.items():
        path = "/mnt/data/" + rel
        if rel.endswith(".pth"):
            files[path] = "import os; os.makedirs('/mnt/data/PWNED', exist_ok=True); " \
                          "open('/mnt/data/PWNED/pth', 'w').close()\n"
        else:
            files[path] = PLANT.format(tag=tag)
    for path, tag in TMP_PLANTED.items():
        files[path] = PLANT.format(tag=tag)
    r = kernel.run(f"""
        import os
        for path, text in {files!r}.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(text)
        print("planted", len({files!r}))
    """)
    assert r.status == "ok" and "planted" in r.stdout, r
    for rel in PLANTED:
        assert os.path.exists(os.path.join(kernel.data_dir, rel)), rel
    try:
        restart(kernel)
        assert kernel.answers()
        result = probe(kernel, """
import os, sys, json, ctypes, zmq, importlib.util
out["pwned_dir"] = os.path.exists("/mnt/data/PWNED") and sorted(os.listdir("/mnt/data/PWNED"))
out["modules"] = {m: getattr(sys.modules.get(m), "__file__", None)
                  for m in ("json", "ctypes", "zmq", "site", "sitecustomize", "usercustomize",
                            "ipykernel_launcher", "kernel_profile")}
out["path"] = sys.path
out["cwd"] = os.getcwd()
out["tmp_startup"] = os.path.exists("/tmp/.ipython/profile_default/startup/00-evil.py")
out["writable"] = {m: f and os.access(os.path.dirname(f), os.W_OK) for m, f in out["modules"].items()}
""")
        assert result["pwned_dir"] is False, f"planted code ran at kernel start: {result['pwned_dir']}"
        assert not os.path.exists(os.path.join(kernel.data_dir, "PWNED"))
        # Every module comes from a read-only bind of the interpreter (which
        # may itself lie under /tmp, when the checkout does): never from
        # /mnt/data nor from the sandbox's own writable /tmp.
        binds = [p.rstrip("/") + "/" for p in kernel.provisioner._spec.ro_paths + ["/usr"]]
        for mod, path in result["modules"].items():
            if path is None:
                continue
            assert not path.startswith("/mnt/data"), (mod, path)
            assert path.startswith(tuple(binds)), f"{mod} loaded from {path}, outside the read-only binds {binds}"
            assert result["writable"][mod] is False, f"{mod}'s folder is writable in the sandbox: {path}"
        assert result["modules"]["json"] and result["modules"]["json"].startswith(sys.base_prefix)
        assert result["modules"]["kernel_profile"] == os.path.join(KERNEL_PROFILE_DIR, "__init__.py")
        assert "/mnt/data" not in result["path"] and "" not in result["path"] and "." not in result["path"]
        assert result["cwd"] == "/mnt/data"
        assert result["tmp_startup"] is False, "/tmp survived the restart"
    finally:
        for rel in PLANTED:
            p = os.path.join(kernel.data_dir, rel)
            if os.path.lexists(p):
                os.unlink(p)
        for d in ("PWNED", "kernel_profile", "profile_default", ".ipython", ".jupyter"):
            shutil.rmtree(os.path.join(kernel.data_dir, d), ignore_errors=True)
    assert kernel.answers()


# --- links, devices, setuid, native code ---------------------------------------------

def test_cant_follow_planted_symlink(kernel, tmp_canary):
    links = {"link-canary": tmp_canary.path, "link-shadow": "/etc/shadow", "link-bashrc": "/root/.bashrc",
             "link-repo": os.path.join(REPO, "setup.cfg"), "link-rel": "../../../../../../etc/shadow"}
    result = probe(kernel, "import os\n" + TRY + f"""
links = {links!r}
for name, target in links.items():
    if os.path.lexists(name):
        os.unlink(name)
    os.symlink(target, name)
out["read"] = {{name: attempt(lambda n=name: open(n).read()) for name in links}}
open("own.txt", "w").write("own-content\\n")
if os.path.lexists("link-own"):
    os.unlink("link-own")
os.symlink("/mnt/data/own.txt", "link-own")
out["own"] = attempt(lambda: open("link-own").read())
""")
    assert result["own"] == ["ok", "own-content\n"], result
    for name, got in result["read"].items():
        assert refused(got), f"planted symlink {name} -> {links[name]} was readable: {got!r}"
    # The shell sandbox over the same folder does not follow them either.
    sh = asyncio.run(run_shell("for l in link-*; do cat \"$l\" && echo \"READ $l\"; done; echo done",
                               kernel.data_dir, SandboxSettings(), timeout=30))
    assert sh.exit_code == 0, sh
    assert "READ link-own" in sh.stdout and "own-content" in sh.stdout, sh
    assert tmp_canary.secret not in sh.stdout + sh.stderr
    assert [line for line in sh.stdout.splitlines() if line.startswith("READ")] == ["READ link-own"], sh
    kernel.run("import os\nfor n in %r + ['link-own', 'own.txt']:\n    os.unlink(n)" % (list(links),))
    assert kernel.answers()


def test_cant_hardlink_outside(kernel):
    sources = ["/etc/passwd", sys.executable, os.path.realpath(sys.executable), "/run/sandbox/kernel.json",
               "/run/sandbox/kernel.bpf", os.path.join(KERNEL_PROFILE_DIR, "audit.py"), os.__file__,
               "/usr/bin/env", "/tmp/own-tmp-file"]
    result = probe(kernel, "import os\n" + TRY + f"""
open("/tmp/own-tmp-file", "w").write("t")
out["links"] = {{}}
for i, src in enumerate({sources!r}):
    out["links"][src] = attempt(lambda: os.link(src, f"/mnt/data/hl-{{i}}"))
open("/mnt/data/hl-own", "w").write("own")
out["own"] = attempt(lambda: os.link("/mnt/data/hl-own", "/mnt/data/hl-own-2"))
out["own_nlink"] = os.stat("/mnt/data/hl-own").st_nlink
""")
    assert result["own"][0] == "ok" and result["own_nlink"] == 2, result
    for src, got in result["links"].items():
        assert refused(got), f"hard link to {src} created in /mnt/data: {got!r}"
        assert got[2] in (1, 13, 18), got  # EPERM EACCES EXDEV
    assert not [n for n in os.listdir(kernel.data_dir) if n.startswith("hl-") and n[3:].isdigit()]
    kernel.run("import os\nos.unlink('/mnt/data/hl-own'); os.unlink('/mnt/data/hl-own-2')")
    assert kernel.answers()


def test_cant_mknod_device(kernel):
    nodes = {"mem": (stat.S_IFCHR, 1, 1), "kmsg": (stat.S_IFCHR, 1, 11), "sda": (stat.S_IFBLK, 8, 0),
             "vda": (stat.S_IFBLK, 253, 0), "loop0": (stat.S_IFBLK, 7, 0), "tty1": (stat.S_IFCHR, 4, 1)}
    result = probe(kernel, "import os\n" + TRY + f"""
out["made"] = {{}}
for folder in ("/mnt/data", "/tmp", "/dev/shm", "/dev"):
    for name, (kind, major, minor) in {nodes!r}.items():
        path = f"{{folder}}/cant-{{name}}"
        out["made"][path] = attempt(lambda: os.mknod(path, kind | 0o666, os.makedev(major, minor)))
out["fifo"] = attempt(lambda: os.mkfifo("/mnt/data/cant-fifo"))
out["fifo_is_fifo"] = __import__("stat").S_ISFIFO(os.lstat("/mnt/data/cant-fifo").st_mode)
os.unlink("/mnt/data/cant-fifo")
""")
    assert result["fifo"][0] == "ok" and result["fifo_is_fifo"], result  # mknod itself works
    for path, got in result["made"].items():
        assert refused(got), f"device node {path} created: {got!r}"
        assert got[2] in (1, 13, 30), got
    assert not [n for n in os.listdir(kernel.data_dir) if n[len("cant-"):] in nodes]
    assert kernel.answers()


def _mount_options(path: str) -> set[str]:
    best = None
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            parts = line.split()
            if parts[4] == path:
                best = parts
    assert best, f"{path} is not a mount point on the host"
    return set(best[5].split(","))


def test_cant_use_setuid_file(kernel):
    # Inside: the data folder (and the tmpfs folders) are mounted nosuid, and
    # a setuid bit the kernel sets on its own file changes nothing.
    result = probe(kernel, "import os\n" + TRY + """
out["flags"] = {p: os.statvfs(p).f_flag for p in ("/mnt/data", "/tmp", "/dev/shm", "/usr")}
open("/mnt/data/suid-file", "w").write("#!/bin/sh\\nid -u\\n")
out["chmod"] = attempt(lambda: os.chmod("/mnt/data/suid-file", 0o4755))
out["status"] = {k: v.split() for k, v in (l.split(":", 1) for l in open("/proc/self/status")) if k in ("Uid", "NoNewPrivs", "CapEff", "CapPrm")}
""")
    for path, flags in result["flags"].items():
        assert flags & os.ST_NOSUID, f"{path} is not mounted nosuid inside the sandbox"
    assert result["flags"]["/mnt/data"] & os.ST_NOEXEC
    assert result["status"]["NoNewPrivs"] == ["1"] and result["status"]["CapEff"] == ["0000000000000000"]
    # On the host the quota image is mounted nosuid,nodev,noexec.
    opts = _mount_options(kernel.data_dir)
    assert {"nosuid", "nodev", "noexec"} <= opts, opts
    # A setuid-root binary planted by someone else in the data folder (a
    # root-owned copy of id, mode 4755): on the host it would run with euid 0
    # for any user; from the sandbox it must not run as root.
    planted = os.path.join(kernel.data_dir, "suid-id")
    shutil.copy2("/usr/bin/id", planted)
    os.chown(planted, 0, 0)
    os.chmod(planted, 0o4755)
    try:
        sh = asyncio.run(run_shell("/mnt/data/suid-id -u; echo rc=$?; /mnt/data/suid-file; echo rc2=$?; id -u",
                                   kernel.data_dir, SandboxSettings(), timeout=30))
        lines = sh.stdout.split()
        assert "0" not in lines, f"setuid file ran as root: {sh}"
        assert "rc=126" in lines and "rc2=126" in lines, sh  # noexec: not even executed
        assert lines[-1] == "1000", sh
    finally:
        os.unlink(planted)
    kernel.run("import os; os.unlink('/mnt/data/suid-file')")
    assert kernel.answers()


EVIL_C = r"""
#include <stdio.h>
int evil_answer(void) { return 1337; }
__attribute__((constructor)) static void boom(void) {
    FILE *f = fopen("/mnt/data/SO-RAN", "w");
    if (f) { fputs("ran", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def evil_so():
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.skip("gcc is needed to build the test library")
    d = tempfile.mkdtemp(prefix="cant-so-")
    try:
        src, lib = os.path.join(d, "evil.c"), os.path.join(d, "evil.so")
        with open(src, "w") as fh:
            fh.write(EVIL_C)
        subprocess.run([gcc, "-shared", "-fPIC", "-o", lib, src], check=True, capture_output=True)
        import ctypes

        assert ctypes.CDLL(lib).evil_answer() == 1337  # the library itself works
        with open(lib, "rb") as fh:
            yield fh.read()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_cant_dlopen_library_from_data(kernel, evil_so):
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    result = probe(kernel, "import os, ctypes, base64, importlib.util\n" + TRY + f"""
data = base64.b64decode({base64.b64encode(evil_so).decode()!r})
for name in ("evil.so", "evilmod{ext}"):
    with open("/mnt/data/" + name, "wb") as fh:
        fh.write(data)
out["cdll"] = attempt(lambda: ctypes.CDLL("/mnt/data/evil.so").evil_answer())
out["pydll"] = attempt(lambda: ctypes.PyDLL("/mnt/data/evil.so").evil_answer())
def load_ext():
    spec = importlib.util.spec_from_file_location("evilmod", "/mnt/data/evilmod{ext}")
    return repr(importlib.util.module_from_spec(spec))
out["ext"] = attempt(load_ext)
out["ran"] = os.path.exists("/mnt/data/SO-RAN")
""")
    for how in ("cdll", "pydll", "ext"):
        got = result[how]
        assert refused(got), f"{how}: a library dropped in /mnt/data was loaded: {got!r}"
        assert "failed to map segment" in got[3] or "Operation not permitted" in got[3], got
    assert result["ran"] is False and not os.path.exists(os.path.join(kernel.data_dir, "SO-RAN"))
    kernel.run(f"import os\nfor n in ('evil.so', 'evilmod{ext}'):\n    os.unlink('/mnt/data/' + n)")
    recover(kernel)


@contextlib.contextmanager
def host_unix_listener(prefix: str):
    """A unix socket on the host that counts the connections it gets:
    yields (its path, the list of hits)."""
    import threading

    d = tempfile.mkdtemp(prefix=prefix)
    target = os.path.join(d, "host.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(target)
    srv.listen(4)
    srv.settimeout(0.2)
    hits, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            hits.append(1)
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield target, hits
    finally:
        stop.set()
        t.join(2)
        srv.close()
        shutil.rmtree(d, ignore_errors=True)


def test_cant_redirect_broker_through_runtime_symlink(kernel):
    """/run/kernel is the kernel's ipc folder, bound read-write from the
    host.  A symlink planted there (say k-3 -> a host unix socket) would be
    followed by the broker, as root, the next time a client connects: the
    kernel must not be able to put one there."""
    listener = contextlib.ExitStack()
    target, hits = listener.enter_context(host_unix_listener("cant-rt-"))
    rt = kernel.provisioner.rt_dir
    client = None
    try:
        result = probe(kernel, "import os\n" + TRY + f"""
out["new"] = attempt(lambda: os.symlink({target!r}, "/run/kernel/k-9"))
out["replace"] = attempt(lambda: os.symlink({target!r}, "/run/kernel/k-3.tmp"))
out["rename"] = attempt(lambda: os.rename("/run/kernel/k-3.tmp", "/run/kernel/k-3"))
out["file"] = attempt(lambda: os.close(os.open("/run/kernel/k-7", os.O_WRONLY | os.O_CREAT, 0o600)))
out["mkdir"] = attempt(lambda: os.mkdir("/run/kernel/k-6"))
out["list"] = sorted(os.listdir("/run/kernel"))
""")
        links = [n for n in os.listdir(rt) if os.path.islink(os.path.join(rt, n))]
        for step in ("new", "replace", "file", "mkdir"):
            assert refused(result[step]), f"{step} in /run/kernel succeeded: {result}"
        assert not links, f"symlinks planted in the kernel's runtime folder: {links}"
        assert result["list"] == [f"k-{i}" for i in range(1, 6)], result["list"]
        # A fresh client (what the broker does after a restart or a reconnect)
        # connects to the real sockets only.
        from jupyter_client.session import Session

        # Its own session id: a second client with the kernel manager's session
        # would take over the first one's socket identity.
        client = kernel.km.client(session=Session(key=kernel.km.session.key))
        client.start_channels()
        client.wait_for_ready(timeout=30)
        time.sleep(0.3)
        assert not hits, "the broker connected to a host socket through a planted symlink"
    finally:
        if client is not None:
            client.stop_channels()
        listener.close()
        for n in os.listdir(rt):
            p = os.path.join(rt, n)
            if os.path.islink(p) or n in ("k-6", "k-7", "k-9", "k-3.tmp"):
                (os.rmdir if os.path.isdir(p) and not os.path.islink(p) else os.unlink)(p)
    if sorted(os.listdir(rt)) != [f"k-{i}" for i in range(1, 6)]:
        restart(kernel)
    assert kernel.answers()


@pytest.mark.skipif(os.geteuid() != 0, reason="the nosymfollow runtime mount is made by a root broker")
def test_cant_redirect_broker_through_runtime_symlink_without_landlock(no_landlock_kernel):
    """Without Landlock the kernel can plant a symlink in /run/kernel; the
    runtime folder is a nosymfollow tmpfs, so a client connecting there (the
    broker, as root) still never reaches the socket the link names."""
    k = no_landlock_kernel
    listener = contextlib.ExitStack()
    target, hits = listener.enter_context(host_unix_listener("cant-rt-nl-"))
    rt = k.provisioner.rt_dir
    try:
        r = k.run(f"""
            import os
            os.symlink({target!r}, "/run/kernel/k-3.tmp")
            os.rename("/run/kernel/k-3.tmp", "/run/kernel/k-3")
            print(os.readlink("/run/kernel/k-3"))
        """)
        assert r.stdout.strip() == target, r     # the plant itself works without Landlock
        assert os.path.islink(os.path.join(rt, "k-3"))
        with pytest.raises(OSError) as exc:      # and is not followed on the host
            c = socket.socket(socket.AF_UNIX)
            try:
                c.connect(os.path.join(rt, "k-3"))
            finally:
                c.close()
        assert exc.value.errno == errno.ELOOP, exc.value
        from jupyter_client.session import Session

        client = k.km.client(session=Session(key=k.km.session.key))
        client.start_channels()
        try:
            client.wait_for_ready(timeout=30)
            time.sleep(0.3)
        finally:
            client.stop_channels()
        assert not hits, "a client connected to a host socket through a planted symlink"
    finally:
        listener.close()
    k.restart()
    assert k.answers()
