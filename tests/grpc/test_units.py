"""The gRPC front's parts that need no server: the status table, peer addresses, the
subscriber's bounded queue, the event mapping, and the ``grpc`` config section."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from kefu.config import ConfigError, load_config
from kefu.grpc.server import STATUS_OF_CODE, Subscriber, _event, _peer_ip, status_of
from kefu.protocol import Closed, Msg, Queued, Resumed, Sender, encode_json
from kefu.web.http import STATUS_OF_CODE as HTTP_STATUS_OF_CODE
from tests import aio


def test_every_rest_error_code_has_a_grpc_status() -> None:
    for code in HTTP_STATUS_OF_CODE:
        if code in ("method_not_allowed", "unsupported_media_type"):
            continue  # HTTP's own refusals: no such thing over gRPC
        assert code in STATUS_OF_CODE, code
    s = grpc.StatusCode
    assert status_of("invalid") == s.INVALID_ARGUMENT
    assert status_of("unauthorized") == s.UNAUTHENTICATED
    assert status_of("forbidden") == s.PERMISSION_DENIED
    assert status_of("not_found") == s.NOT_FOUND
    assert status_of("rate_limited") == status_of("busy") == s.RESOURCE_EXHAUSTED
    assert status_of("cluster_unavailable") == status_of("unavailable") == s.UNAVAILABLE
    assert status_of("no_such_code") == s.INTERNAL


@pytest.mark.parametrize(
    ("peer", "ip"),
    [
        ("ipv4:127.0.0.1:5050", "127.0.0.1"),
        ("ipv6:[::1]:5050", "::1"),
        ("ipv6:%5B2001:db8::7%5D:443", "2001:db8::7"),
        ("unix:/tmp/sock", ""),
        ("", ""),
    ],
)
def test_peer_address(peer: str, ip: str) -> None:
    assert _peer_ip(peer) == ip


def _msg(conv: str, seq: int, text: str = "hi") -> Msg:
    return Msg(
        conv=conv,
        seq=seq,
        epoch=1,
        id=f"id{seq}",
        from_=Sender(role="visitor", id="v1", name="visitor"),
        text=text,
        ts=1,
        meta={"k": [1, 2]},
    )


def test_events_of_another_conversation_are_not_forwarded() -> None:
    conv, other = "a" * 16, "b" * 16
    event = _event("msg", encode_json(_msg(conv, 3)), conv)
    assert (event.type, event.msg.seq, event.msg.sender.role) == ("msg", 3, "visitor")
    assert event.msg.meta_json == b'{"k":[1,2]}'
    assert _event("msg", encode_json(_msg(other, 3)), conv) is None
    resumed = _event("resumed", encode_json(Resumed(conv=conv, from_seq=2, to_seq=5)), conv)
    assert (resumed.resumed.from_seq, resumed.resumed.to_seq, resumed.resumed.recovered) == (
        2,
        5,
        True,
    )
    not_recovered = _event("resumed", encode_json(Resumed(conv=conv, recovered=False)), conv)
    assert not not_recovered.resumed.recovered
    queued = encode_json(Queued(conv=conv, position=2))
    assert _event("queued", queued, conv).frame_json == queued
    assert _event("closed", encode_json(Closed(conv=other, by="agent", reason="x")), conv) is None


def test_subscriber_queue_is_bounded_and_a_slow_one_is_closed() -> None:
    async def body() -> None:
        sub = Subscriber(1_000, "ipv4:127.0.0.1:1")
        frame = encode_json(_msg("a" * 16, 1, "x" * 100))
        sent = 0
        while sub.send_encoded(frame, "msg"):
            sent += 1
        assert sent == 1_000 // len(frame)
        assert sub.close_code == 4008 and sub.queued_bytes == 0 and sub.ended.done()
        assert not sub.send_encoded(frame, "msg")  # closed: refused, nothing queued
        assert await sub.take() == []  # the queue was dropped

    aio.run(body)


def test_subscriber_delivers_what_was_queued_before_a_close() -> None:
    async def body() -> None:
        sub = Subscriber(1 << 20, "")
        assert sub.send(Queued(conv="a" * 16, position=1))
        sub.close(1001, "server stopping")
        assert [kind for kind, _ in await sub.take()] == ["queued"]
        assert await sub.take() == []
        assert sub.close_code == 1001 and sub.close_reason == "server stopping"

    aio.run(body)


def test_grpc_config_section(tmp_path: Path) -> None:
    cfg = load_config(None, env={})
    assert (cfg.grpc.port, cfg.grpc.host) == (None, None)  # off by default
    path = tmp_path / "kefu.yaml"
    path.write_text("grpc: {port: 9090}\n")
    assert load_config(path, env={}).grpc.port == 9090
    path.write_text("http: {port: 9090}\ngrpc: {port: 9090}\n")
    with pytest.raises(ConfigError, match=r"grpc\.port"):
        load_config(path, env={})
    path.write_text("grpc: {port: 70000}\n")
    with pytest.raises(ConfigError, match=r"grpc\.port"):
        load_config(path, env={})
