"""The broker's lean kernel-message parser (``broker.execution._deserialize``)
keeps jupyter_client's checks: unsigned, tampered and replayed messages are
refused; a good message parses to what ``Session.deserialize`` gives, with
the header dates left as strings."""

from __future__ import annotations

import pytest
from jupyter_client.session import Session

from broker.execution import _deserialize


def signed(session: Session, content: dict) -> list[bytes]:
    msg = session.msg("execute_reply", content, parent=session.msg_header("execute_request"))
    parts = session.serialize(msg)
    _, msg_list = session.feed_identities(parts)
    return msg_list


@pytest.fixture
def pair():
    key = b"a-test-key"
    return Session(key=key), Session(key=key)


def test_parses_like_jupyter_client_but_keeps_dates_as_text(pair):
    sender, receiver = pair
    parts = signed(sender, {"status": "ok", "execution_count": 3})
    ours = _deserialize(receiver, list(parts))
    theirs = Session(key=b"a-test-key").deserialize(list(parts))
    assert ours["content"] == theirs["content"] == {"status": "ok", "execution_count": 3}
    assert ours["msg_type"] == theirs["msg_type"] == "execute_reply"
    assert ours["parent_header"]["msg_id"] == theirs["parent_header"]["msg_id"]
    assert isinstance(ours["header"]["date"], str)
    assert not isinstance(theirs["header"]["date"], str)


def test_cant_pass_a_tampered_message(pair):
    sender, receiver = pair
    parts = signed(sender, {"status": "ok"})
    parts[4] = parts[4].replace(b"ok", b"no")
    with pytest.raises(ValueError, match="Invalid Signature"):
        _deserialize(receiver, parts)
    # The receiver still takes the next good message.
    assert _deserialize(receiver, signed(sender, {"status": "ok"}))["content"]["status"] == "ok"


def test_cant_replay_or_drop_the_signature(pair):
    sender, receiver = pair
    parts = signed(sender, {"status": "ok"})
    _deserialize(receiver, list(parts))
    with pytest.raises(ValueError, match="Duplicate Signature"):
        _deserialize(receiver, list(parts))
    unsigned = signed(sender, {"status": "ok"})
    unsigned[0] = b""
    with pytest.raises(ValueError, match="Unsigned"):
        _deserialize(receiver, unsigned)
    with pytest.raises(TypeError, match="malformed"):
        _deserialize(receiver, parts[:3])
