"""The virtualenv Semantic Kernel's client runs in (``.venv-sk`` next to
``.venv``), made from setup.cfg's ``azure-sk-client`` extra.  Semantic Kernel
does not go into the broker's own virtualenv: it pins ``mcp<2`` and
``referencing<0.37`` and brings some fifty packages (aiortc, av, openai,
opentelemetry, ...).

``make install`` runs ``python -m tests.aca_sk_venv``; the test calls
``ensure()``, which does nothing when the virtualenv holds the extra's current
requirements.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

EXTRA = "azure-sk-client"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SK_VENV = os.path.join(REPO, ".venv-sk")


def requirements() -> list[str]:
    reqs = []
    for r in importlib.metadata.requires("broker") or []:
        spec, _, marker = r.partition(";")
        if marker.replace(" ", "").replace("'", '"') == f'extra=="{EXTRA}"':
            reqs.append(spec.strip())
    if not reqs:
        raise RuntimeError(f"setup.cfg has no [{EXTRA}] extra in the installed metadata: run `make install`")
    return reqs


def ensure() -> str:
    """The virtualenv's Python, installed or updated as needed."""
    reqs = "\n".join(requirements())
    python = os.path.join(SK_VENV, "bin", "python")
    stamp = os.path.join(SK_VENV, ".requirements")
    try:
        with open(stamp) as fh:
            if fh.read() == reqs and os.path.exists(python):
                return python
    except OSError:
        pass
    subprocess.run([sys.executable, "-m", "venv", "--clear", SK_VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *reqs.split("\n")], check=True, stdin=subprocess.DEVNULL)
    with open(stamp, "w") as fh:
        fh.write(reqs)
    return python


if __name__ == "__main__":
    print(ensure())
