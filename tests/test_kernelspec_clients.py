"""Issue 14: what jupyter_client, nbclient and papermill callers of
``python3-sandbox`` expect, each checked through those clients.

1. a signal the code sends to its own kernel ends it (the sandbox's init);
2. the provisioner works in a process forked after a first kernel start, and
   its waits are bounded by ``startup_timeout``;
3. the kernel runs the interpreter the kernelspec names, whatever
   environment the client runs in;
4. no ipykernel banner on the client's stdout;
5. ``extra_arguments`` pass an allow-list, the rest is refused;
6. the caller's working folder (docs/kernelspec.md, "Working folder");
7. probing installed packages (importlib.metadata, pkg_resources).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from nbformat.v4 import new_code_cell, new_notebook
from traitlets.config import Config

from broker import kernelspec
from broker.errors import SandboxError
from tests.harness import SandboxKernel

KERNEL = "python3-sandbox"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLIENT_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}


def stdout_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _wait_dead(km, seconds=20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not km.is_alive():
            return True
        time.sleep(0.1)
    return False


# --- 1. signals to its own kernel ------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGHUP])
def test_signal_to_own_kernel_ends_it(sig):
    k = SandboxKernel()
    try:
        r = k.run(f"import os, time\nos.kill(os.getpid(), {int(sig)})\ntime.sleep(2)\nprint('still running')",
                  timeout=30)
        assert r.dead and "still running" not in r.stdout, r
        assert _wait_dead(k.km)
        # As a shell reports it: 128 + the signal (the init exits so; bwrap passes it on).
        assert k.km.provisioner.process.wait(10) == 128 + sig
    finally:
        k.shutdown()


def test_nbclient_sees_dead_kernel():
    nb = new_notebook()
    nb.cells = [new_code_cell("x = 1"),
                new_code_cell("import os, signal, time\nos.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(5)"),
                new_code_cell("print('after')")]
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=60)
    with pytest.raises(DeadKernelError):
        client.execute()
    assert stdout_of(nb.cells[2]) == ""


def test_kernel_survives_kill_of_init():
    """The init ignores SIGKILL from inside (as every pid 1 does), or where
    Landlock scopes signals (ABI 6) the kernel cannot signal it at all: either
    way the kernel lives on."""
    k = SandboxKernel()
    try:
        r = k.run("""
            import os, signal
            try:
                os.kill(1, signal.SIGKILL)
                print("sent")
            except PermissionError:
                print("refused")
            print(os.getpid(), os.getppid())
        """)
        assert r.status == "ok" and r.stdout.split()[1:] == ["2", "1"], r
        assert r.stdout.split()[0] in ("sent", "refused")
        time.sleep(0.5)
        assert k.answers()
    finally:
        k.shutdown()


# --- 2. fork safety and bounded waits -------------------------------------------

FORKED_CLIENT = textwrap.dedent("""
    import concurrent.futures, multiprocessing, sys
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    def run(n):
        nb = new_notebook()
        nb.cells = [new_code_cell(f"print({n} * 2)")]
        NotebookClient(nb, kernel_name="python3-sandbox", timeout=60, startup_timeout=60).execute()
        return nb.cells[0].outputs[0]["text"].strip()

    print("parent", run(1), flush=True)   # a first start in the parent
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        print("children", sorted(pool.map(run, [2, 3])), flush=True)
""")


def test_kernels_start_in_forked_workers():
    out = subprocess.run([sys.executable, "-c", FORKED_CLIENT], capture_output=True, text=True, timeout=240,
                         cwd=ROOT, env={**CLIENT_ENV, "JUPYTER_PATH": os.path.join(sys.prefix, "share", "jupyter")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "parent 2" in out.stdout and "children ['4', '6']" in out.stdout, out.stdout


def test_startup_wait_is_bounded(tmp_path, monkeypatch):
    """An interpreter that never answers the provisioner's probe fails the
    start within startup_timeout, not never."""
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 60\n")
    slow.chmod(0o755)
    prefix = tmp_path / "prefix"
    spec_dir = kernelspec.install(prefix=str(prefix), name="slow-sandbox")
    spec_file = os.path.join(spec_dir, "kernel.json")
    spec = json.load(open(spec_file))
    spec["argv"][0] = str(slow)
    spec["metadata"]["kernel_provisioner"]["config"] = {"startup_timeout": 2}
    json.dump(spec, open(spec_file, "w"))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    km = KernelManager(kernel_name="slow-sandbox")
    started = time.monotonic()
    with pytest.raises(SandboxError, match="startup_timeout"):
        km.start_kernel()
    assert time.monotonic() - started < 15
    assert not km.has_kernel


# --- 3 + 4. another Python environment; no banner -------------------------------

OTHER_ENV_CLIENT = textwrap.dedent("""
    import json, sys
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name="python3-sandbox")
    km.start_kernel()
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
    out = []
    code = ("import sys, os, json; print(json.dumps([sys.executable, sys.prefix, sys.path, "
            "os.path.exists(%r)]))" % sys.prefix)
    kc.execute_interactive(code, output_hook=lambda m: out.append(m["content"].get("text", "")), timeout=60)
    kc.stop_channels(); km.shutdown_kernel(now=True)
    print("CLIENT", sys.prefix, flush=True)
    print("KERNEL", "".join(out).strip(), flush=True)
""")


def test_kernelspec_from_another_environment(tmp_path):
    """A kernelspec installed with --prefix, started by a client in another
    virtualenv (which can import jupyter_client and the provisioner but is
    not the kernelspec's environment): the kernel runs the kernelspec's
    interpreter with its own prefix and isolated sys.path, and sees nothing
    of the client's environment.  The client's stdout has no banner."""
    prefix = tmp_path / "prefix"
    spec_dir = kernelspec.install(prefix=str(prefix))
    assert json.load(open(os.path.join(spec_dir, "kernel.json")))["argv"][0] == sys.executable
    other = tmp_path / "other env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True, timeout=120,
                   capture_output=True)
    site = subprocess.run([str(other / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)][0]
    with open(os.path.join(site, "borrowed.pth"), "w") as fh:
        fh.write(f"import site; site.addsitedir({ours!r})\n")
    out = subprocess.run([str(other / "bin" / "python"), "-c", OTHER_ENV_CLIENT], capture_output=True, text=True,
                         timeout=180, cwd=str(tmp_path),
                         env={**CLIENT_ENV, "JUPYTER_PATH": str(prefix / "share" / "jupyter")})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("CLIENT", "KERNEL")))
    assert lines["CLIENT"] == str(other)
    executable, kprefix, kpath, sees_client_env = json.loads(lines["KERNEL"])
    assert executable == sys.executable and kprefix == sys.prefix
    assert ours in kpath and not any(p.startswith(str(other)) for p in kpath), kpath
    assert sees_client_env is False
    # 4: ipykernel's "NOTE: When using the `ipython kernel` entry point" banner.
    assert "NOTE" not in out.stdout and "--existing" not in out.stdout, out.stdout


def test_no_banner_on_client_stdout():
    code = textwrap.dedent("""
        from jupyter_client.manager import KernelManager
        km = KernelManager(kernel_name="python3-sandbox"); km.start_kernel()
        kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
        kc.execute_interactive("1 + 1", timeout=60, output_hook=lambda m: None); kc.stop_channels(); km.shutdown_kernel(now=True)
        print("done")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT,
                         env={**CLIENT_ENV, "JUPYTER_PATH": os.path.join(sys.prefix, "share", "jupyter")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "done\n", out.stdout
    assert "Ctrl-C will not work" not in out.stderr


# --- 5. extra_arguments ------------------------------------------------------------

def test_allowed_extra_arguments_reach_ipykernel():
    k = SandboxKernel(extra_arguments=["--HistoryManager.hist_file=:memory:",
                                       "--IPKernelApp.exec_lines=from_args = 6 * 7",
                                       "--InteractiveShell.xmode", "Plain", "--log-level=WARN"])
    try:
        r = k.run("print(from_args, get_ipython().InteractiveTB.mode)")
        assert r.stdout.split() == ["42", "Plain"], r
    finally:
        k.shutdown()


def test_nbclient_extra_arguments():
    nb = new_notebook()
    nb.cells = [new_code_cell("print(from_args)")]
    NotebookClient(nb, kernel_name=KERNEL, timeout=60,
                   extra_arguments=["--IPKernelApp.exec_lines=from_args = 'nbclient'"]).execute()
    assert stdout_of(nb.cells[0]) == "nbclient\n"


@pytest.mark.parametrize("bad", [
    ["--seccomp=none"], ["--secc=none"], ["--landlock", "off"], ["--ip=0.0.0.0"], ["--transport=tcp"],
    ["-f", "/tmp/other.json"], ["--config=/mnt/data/evil.py"], ["--profile-dir=/mnt/data"],
    ["--IPKernelApp.kernel_class=evil.Kernel"], ["--Session.key=abc"], ["script.py"], ["--", "--seccomp=none"],
])
def test_cant_pass_other_arguments(bad):
    km = KernelManager(kernel_name=KERNEL)
    with pytest.raises(ValueError, match="extra_arguments: .* is not allowed") as info:
        km.start_kernel(extra_arguments=bad)
    assert repr(bad[0]) in str(info.value)
    assert "docs/kernelspec.md" in str(info.value)
    assert not km.has_kernel


# --- 6. the working folder -----------------------------------------------------------

def _folder_with_csv(path):
    path.mkdir(parents=True)
    (path / "data.csv").write_text("day,visits\nmon,3\ntue,5\nwed,9\n")
    return path


CHART = ("import pandas as pd, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
         "df = pd.read_csv('data.csv')\nfig, ax = plt.subplots(); ax.bar(df['day'], df['visits'])\n")


def test_nbclient_notebook_folder_is_a_read_only_view(tmp_path):
    folder = _folder_with_csv(tmp_path / "my notebooks")
    nb = new_notebook()
    nb.cells = [new_code_cell("import os; print(os.getcwd(), int(__import__('pandas').read_csv('data.csv')"
                              "['visits'].sum()))"),
                new_code_cell(CHART + "fig.savefig('chart.png')"),
                new_code_cell(CHART + "fig.savefig('/mnt/data/chart.png'); print(os.path.getsize('/mnt/data/chart.png') > 0)")]
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=120, allow_errors=True,
                            resources={"metadata": {"path": str(folder)}})
    client.execute()
    assert stdout_of(nb.cells[0]) == "/mnt/notebook 17\n"
    [err] = [o for o in nb.cells[1].outputs if o.output_type == "error"]
    assert err.ename == "OSError" and "Read-only file system" in err.evalue, err
    assert stdout_of(nb.cells[2]) == "True\n"
    assert sorted(os.listdir(folder)) == ["data.csv"], "the sandbox wrote into a folder nobody gave it"


@pytest.mark.parametrize("where", ["/", "~"])
def test_cant_see_root_or_home_as_working_folder(where):
    folder = os.path.expanduser(where)
    nb = new_notebook()
    nb.cells = [new_code_cell("import os; print(os.getcwd(), os.path.exists('/mnt/notebook'))")]
    NotebookClient(nb, kernel_name=KERNEL, timeout=60, resources={"metadata": {"path": folder}}).execute()
    assert stdout_of(nb.cells[0]) == "/mnt/data False\n"


def _papermill_notebook(path):
    nb = new_notebook(metadata={"kernelspec": {"name": KERNEL, "language": "python",
                                               "display_name": "Python 3 (sandbox)"}})
    params = new_code_cell("out = 'chart.png'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, new_code_cell(CHART + "fig.savefig(out)\nimport os; print(os.getcwd(), len(df))")]
    nbformat.write(nb, path)


def test_papermill_reads_csv_and_writes_chart_in_named_folder(tmp_path, monkeypatch):
    """The folder is named (BROKER_KERNEL_DATA_DIR, or data_dir in the
    kernelspec or configuration): papermill's cwd inside it is where the
    kernel starts, read-write, so the chart lands next to the notebook."""
    import papermill as pm

    folder = _folder_with_csv(tmp_path / "report")
    (folder / "sub").mkdir()
    _papermill_notebook(folder / "sub" / "in.ipynb")
    (folder / "sub" / "data.csv").write_text((folder / "data.csv").read_text())
    monkeypatch.setenv("BROKER_KERNEL_DATA_DIR", str(folder))
    pm.execute_notebook(str(folder / "sub" / "in.ipynb"), str(tmp_path / "out.ipynb"), kernel_name=KERNEL,
                        cwd=str(folder / "sub"), progress_bar=False, start_timeout=120)
    done = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert stdout_of(done.cells[-1]) == "/mnt/data/sub 3\n"
    assert (folder / "sub" / "chart.png").read_bytes().startswith(PNG_MAGIC)


def test_papermill_inherited_folder_is_read_only(tmp_path, monkeypatch):
    """working_folder='inherited' (here in a kernelspec): papermill's cwd is
    shown read-only; the chart goes to the kernel's own /mnt/data."""
    import papermill as pm

    folder = _folder_with_csv(tmp_path / "report")
    _papermill_notebook(folder / "in.ipynb")
    prefix = tmp_path / "prefix"
    kernelspec.install(prefix=str(prefix), provisioner_config={"working_folder": "inherited"})
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.delenv("BROKER_KERNEL_DATA_DIR", raising=False)
    pm.execute_notebook(str(folder / "in.ipynb"), str(tmp_path / "out.ipynb"), kernel_name=KERNEL,
                        cwd=str(folder), progress_bar=False, start_timeout=120,
                        parameters={"out": "/mnt/data/chart.png"})
    done = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert stdout_of(done.cells[-1]) == "/mnt/notebook 3\n"
    assert sorted(os.listdir(folder)) == ["data.csv", "in.ipynb"]


def test_broker_sessions_keep_their_folder(tmp_path):
    """A managed start (how the broker starts its sessions) ignores cwd."""
    data, rt = tmp_path / "data", tmp_path / "rt"
    folder = _folder_with_csv(tmp_path / "elsewhere")
    km = KernelManager(kernel_name=KERNEL)
    km.start_kernel(sandbox={"data_dir": str(data), "rt_dir": str(rt), "managed": True}, cwd=str(folder))
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        out = []
        kc.execute_interactive("import os; print(os.getcwd(), os.path.exists('/mnt/notebook'))", timeout=60,
                               output_hook=lambda m: out.append(m["content"].get("text", "")))
        assert "".join(out) == "/mnt/data False\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


# --- 7. probing the installed packages ------------------------------------------------

def test_probing_installed_packages():
    k = SandboxKernel()
    try:
        r = k.run("""
            import importlib.metadata, warnings
            names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
            print("pandas" in names, "matplotlib" in names, importlib.metadata.version("numpy") != "")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pkg_resources
            print("pandas" in {d.project_name.lower() for d in pkg_resources.working_set})
        """)
        assert r.status == "ok" and r.stdout.split() == ["True"] * 4, r
    finally:
        k.shutdown()


def test_nbclient_config_reaches_provisioner(tmp_path):
    """Settings reach the provisioner through NotebookClient's config too."""
    c = Config()
    c.SandboxProvisioner.working_folder = "off"
    folder = _folder_with_csv(tmp_path / "nb")
    nb = new_notebook()
    nb.cells = [new_code_cell("import os; print(os.getcwd())")]
    NotebookClient(nb, kernel_name=KERNEL, timeout=60, config=c,
                   resources={"metadata": {"path": str(folder)}}).execute()
    assert stdout_of(nb.cells[0]) == "/mnt/data\n"
