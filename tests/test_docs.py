"""Every setting is documented: docs/configuration.md is generated from the
traits, and `broker --help-all` lists every one of them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_doc_matches_the_traits():
    from broker.configdoc import render

    assert (ROOT / "docs" / "configuration.md").read_text().strip() == render().strip(), \
        "docs/configuration.md is stale: run `python -m broker.configdoc > docs/configuration.md`"


def test_help_all_lists_every_setting():
    from broker.cli.serve import serve_classes

    out = subprocess.run([sys.executable, "-m", "broker.app", "serve", "--help-all"], capture_output=True,
                         text=True, check=True).stdout
    missing = [f"{cls.__name__}.{name}" for cls in serve_classes()
               for name in cls.class_traits(config=True) if f"--{cls.__name__}.{name}" not in out]
    assert not missing, f"not in `broker serve --help-all`: {missing}"
    top = subprocess.run([sys.executable, "-m", "broker.app", "--help-all"], capture_output=True, text=True,
                         check=True).stdout
    assert "--SandboxSettings.memory_limit" in top and "--SessionManager.idle_timeout_minutes" in top
