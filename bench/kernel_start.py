"""Kernel start -> ready: plain ipykernel (the anchor) against python3-sandbox.

"Ready" is what every jupyter_client caller waits for: ``start_kernel()``
returns, a client connects, and ``wait_for_ready()`` gets a ``kernel_info``
reply (and an IOPub message, as jupyter_client checks).  Both configurations
are driven through ``AsyncKernelManager`` over the ``ipc`` transport:

A  plain ipykernel: a temporary kernelspec whose argv is
   ``[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]``;
B  the installed ``python3-sandbox`` kernelspec (bubblewrap, seccomp, Landlock,
   cgroup, uid, quota image: the full sandbox provisioner).

Runs are interleaved (A B A B ...) after one untimed warm-up of each, so that
machine noise hits both alike.  The figure that matters is the ratio B/A of the
medians (target: <= 1.15).  Shutdown is not timed.

    python bench/kernel_start.py            # 15 runs each
    python bench/kernel_start.py --quick    # 4 runs each
    python bench/kernel_start.py --breakdown  # also time each stage of a sandbox start
    python bench/kernel_start.py --variant cgroups=off   # also B with other settings (C1, C2, ...)

``--breakdown`` then starts both again, interleaved, through temporary
kernelspecs that run each kernel's real entry point with timestamps around
its steps (interpreter up, kernel_profile boot and lockdown, ipykernel import,
kernel app initialised and started), and wraps the provisioner's host-side
steps (prerequisite checks, uid lease, quota image, cgroup, launch) from the
outside.  It prints the median of each stage for A and B side by side.  It
changes no product code.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

SANDBOX_KERNEL = "python3-sandbox"
PLAIN_KERNEL = "bench-plain-ipykernel"
TARGET_RATIO = 1.15
READY_TIMEOUT = 60


# -- statistics ---------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); with few runs p99 is
    close to the maximum."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "p99": percentile(values, 99),
            "min": min(values), "max": max(values)}


# -- environment ----------------------------------------------------------------

def versions() -> dict:
    import ipykernel
    import jupyter_client
    import zmq

    try:
        bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        bwrap = "not found"
    return {
        "python": platform.python_version(),
        "ipykernel": ipykernel.__version__,
        "jupyter_client": jupyter_client.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "bwrap": bwrap,
    }


def machine() -> dict:
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "arch": platform.machine(),
            "root": os.geteuid() == 0, "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def plain_kernelspec(root: str) -> KernelSpecManager:
    """A throw-away kernelspec for plain ipykernel, visible only to this run."""
    d = os.path.join(root, "kernels", PLAIN_KERNEL)
    os.makedirs(d)
    with open(os.path.join(d, "kernel.json"), "w") as fh:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "plain ipykernel (bench anchor)", "language": "python"}, fh)
    return KernelSpecManager(kernel_dirs=[os.path.join(root, "kernels")])


# -- one start ------------------------------------------------------------------

async def start_to_ready(km: AsyncKernelManager, log_file) -> float:
    """Seconds from start_kernel() to the kernel_info reply; always shuts down."""
    kc = None
    t0 = time.perf_counter()
    try:
        await km.start_kernel(stdout=log_file, stderr=log_file)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        return time.perf_counter() - t0
    finally:
        if kc is not None:
            kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)


class Runner:
    def __init__(self, tmp: str):
        self.tmp = tmp
        self.ksm = plain_kernelspec(tmp)
        self.count = 0

    def plain(self) -> AsyncKernelManager:
        self.count += 1
        # ipc socket paths in our temp folder, fresh per kernel.
        return AsyncKernelManager(kernel_name=PLAIN_KERNEL, kernel_spec_manager=self.ksm,
                                  transport="ipc", ip=os.path.join(self.tmp, f"ipc{self.count}"))

    def sandbox(self) -> AsyncKernelManager:
        return AsyncKernelManager(kernel_name=SANDBOX_KERNEL)


@contextmanager
def kernel_log(tmp: str):
    """Kernels' stdout/stderr go to a file, shown only if something fails."""
    path = os.path.join(tmp, "kernels.log")
    with open(path, "w+b") as fh:
        try:
            yield fh
        except BaseException:
            fh.flush()
            fh.seek(0)
            tail = fh.read().decode(errors="replace")[-4000:]
            print(f"--- last kernel output ({path}) ---\n{tail}", file=sys.stderr)
            raise


def variant_config(spec: str):
    """``"cgroups=off,quota=off"`` -> a traitlets Config for SandboxSettings."""
    from traitlets.config import Config

    cfg = Config()
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if not name or not _:
            raise SystemExit(f"--variant {spec!r}: use TRAIT=VALUE[,TRAIT=VALUE...] (SandboxSettings traits)")
        cfg.SandboxSettings[name.strip()] = value.strip()
    return cfg


async def measure(runs: int, variants: list[str] = (), log=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-kstart-") as tmp, kernel_log(tmp) as out:
        r = Runner(tmp)
        makers = {"A": r.plain, "B": r.sandbox}
        for i, spec in enumerate(variants):
            cfg = variant_config(spec)
            makers[f"C{i + 1}"] = lambda cfg=cfg: AsyncKernelManager(kernel_name=SANDBOX_KERNEL, config=cfg)
        warm = {key: await start_to_ready(make(), out) for key, make in makers.items()}
        log("warm-up (not counted): " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in warm.items()))
        times: dict[str, list[float]] = {key: [] for key in makers}
        for i in range(runs):
            for key, make in makers.items():
                times[key].append(await start_to_ready(make(), out))
            log(f"run {i + 1}/{runs}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in times.items()))
    labels = {"A": "A plain ipykernel (AsyncKernelManager, ipc)", "B": "B python3-sandbox (full sandbox)"}
    labels.update({f"C{i + 1}": f"C{i + 1} python3-sandbox with {spec}" for i, spec in enumerate(variants)})
    return {"warmup": warm, "runs": times, "labels": labels, **{k: summary(v) for k, v in times.items()}}


def table(result: dict) -> str:
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    rows = [("configuration", "runs", "median", "p99", "min", "max")]
    for key, label in result["labels"].items():
        x = result[key]
        rows.append((label, str(x["n"]), ms(x["median"]), ms(x["p99"]), ms(x["min"]), ms(x["max"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    a = result["A"]
    lines.append("")
    for key in result["labels"]:
        if key == "A":
            continue
        x = result[key]
        ratio = x["median"] / a["median"]
        line = f"ratio {key}/A: median {ratio:.2f}, p99 {x['p99'] / a['p99']:.2f}"
        if key == "B":
            line += f"   (target median <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'})"
        lines.append(line)
    return "\n".join(lines)


# -- breakdown: where the time goes, plain and sandbox side by side ----------------

# Code run with ``python -I -c`` in place of each kernel's own entry point.  It
# installs timestamps (time.time(): CLOCK_REALTIME is not namespaced, so the
# host can compare them with its own) and then runs the real entry point
# unchanged: kernel_profile.boot.main() for the sandbox, ipykernel_launcher's
# two lines for plain.  The timestamps go to BENCH_BOOT_TIMES (plain) or to
# /mnt/data/.bench-boot.json (the sandbox's environment is an allow-list).
_TIMER = r"""
import time
T = {"interpreter_up": time.time()}
import importlib.abc, importlib.util, json, os, sys

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ipykernel" and "ipykernel_import_start" not in T:
            T["ipykernel_import_start"] = time.time()
        if name != "ipykernel.kernelapp":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            T["ipykernel_imported"] = time.time()
            app = module.IPKernelApp
            init, start = app.initialize, app.start
            def initialize(self, *a, **k):
                T["app_initialize_start"] = time.time()
                return init(self, *a, **k)
            def start_(self, *a, **k):
                T["app_start"] = time.time()
                with open(os.environ.get("BENCH_BOOT_TIMES", "/mnt/data/.bench-boot.json"), "w") as fh:
                    json.dump(T, fh)
                return start(self, *a, **k)
            app.initialize, app.start = initialize, start_
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _Finder())
"""

_SANDBOX_MAIN = r"""
from kernel_profile import boot
T["boot_imported"] = time.time()
_lock_down = boot.lock_down
def lock_down(*a, **k):
    T["lockdown_start"] = time.time()
    try:
        return _lock_down(*a, **k)
    finally:
        T["lockdown_end"] = time.time()
boot.lock_down = lock_down
boot.main()
"""

_PLAIN_MAIN = r"""
from ipykernel import kernelapp as app
app.launch_new_instance()
"""

TIMED_PLAIN, TIMED_SANDBOX = "bench-plain-timed", "bench-sandbox-timed"


def timed_kernelspecs(root: str) -> KernelSpecManager:
    """Plain and python3-sandbox kernelspecs with their entry points timed."""
    sandbox = KernelSpecManager().get_kernel_spec(SANDBOX_KERNEL)
    argv = list(sandbox.argv)
    i = argv.index("-m")
    assert argv[i + 1] == "kernel_profile", argv
    argv[i:i + 2] = ["-c", _TIMER + _SANDBOX_MAIN]
    specs = {
        TIMED_SANDBOX: {"argv": argv, "display_name": "sandbox (timed)", "language": "python",
                        "interrupt_mode": sandbox.interrupt_mode, "metadata": sandbox.metadata},
        TIMED_PLAIN: {"argv": [sys.executable, "-c", _TIMER + _PLAIN_MAIN, "-f", "{connection_file}"],
                      "display_name": "plain (timed)", "language": "python",
                      "env": {"BENCH_BOOT_TIMES": os.path.join(root, "plain-boot.json")}},
    }
    for name, spec in specs.items():
        d = os.path.join(root, "kernels", name)
        os.makedirs(d)
        with open(os.path.join(d, "kernel.json"), "w") as fh:
            json.dump(spec, fh)
    return KernelSpecManager(kernel_dirs=[os.path.join(root, "kernels")])


@contextmanager
def host_stage_timers(stages: dict[str, float], marks: dict[str, float]):
    """Time the provisioner's host-side steps by wrapping what it calls."""
    import broker_seccomp
    from jupyter_client.provisioning import LocalProvisioner

    from broker.sandbox import bwrap, cgroups, identity, prereq, provisioner, volume

    patched = []

    def wrap(obj, name, label, mark=None):
        raw = obj.__dict__.get(name)
        if raw is None:
            return
        orig = getattr(obj, name)

        def add(t):
            stages[label] = stages.get(label, 0.0) + time.perf_counter() - t

        if inspect.iscoroutinefunction(orig):
            async def timed(*a, **k):
                if mark:
                    marks[mark] = time.time()
                t = time.perf_counter()
                try:
                    return await orig(*a, **k)
                finally:
                    add(t)
        else:
            def timed(*a, **k):
                t = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    add(t)
        setattr(obj, name, classmethod(lambda cls, *a, **k: timed(*a, **k)) if isinstance(raw, classmethod)
                else timed)
        patched.append((obj, name, raw))

    wrap(prereq, "check_all", "host: prerequisite checks (cached after a process's first start)")
    wrap(identity, "lease_uid", "host: uid lease")
    wrap(volume, "ensure", "host: quota image (mkfs.ext4 + loop mount)")
    wrap(volume, "mount_runtime", "host: runtime folder tmpfs (nosymfollow)")
    wrap(identity, "chown_tree", "host: chown of the data folder")
    wrap(cgroups, "detect", "host: cgroup detect")
    wrap(cgroups.Cgroup, "create", "host: cgroup create")
    wrap(broker_seccomp, "compile_profile", "host: seccomp compile (cached after the first start)")
    wrap(provisioner, "python_paths", "host: python_paths() (sys.path probe cached after the first start)")
    wrap(bwrap, "launch", "host: launch argv (bwrap.launch)")
    wrap(LocalProvisioner, "pre_launch", "host: LocalProvisioner.pre_launch (connection info)")
    wrap(provisioner.SandboxProvisioner, "pre_launch", "host: provisioner.pre_launch")
    wrap(LocalProvisioner, "launch_kernel", "host: provisioner.launch_kernel (Popen)", mark="popen")
    wrap(provisioner.SandboxProvisioner, "launch_kernel", "host: provisioner.launch_kernel (Popen)",
         mark="popen")
    try:
        yield
    finally:
        for obj, name, raw in reversed(patched):
            setattr(obj, name, raw)


def _clear_caches() -> None:
    """Empty the per-process caches a broker fills on its first start
    (prerequisite checks, compiled seccomp profiles, the kernel's sys.path)."""
    import broker_seccomp
    from broker.sandbox import prereq, provisioner

    for module in (prereq, provisioner, broker_seccomp):
        for name in dir(module):
            fn = getattr(module, name)
            if getattr(fn, "__module__", None) == module.__name__ and callable(getattr(fn, "cache_clear", None)):
                fn.cache_clear()


async def timed_start(km: AsyncKernelManager, out, times_file: str | None) -> dict:
    stages: dict[str, float] = {}
    marks: dict[str, float] = {}
    kc = None
    with host_stage_timers(stages, marks):
        try:
            t0_wall, t0 = time.time(), time.perf_counter()
            await km.start_kernel(stdout=out, stderr=out)
            stages["start_kernel() returns"] = time.perf_counter() - t0
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=READY_TIMEOUT)
            t_ready_wall = time.time()
            stages["TOTAL start -> ready"] = time.perf_counter() - t0
            path = times_file or os.path.join(km.provisioner.sandbox_data_dir, ".bench-boot.json")
            with open(path) as fh:
                t = json.load(fh)
        finally:
            if kc is not None:
                kc.stop_channels()
            if km.has_kernel:
                s = time.perf_counter()
                await km.shutdown_kernel(now=True)
                stages["shutdown_kernel(now=True), not part of start"] = time.perf_counter() - s
    stages["kernel: launch_kernel() -> interpreter's first line"] = t["interpreter_up"] - marks["popen"]
    if "boot_imported" in t:
        stages["kernel: import kernel_profile.boot"] = t["boot_imported"] - t["interpreter_up"]
        stages["kernel: lock_down (Landlock, seccomp, audit hook)"] = t["lockdown_end"] - t["lockdown_start"]
    stages["kernel: import ipykernel.kernelapp"] = t["ipykernel_imported"] - t["ipykernel_import_start"]
    stages["kernel: IPKernelApp.initialize"] = t["app_start"] - t["app_initialize_start"]
    stages["kernel: app.start() -> client has the kernel_info reply"] = t_ready_wall - t["app_start"]
    stages["_t0"] = t0_wall
    return stages


async def breakdown(runs: int, log=print) -> dict:
    out_runs: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="bench-kstart-") as tmp, kernel_log(tmp) as out:
        ksm = timed_kernelspecs(tmp)
        plain_times = os.path.join(tmp, "plain-boot.json")
        _clear_caches()  # the first sandbox start pays for the checks, as a fresh broker does
        first = await timed_start(AsyncKernelManager(kernel_name=TIMED_SANDBOX, kernel_spec_manager=ksm),
                                  out, None)
        log(f"breakdown first sandbox start (caches empty): {first['TOTAL start -> ready'] * 1000:.0f} ms")
        n = 0
        for i in range(runs):
            n += 1
            a = await timed_start(AsyncKernelManager(kernel_name=TIMED_PLAIN, kernel_spec_manager=ksm,
                                                     transport="ipc", ip=os.path.join(tmp, f"ipc{n}")),
                                  out, plain_times)
            b = await timed_start(AsyncKernelManager(kernel_name=TIMED_SANDBOX, kernel_spec_manager=ksm),
                                  out, None)
            out_runs["A"].append(a)
            out_runs["B"].append(b)
            log(f"breakdown run {i + 1}/{runs}: A {a['TOTAL start -> ready'] * 1000:.0f} ms, "
                f"B {b['TOTAL start -> ready'] * 1000:.0f} ms")
    return {"first_sandbox_start": first, "runs": out_runs,
            "host_interpreter_startup": interpreter_startup(sys.executable)}


def interpreter_startup(python: str, runs: int = 7) -> float:
    """fork + exec + init of ``python -I`` up to its first line, on the host."""
    out = []
    for _ in range(runs):
        t = time.time()
        r = subprocess.run([python, "-I", "-c", "import time; print(time.time())"], capture_output=True,
                           text=True, check=True)
        out.append(float(r.stdout) - t)
    return statistics.median(out)


def breakdown_table(result: dict) -> str:
    runs = result["runs"]
    keys: list[str] = []
    for row in runs["B"] + runs["A"]:
        keys += [k for k in row if not k.startswith("_") and k not in keys]
    order = lambda k: (k.startswith("TOTAL"), k.startswith("shutdown"), not k.startswith("host"))  # noqa: E731
    keys.sort(key=order)
    med = lambda key, rows: statistics.median(r[key] for r in rows) * 1000 if key in rows[0] else None  # noqa: E731
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    first = result["first_sandbox_start"]
    w = max(len(k) for k in keys)
    head = ("stage (ms, medians)", "A plain", "B sandbox", "B - A", "B 1st start")
    lines = [f"{head[0]:<{w}}  {head[1]:>8}  {head[2]:>9}  {head[3]:>7}  {head[4]:>11}",
             f"{'-' * w}  {'-' * 8}  {'-' * 9}  {'-' * 7}  {'-' * 11}"]
    for k in keys:
        a, b = med(k, runs["A"]), med(k, runs["B"])
        d = None if b is None else b - (a or 0.0)
        f1 = first.get(k)
        lines.append(f"{k:<{w}}  {fmt(a):>8}  {fmt(b):>9}  {fmt(d):>7}  {fmt(f1 and f1 * 1000):>11}")
    lines.append(f"(python -I fork+exec+init to its first line on the host, no kernel: "
                 f"{result['host_interpreter_startup'] * 1000:.1f} ms)")
    lines.append("Stages overlap the total only where they are sequential; 'host:' stages are inside "
                 "'start_kernel() returns'.")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15, help="timed runs of each configuration (default 15)")
    p.add_argument("--quick", action="store_true", help="4 runs each: a smoke run")
    p.add_argument("--breakdown", action="store_true", help="also time each stage of a sandbox start")
    p.add_argument("--variant", action="append", default=[], metavar="TRAIT=VALUE[,...]",
                   help="also measure python3-sandbox with these SandboxSettings (repeatable), "
                        "e.g. --variant cgroups=off")
    p.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    args = p.parse_args(argv)
    runs = 4 if args.quick else args.runs

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions(), "machine": machine()}
    print("kernel start -> ready (kernel_info reply), AsyncKernelManager, ipc transport")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print("machine:  " + ", ".join(f"{k} {v}" for k, v in info["machine"].items()))
    result = asyncio.run(measure(runs, args.variant))
    result["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    print(table(result))
    print(f"load average before {info['machine']['loadavg']}, after {result['loadavg_after']}")
    out = {**info, "kernel_start": result}
    if args.breakdown:
        print()
        bd = asyncio.run(breakdown(runs))
        print(breakdown_table(bd))
        out["breakdown"] = bd
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
