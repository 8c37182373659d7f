"""The kernel provisioner: jupyter_client's seam for the sandbox.

Registered as ``sandbox-provisioner`` in ``jupyter_client.kernel_provisioners``
and named by the ``python3-sandbox`` kernelspec, so ``KernelManager``, nbclient,
papermill and the broker all get the same locked-down kernel from the same
code.

What a caller passes is honoured where it can be without weakening the
sandbox (docs/kernelspec.md): the interpreter the kernelspec names (probed
with ``-I`` for its own prefix and paths), ``extra_arguments`` through an
allow-list, and the working folder (``cwd``) as a read-only view.

Per kernel it owns: a runtime folder for the ZeroMQ ``ipc`` sockets (bound at
``/run/kernel``; paths stable across restarts), the data folder (bound at
``/mnt/data``), a uid lease (as root), a cgroup, and the quota volume when it
created one.  ``cleanup(restart=False)`` releases all of them.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import fcntl
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Any, Callable

from jupyter_client.provisioning import LocalProvisioner
from traitlets import CaselessStrEnum, Float, Unicode

from broker.errors import SandboxError, SandboxUnavailable
from broker.sandbox import bwrap as bw
from broker.sandbox import cgroups, identity, prereq, volume
from broker.sandbox.settings import SandboxSettings

KERNEL_RT = "/run/kernel"
IPC_NAME = "k"
PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "hb_port": 4, "control_port": 5}
SUN_PATH_MAX = 107

# Passed through from the broker's environment when set: older OpenBLAS
# builds crash on some processors without them.
PASSTHROUGH_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def kernel_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The kernel's whole environment: an allow-list, nothing inherited."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "USER": "sandbox",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": "/tmp",
        "IPYTHONDIR": "/tmp/.ipython",
        "MPLCONFIGDIR": "/tmp/.config/matplotlib",
        "XDG_CACHE_HOME": "/tmp/.cache",
        "XDG_CONFIG_HOME": "/tmp/.config",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "BROKER_FIGURE_AUTOSHOW": "1",      # SandboxSettings.figure_autoshow (profile_env)
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    for k in PASSTHROUGH_ENV:
        if k in os.environ:
            env[k] = os.environ[k]
    env.update(extra or {})
    return env


@functools.lru_cache(maxsize=1)
def _isolated_sys_path() -> tuple[str, ...]:
    """``sys.path`` as ``python -I`` (the kernel's interpreter) builds it: the
    standard library, site-packages and what their ``.pth`` files add.  Not
    this process's own ``sys.path``, which also holds the script folder, the
    working directory (``python -m``), ``PYTHONPATH`` and runtime insertions
    (pytest's rootdir): binding those would show the sandbox the broker's
    checkout, its configuration or whatever folder it was started from."""
    try:
        out = subprocess.run([sys.executable, "-I", "-c", "import sys, json; print(json.dumps(sys.path))"],
                             capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
                             cwd="/", check=True).stdout
        return tuple(json.loads(out))
    except (OSError, ValueError, subprocess.SubprocessError):
        return ()


# What the provisioner learns from the kernelspec's interpreter, run with -I
# (as the kernel will be): its prefixes, its isolated sys.path and where its
# kernel_profile is.  Nothing of the caller's own environment is used.
_PROBE = ("import json, os, sys, kernel_profile; print(json.dumps({'prefix': sys.prefix, "
          "'base_prefix': sys.base_prefix, 'executable': sys.executable, 'path': sys.path, "
          "'profile': os.path.dirname(os.path.abspath(kernel_profile.__file__))}))")


@functools.lru_cache(maxsize=8)
def _probe_interpreter(python: str, timeout: float) -> dict:
    try:
        out = subprocess.run([python, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                             env={"PATH": "/usr/bin:/bin"}, cwd="/")
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"the kernelspec's interpreter {python} did not answer within {timeout:g} s "
                           "(SandboxProvisioner.startup_timeout)") from exc
    except OSError as exc:
        raise SandboxError(f"the kernelspec's interpreter {python} cannot be run: {exc}. "
                           "Fix argv[0] of the kernelspec (broker kernelspec install)") from exc
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or [f"exit status {out.returncode}"]
        raise SandboxError(f"the kernelspec's interpreter {python} cannot import kernel_profile ({tail[0]}). "
                           "Install the broker (with its 'kernel' extra) into that environment, or "
                           "reinstall the kernelspec from the environment that has it")
    return json.loads(out.stdout)


def _bindable_import_path(p: str) -> bool:
    """Whether an entry of the interpreter's sys.path is bound into the
    sandbox.  /usr is bound whole already; the host's /tmp and /var/tmp
    themselves are never shown (the sandbox has a /tmp of its own), but a
    folder below them is: a virtualenv, a layered environment or a .pth
    entry in a checkout under /tmp must still be importable inside."""
    if not p or not os.path.isabs(p) or not os.path.isdir(p):
        return False
    p = os.path.normpath(p)
    if p in ("/", "/usr", "/tmp", "/var", "/var/tmp", "/dev", "/proc", "/run") or p.startswith("/usr/"):
        return False
    return True


def interpreter_paths(python: str, timeout: float = 30) -> tuple[str, list[str]]:
    """The absolute interpreter and the host paths it needs inside the
    sandbox (bound read-only at the same paths): its prefix, base prefix,
    the folder of the real executable, its isolated sys.path and its
    kernel_profile package."""
    exe = python if os.path.isabs(python) else shutil.which(python)
    if not exe:
        raise SandboxError(f"the kernelspec's interpreter {python!r} is not on PATH; "
                           "use an absolute path in argv[0] of the kernelspec")
    info = _probe_interpreter(exe, timeout)
    paths = {info["prefix"], info["base_prefix"], os.path.dirname(os.path.realpath(exe)),
             os.path.dirname(os.path.realpath(info["executable"])), info["profile"]}
    for p in info["path"]:
        if _bindable_import_path(p):
            paths.add(p)
    return exe, sorted(paths)


# --- extra_arguments: IPython and ipykernel options that may pass ------------------
# Everything else is refused: connection and transport options (the provisioner
# owns them), configuration and profile locations (the profile is read-only
# by design), the kernel class, and anything the boot script itself reads.
ALLOWED_FLAGS = frozenset({
    "--debug", "--quiet", "--pprint", "--no-pprint", "--color-info", "--no-color-info", "--autoindent",
    "--no-autoindent", "--automagic", "--no-automagic", "--pdb", "--no-pdb", "--nosep", "--matplotlib",
    "--pylab", "--no-stdout", "--no-stderr", "--ignore-cwd", "--no-ignore-cwd",
})
ALLOWED_ALIASES = frozenset({
    "--log-level", "--matplotlib", "--pylab", "--gui", "--colors", "--theme", "--autocall", "--cache-size",
    "--ext", "-c", "-m", "--logfile", "--logappend", "--user",
})
# --Class.trait=value for these classes (all traits), and for a few traits of
# the applications (not their connection, config or class settings).
ALLOWED_CLASSES = frozenset({
    "InteractiveShell", "ZMQInteractiveShell", "HistoryManager", "HistoryAccessor", "IPythonKernel",
    "Kernel", "InlineBackend", "PlainTextFormatter", "DisplayFormatter", "IPCompleter", "Completer",
    "StoreMagics", "MagicsManager", "PrefilterManager", "Inspector",
})
ALLOWED_APP_TRAITS = frozenset({
    "log_level", "log_format", "log_datefmt", "quiet", "no_stdout", "no_stderr", "matplotlib", "pylab", "gui",
    "exec_lines", "extensions", "extra_extensions", "code_to_run", "module_to_run", "hide_initial_ns",
    "ignore_cwd", "pylab_import_all", "capture_fd_output", "trio_loop",
})
ALLOWED_APPS = frozenset({"IPKernelApp", "InteractiveShellApp", "BaseIPythonApplication", "Application"})
_TRAIT_ARG = re.compile(r"^--([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")


def _option_allowed(name: str) -> bool:
    m = _TRAIT_ARG.match(name)
    if m:
        cls, trait = m.groups()
        return cls in ALLOWED_CLASSES or (cls in ALLOWED_APPS and trait in ALLOWED_APP_TRAITS)
    return name in ALLOWED_FLAGS or name in ALLOWED_ALIASES


def check_extra_arguments(args) -> list[str]:
    """*args* as they will reach ipykernel, or ValueError naming the first one
    refused.  Options take their value as ``--opt=value`` or as the next
    argument; nothing positional passes."""
    if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
        raise ValueError(f"extra_arguments must be a list of strings, not {args!r}")
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, _value = arg.partition("=")
        takes_value = name in ALLOWED_ALIASES or bool(_TRAIT_ARG.match(name))
        if not name.startswith("-") or not _option_allowed(name) or (eq and not takes_value):
            raise ValueError(
                f"extra_arguments: {arg!r} is not allowed for the sandboxed kernel. Allowed: the "
                f"IPython/ipykernel options {', '.join(sorted(ALLOWED_FLAGS | ALLOWED_ALIASES))}, "
                f"--Class.trait=value for {', '.join(sorted(ALLOWED_CLASSES))}, and "
                f"--IPKernelApp.<trait>=value for {', '.join(sorted(ALLOWED_APP_TRAITS))}. Connection, "
                "transport, configuration-file, profile and kernel-class options are set by the sandbox "
                "(docs/kernelspec.md, 'Arguments')")
        out.append(arg)
        if takes_value and not eq and name not in ALLOWED_FLAGS:
            if i + 1 >= len(args):
                raise ValueError(f"extra_arguments: {arg!r} needs a value ({arg}=VALUE)")
            out.append(args[i + 1])
            i += 1
        i += 1
    return out


# --- the working folder --------------------------------------------------------------
NOTEBOOK_VIEW = "/mnt/notebook"
# Never shown, nor anything above them: the whole host, its system and
# pseudo file systems, and folders that hold other kernels' or the broker's state.
_SYSTEM_TREES = ("/proc", "/sys", "/dev", "/run", "/boot", "/etc", "/var/run", "/var/lib")


def _homes() -> set[str]:
    homes = {os.path.expanduser("~")}
    try:
        homes |= {p.pw_dir for p in pwd.getpwall() if p.pw_dir and p.pw_dir != "/"}
    except OSError:
        pass
    return {os.path.realpath(h) for h in homes if h}


def unshareable_reason(folder: str, protected: list[str]) -> str | None:
    """Why *folder* (a real path) must not be shown to the sandbox, or None.
    *protected*: folders that must stay hidden, with everything above them."""
    if not os.path.isdir(folder):
        return "it is not a folder"
    if folder == "/":
        return "it is the host's root folder"
    for tree in _SYSTEM_TREES:
        if folder == tree or folder.startswith(tree + "/"):
            return f"it is a system folder ({tree})"
    homes = _homes()
    if folder in homes:
        return "it is a home folder"
    for path in sorted(homes) + [os.path.realpath(p) for p in protected if p]:
        if path == folder or path.startswith(folder + "/"):
            return f"it holds {path}"
    return None


def enterable_by(folder: str, uid: int, gid: int) -> bool:
    """Can *uid* (no supplementary groups) list and enter *folder* itself?
    (bwrap.reachable_by answers for the path leading to it.)"""
    st = os.stat(folder)
    if st.st_uid == uid:
        bits = stat.S_IRUSR | stat.S_IXUSR
    elif st.st_gid == gid:
        bits = stat.S_IRGRP | stat.S_IXGRP
    else:
        bits = stat.S_IROTH | stat.S_IXOTH
    return st.st_mode & bits == bits


def _run_in_own_thread(fn: Callable, *args) -> asyncio.Future:
    """Run *fn* in a thread of its own and return an awaitable for its result.

    Not the event loop's default executor: a process forked after that pool
    started (nbclient's parallel runs, papermill in a ProcessPoolExecutor
    with the fork start method) inherits the pool without its threads, and
    a job handed to it never runs."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def done(result=None, exc=None):
        if fut.cancelled():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def run():
        try:
            outcome = (fn(*args), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(done, *outcome)
        except RuntimeError:
            pass  # the loop is gone (the caller gave up after startup_timeout)

    threading.Thread(target=run, name="sandbox-prepare", daemon=True).start()
    return fut


OWN_ROOT_PREFIX = "broker-kernel-"


def sweep_stale_roots(tools: dict) -> list[str]:
    """Remove temporary kernel folders whose kernel is gone without a clean
    shutdown (a client that exited, a killed process): unmount what is
    mounted there, remove its cgroup, delete the folder.  A folder is stale
    when nobody holds its ``.lock``."""
    removed = []
    cgroups.sweep_empty()
    tmp = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(OWN_ROOT_PREFIX)]
    except OSError:
        return removed
    for name in names:
        root = os.path.join(tmp, name)
        lock = os.path.join(root, ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if prereq.is_root():
                for sub in ("data", "rt"):
                    volume.unmount(os.path.join(root, sub), tools)
            try:
                with open(os.path.join(root, ".kernel-id")) as fh:
                    kid = fh.read().strip()
                if kid:
                    cgroups.remove_named(f"k-{kid}")
            except OSError:
                pass
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
        finally:
            os.close(fd)
    return removed


_KERNEL_VAR = re.compile(r"^KERNEL_[A-Z0-9_]{1,64}$")


def safe_kernel_vars(env: dict) -> dict[str, str]:
    """Only KERNEL_* names with short printable values; never anything that
    could change how the sandbox or Python behaves."""
    out = {}
    for k, v in env.items():
        if isinstance(k, str) and isinstance(v, str) and _KERNEL_VAR.match(k) and len(v) <= 256 and v.isprintable():
            out[k] = v
    return out


def python_paths() -> list[str]:
    """Host paths the kernel's Python needs, bound read-only at the same paths."""
    paths = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    import kernel_profile

    paths.add(os.path.dirname(os.path.abspath(kernel_profile.__file__)))
    for p in _isolated_sys_path():
        if _bindable_import_path(p):
            paths.add(p)
    return sorted(paths)


PR_SET_MEMORY_MERGE = 67
ADDR_NO_RANDOMIZE = 0x0040000
KSM_DIR = "/sys/kernel/mm/ksm"


def ksm_on(pages_to_scan: int, log) -> None:
    """As root, turn the host's ksmd on (it scans only processes that asked)."""
    if not prereq.is_root():
        return
    try:
        with open(os.path.join(KSM_DIR, "run")) as fh:
            if fh.read().strip() != "1":
                with open(os.path.join(KSM_DIR, "run"), "w") as out:
                    out.write("1")
        if pages_to_scan:
            with open(os.path.join(KSM_DIR, "pages_to_scan"), "w") as out:
                out.write(str(pages_to_scan))
    except OSError as exc:
        log.warning("memory_merge: cannot turn KSM on (%s): kernels are marked mergeable but not merged", exc)


def memory_preexec(merge: bool, fixed: bool):
    """The launch's pre-exec step (in the forked child, before the launcher
    runs): PR_SET_MEMORY_MERGE and ADDR_NO_RANDOMIZE, both kept across exec
    and uid changes down to the kernel (the kernel's seccomp profile refuses
    personality changes inside).  The libc functions are looked up here, in
    the parent: the child only calls them."""
    if not merge and not fixed:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    prctl, personality = libc.prctl, libc.personality

    def pre() -> None:
        if merge:
            prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)    # EINVAL before Linux 6.4: left unmerged
        if fixed:
            personality(ADDR_NO_RANDOMIZE)
    return pre


class SandboxProvisioner(SandboxSettings, LocalProvisioner):
    """Starts each kernel inside bubblewrap + seccomp + Landlock + cgroup."""

    data_dir = Unicode("", config=True, help="""Host folder shown to the kernel as /mnt/data.
        Empty (the default): a fresh temporary folder per kernel, removed at shutdown. Also
        settable with the BROKER_KERNEL_DATA_DIR environment variable or
        `broker kernelspec install --data-dir`.""")
    working_folder = CaselessStrEnum(["passed", "inherited", "off"], default_value="passed", config=True,
        help="""Which caller's folder a kernel started outside the broker sees, read-only at
        /mnt/notebook, and starts in (docs/kernelspec.md). 'passed' (the default): the folder
        given to start_kernel(cwd=...), as nbclient passes the notebook's folder;
        'inherited': also the working folder of the process that starts the kernel when none
        is given (papermill's cwd= changes that); 'off': none, the kernel starts in /mnt/data.
        Whatever this says, a folder inside the named data_dir is where the kernel starts,
        read-write, and the root folder, system folders, home folders and folders holding
        other kernels' state are never shown.""")
    startup_timeout = Float(60.0, min=1.0, config=True, help="""Seconds the host-side preparation
        of a kernel (probing the interpreter, folders, quota image, uid, cgroup) may take
        before start_kernel() fails.""")

    _prepared = False
    _extra_env: dict = {}
    _own_root: str | None = None
    _identity: identity.Identity | None = None
    _cgroup: cgroups.Cgroup | None = None
    _mounted_volume = False
    _mounted_rt = False
    _root_lock: int | None = None
    _named_data_dir = False
    _host_cwd: str = ""
    rt_dir: str = ""
    sandbox_data_dir: str = ""

    # -- preparation (first start only; restarts reuse it) ------------------
    def _prepare(self, opts: dict) -> None:
        self._bwrap = prereq.check_all(self.bwrap)
        self._tools = prereq.launch_tools()
        data_dir = opts.get("data_dir") or self.data_dir or os.environ.get("BROKER_KERNEL_DATA_DIR", "")
        self._named_data_dir = bool(data_dir)
        rt_dir = opts.get("rt_dir", "")
        if not data_dir or not rt_dir:
            sweep_stale_roots(self._tools)
            self._own_root = tempfile.mkdtemp(prefix=OWN_ROOT_PREFIX)
            os.chmod(self._own_root, 0o711)
            # Held while this kernel lives: a root whose lock is free belongs
            # to a client that went away without shutting its kernel down.
            self._root_lock = os.open(os.path.join(self._own_root, ".lock"),
                                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._root_lock, fcntl.LOCK_EX)
            with open(os.path.join(self._own_root, ".kernel-id"), "w") as fh:
                fh.write(str(self.kernel_id or ""))
        if not data_dir:
            data_dir = os.path.join(self._own_root, "data")
        if not rt_dir:
            rt_dir = os.path.join(self._own_root, "rt")
        data_dir = os.path.abspath(data_dir)
        os.makedirs(data_dir, exist_ok=True)
        os.makedirs(rt_dir, mode=0o700, exist_ok=True)
        if len(os.path.join(rt_dir, f"{IPC_NAME}-5")) > SUN_PATH_MAX:
            raise SandboxError(f"runtime folder {rt_dir} is too long for unix sockets "
                               f"(at most {SUN_PATH_MAX - 4} characters); use a shorter data root")
        self.sandbox_data_dir, self.rt_dir = data_dir, rt_dir

        managed = bool(opts.get("managed")) or self._own_root is not None and data_dir.startswith(self._own_root)
        if prereq.is_root():
            # The quota image goes only on folders the broker made: mounted
            # over a folder you named, your files would seem to vanish into
            # the image (quota='loop' forces it).
            want_quota = self.quota == "loop" or (self.quota == "auto" and managed)
            if want_quota and os.path.exists(volume.image_path(data_dir)):
                # Mount an existing image first: the uid follows the owner of
                # what is inside it, not of the empty mount point.
                self._mounted_volume = volume.ensure(data_dir, self.data_quota, 0, 0, self._tools)
            owner = os.stat(data_dir).st_uid
            self._identity = identity.lease_uid(os.path.join(self.state_dir, "uids"), self.uid_range_start,
                                                self.uid_range_size, preferred=owner)
            ident = self._identity
            if want_quota and not volume.is_mounted(data_dir):
                self._mounted_volume = volume.ensure(data_dir, self.data_quota, ident.uid, ident.gid, self._tools)
                if not self._mounted_volume:
                    msg = f"{data_dir} already holds files and has no quota image; only RLIMIT_FSIZE caps it"
                    if self.quota == "loop":
                        raise SandboxError(msg)
                    self.log.warning(msg)
            if os.stat(data_dir).st_uid != ident.uid:
                identity.chown_tree(data_dir, ident.uid, ident.gid)
            self._mounted_rt = volume.mount_runtime(rt_dir, ident.uid, ident.gid, self._tools)
            os.chown(rt_dir, ident.uid, ident.gid)
            os.chmod(data_dir, 0o700)
        else:
            self._identity = identity.current_identity()

        if self.cgroups != "off":
            version = cgroups.detect()
            if version is None:
                if self.cgroups == "required":
                    raise SandboxUnavailable("a writable cgroup (v2 or v1 memory+pids controllers)",
                                             "run the broker as root or in a delegated cgroup subtree")
                self.log.warning("no writable cgroup: memory, pids and CPU are capped by rlimits only")
            else:
                try:
                    self._cgroup = cgroups.Cgroup.create(f"k-{self.kernel_id or uuid.uuid4()}", self.memory_limit,
                                                         self.pids_limit, self.cpu_limit, version)
                except OSError as exc:
                    if self.cgroups == "required":
                        raise SandboxUnavailable(f"a per-sandbox cgroup ({exc})", "see docs/security.md") from exc
                    self.log.warning("cgroup not created (%s): rlimits only", exc)
        self._prepared = True

    def _working_folder(self, opts: dict, cwd) -> tuple[dict[str, str], str, str]:
        """(read-only views, the kernel's working folder inside, the host
        folder it stands for).  Broker sessions (``managed``) keep theirs."""
        default = ({}, "/mnt/data", self.sandbox_data_dir)
        if opts.get("managed") or opts.get("data_dir"):
            return default
        passed = cwd is not None
        try:
            folder = os.path.realpath(os.fspath(cwd)) if passed else os.getcwd()
        except OSError:  # the caller's folder was removed
            return default
        data = os.path.realpath(self.sandbox_data_dir)
        if self._named_data_dir and (folder == data or folder.startswith(data + "/")):
            return {}, os.path.normpath(os.path.join("/mnt/data", os.path.relpath(folder, data))), folder
        if self.working_folder == "off" or (self.working_folder == "passed" and not passed):
            return default
        reason = unshareable_reason(folder, [tempfile.gettempdir(), self.state_dir, self._own_root or "",
                                             self.sandbox_data_dir, self.rt_dir])
        ident = self._identity
        if not reason and ident and not enterable_by(folder, ident.uid, ident.gid):
            reason = f"the sandbox's uid {ident.uid} may not list it (its mode is {os.stat(folder).st_mode & 0o777:o})"
        if reason:
            if passed:
                self.log.warning("working folder %s not shown to the sandbox: %s; the kernel starts in "
                                 "/mnt/data", folder, reason)
            return default
        return {NOTEBOOK_VIEW: folder}, NOTEBOOK_VIEW, folder

    # -- jupyter_client provisioner API --------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        opts = kwargs.pop("sandbox", None) or {}
        extra = check_extra_arguments(list(kwargs.get("extra_arguments") or []))
        python, paths = await self._bounded(interpreter_paths, self.kernel_spec.argv[0], self.startup_timeout)
        if not self._prepared:
            # Mounts, mkfs and chown block: keep them off the event loop, so
            # a pool refill does not stall the executions of other sessions.
            await self._bounded(self._prepare, opts)
            self._extra_env = safe_kernel_vars(opts.get("env") or {})
        km = self.parent
        km.transport = "ipc"
        km.ip = os.path.join(self.rt_dir, IPC_NAME)
        for name, port in PORTS.items():
            setattr(km, name, port)
        self.ports_cached = False  # nothing taken from LocalPortCache
        saved_cache = km.cache_ports
        km.cache_ports = False
        try:
            kwargs = await super().pre_launch(**kwargs)
        finally:
            km.cache_ports = saved_cache
        kwargs.pop("env", None)  # the host environment never reaches the kernel
        views, inside, self._host_cwd = self._working_folder(opts, kwargs.pop("cwd", None))

        info = dict(km.get_connection_info())
        info["key"] = info["key"].decode() if isinstance(info["key"], bytes) else info["key"]
        info["ip"] = os.path.join(KERNEL_RT, IPC_NAME)
        info["transport"] = "ipc"
        kernel_cf = "/run/sandbox/kernel.json"
        info.pop("kernel_name", None)
        import broker_seccomp

        argv = [python] + [a.replace("{connection_file}", kernel_cf) for a in self.kernel_spec.argv[1:]]
        boot = [f"--cwd={inside}"] + ([] if self.landlock else ["--landlock=off"])
        self._spec = bw.SandboxSpec(
            command=argv + boot + ["--"] + extra,
            data_dir=self.sandbox_data_dir,
            rt_dir=self.rt_dir,
            env=kernel_env({**self._extra_env, **self.profile_env()}),
            ro_paths=paths,
            views=views,
            files={"kernel.json": json.dumps(info).encode(),
                   "kernel.bpf": broker_seccomp.compile_profile(self.seccomp_profile)},
            tmp_size=self.tmp_size,
            shm_size=self.shm_size,
        )
        kwargs["cmd"] = self._spec.command
        return kwargs

    async def _bounded(self, fn: Callable, *args):
        """*fn* in its own thread, bounded by ``startup_timeout``."""
        try:
            return await asyncio.wait_for(_run_in_own_thread(fn, *args), self.startup_timeout)
        except asyncio.TimeoutError:
            raise SandboxError(f"preparing the sandbox took longer than {self.startup_timeout:g} s "
                               "(SandboxProvisioner.startup_timeout)") from None

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):
        ident = self._identity
        launch = bw.launch(self._spec, bwrap=self._bwrap, uid=ident.uid, gid=ident.gid,
                           as_root=prereq.is_root(), rlimits=self.rlimits(own_uid=prereq.is_root()),
                           procs_files=self._cgroup.ensure().procs_files if self._cgroup else [],
                           stage_dir=os.path.join(self.state_dir, "stage"), tools=self._tools)
        if self.memory_merge:
            ksm_on(self.ksm_pages_to_scan, self.log)
        try:
            self.process = subprocess.Popen(
                launch.argv, env=launch.env, pass_fds=launch.pass_fds, stdin=subprocess.DEVNULL,
                stdout=kwargs.get("stdout"), stderr=kwargs.get("stderr"), start_new_session=True,
                close_fds=True, cwd="/", preexec_fn=memory_preexec(self.memory_merge, self.fixed_layout))
        finally:
            launch.close_fds()
        self.pid = self.process.pid
        self.pgid = self.pid
        self.cwd = self._host_cwd
        return self.connection_info

    async def cleanup(self, restart: bool = False) -> None:
        if not restart and getattr(self, "shell_sandbox", None) is not None:
            # The session's shell sandbox runs as this kernel's uid over its
            # mounted folder: it ends with them (broker/sandbox/shell.py).
            self.shell_sandbox.close()
            self.shell_sandbox = None
        if self._cgroup:
            self._cgroup.kill_all()
        if restart:
            return
        if self._cgroup:
            self._cgroup.remove()
            self._cgroup = None
        if self._mounted_volume:
            volume.unmount(self.sandbox_data_dir)
            self._mounted_volume = False
        if self._mounted_rt:
            volume.unmount(self.rt_dir)
            self._mounted_rt = False
        if self._identity:
            self._identity.release()
            self._identity = None
        if self._own_root:
            img = volume.image_path(self.sandbox_data_dir)
            if os.path.dirname(img) == self._own_root and os.path.exists(img):
                os.unlink(img)
            shutil.rmtree(self._own_root, ignore_errors=True)
            self._own_root = None
            os.close(self._root_lock)
        self._prepared = False

    async def get_provisioner_info(self) -> dict:
        info = await super().get_provisioner_info()
        info.update({"data_dir": self.sandbox_data_dir, "rt_dir": self.rt_dir})
        return info
