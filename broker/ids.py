"""Session ids and broker names (no other broker import: the router's CLI loads it).

A session id is a random UUID (122 random bits), prefixed with the name of the
broker that made it and ``_`` when that broker has a name: ``b02_`` + UUID.
A router sends each request to the broker its id names (docs/scale.md).
jupyter_server's gateway client only routes kernel ids of five dash-separated
``\\w+`` groups, which both shapes are.
"""

from __future__ import annotations

import re
import uuid

BROKER_NAME_RE = re.compile(r"^[a-z0-9]{1,16}$")
BROKER_NAME_ALLOWED = "1 to 16 lowercase letters and digits"
ID_RE = re.compile(r"^(?:[a-z0-9]{1,16}_)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# What jupyter_server's gateway client accepts as a kernel id.
GATEWAY_KERNEL_ID_RE = re.compile(r"^\w+-\w+-\w+-\w+-\w+$")


def new_id(broker_name: str) -> str:
    sid = str(uuid.uuid4())
    return f"{broker_name}_{sid}" if broker_name else sid


def broker_of(sid: str) -> str:
    """The name of the broker a session id names ("" for a plain UUID)."""
    name, sep, _ = sid.partition("_")
    return name if sep else ""


def default_broker_name(hostname: str, in_kubernetes: bool) -> str:
    """On Kubernetes, a StatefulSet pod's ordinal (``broker-2`` -> ``b02``);
    elsewhere no name (plain UUID ids, as a single broker has always made)."""
    m = re.fullmatch(r".+-(\d{1,6})", hostname)
    return f"b{int(m.group(1)):02d}" if in_kubernetes and m else ""
