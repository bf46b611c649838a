"""Every refusal a client can see derives from KefuError and names a snake_case code."""

from __future__ import annotations

import re

import pytest

import kefu.cluster.member
import kefu.grpc.server
import kefu.web.http
from kefu import conversations, protocol, routing, store
from kefu.errors import KefuError

# Every module that defines refusals, imported here so that the leaves below do not depend on
# which other tests ran first.
_MODULES = (kefu.cluster.member, kefu.grpc.server, kefu.web.http)


def _leaves() -> list[type[KefuError]]:
    found: list[type[KefuError]] = []
    pending: list[type[KefuError]] = [KefuError]
    while pending:
        cls = pending.pop()
        subs = cls.__subclasses__()
        pending.extend(subs)
        if not subs and cls is not protocol.ProtocolError:
            found.append(cls)
    return found


def test_the_modules_refusals_share_the_base() -> None:
    for cls in (
        conversations.ConversationError,
        routing.RoutingError,
        store.StoreError,
        protocol.ProtocolError,
    ):
        assert issubclass(cls, KefuError)


@pytest.mark.parametrize("cls", _leaves(), ids=lambda c: c.__name__)
def test_each_refusal_names_its_own_code(cls: type[KefuError]) -> None:
    assert re.fullmatch(r"[a-z][a-z_]*", cls.code)
    assert cls.code not in ("internal", "conversation_error", "routing_error", "store_error")


def test_key_error_subclasses_print_their_message_not_a_repr() -> None:
    err = routing.UnknownAgent("no agent 'x'")
    assert isinstance(err, KeyError)
    assert str(err) == "no agent 'x'"
    assert str(conversations.UnknownConversation("gone")) == "gone"


def test_protocol_error_keeps_its_instance_code() -> None:
    err = protocol.ProtocolError("bad_frame", "not JSON")
    assert isinstance(err, KefuError)
    assert err.code == "bad_frame"
    assert str(err) == "not JSON"
