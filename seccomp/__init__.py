"""The sandbox's syscall policies, as reviewed data, and their compiler.

The profiles live beside this file as JSON (``common.json``, ``kernel.json``,
``shell.json``): each rule names the syscalls, the action, the argument
comparisons and *why*.  :func:`compile_profile` turns a profile into a
classic-BPF program with libseccomp (through ``pyseccomp``, a small ctypes
binding over the system's ``libseccomp2``; see ``docs/security.md``).

The compiled program is what leaves the broker: bwrap takes the shell
profile with ``--seccomp FD``, and the kernel's boot script loads the kernel
profile with ``seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC)``,
so nothing inside the sandbox needs libseccomp or a ``find_library`` call.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROFILES = ("kernel", "shell")

# Symbolic names a profile may use.  Values are Linux x86_64/aarch64 ABI
# constants (identical on both).
CONSTANTS = {
    "CLONE_THREAD": 0x00010000,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "AF_UNIX": 1,
    "AF_INET": 2,
    "AF_INET6": 10,
    "AF_NETLINK": 16,
    "AF_PACKET": 17,
    "NETLINK_ROUTE": 0,
    "TIOCSTI": 0x5412,
    "TIOCLINUX": 0x541C,
}


class ProfileError(ValueError):
    """A profile file is malformed; the message names the file and the rule."""


def load_profile(name: str) -> dict:
    """Load a profile and the profiles it includes, rules in order."""
    path = HERE / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"no seccomp profile {name!r} (looked for {path})") from None
    rules = []
    for inc in data.get("include", []):
        rules.extend(load_profile(inc)["rules"])
    rules.extend(data.get("rules", []))
    data["rules"] = rules
    return data


def _value(v, where: str) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        if v in CONSTANTS:
            return CONSTANTS[v]
        try:
            return int(v, 0)
        except ValueError:
            pass
    raise ProfileError(f"{where}: unknown value {v!r} (use an integer or one of {sorted(CONSTANTS)})")


def _action(sc, text: str, where: str) -> int:
    if text == "allow":
        return sc.ALLOW
    if text == "kill_process":
        return sc.KILL_PROCESS
    if text.startswith("errno:"):
        name = text.split(":", 1)[1]
        code = getattr(errno, name, None)
        if code is None:
            raise ProfileError(f"{where}: unknown errno {name!r}")
        return sc.ERRNO(code)
    raise ProfileError(f"{where}: unknown action {text!r} (allow, kill_process, errno:NAME)")


def _arg_variants(sc, args: list, where: str) -> list[list]:
    """Expand a rule's argument list into one or more lists of ``sc.Arg``.

    ``each_of: "A..B"`` stands for one rule per value, since libseccomp allows
    only one comparison per argument in a rule.
    """
    ops = {"eq": sc.EQ, "ne": sc.NE, "lt": sc.LT, "le": sc.LE, "gt": sc.GT, "ge": sc.GE,
           "masked_eq": sc.MASKED_EQ}
    variants: list[list] = [[]]
    for a in args:
        op = ops.get(a.get("op"))
        if op is None:
            raise ProfileError(f"{where}: unknown op {a.get('op')!r} (one of {sorted(ops)})")
        index = a["index"]
        if "each_of" in a:
            lo, hi = (int(x) for x in a["each_of"].split(".."))
            values = list(range(lo, hi + 1))
            variants = [v + [sc.Arg(index, op, x)] for v in variants for x in values]
        elif op == sc.MASKED_EQ:
            mask = _value(a["mask"], where)
            variants = [v + [sc.Arg(index, op, mask, _value(a["value"], where))] for v in variants]
        else:
            variants = [v + [sc.Arg(index, op, _value(a["value"], where))] for v in variants]
    return variants


def build_filter(name: str):
    """A ``pyseccomp.SyscallFilter`` for profile *name*, not yet loaded."""
    import pyseccomp as sc

    profile = load_profile(name)
    f = sc.SyscallFilter(defaction=_action(sc, profile.get("default_action", "allow"), name))
    f.set_attr(sc.Attr.ACT_BADARCH, _action(sc, profile.get("bad_arch_action", "kill_process"), name))
    for i, rule in enumerate(profile["rules"]):
        where = f"seccomp profile {name!r}, rule {i} ({', '.join(rule.get('syscalls', []))})"
        action = _action(sc, rule["action"], where)
        for args in _arg_variants(sc, rule.get("args", []), where):
            for syscall in rule["syscalls"]:
                try:
                    f.add_rule(action, syscall, *args)
                except (OSError, ValueError) as exc:
                    # Syscalls this architecture does not have (e.g. _sysctl,
                    # uselib on aarch64) are skipped; anything else is a bug.
                    if "resolve" in str(exc).lower() or getattr(exc, "errno", None) in (errno.EFAULT,):
                        continue
                    raise ProfileError(f"{where}: libseccomp refused the rule: {exc}") from exc
    return f


@functools.lru_cache(maxsize=None)
def compile_profile(name: str) -> bytes:
    """The profile as a classic-BPF program (``struct sock_filter`` array)."""
    f = build_filter(name)
    with tempfile.TemporaryFile() as fh:
        f.export_bpf(fh)
        fh.seek(0)
        return fh.read()


def export_pfc(name: str) -> str:
    """The profile in libseccomp's human-readable pseudo-filter-code form, for review."""
    f = build_filter(name)
    with tempfile.TemporaryFile("w+") as fh:
        f.export_pfc(fh)
        fh.seek(0)
        return fh.read()


def profile_fd(name: str) -> int:
    """A sealed-ish memfd holding the compiled program, positioned at 0, for bwrap's --seccomp."""
    data = compile_profile(name)
    fd = os.memfd_create(f"seccomp-{name}", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
