"""RunShellCommand of ``echo hi`` against a bare bwrap sandbox, in one run,
with a breakdown of where the product's launch spends its time.

Target (docs/PERFORMANCE.md): ``RunShellCommand`` of ``echo hi`` p50 <= 2 x a
bare ``bwrap ... true``-style sandbox.

The anchor (as root): ``setpriv`` to an unprivileged uid, then a minimal
bwrap -- ``--unshare-all --die-with-parent``, ``/usr`` bound read-only and the
``/lib``, ``/lib64``, ``/bin`` symlinks -- running ``/bin/bash -c "echo hi"``.
Every process target is started the same way, from this script's asyncio
loop: ``asyncio.create_subprocess_exec`` with stdout and stderr piped, stdin
from /dev/null, a new session, until the process has exited and both pipes
are drained.  Targets, interleaved in a random order each round:

  bare                  the anchor
  run_shell             broker.sandbox.shell.run_shell called directly (a data
                        folder owned by a leased sandbox uid; default settings)
  REST RunShellCommand  POST /api/sessions/{id}/tools/RunShellCommand on a real
                        ``broker serve`` (warm pool off), keep-alive session

and, for the breakdown, the product's launch chain built up one layer at a
time (argv from broker.sandbox.bwrap, the same as run_shell's; no product
code is changed):

  L1 setpriv + prlimit + minimal bwrap           (+ prlimit)
  L2 setpriv + prlimit + the product's bwrap     (+ its arguments: binds, tmpfs,
     argv (binds from empty staging folders)        /proc, /dev, memfd files,
                                                    seccomp, --as-pid-1, ...)
  L3 unshare + sh launcher + L2                   (+ unshare, sh; no binds)
  L4 unshare + sh + mount --bind x k + L2         (+ staging mounts) = the
                                                    product's argv, no cgroup
  L5 L4 + joining a fresh cgroup                  = run_shell's process
  S0 run_shell with cgroups=off                   (+ run_shell's Python)

Besides, per L5 sample: the cgroup creation (Cgroup.create) and the argv build
(bw.launch: memfds, the seccomp program), timed on their own; and at the end
a probe that times writing a pid into each controller's cgroup.procs of a
fresh group (what the launcher's ``echo $$ > ...`` does).

Two phases: [1] every sample preceded by a --gap sleep (0.1 s; calls spaced
as an agent makes them), [2] back to back.  They differ: on cgroup v1 the
first cgroup.procs write after a quiet spell waits for an RCU grace period
(cgroup_threadgroup_rwsem), later writes soon after are cheap.

    python bench/shell_command.py            # 200 rounds per phase
    python bench/shell_command.py --quick    # 20 rounds per phase
    python bench/shell_command.py --diagnose # + a broker with timing wrappers (REST stages)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _exec_common import summary  # noqa: E402
from _session_common import Broker, RestSession, env_info, machine_quiet, print_env  # noqa: E402

from broker.sandbox import bwrap as bw  # noqa: E402
from broker.sandbox import cgroups, identity, prereq  # noqa: E402
from broker.sandbox.provisioner import python_paths  # noqa: E402
from broker.sandbox.settings import SandboxSettings  # noqa: E402
from broker.sandbox.shell import SHELL_ENV, run_shell  # noqa: E402

TARGET = 2.0
CMD = "echo hi"
BARE = "bare: setpriv + minimal bwrap"
L1 = "L1 + prlimit"
L2 = "L2 + the product's bwrap argv"
L3 = "L3 + unshare + sh launcher"
L4 = "L4 + mount --bind staging (product argv)"
L5 = "L5 + cgroup join (run_shell's process)"
S0 = "S0 run_shell, cgroups=off"
RUN_SHELL = "run_shell (direct, fresh sandbox)"
HELPER = "run_shell via a session shell sandbox"
REST = "REST RunShellCommand"
REST_FRESH = "REST RunShellCommand, shell_helper off"
REST_DIAG = "REST, timing-launcher broker"
ORDER = [BARE, L1, L2, L3, L4, L5, S0, RUN_SHELL, HELPER, REST, REST_FRESH, REST_DIAG]

DIAG_WRAP = ["broker.tools:call_tool", "broker.tools:run_shell", "broker.tools:record",
             "broker.changes:ChangeTracker.begin", "broker.changes:ChangeTracker.end",
             "broker.sessions:Session.ensure_kernel",
             "broker.sandbox.cgroups:Cgroup.create", "broker.sandbox.bwrap:launch"]


async def spawn(argv: list[str], env: dict, fds: list[int] = ()) -> float:
    """Start, wait, drain; the seconds from just before the exec call to the end."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, pass_fds=list(fds), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True, cwd="/")
    for fd in fds:
        os.close(fd)
    out, err = await proc.communicate()
    dt = time.perf_counter() - t0
    if proc.returncode != 0 or out != b"hi\n":
        raise RuntimeError(f"{argv[:3]}...: exit {proc.returncode}, stdout {out!r}, stderr {err[-500:]!r}")
    return dt


class Shell:
    """Everything the process targets need: a leased uid, a data folder it
    owns (under a 0700 folder, like a session's), the tools."""

    def __init__(self):
        self.settings = SandboxSettings()
        self.bwrap = prereq.check_all(self.settings.bwrap)
        self.tools = prereq.check_root_tools()
        self.ident = identity.lease_uid(os.path.join(self.settings.state_dir, "uids"),
                                        self.settings.uid_range_start, self.settings.uid_range_size)
        self.root = tempfile.mkdtemp(prefix="bench-shell-", dir="/tmp")
        self.data = os.path.join(self.root, "data")
        os.makedirs(self.data, mode=0o700)
        os.chown(self.data, self.ident.uid, self.ident.gid)
        self.stage = os.path.join(self.settings.state_dir, "stage")
        os.makedirs(self.stage, mode=0o755, exist_ok=True)
        self.cg_version = cgroups.detect()
        self.side = {"cgroup create": [], "argv build (bw.launch)": []}
        s = self.settings
        self.rlimits = {"as": s.effective_address_space, "fsize": s.effective_file_size,
                        "nofile": s.open_files_limit, "core": 0, "nproc": s.pids_limit}
        self.setpriv = [self.tools["setpriv"], f"--reuid={self.ident.uid}", f"--regid={self.ident.gid}",
                        "--clear-groups", "--inh-caps=-all", "--"]
        self.prlimit = [self.tools["prlimit"]] + [f"--{k}={v}" for k, v in self.rlimits.items()] + ["--"]
        self.env = {"PATH": bw.LAUNCH_PATH}
        self.no_cg = SandboxSettings(cgroups="off")
        # As a session keeps them: one shell cgroup and one long-lived shell
        # sandbox (kept on this object as ``shell_sandbox``).
        self.shell_sandbox = None
        self.session_cg = (cgroups.Cgroup.create(f"sh-bench-{uuid.uuid4().hex[:12]}", self.settings.memory_limit,
                                                 self.settings.pids_limit, self.settings.cpu_limit, self.cg_version)
                           if self.cg_version else None)

    def close(self) -> None:
        if self.shell_sandbox is not None:
            self.shell_sandbox.close()
        if self.session_cg is not None:
            self.session_cg.remove()
        shutil.rmtree(self.root, ignore_errors=True)
        self.ident.release()

    # -- argv ------------------------------------------------------------------
    def minimal_bwrap(self) -> list[str]:
        a = [self.bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr"]
        for name in ("lib", "lib64", "bin", "sbin"):
            if os.path.islink(f"/{name}"):
                a += ["--symlink", os.readlink(f"/{name}"), f"/{name}"]
        return a + ["--", "/bin/bash", "-c", CMD]

    def spec(self) -> bw.SandboxSpec:
        import broker_seccomp

        s = self.settings
        return bw.SandboxSpec(command=["/bin/bash", "--noprofile", "--norc", "-c", CMD], data_dir=self.data,
                              env=dict(SHELL_ENV), ro_paths=python_paths(), tmp_size=s.tmp_size,
                              shm_size=s.shm_size, seccomp_fd=broker_seccomp.profile_fd("shell"))

    def product_bwrap(self) -> tuple[list[str], list[int], int]:
        """bw.build as bw.launch calls it, the staged sources pointing at the
        staging folders (empty outside the launcher's mount namespace)."""
        spec = self.spec()
        needs = [p for p in bw._dedupe(spec.ro_paths) + [spec.data_dir]
                 if not bw.reachable_by(p, self.ident.uid, self.ident.gid)]
        bw.ensure_stage_dirs(self.stage, len(needs))
        argv, fds = bw.build(spec, self.bwrap, {p: os.path.join(self.stage, str(i)) for i, p in enumerate(needs)})
        return argv, fds, len(needs)

    def product_launch(self, procs_files: list[str]) -> bw.Launch:
        t = time.perf_counter()
        launch = bw.launch(self.spec(), bwrap=self.bwrap, uid=self.ident.uid, gid=self.ident.gid, as_root=True,
                           rlimits=self.rlimits, procs_files=procs_files, stage_dir=self.stage, tools=self.tools)
        self.side["argv build (bw.launch)"].append(time.perf_counter() - t)
        return launch

    # -- targets -----------------------------------------------------------------
    async def bare(self) -> float:
        return await spawn(self.setpriv + self.minimal_bwrap(), self.env)

    async def l1(self) -> float:
        return await spawn(self.setpriv + self.prlimit + self.minimal_bwrap(), self.env)

    async def l2(self) -> float:
        argv, fds, _ = self.product_bwrap()
        return await spawn(self.setpriv + self.prlimit + argv, self.env, fds)

    async def l3(self) -> float:
        argv, fds, _ = self.product_bwrap()
        full = [self.tools["unshare"], "--mount", "--propagation", "private", "--", "/bin/sh", "-c", bw._LAUNCHER,
                "launch", self.stage, "0", "0", "--", *self.setpriv, *self.prlimit, *argv]
        return await spawn(full, self.env, fds)

    async def l4(self) -> float:
        launch = self.product_launch([])
        return await spawn(launch.argv, launch.env, launch.pass_fds)

    async def l5(self) -> float:
        s = self.settings
        t = time.perf_counter()
        cg = cgroups.Cgroup.create(f"sh-bench-{uuid.uuid4().hex[:12]}", s.memory_limit, s.pids_limit, s.cpu_limit,
                                   self.cg_version)
        self.side["cgroup create"].append(time.perf_counter() - t)
        try:
            launch = self.product_launch(cg.procs_files)
            return await spawn(launch.argv, launch.env, launch.pass_fds)
        finally:
            cg.remove()

    async def _run_shell(self, settings, **kwargs) -> float:
        t0 = time.perf_counter()
        r = await run_shell(CMD, self.data, settings, timeout=60, **kwargs)
        dt = time.perf_counter() - t0
        if r.exit_code != 0 or r.stdout != "hi\n":
            raise RuntimeError(f"run_shell: {r}")
        return dt

    async def s0(self) -> float:
        return await self._run_shell(self.no_cg)

    async def run_shell(self) -> float:
        return await self._run_shell(self.settings)

    async def helper(self) -> float:
        return await self._run_shell(self.settings, cgroup=self.session_cg, helper_host=self)


class RestShell:
    def __init__(self, broker: Broker):
        self.session = RestSession(broker)

    def once(self) -> float:
        t0 = time.perf_counter()
        r = self.session.tool("RunShellCommand", {"command": CMD})
        dt = time.perf_counter() - t0
        if r.get("exit_code") != 0 or r.get("stdout") != "hi\n":
            raise RuntimeError(f"RunShellCommand: {str(r)[:300]}")
        return dt


def diag_lines(calls: list[dict], n_calls: int) -> list[str]:
    by: dict[str, list[float]] = {}
    for c in calls:
        by.setdefault(c["fn"], []).append(c["dur"] * 1e3)
    labels = [("broker.tools:call_tool", "call_tool (the tool handler, whole)"),
              ("broker.sessions:Session.ensure_kernel", "  Session.ensure_kernel (is the kernel alive)"),
              ("broker.changes:ChangeTracker.begin", "  ChangeTracker.begin (changes: start)"),
              ("broker.changes:ChangeTracker.end", "  ChangeTracker.end (changes: what the call changed)"),
              ("broker.tools:run_shell", "  run_shell"),
              ("broker.sandbox.cgroups:Cgroup.create", "    Cgroup.create"),
              ("broker.sandbox.bwrap:launch", "    bw.launch (argv build)"),
              ("broker.tools:record", "  record (queue the transcript cell)")]
    lines = [f"\nREST stages inside the timing-launcher broker ({n_calls} calls; p50 / p99 ms):"]
    for fn, label in labels:
        v = by.get(fn, [])
        if v:
            lines.append(f"  {label:<48} {statistics.median(v):7.2f} / {summary(v)['p99']:7.2f}  (n {len(v)})")
    return lines


def run_phase(targets: dict, n: int, gap: float, loop, seed: int) -> dict:
    """n rounds; each runs every target once in a fresh random order, with
    *gap* seconds of sleep before every sample."""
    import random

    rng = random.Random(seed)
    names = list(targets)
    times = {name: [] for name in names}
    for _ in range(n):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if gap:
                time.sleep(gap)
            fn = targets[name]
            times[name].append(loop.run_until_complete(fn()) if asyncio.iscoroutinefunction(fn) else fn())
    return times


def attach_probe(sh: Shell, runs: int, gap: float) -> dict:
    """Writing a pid into a fresh group's cgroup.procs files (what the
    launcher's ``echo $$ > ...`` does), each file timed: create the group,
    start ``sleep``, write its pid into every controller's file in turn."""
    import subprocess

    s = sh.settings
    out: dict[str, list[float]] = {}
    for i in range(runs):
        time.sleep(gap)
        cg = cgroups.Cgroup.create(f"sh-bench-{uuid.uuid4().hex[:12]}", s.memory_limit, s.pids_limit, s.cpu_limit,
                                   sh.cg_version)
        p = subprocess.Popen(["sleep", "30"])
        try:
            files = cg.procs_files if i % 2 == 0 else list(reversed(cg.procs_files))
            for j, f in enumerate(files):
                t = time.perf_counter()
                with open(f, "w") as fh:
                    fh.write(str(p.pid))
                dt = time.perf_counter() - t
                out.setdefault(f"write #{j + 1}", []).append(dt)
                out.setdefault(f"controller {f.split('/')[4]}", []).append(dt)
        finally:
            p.kill()
            p.wait()
            cg.remove()
    return out


def table(title: str, times: dict, k: int) -> tuple[dict, list[str]]:
    stats = {name: summary(v) for name, v in times.items()}
    bare = stats[BARE]["median"]
    lines = [title, f"{'target':<44} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'min ms':>8} {'x bare':>7} {'step ms':>8}"]
    prev = None
    for name in ORDER:
        if name not in stats:
            continue
        s = stats[name]
        step = ""
        if name in (L1, L2, L3, L4, L5, S0):
            step = f"{(s['median'] - stats[prev]['median']) * 1e3:+8.2f}"
        elif name == RUN_SHELL:
            step = f"{(s['median'] - stats[L5]['median']) * 1e3:+8.2f}"
        elif name == REST and HELPER in stats:
            step = f"{(s['median'] - stats[HELPER]['median']) * 1e3:+8.2f}"
        elif name == REST_FRESH:
            step = f"{(s['median'] - stats[RUN_SHELL]['median']) * 1e3:+8.2f}"
        lines.append(f"{name:<44} {s['n']:>5} {s['median'] * 1e3:>8.2f} {s['p99'] * 1e3:>8.2f} {s['min'] * 1e3:>8.2f} "
                     f"{s['median'] / bare:>7.2f} {step:>8}")
        prev = L4 if name == L5 else name
    lines.append("(step: p50 minus the row above; L5 and S0 against L4, run_shell against L5, REST against "
                 "the session shell sandbox, REST with shell_helper off against run_shell (fresh).  The product's "
                 f"bwrap argv stages {k} host paths.)")
    for name in (REST, HELPER, REST_FRESH, RUN_SHELL):
        if name not in stats:
            continue
        r = stats[name]["median"] / bare
        lines.append(f"{name} / bare p50: {r:.2f} (p99 {stats[name]['p99'] / stats[BARE]['p99']:.2f}); "
                     f"target <= {TARGET}: {'PASS' if r <= TARGET else 'FAIL'}")
    return stats, lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20 rounds per phase instead of 200")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--gap", type=float, default=0.1, help="sleep before every sample in phase 1 (default 0.1 s)")
    p.add_argument("--diagnose", action="store_true",
                   help="also a REST target on a broker started through the timing launcher, with its stages")
    p.add_argument("--json", default="", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    n = args.rounds or (20 if args.quick else 200)
    warmup = 5

    if os.geteuid() != 0:
        print("shell_command.py measures the root launch chain (setpriv, staging mounts): run it as root")
        return 1
    info = env_info()
    print_env(f"shell_command: {n} rounds of every target per phase, each round in a random order ({warmup} "
              f"warm-up rounds first); phase 1 sleeps {args.gap:g} s before every sample (calls spaced as an "
              "agent makes them), phase 2 runs them back to back", info)
    print("before: " + machine_quiet(), flush=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sh = Shell()
    brokers, diag_broker = [], None
    try:
        broker = Broker(0).start()
        brokers.append(broker)
        rest = RestShell(broker)
        fresh_broker = Broker(0, "--SandboxProvisioner.shell_helper=False").start()
        brokers.append(fresh_broker)
        targets = {BARE: sh.bare, L1: sh.l1, L2: sh.l2, L3: sh.l3, L4: sh.l4, L5: sh.l5, S0: sh.s0,
                   RUN_SHELL: sh.run_shell, HELPER: sh.helper, REST: rest.once,
                   REST_FRESH: RestShell(fresh_broker).once}
        if args.diagnose:
            diag_broker = Broker(0, wrap=DIAG_WRAP).start()
            brokers.append(diag_broker)
            targets[REST_DIAG] = RestShell(diag_broker).once
        _, fds, k = sh.product_bwrap()
        for fd in fds:
            os.close(fd)
        run_phase(targets, warmup, 0, loop, 0)
        t_measured = time.time()
        sh.side = {key: [] for key in sh.side}
        spaced = run_phase(targets, n, args.gap, loop, 1)
        side = {name: summary(v) for name, v in sh.side.items() if v}
        back = run_phase(targets, n, 0, loop, 2)
        probe = attach_probe(sh, 10 if args.quick else 40, args.gap)
        # Only the calls of the timed phases (not the session's kernel start).
        calls = [c for c in diag_broker.timings() if c["start"] >= t_measured] if diag_broker is not None else []
    finally:
        for b in brokers:
            b.stop()
        sh.close()
        loop.run_until_complete(asyncio.sleep(0.2))     # let the shell sandbox's transports close
        loop.close()

    s1, lines1 = table(f"\n[1] spaced: {args.gap:g} s before every sample", spaced, k)
    s2, lines2 = table("\n[2] back to back", back, k)
    print("\n".join(lines1))
    for name, s in side.items():
        print(f"  (phase 1) {name:<32} p50 {s['median'] * 1e3:.2f} ms, p99 {s['p99'] * 1e3:.2f} ms")
    print("\n".join(lines2))
    print(f"\ncgroup join probe ({len(probe['write #1'])} fresh groups, {args.gap:g} s apart; a pid written into each "
          "controller's cgroup.procs in turn, order alternating):")
    pstats = {name: summary(v) for name, v in probe.items()}
    for name, s in pstats.items():
        print(f"  {name:<22} p50 {s['median'] * 1e3:6.2f} ms, p99 {s['p99'] * 1e3:6.2f} ms")
    lines = diag_lines(calls, len(spaced.get(REST_DIAG, [])) + len(back.get(REST_DIAG, []))) if calls else []
    if lines:
        print("\n".join(lines))
    print("after: " + machine_quiet())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"versions": info, "rounds": n, "gap": args.gap,
                       "spaced": {"stats": s1, "times": spaced, "side": side},
                       "back_to_back": {"stats": s2, "times": back}, "attach_probe": pstats,
                       "diagnose": lines}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
