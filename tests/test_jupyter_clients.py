"""Plain Jupyter clients drive the sandboxed kernel through the kernelspec:
nbclient, papermill and KernelManager (interrupt, restart), and the two ways
of choosing the host folder behind /mnt/data (``broker kernelspec install
--data-dir`` and ``BROKER_KERNEL_DATA_DIR``).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from tests.harness import SandboxKernel

KERNEL = "python3-sandbox"
BROKER = os.path.join(os.path.dirname(sys.executable), "broker")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Proof that a cell ran in the sandbox and not in a plain kernel.
PROOF = ("import os\n"
         "_st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
         "print(os.getcwd(), _st['Seccomp'].strip(), os.getuid())")


def stdout_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def assert_sandboxed(cell) -> None:
    # The working folder is /mnt/data, or /mnt/notebook where the notebook's
    # folder is shown read-only (docs/kernelspec.md, "Working folder").
    cwd, seccomp, uid = stdout_of(cell).split()
    assert cwd in ("/mnt/data", "/mnt/notebook") and [seccomp, uid] == ["2", "1000"], cell.outputs


# --- nbclient / papermill --------------------------------------------------------

def test_nbclient_executes_notebook(tmp_path):
    nb = new_notebook()
    nb.cells = [
        new_markdown_cell("# Incident notebook"),
        new_code_cell(PROOF),
        new_code_cell("import pandas as pd\n"
                      "df = pd.DataFrame({'service': ['api', 'web', 'db'], 'errors': [3, 0, 7]})\n"
                      "df"),
        new_code_cell("import matplotlib.pyplot as plt\n"
                      "plt.bar(df['service'], df['errors'])\n"
                      "plt.show()"),
        new_code_cell("1 / 0"),
        new_code_cell("print('still running', int(df['errors'].sum()))"),
    ]
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=120, allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    proof, frame, chart, error, after = nb.cells[1:]

    assert_sandboxed(proof)

    [res] = [o for o in frame.outputs if o.output_type == "execute_result"]
    assert "text/html" in res.data and "<table" in res.data["text/html"]
    assert "text/plain" in res.data
    plain = res.data["text/plain"].splitlines()
    assert plain[0].split() == ["service", "errors"]
    assert [ln.split()[1:] for ln in plain[1:]] == [["api", "3"], ["web", "0"], ["db", "7"]]

    images = [o for o in chart.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1, chart.outputs
    assert base64.b64decode(images[0].data["image/png"]).startswith(PNG_MAGIC)

    [err] = [o for o in error.outputs if o.output_type == "error"]
    assert err.ename == "ZeroDivisionError"
    assert "division by zero" in err.evalue

    assert stdout_of(after) == "still running 10\n"
    # Execution counts are consecutive across the error.
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))


def test_nbclient_stops_at_error_without_allow_errors(tmp_path):
    from nbclient.exceptions import CellExecutionError

    nb = new_notebook()
    nb.cells = [new_code_cell("x = 1"), new_code_cell("raise ValueError('boom')"), new_code_cell("x = 2")]
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=60)
    with pytest.raises(CellExecutionError, match="boom"):
        client.execute()
    assert nb.cells[2].execution_count is None


def test_papermill_parameterised_notebook(tmp_path):
    import papermill as pm

    nb = new_notebook(metadata={"kernelspec": {"name": KERNEL, "language": "python",
                                               "display_name": "Python 3 (sandbox)"}})
    params = new_code_cell("rows = 3\nlabel = 'default'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        new_code_cell("import pandas as pd\n"
                      "df = pd.DataFrame({'n': range(rows)})\n"
                      "df.to_csv(f'/mnt/data/{label}.csv', index=False)\n"
                      "print(label, len(df), int(df['n'].sum()))"),
        new_code_cell(PROOF),
    ]
    src, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    pm.execute_notebook(str(src), str(out), parameters={"rows": 5, "label": "weekly"},
                        kernel_name=KERNEL, progress_bar=False, start_timeout=120)

    done = nbformat.read(out, as_version=4)
    injected = [c for c in done.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "rows = 5" in injected[0].source and 'label = "weekly"' in injected[0].source
    work, proof = done.cells[-2:]
    assert stdout_of(work) == "weekly 5 10\n"
    assert_sandboxed(proof)
    assert done.metadata["papermill"]["parameters"] == {"rows": 5, "label": "weekly"}
    assert done.metadata["kernelspec"]["name"] == KERNEL


# --- KernelManager: interrupt and restart ----------------------------------------

@pytest.fixture(scope="module")
def mk():
    k = SandboxKernel()
    yield k
    k.shutdown()


def test_interrupt_stops_a_long_cell(mk):
    assert mk.run("counter = 41").status == "ok"
    msg_id = mk.kc.execute("import time\ntime.sleep(60)\ncounter = -1")
    # Wait until the cell is running.
    deadline = time.monotonic() + 30
    while True:
        msg = mk.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            break
    time.sleep(0.5)
    started = time.monotonic()
    mk.km.interrupt_kernel()

    reply = None
    error = None
    while reply is None or error is None:
        remaining = started + 20 - time.monotonic()
        assert remaining > 0, "the interrupted cell did not finish"
        try:
            msg = mk.kc.get_iopub_msg(timeout=0.2)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "error":
                error = msg["content"]
        except queue.Empty:
            pass
        if reply is None:
            try:
                m = mk.kc.get_shell_msg(timeout=0.05)
                if m["parent_header"].get("msg_id") == msg_id:
                    reply = m["content"]
            except queue.Empty:
                pass
    assert time.monotonic() - started < 20
    assert reply["status"] == "error"
    assert reply["ename"] == error["ename"] == "KeyboardInterrupt"

    # The kernel still answers, with its state intact.
    assert mk.answers()
    r = mk.run("print(counter + 1)")
    assert r.stdout.strip() == "42", r


def test_restart_clears_state_and_keeps_files(mk):
    r = mk.run("""
        secret_state = 'before restart'
        open('/mnt/data/survivor.txt', 'w').write('kept across restarts')
        import os; print(os.getpid())
    """)
    assert r.status == "ok", r
    data_dir = mk.data_dir
    old_host_pid = mk.km.provisioner.pid

    mk.restart()

    assert mk.km.provisioner.pid != old_host_pid, "restart must start a new sandbox"
    assert mk.data_dir == data_dir
    r = mk.run("secret_state")
    assert r.status == "error" and r.ename == "NameError", r
    r = mk.run("print(open('/mnt/data/survivor.txt').read())")
    assert r.stdout.strip() == "kept across restarts", r
    with open(os.path.join(data_dir, "survivor.txt")) as fh:
        assert fh.read() == "kept across restarts"


# --- choosing the data folder ----------------------------------------------------

def _seed_data_dir(path) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "from_host.txt"), "w") as fh:
        fh.write(f"host file in {path}")
    return str(path)


def _check_sees_data_dir(k: SandboxKernel, data_dir: str) -> None:
    assert os.path.samefile(k.data_dir, data_dir)
    r = k.run("""
        import os
        print(sorted(os.listdir('/mnt/data')))
        print(open('/mnt/data/from_host.txt').read())
        open('/mnt/data/from_kernel.txt', 'w').write('written in the sandbox')
    """)
    assert r.status == "ok", r
    listing, content = r.stdout.strip().splitlines()
    assert "from_host.txt" in listing
    assert content == f"host file in {data_dir}"
    with open(os.path.join(data_dir, "from_kernel.txt")) as fh:
        assert fh.read() == "written in the sandbox"


def test_kernelspec_install_data_dir(tmp_path, monkeypatch):
    data_dir = _seed_data_dir(tmp_path / "shared-data")
    prefix = tmp_path / "prefix"
    out = subprocess.run([BROKER, "kernelspec", "install", "--data-dir", data_dir, "--prefix", str(prefix)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    spec_dir = prefix / "share" / "jupyter" / "kernels" / KERNEL
    assert str(spec_dir) in out.stdout
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"] == {"provisioner_name": "sandbox-provisioner",
                                                      "config": {"data_dir": data_dir}}

    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.delenv("BROKER_KERNEL_DATA_DIR", raising=False)
    k = SandboxKernel()
    try:
        assert os.path.samefile(k.km.kernel_spec.resource_dir, spec_dir), "the temp kernelspec must be used"
        _check_sees_data_dir(k, data_dir)
    finally:
        k.shutdown()
    # The folder is the caller's: it stays, with the kernel's file, after shutdown.
    assert sorted(os.listdir(data_dir)) == ["from_host.txt", "from_kernel.txt"]


def test_data_dir_from_environment(tmp_path, monkeypatch):
    data_dir = _seed_data_dir(tmp_path / "env-data")
    monkeypatch.setenv("BROKER_KERNEL_DATA_DIR", data_dir)
    k = SandboxKernel()
    try:
        _check_sees_data_dir(k, data_dir)
    finally:
        k.shutdown()
    assert sorted(os.listdir(data_dir)) == ["from_host.txt", "from_kernel.txt"]
