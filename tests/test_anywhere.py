"""The suite passes wherever the repository is cloned (issue 11, docs/testing.md).

A copy of this checkout goes under ``/tmp`` at a path with spaces in it, gets
an install of its own, and runs a representative subset of the suite there
through ``make test``: a sandboxed kernel started and executing code, a broker
session making tool calls, and the escape tests that once assumed the checkout
never lies under ``/tmp`` (which the sandbox covers with a tmpfs of its own).

To stay fast the copy's virtualenv is layered: a fresh ``venv`` (its own
interpreter, ``sys.prefix`` and console scripts) whose site-packages holds a
``.pth`` adding this checkout's installed dependencies, and an editable
install of the copy itself (``pip install --no-deps -e``).  So the copy runs
its own source, its own ``broker`` script (with pip's ``/bin/sh`` trampoline
for interpreters at paths with spaces) and its own kernelspec; only the
third-party packages are shared.  What this does not cover is downloading
and building the dependencies, which every CI run does in its own place.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A kernel start and execution (hook on and off), a broker session with Python
# and shell tool calls and a file upload, and the escape tests that depend on
# where the checkout lies.
SUBSET = [
    "tests/test_smoke.py",
    "tests/test_api_tools.py::test_seed_log_analysis_with_shell",
    "tests/test_api_files.py::test_upload_tool_base64_then_read_everywhere",
    "tests/test_cant_filesystem.py::test_cant_shadow_modules_across_restart",
    "tests/test_cant_filesystem.py::test_cant_read_broker_repo",
    "tests/test_cant_shell.py::test_cant_write_outside_data_from_shell",
    "tests/test_cant_shell.py::test_cant_read_host_secrets_from_shell",
    # The shell helper scrubs /tmp after each command; under a /tmp checkout
    # that /tmp holds the checkout's read-only binds, which it must keep
    # (it used to fail there and restart the sandbox after every command).
    "tests/test_cant_shell.py::test_cant_kill_or_read_the_shell_helper",
    "tests/test_sessions_inprocess.py::test_shell_commands_share_one_session_cgroup_left_empty",
]


def tracked_files(repo: str) -> list[str]:
    """The files of the working tree as a fresh clone would have them (tracked
    and new, not ignored), or every file but the virtualenvs without git."""
    if os.path.isdir(os.path.join(repo, ".git")) or os.path.isfile(os.path.join(repo, ".git")):
        out = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(repo, p))]
    names = []
    for root, dirs, files in os.walk(repo):
        dirs[:] = [d for d in dirs if not d.startswith((".venv", "build", "__pycache__")) and not d.endswith(".egg-info")]
        names += [os.path.relpath(os.path.join(root, f), repo) for f in files]
    return names


def copy_checkout(repo: str, dest: str) -> None:
    for rel in tracked_files(repo):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(repo, rel), target, follow_symlinks=False)


def layered_venv(dest: str) -> str:
    """A virtualenv in *dest*/.venv that sees this one's packages; returns its python."""
    venv = os.path.join(dest, ".venv")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Processed after the copy's own editable install ("__editable__..." sorts first).
    with open(os.path.join(site, "zz-layered-on-checkout.pth"), "w") as fh:
        fh.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-e", dest], check=True, cwd=dest, stdin=subprocess.DEVNULL)
    return python


def make_clone(parent: str, name: str) -> tuple[str, str]:
    """A copy of this checkout at *parent*/*name* with its layered virtualenv
    and its own kernelspec; returns (checkout, python)."""
    dest = os.path.join(parent, name)
    copy_checkout(REPO, dest)
    python = layered_venv(dest)
    subprocess.run([os.path.join(dest, ".venv", "bin", "broker"), "kernelspec", "install", "--sys-prefix"],
                   check=True, capture_output=True)
    return dest, python


def run_subset(dest: str, basetemp: str, tests: list[str] = SUBSET) -> subprocess.CompletedProcess:
    """``make test`` in the copy, on *tests* (the install stamp is made fresh,
    so make skips pip)."""
    open(os.path.join(dest, ".venv", ".installed-stamp"), "w").close()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "VIRTUAL_ENV", "PYTHON", "JUPYTER", "BROKER_"))}
    args = " ".join(tests) + " -p no:xdist -q --basetemp=" + shlex.quote(basetemp)
    return subprocess.run(["make", "-C", dest, "test", "PYTEST_XDIST=", f"PYTEST_ARGS={args}"], capture_output=True, text=True,
                          env=env, cwd=dest, stdin=subprocess.DEVNULL, timeout=900)


def remove(parent: str) -> None:
    """Unmount what a failed run left under *parent*, then remove it."""
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4].replace("\\040", " ") for line in fh]
    for p in sorted((p for p in points if p.startswith(parent + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True)
    shutil.rmtree(parent, ignore_errors=True)


# A long checkout path (pip writes a /bin/sh trampoline instead of a shebang
# for interpreters at paths with spaces or over 127 bytes).
LONG_NAME = "a checkout with spaces " + "and-a-long-name-" * 6


@pytest.fixture(scope="module")
def clone():
    if os.geteuid() != 0:
        pytest.skip("the subset's escape tests lease sandbox uids: run as root")
    # mkdtemp makes it root's, mode 0700: the sandbox uids cannot enter it.
    parent = tempfile.mkdtemp(prefix="broker clone ", dir="/tmp")
    try:
        yield parent, *make_clone(parent, LONG_NAME)
    finally:
        remove(parent)


def test_suite_subset_passes_in_a_clone_under_tmp_with_spaces(clone):
    parent, dest, python = clone
    assert dest.startswith("/tmp/") and " " in dest and len(dest) > 127, dest
    st = os.stat(parent)
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o700
    # The copy imports its own source and runs its own console script.
    where = subprocess.run([python, "-c", "import broker, kernel_profile; print(broker.__file__); "
                            "print(kernel_profile.__file__)"], capture_output=True, text=True, check=True, cwd=dest)
    assert where.stdout.split("\n")[:2] == [os.path.join(dest, "broker", "__init__.py"),
                                            os.path.join(dest, "kernel_profile", "__init__.py")], where.stdout
    with open(os.path.join(dest, ".venv", "bin", "broker"), "rb") as fh:
        assert fh.readline() == b"#!/bin/sh\n"  # pip's trampoline: a shebang cannot hold this path
    # Pytest's temp folder (the brokers' data roots) also under the 0700
    # parent, with a space, short enough for the kernels' ipc sockets.
    r = run_subset(dest, os.path.join(parent, "t t"))
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    summary = [line for line in r.stdout.splitlines() if " passed" in line]
    # Every case ran and passed: none skipped, none deselected.
    assert summary and not any(w in summary[-1] for w in ("failed", "error", "skipped", "deselected")), tail


if __name__ == "__main__":
    # By hand (docs/testing.md): python -m tests.test_anywhere PARENT [NAME [TEST...]]
    # copies the checkout to PARENT/NAME and runs the subset (or TEST...) there.
    parent = os.path.abspath(sys.argv[1])
    os.makedirs(parent, exist_ok=True)
    name = sys.argv[2] if len(sys.argv) > 2 else "checkout"
    dest, _ = make_clone(parent, name)
    # Pytest's temp folder holds the brokers' data roots, whose runtime folders
    # hold unix sockets (at most 107 bytes): next to the copy when that is short.
    basetemp = os.path.join(parent, "pt") if len(parent) < 40 else tempfile.mkdtemp(prefix="pt-anywhere-")
    r = run_subset(dest, basetemp, sys.argv[3:] or SUBSET)
    print(r.stdout[-6000:], r.stderr[-3000:])
    print("copy left at", dest)
    sys.exit(r.returncode)
