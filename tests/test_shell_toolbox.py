"""The shell sandbox's toolbox (docs/shell.md): every tool a data analyst
reaches for runs, ``python``/``python3`` are the kernel's interpreter and
libraries, ``pip`` lists but never installs, and nothing more of the host is
reachable than before (``/etc/alternatives`` read-only, the virtualenv's
console scripts not on ``PATH``).

Each command runs through :func:`broker.sandbox.shell.run_shell` in a real
sandbox over a folder owned by a leased sandbox uid; the last tests go
through a real broker's ``RunShellCommand``.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from broker.sandbox.shell import INSTALL_REFUSAL, SANDBOX_BIN, kernel_python
from tests.cant_support import ShellBox


@pytest.fixture
def box():
    b = ShellBox()
    yield b
    b.close()


def sh(box, command: str, timeout: float = 60):
    return box.run(command, timeout=timeout)


# (tool, command, expected stdout).  Each command uses the tool for real on a
# small input made in /mnt/data.
TOOLS = [
    ("coreutils", "printf 'b,2\\na,1\\n' > t.csv; cut -d, -f1 t.csv | tr a-z A-Z | head -1; wc -l < t.csv",
     "B\n2\n"),
    ("awk", "printf 'x 1\\ny 2\\n' | awk '{s += $2} END {print s}'", "3\n"),
    ("sed", "echo hello | sed 's/l/L/g'", "heLLo\n"),
    ("grep", "printf 'ok\\nERROR one\\nERROR two\\n' | grep -c ERROR", "2\n"),
    ("find", "mkdir -p d/e && touch d/e/f.txt && find d -name '*.txt'", "d/e/f.txt\n"),
    ("xargs", "printf '1\\n2\\n3\\n' | xargs echo", "1 2 3\n"),
    ("sort+uniq", "printf 'b\\na\\nb\\n' | sort | uniq -c | awk '{print $1 $2}'", "1a\n2b\n"),
    ("which", "which awk sed", "/usr/bin/awk\n/usr/bin/sed\n"),
    ("file", "printf '%%PDF-1.4\\n' > x.pdf; file --brief --mime-type x.pdf", "application/pdf\n"),
    ("jq", "echo '{\"a\": [1, 2, 3]}' | jq '.a | add'", "6\n"),
    ("sqlite3", "sqlite3 db.sqlite 'create table t(x); insert into t values (6), (7); select x * 6 from t "
     "order by x'", "36\n42\n"),
    ("zip+unzip", "echo zipped > z.txt; zip -q z.zip z.txt && rm z.txt && unzip -q z.zip && cat z.txt", "zipped\n"),
    ("tar", "echo tarred > a.txt; tar cf a.tar a.txt && tar tf a.tar", "a.txt\n"),
    ("gzip", "echo gz | gzip | gzip -d", "gz\n"),
    ("bzip2", "echo bz | bzip2 | bzip2 -d", "bz\n"),
    ("xz", "echo xz | xz | xz -d", "xz\n"),
    ("diff", "echo a > 1; echo b > 2; diff 1 2 | tail -1", "> b\n"),
    ("iconv", "printf '\\xe9t\\xe9\\n' | iconv -f latin1 -t utf-8", "été\n"),
    ("bc", "echo 'scale=2; 10/4' | bc", "2.50\n"),
]


@pytest.mark.parametrize("tool,command,expected", TOOLS, ids=[t[0] for t in TOOLS])
def test_tool_runs(box, tool, command, expected):
    r = sh(box, command)
    assert r.exit_code == 0 and r.stdout == expected, (tool, r)


def test_python_is_the_kernels_interpreter_and_libraries(box):
    code = ("import json, sys, pandas, numpy, matplotlib, scipy; "
            "print(json.dumps([sys.executable, sys.version, pandas.__version__, numpy.__version__]))")
    r = sh(box, f"python -c '{code}'; python3 -c '{code}'; command -v python python3")
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    py, py3 = json.loads(lines[0]), json.loads(lines[1])
    assert py == py3
    import numpy
    import pandas

    assert py[0] == kernel_python(), py
    assert py[2:] == [pandas.__version__, numpy.__version__]
    assert lines[2:] == [f"{SANDBOX_BIN}/python", f"{SANDBOX_BIN}/python3"]


def test_python_script_runs_as_in_the_kernel(box):
    """A script and its helper module in /mnt/data: pandas works, the script's
    folder is importable, and no __pycache__ appears beside them."""
    with open(os.path.join(box.data, "helper.py"), "w") as fh:
        fh.write("def total(df):\n    return int(df['x'].sum())\n")
    with open(os.path.join(box.data, "analyze.py"), "w") as fh:
        fh.write("#!/usr/bin/env python3\nimport pandas as pd\nfrom helper import total\n"
                 "print(total(pd.DataFrame({'x': range(5)})))\n")
    os.chown(os.path.join(box.data, "analyze.py"), box.uid, box.uid)
    r = sh(box, "python3 analyze.py && chmod +x analyze.py && ./analyze.py && ls -A")
    assert r.exit_code == 0, r
    assert r.stdout.split() == ["10", "10", "analyze.py", "helper.py"], r


def test_python_runs_as_the_shell_uid_under_the_shell_seccomp_profile(box):
    # socket(AF_INET) would succeed in an empty network namespace: only the
    # seccomp profile refuses it (EPERM).
    code = ("import os, socket; print(os.getuid()); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('Seccomp:')][0])\n"
            "try:\n    socket.socket(socket.AF_INET); print('SOCKET')\n"
            "except OSError as e:\n    print('refused', e.errno)")
    r = sh(box, f"python3 -c \"{code}\"; grep '^Seccomp:' /proc/self/status")
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == "1000" and lines[1] == "2", r          # 2: a seccomp filter is in force
    assert lines[2] == "refused 1", r
    assert lines[3].split() == ["Seccomp:", "2"]
    assert sh(box, "echo next").stdout == "next\n"


@pytest.mark.parametrize("command", [
    "pip install requests",
    "pip3 install --user ./wheel.whl",
    "python -m pip install requests",
    "python3 -m pip download requests",
    "python -mpip install requests",
    "python3 -m ensurepip",
])
def test_cant_pip_install_in_shell(box, command):
    r = sh(box, f"{command}; echo status=$?")
    assert r.stdout.strip().splitlines()[-1] == "status=1", r
    assert INSTALL_REFUSAL in r.stderr, r
    assert sh(box, "echo next").stdout == "next\n"


def test_cant_pip_install_past_the_wrapper(box):
    """pip reached another way has no index and no network: nothing lands."""
    r = sh(box, "python3 -u -m pip install --target /mnt/data/t requests; echo status=$?", timeout=90)
    assert r.stdout.strip().splitlines()[-1] != "status=0", r
    assert "No matching distribution" in r.stderr or "network" in r.stderr.lower(), r
    assert not os.path.exists(os.path.join(box.data, "t", "requests"))
    assert sh(box, "echo next").stdout == "next\n"


def test_pip_lists_what_is_installed(box):
    r = sh(box, "pip list --format=freeze; pip show pandas | head -1")
    assert r.exit_code == 0, r
    names = {line.split("==")[0].lower() for line in r.stdout.splitlines() if "==" in line}
    assert {"pandas", "numpy", "matplotlib"} <= names, r
    assert "Name: pandas" in r.stdout


def test_cant_run_virtualenv_console_scripts(box):
    """Only python, python3, python3.X and pip are added to PATH; the
    virtualenv's console scripts (jupyter, broker, ...) are not tools."""
    r = sh(box, f"ls {SANDBOX_BIN}; for c in jupyter broker ipython f2py pytest; do command -v $c; done; true")
    assert r.exit_code == 0, r
    listed = r.stdout.split()
    assert sorted(n for n in listed if not n.startswith("/")) == sorted(
        ["pip", "pip3", "python", "python3", f"python3.{sys.version_info.minor}"]), r
    assert [n for n in listed if n.startswith("/")] == [], r


def test_cant_change_the_toolbox(box):
    r = sh(box, f"""
        ln -sf /bin/sh /etc/alternatives/awk 2>/dev/null && echo CHANGED-ALTERNATIVE
        touch /etc/alternatives/new 2>/dev/null && echo ADDED-ALTERNATIVE
        echo 'echo pwned' > {SANDBOX_BIN}/python3 2>/dev/null && echo CHANGED-PYTHON
        touch {SANDBOX_BIN}/jupyter 2>/dev/null && echo ADDED-PROGRAM
        awk 'BEGIN {{print "awk-ok"}}'; python3 -c 'print("python-ok")'
    """)
    assert r.stdout.split() == ["awk-ok", "python-ok"], r
    assert not os.path.lexists("/etc/alternatives/new")
    assert os.path.realpath("/etc/alternatives/awk") != "/bin/sh"


# -- through the real broker -------------------------------------------------------------

def test_run_shell_command_has_the_toolbox(broker, session):
    r = broker.shell(session, "printf 'a 1\\nb 2\\n' | awk '{s += $2} END {print s}'; which awk; "
                              "python -c 'import pandas; print(pandas.DataFrame({\"x\": [1, 2]}).x.sum())'")
    assert r["status"] == "success", r
    assert r["stdout"] == "3\n/usr/bin/awk\n3\n", r


def test_run_shell_command_refuses_pip_install(broker, session):
    r = broker.shell(session, "python -m pip install requests")
    assert r["status"] == "error" and r["error"]["ename"] == "PackageInstallationUnavailable", r
    # Inside a script the wrapper refuses with the same words.
    r = broker.shell(session, "echo 'pip install requests' > setup.sh; bash setup.sh")
    assert r["status"] == "error" and INSTALL_REFUSAL in r["stderr"], r
    assert broker.shell(session, "echo next")["stdout"] == "next\n"
