"""Property-based tests (hypothesis) of the code that reads untrusted input:
the /mnt/data path resolver (broker/files.py), the tool argument validation
(broker/tools.py) and the kernel WebSocket frame parsing
(broker/web/kernels.py).  No kernel needed: these run in-process against a
real folder with real links that lead out of it.

The properties: whatever the input, the answer is either a result inside the
rules or the broker's own clear error (never another exception, never a
file outside the folder), and what parses round-trips.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.channels import KernelMessage
from broker.errors import BrokerError, InvalidArgument
from broker.files import FileError, SessionFiles, normalise
from broker.tools import TOOLS
from broker.web.kernels import decode_legacy, decode_v1, encode_v1

pytestmark = pytest.mark.reliability

SETTINGS = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# Path pieces that matter to a resolver, plus anything at all.
PIECES = st.sampled_from(["", ".", "..", "...", "a", "sub", "out", "loop", "abs", "secret.txt", "in.txt",
                          "/", "//", "/mnt/data", "/mnt", "mnt", "data", "\x00", " ", "%2e%2e", "\\..", "ü"])
PATHS = st.one_of(st.lists(PIECES, max_size=8).map("/".join), st.text(max_size=60),
                  st.lists(PIECES, max_size=6).map(lambda p: "/mnt/data/" + "/".join(p)))

# What the WebSocket error path catches; anything else would escape on_message.
WS_ERRORS = (ValueError, KeyError, TypeError, UnicodeDecodeError)


# -- the path resolver ------------------------------------------------------------------------------

@SETTINGS
@given(path=PATHS)
def test_normalise_is_inside_or_refused(path):
    try:
        rel = normalise(path)
    except FileError as exc:
        assert exc.message and exc.status == 400
        return
    parts = rel.split("/") if rel else []
    assert not rel.startswith("/") and ".." not in parts and "" not in parts and "." not in parts
    assert "\x00" not in rel
    assert os.path.normpath(os.path.join("/mnt/data", rel)).startswith("/mnt/data")
    assert normalise(rel) == rel                       # idempotent
    assert normalise("/mnt/data/" + rel) == rel        # both spellings agree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A data folder with links that lead out (to a secret) and loop, next to that secret."""
    base = tmp_path_factory.mktemp("resolver")
    root = base / "data"
    (root / "sub").mkdir(parents=True)
    (base / "secret.txt").write_text("SECRET")
    (root / "in.txt").write_text("inside")
    (root / "sub" / "in.txt").write_text("inside too")
    os.symlink("../secret.txt", root / "out")
    os.symlink(str(base / "secret.txt"), root / "abs")
    os.symlink("../..", root / "sub" / "up")
    os.symlink("loop", root / "loop")
    return str(root)


@SETTINGS
@given(path=PATHS)
def test_reads_never_leave_the_folder(tree, path):
    files = SessionFiles(tree)
    try:
        data, _st, rel = files.read(path)
    except BrokerError as exc:
        assert exc.message and 400 <= exc.status < 600
        return
    assert data in (b"inside", b"inside too"), (path, rel, data)
    assert os.path.realpath(os.path.join(tree, rel)).startswith(os.path.realpath(tree) + os.sep)


@SETTINGS
@given(path=PATHS, body=st.binary(max_size=64))
def test_writes_never_leave_the_folder(tmp_path_factory, path, body):
    base = tmp_path_factory.mktemp("w")
    root = base / "data"
    root.mkdir()
    (base / "secret.txt").write_text("SECRET")
    os.symlink("../secret.txt", root / "out")
    os.symlink(str(base), root / "abs")
    try:
        SessionFiles(str(root)).write(path, [body])
    except BrokerError as exc:
        assert exc.message
    assert (base / "secret.txt").read_text() == "SECRET"
    assert sorted(os.listdir(base)) == ["data", "secret.txt"]


# -- tool arguments -----------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=3), max_leaves=8)


def _args(tool):
    """Objects that use the tool's own field names (plus strangers) with any JSON values."""
    names = [p.name for p in tool.params]
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=10), JSON, max_size=len(names) + 1)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(TOOLS)))
def test_tool_validation_accepts_only_the_contract(data, name):
    tool = TOOLS[name]
    args = data.draw(st.one_of(_args(tool), JSON), label="args")
    try:
        out = tool.validate(args)
    except InvalidArgument as exc:
        assert exc.message and exc.status == 400
        if isinstance(args, dict):
            # The error names a field that exists or the stranger that was sent.
            assert exc.field is None or exc.field in {p.name for p in tool.params} | set(args)
        return
    assert set(out) == {p.name for p in tool.params}
    for p in tool.params:
        v = out[p.name]
        if v is None:
            assert not p.required and p.default is None
            continue
        if p.type == "string":
            assert isinstance(v, str) and (p.max_length is None or len(v) <= p.max_length)
            if p.required:
                assert v.strip()
        elif p.type == "integer":
            assert type(v) is int and p.minimum <= v <= p.maximum
        else:
            assert type(v) is bool


# -- WebSocket frames ----------------------------------------------------------------------------------

@SETTINGS
@given(frame=st.binary(max_size=300))
def test_v1_frames_parse_or_raise_a_caught_error(frame):
    try:
        channel, parts = decode_v1(frame)
    except WS_ERRORS:
        return
    assert isinstance(channel, str) and all(isinstance(p, bytes) for p in parts)


@SETTINGS
@given(frame=st.one_of(st.binary(max_size=300), st.text(max_size=300), JSON.map(json.dumps)))
def test_legacy_frames_parse_or_raise_a_caught_error(frame):
    try:
        channel, parts = decode_legacy(frame)
    except WS_ERRORS:
        return
    assert isinstance(channel, str) and len(parts) >= 4 and all(isinstance(p, bytes) for p in parts)
    for p in parts[:4]:
        assert isinstance(json.loads(p), dict)


@SETTINGS
@given(channel=st.sampled_from(["shell", "control", "stdin", "iopub"]),
       parts=st.lists(st.binary(max_size=50), min_size=4, max_size=8))
def test_v1_round_trip(channel, parts):
    got_channel, got_parts = decode_v1(encode_v1(KernelMessage(channel, parts)))
    assert got_channel == channel and got_parts == parts


@SETTINGS
@given(frame=st.binary(min_size=16, max_size=200), flip=st.integers(0, 199), byte=st.integers(0, 255))
def test_v1_corrupted_frames_never_escape(frame, flip, byte):
    good = bytearray(encode_v1(KernelMessage("shell", [b"{}", b"{}", b"{}", b"{}", frame])))
    good[flip % len(good)] = byte
    try:
        decode_v1(bytes(good))
    except WS_ERRORS:
        pass
