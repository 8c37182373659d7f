"""The kernel provisioner: jupyter_client's seam for the sandbox.

Registered as ``sandbox-provisioner`` in ``jupyter_client.kernel_provisioners``
and named by the ``python3-sandbox`` kernelspec, so ``KernelManager``, nbclient,
papermill and the broker all get the same locked-down kernel from the same
code.

Per kernel it owns: a runtime folder for the ZeroMQ ``ipc`` sockets (bound at
``/run/kernel``; paths stable across restarts), the data folder (bound at
``/mnt/data``), a uid lease (as root), a cgroup, and the quota volume when it
created one.  ``cleanup(restart=False)`` releases all of them.
"""

from __future__ import annotations

import functools
import fcntl
import json
import os
import shutil
import sys
import tempfile
import uuid
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Unicode

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
    import subprocess

    try:
        out = subprocess.run([sys.executable, "-I", "-c", "import sys, json; print(json.dumps(sys.path))"],
                             capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
                             cwd="/", check=True).stdout
        return tuple(json.loads(out))
    except (OSError, ValueError, subprocess.SubprocessError):
        return ()


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


_KERNEL_VAR = __import__("re").compile(r"^KERNEL_[A-Z0-9_]{1,64}$")


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
        if p and os.path.isabs(p) and os.path.isdir(p) and not p.startswith(("/usr/", "/tmp")):
            paths.add(p)
    return sorted(paths)


class SandboxProvisioner(SandboxSettings, LocalProvisioner):
    """Starts each kernel inside bubblewrap + seccomp + Landlock + cgroup."""

    data_dir = Unicode("", config=True, help="""Host folder shown to the kernel as /mnt/data.
        Empty (the default): a fresh temporary folder per kernel, removed at shutdown. Also
        settable with the BROKER_KERNEL_DATA_DIR environment variable or
        `broker kernelspec install --data-dir`.""")

    _prepared = False
    _extra_env: dict = {}
    _own_root: str | None = None
    _identity: identity.Identity | None = None
    _cgroup: cgroups.Cgroup | None = None
    _mounted_volume = False
    _mounted_rt = False
    _root_lock: int | None = None
    rt_dir: str = ""
    sandbox_data_dir: str = ""

    # -- preparation (first start only; restarts reuse it) ------------------
    def _prepare(self, opts: dict) -> None:
        self._bwrap = prereq.check_all(self.bwrap)
        self._tools = prereq.launch_tools()
        data_dir = opts.get("data_dir") or self.data_dir or os.environ.get("BROKER_KERNEL_DATA_DIR", "")
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

    # -- jupyter_client provisioner API --------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        opts = kwargs.pop("sandbox", None) or {}
        if not self._prepared:
            # Mounts, mkfs and chown block: keep them off the event loop, so
            # a pool refill does not stall the executions of other sessions.
            import asyncio

            await asyncio.get_running_loop().run_in_executor(None, self._prepare, opts)
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
        kwargs.pop("cwd", None)

        info = dict(km.get_connection_info())
        info["key"] = info["key"].decode() if isinstance(info["key"], bytes) else info["key"]
        info["ip"] = os.path.join(KERNEL_RT, IPC_NAME)
        info["transport"] = "ipc"
        kernel_cf = "/run/sandbox/kernel.json"
        info.pop("kernel_name", None)
        import broker_seccomp

        argv = [a.replace("{connection_file}", kernel_cf) for a in self.kernel_spec.argv]
        self._spec = bw.SandboxSpec(
            command=argv,
            data_dir=self.sandbox_data_dir,
            rt_dir=self.rt_dir,
            env=kernel_env(self._extra_env),
            ro_paths=python_paths(),
            files={"kernel.json": json.dumps(info).encode(),
                   "kernel.bpf": broker_seccomp.compile_profile(self.seccomp_profile)},
            tmp_size=self.tmp_size,
            shm_size=self.shm_size,
        )
        if not self.landlock:
            self._spec.command = self._spec.command + ["--landlock=off"]
        kwargs["cmd"] = argv
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):
        import subprocess

        ident = self._identity
        launch = bw.launch(self._spec, bwrap=self._bwrap, uid=ident.uid, gid=ident.gid,
                           as_root=prereq.is_root(), rlimits=self.rlimits(own_uid=prereq.is_root()),
                           procs_files=self._cgroup.ensure().procs_files if self._cgroup else [],
                           stage_dir=os.path.join(self.state_dir, "stage"), tools=self._tools)
        try:
            self.process = subprocess.Popen(
                launch.argv, env=launch.env, pass_fds=launch.pass_fds, stdin=subprocess.DEVNULL,
                stdout=kwargs.get("stdout"), stderr=kwargs.get("stderr"), start_new_session=True,
                close_fds=True, cwd="/")
        finally:
            launch.close_fds()
        self.pid = self.process.pid
        self.pgid = self.pid
        self.cwd = self.sandbox_data_dir
        return self.connection_info

    async def cleanup(self, restart: bool = False) -> None:
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
