"""The ``broker`` command line: the composition root.

Subcommands:
  broker kernelspec install   install the python3-sandbox kernelspec
  broker check                check every sandbox prerequisite and say what is missing
"""

from __future__ import annotations

import json
import sys

from traitlets import Bool, Unicode
from traitlets.config import Application, catch_config_error

from broker import __version__
from broker.sandbox.settings import SandboxSettings


class KernelspecInstallApp(Application):
    name = "broker-kernelspec-install"
    description = "Install the python3-sandbox kernelspec (a locked-down kernel for any Jupyter client)."
    user = Bool(False, config=True, help="Install for the current user instead of system-wide.")
    sys_prefix = Bool(False, config=True, help="Install into sys.prefix (the virtualenv) instead of system-wide.")
    prefix = Unicode("", config=True, help="Install under this prefix.")
    data_dir = Unicode("", config=True, help="Host folder the kernel sees as /mnt/data (default: a fresh temporary folder per kernel).")
    kernel_name = Unicode("python3-sandbox", config=True, help="Name of the kernelspec.")
    flags = {
        "user": ({"KernelspecInstallApp": {"user": True}}, "Install for the current user."),
        "sys-prefix": ({"KernelspecInstallApp": {"sys_prefix": True}}, "Install into sys.prefix."),
    }
    aliases = {"prefix": "KernelspecInstallApp.prefix", "data-dir": "KernelspecInstallApp.data_dir",
               "name": "KernelspecInstallApp.kernel_name"}

    def start(self):
        from broker import kernelspec

        prefix = sys.prefix if self.sys_prefix else (self.prefix or None)
        config = {"data_dir": self.data_dir} if self.data_dir else {}
        dest = kernelspec.install(user=self.user, prefix=prefix, name=self.kernel_name, provisioner_config=config)
        print(f"Installed kernelspec {self.kernel_name} in {dest}")


class KernelspecApp(Application):
    name = "broker-kernelspec"
    description = "Manage the python3-sandbox kernelspec."
    subcommands = {"install": (KernelspecInstallApp, KernelspecInstallApp.description)}

    def start(self):
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        return self.subapp.start()


class CheckApp(Application):
    name = "broker-check"
    description = "Check every sandbox prerequisite; exit 1 naming the first missing piece and its fix."
    classes = [SandboxSettings]

    def start(self):
        from broker.errors import SandboxUnavailable
        from broker.sandbox import cgroups, prereq
        from kernel_profile import lockdown

        settings = SandboxSettings(parent=self)
        try:
            bwrap = prereq.check_all(settings.bwrap)
        except SandboxUnavailable as exc:
            print(exc.message, file=sys.stderr)
            self.exit(1)
        print(json.dumps({"bwrap": bwrap, "root": prereq.is_root(), "cgroups": cgroups.detect(),
                          "landlock_abi": lockdown.landlock_abi()}, indent=2))


class BrokerApp(Application):
    name = "broker"
    version = __version__
    description = "A self-hosted code interpreter: one locked-down IPython kernel per session."
    classes = [SandboxSettings]
    subcommands = {
        "kernelspec": (KernelspecApp, KernelspecApp.description),
        "check": (CheckApp, CheckApp.description),
    }

    @catch_config_error
    def initialize(self, argv=None):
        super().initialize(argv)

    def start(self):
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        return self.subapp.start()


def main(argv=None):
    app = BrokerApp.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()
