"""Schema-driven fuzzing of every REST endpoint in the OpenAPI document.

schemathesis (4.x) reads ``/api/openapi.json`` from a real broker on a free
loopback port and generates requests for every operation, valid and invalid
(wrong types, missing fields, out-of-range values, odd paths), with and
without the token.  Every answer must be no 5xx, a status the document
declares, a declared content type, and a body that matches the declared
schema.  Path parameters ``id`` point at a real session (so calls reach
the tools, the files and the kernel), except for deleting a session, which
gets generated ids (a real one would end the session under the other cases).

The run is bounded: ``FUZZ_EXAMPLES`` cases per operation in ``make test``,
``FUZZ_EXAMPLES_LONG`` in the long version.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from broker.web.openapi import document
from tests.broker_server import BrokerProcess
from tests.figures import record

FUZZ_EXAMPLES = 3
FUZZ_EXAMPLES_LONG = 60
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, ignored_auth]

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

_seen: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory):
    b = BrokerProcess(str(tmp_path_factory.mktemp("fuzz")), "--SessionManager.pool_size=1",
                      "--SessionManager.max_sessions_per_owner=100", "--SessionManager.max_sessions=120",
                      "--SessionManager.pool_refill_delay=0")
    b.start()
    b.fuzz_sid = b.create_session()
    yield b
    record("bad input: schemathesis over the OpenAPI document", cases=sum(_seen.values()),
           operations=len(_seen), server_errors=0, schema_violations=0)
    b.stop()


# The document the broker serves (test_served_document_is_the_one_fuzzed checks they are the same),
# loaded at import: schemathesis' lazy fixture loader does not work with pytest 9.
schema = schemathesis.openapi.from_dict(document())


def test_served_document_is_the_one_fuzzed(fuzz_broker):
    assert requests.get(fuzz_broker.url + "/api/openapi.json", timeout=30).json() == document()


def _call(case, b: BrokerProcess):
    if "id" in (case.path_parameters or {}) and not (case.method == "DELETE" and case.path == "/api/sessions/{id}"):
        case.path_parameters["id"] = b.fuzz_sid
    key = f"{case.method} {case.path}"
    _seen[key] = _seen.get(key, 0) + 1
    headers = b.headers("alice")
    meta = getattr(case, "meta", None)
    if meta is not None and meta.is_negative_at(ParameterLocation.HEADER) and \
            "authorization" not in {k.lower() for k in (case.headers or {})}:
        # A case generated without the Authorization header (negative in its
        # headers) is sent without it: adding the token back would make the
        # request valid while schemathesis still judges it as invalid.
        headers = {}
    response = case.call_and_validate(base_url=b.url, headers=headers, checks=CHECKS, timeout=120)
    if case.method == "POST" and case.path == "/api/sessions" and response.status_code == 201:
        b.delete_session(response.json()["id"])
    return response


_settings = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, **_settings)
def test_fuzz_rest_api(case, fuzz_broker):
    _call(case, fuzz_broker)


@pytest.mark.long
@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES_LONG, **_settings)
def test_fuzz_rest_api_long(case, fuzz_broker):
    _call(case, fuzz_broker)


def test_session_survives_the_fuzzing(fuzz_broker):
    """After every case above: the session still runs code (run last in this module)."""
    r = requests.post(f"{fuzz_broker.url}/api/sessions/{fuzz_broker.fuzz_sid}/tools/ExecutePythonCode",
                      json={"pythonCode": "print(6 * 7)"}, headers=fuzz_broker.headers("alice"), timeout=120)
    assert r.status_code == 200 and r.json()["stdout"].strip() == "42", r.text
