"""``broker transcript ID``: a session's transcript, from the data root (as
before) or, with ``--url`` or ``BROKER_URL``, from a running broker."""

from __future__ import annotations

import os
import sys

from broker.app import TranscriptApp
from broker.cli.common import EXIT_OK, ClientApp, ClientConfig, UsageError
from broker.client import ENV_URL
from broker.sessions import ID_RE


class TranscriptCommand(TranscriptApp, ClientApp):
    name = "broker-transcript"
    description = ("Write a session's transcript (.ipynb): broker transcript SESSION_ID [-o FILE]. It is read from "
                   "the data root (--data-root), or fetched from a running broker when --url is given or "
                   f"${ENV_URL} is set (and --data-root is not).")
    usage = "broker transcript SESSION_ID [-o FILE] [--data-root DIR | --url URL --token TOKEN]"
    aliases = {**TranscriptApp.aliases, **ClientApp.aliases}
    flags = {}

    @property
    def classes(self):
        return [*TranscriptApp.classes.fget(self), ClientConfig]

    def remote(self) -> bool:
        if "data_root" in self.config.get("SessionManager", {}):
            return False
        return bool(self.config.get("ClientConfig", {}).get("url") or os.environ.get(ENV_URL))

    def start(self):
        if not self.remote():
            return TranscriptApp.start(self)
        return ClientApp.start(self)

    def run(self) -> int:
        a = list(self.extra_args)
        if len(a) != 1 or not ID_RE.match(a[0]):
            raise UsageError("give one session id")
        text = self.client.session(a[0]).transcript_text()
        if self.output:
            try:
                with open(self.output, "w") as fh:
                    fh.write(text)
            except OSError as exc:
                raise UsageError(f"cannot write {self.output}: {exc}") from None
        else:
            sys.stdout.write(text)
        return EXIT_OK
