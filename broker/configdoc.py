"""docs/configuration.md, generated from the traits themselves so it cannot
drift (tests/test_docs.py checks it): ``python -m broker.configdoc``."""

from __future__ import annotations

import inspect

from broker.cli.serve import ServeApp, serve_classes


def render() -> str:
    lines = ["# Configuration", "",
             "Every setting is a traitlets trait: on the command line as `--Class.trait=value`, in a config",
             "file (`broker serve --config broker_config.py` with `c.Class.trait = value`, or JSON), and",
             "listed by `broker serve --help-all`. Sizes accept bytes or strings such as `2G`, `256M`.",
             "`SandboxSettings` traits also apply to the `python3-sandbox` kernelspec (set them in the",
             "kernelspec's `metadata.kernel_provisioner.config`, or as `c.SandboxProvisioner.<trait>`).",
             "", "Command-line aliases of `broker serve`: " +
             ", ".join(f"`--{k}` ({v})" for k, v in sorted(ServeApp.aliases.items())) + ".", ""]
    for cls in serve_classes():
        own = {n: t for n, t in cls.class_traits(config=True).items() if n in cls.__dict__ or cls is ServeApp
               and n in ("ip", "port", "token", "tokens_file", "public_url", "inline_images", "link_ttl",
                         "config_file")}
        if not own:
            continue
        lines += [f"## {cls.__name__}", ""]
        doc = inspect.getdoc(cls) or ""
        if doc:
            lines += [doc.split("\n\n")[0], ""]
        lines += ["| setting | default | meaning |", "|---|---|---|"]
        for name, trait in sorted(own.items()):
            default = trait.default_value_repr()
            help_ = " ".join((trait.help or "").split()).replace("|", "\\|")
            lines.append(f"| `{cls.__name__}.{name}` | `{default}` | {help_} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
