"""Readiness and liveness: may a router send this broker new sessions?

``readiness(sessions)`` answers three questions, each with a short reason
when the answer is no (docs/scale.md):

- kernel start works: a pooled kernel is waiting, or the latest kernel start
  succeeded (a broker that has not started one yet is given the benefit of the
  doubt; the first failure turns it unready until a start succeeds again);
- the data root is writable (a small file is written and removed);
- memory admission is open (:func:`memory_shortfall`).

Nothing here names a session or an owner: the endpoints answer without a token.
"""

from __future__ import annotations

import os
import secrets

def memory_shortfall(sessions) -> str | None:
    """Why memory admission is closed, or None when it is open: the
    session manager's admission policy decides (broker/admission.py)."""
    return sessions.admission.shortfall()


def kernel_start_problem(sessions) -> str | None:
    if any(s.kernel is not None for s in getattr(sessions, "_pool", [])):
        return None
    last = sessions.last_start
    if last is None or last[1]:
        return None
    return f"the latest kernel start failed: {last[2]}"


def data_root_problem(sessions) -> str | None:
    probe = os.path.join(sessions.data_root, f".ready-{secrets.token_hex(4)}")
    try:
        with open(probe, "w") as fh:
            fh.write("ok")
        os.unlink(probe)
    except OSError as exc:
        return f"data root not writable: {exc.strerror or exc}"
    return None


def readiness(sessions) -> dict:
    """{"ready": bool, "broker": name, "problems": [...]} (problems empty when ready)."""
    problems = []
    if sessions.closing:
        problems.append("shutting down")
    for check in (kernel_start_problem, data_root_problem, memory_shortfall):
        why = check(sessions)
        if why:
            problems.append(why)
    return {"ready": not problems, "broker": sessions.broker_name, "problems": problems}
