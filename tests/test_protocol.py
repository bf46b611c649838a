"""kefu.protocol: frame and body shapes, codecs, and the error code of every refusal."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kefu import protocol as p
from kefu.protocol import (
    MAX_RESUME,
    MAX_TEXT_CHARS,
    FrameDecoder,
    ProtocolError,
    decode_body,
    decode_client_frame,
    decode_server_frame,
    encode_json,
    encode_msgpack,
)

CONV = "0123456789abcdef"
SENDER = p.Sender(role="agent", id="alice", name="Alice")
MSG = p.Msg(
    conv=CONV,
    seq=7,
    epoch=2,
    id="m-7",
    client_msg_id="c-1",
    from_=SENDER,
    text="满99元包邮",
    ts=1_700_000_000_000,
    meta={"source": "kb", "score": 0.9},
)

CLIENT_FRAMES: list[Any] = [
    p.Hello(token="tok"),
    p.Hello(token="tok", resume=[p.ResumePoint(conv=CONV, epoch=1, last_seq=5)]),
    p.Send(conv=CONV, client_msg_id="c-1", text="hello"),
    p.Typing(conv=CONV),
    p.Read(conv=CONV, seq=3),
    p.Sync(conv=CONV, after=10, limit=20),
    p.Status(status="away", max_chats=3),
    p.Status(status="online"),
    p.Accept(conv=CONV),
    p.Transfer(conv=CONV, to_agent="bob"),
    p.Transfer(conv=CONV, to_group="sales"),
    p.Close(conv=CONV),
    p.Ping(),
]

SERVER_FRAMES: list[Any] = [
    p.Welcome(
        role="agent",
        id="alice",
        convs=[p.ConvState(conv=CONV, epoch=1, top_seq=9, status="assigned")],
        ping_interval_ms=20_000,
        max_msg_bytes=65_536,
    ),
    MSG,
    p.Msg(conv=CONV, seq=1, epoch=1, id="m-1", from_=SENDER, text="hi", ts=1),
    p.Delta(conv=CONV, stream_id="s1", text="满"),
    p.Ack(conv=CONV, client_msg_id="c-1", seq=7, ts=5, dup=False),
    p.Resumed(conv=CONV, from_seq=3, to_seq=7),
    p.Resumed(conv=CONV, recovered=False),
    p.History(conv=CONV, epoch=1, messages=[MSG], more=True),
    p.Assigned(conv=CONV, agent=p.AgentRef(id="alice", name="Alice")),
    p.Assigned(
        conv=CONV,
        agent=p.AgentRef(id="alice", name="Alice"),
        visitor=p.VisitorProfile(id="v1", name="Ann", user_id="u1", metadata={"plan": "pro"}),
        messages=[MSG],
    ),
    p.Queued(conv=CONV, position=3),
    p.Handoff(conv=CONV, reason="asked for a human"),
    p.Closed(conv=CONV, by="expired", reason="idle for 60 minutes"),
    p.TypingRelay(conv=CONV, from_=SENDER),
    p.ReadRelay(conv=CONV, seq=7, from_=SENDER),
    p.Presence(agent=p.AgentPresence(id="alice", status="online", active_chats=2)),
    p.StatusFrame(status="online"),
    p.Transferred(conv=CONV, to="bob"),
    p.Pong(),
    p.Error(code="forbidden", message="not your conversation", ref="c-1"),
    p.Error(code="rate_limited", message="slow down"),
]


def _tag(frame: Any) -> str:
    return str(type(frame).__struct_config__.tag)


def _wire(frame: Any) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.json.decode(encode_json(frame))
    return out


def _refused(data: bytes | str, *, msgpack: bool = False) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(data, msgpack=msgpack)
    return info.value


def _send(**fields: Any) -> bytes:
    frame = {"type": "send", "conv": CONV, "client_msg_id": "c-1", "text": "hi", **fields}
    return msgspec.json.encode(frame)


# ---------------------------------------------------------------------------------------------
# Shapes and round trips


def test_samples_cover_every_frame_type() -> None:
    assert {_tag(f) for f in CLIENT_FRAMES} == p.CLIENT_FRAME_TYPES
    assert {_tag(f) for f in SERVER_FRAMES} == p.SERVER_FRAME_TYPES
    client = "hello send typing read sync status accept transfer close ping"
    server = (
        "welcome msg delta ack resumed history assigned queued handoff closed typing read "
        "presence status transferred pong error"
    )
    assert set(client.split()) == p.CLIENT_FRAME_TYPES
    assert set(server.split()) == p.SERVER_FRAME_TYPES


@pytest.mark.parametrize("frame", CLIENT_FRAMES, ids=_tag)
def test_client_frames_round_trip(frame: Any) -> None:
    assert decode_client_frame(encode_json(frame), msgpack=False) == frame
    assert decode_client_frame(encode_json(frame).decode(), msgpack=False) == frame
    assert decode_client_frame(encode_msgpack(frame), msgpack=True) == frame


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=_tag)
def test_server_frames_round_trip(frame: Any) -> None:
    assert decode_server_frame(encode_json(frame)) == frame
    assert decode_server_frame(encode_msgpack(frame), msgpack=True) == frame
    assert msgspec.msgpack.decode(encode_msgpack(frame)) == _wire(frame)  # same shape


def test_every_frame_carries_its_type() -> None:
    for frame in CLIENT_FRAMES + SERVER_FRAMES:
        assert _wire(frame)["type"] == _tag(frame)


def test_from_is_the_wire_name() -> None:
    relays = [p.TypingRelay(conv=CONV, from_=SENDER), p.ReadRelay(conv=CONV, seq=1, from_=SENDER)]
    for frame in [MSG, *relays]:
        wire = _wire(frame)
        assert wire["from"] == {"role": "agent", "id": "alice", "name": "Alice"}
        assert "from_" not in wire
        assert msgspec.msgpack.decode(encode_msgpack(frame))["from"] == wire["from"]


def test_msg_shape_matches_the_protocol() -> None:
    assert _wire(MSG) == {
        "type": "msg",
        "conv": CONV,
        "seq": 7,
        "epoch": 2,
        "id": "m-7",
        "client_msg_id": "c-1",
        "from": {"role": "agent", "id": "alice", "name": "Alice"},
        "text": "满99元包邮",
        "ts": 1_700_000_000_000,
        "meta": {"source": "kb", "score": 0.9},
    }
    assert "满" in encode_json(MSG).decode()  # UTF-8, not \\u escapes


def test_optional_fields_are_omitted_when_none() -> None:
    bare = _wire(p.Msg(conv=CONV, seq=1, epoch=1, id="m", from_=SENDER, text="t", ts=1))
    assert "client_msg_id" not in bare and "meta" not in bare
    assert _wire(p.Error(code="invalid", message="m")) == {
        "type": "error",
        "code": "invalid",
        "message": "m",
    }
    assert _wire(p.Assigned(conv=CONV, agent=p.AgentRef(id="a", name="A"))) == {
        "type": "assigned",
        "conv": CONV,
        "agent": {"id": "a", "name": "A"},
    }
    assert _wire(p.Hello(token="t")) == {"type": "hello", "token": "t"}
    assert _wire(p.VisitorProfile(id="v")) == {"id": "v"}


def test_required_fields_are_written_even_at_their_zero_value() -> None:
    assert _wire(p.Ack(conv=CONV, client_msg_id="c", seq=1, ts=2, dup=False))["dup"] is False
    assert _wire(p.History(conv=CONV, epoch=1, messages=[], more=False)) == {
        "type": "history",
        "conv": CONV,
        "epoch": 1,
        "messages": [],
        "more": False,
    }
    assert _wire(p.Queued(conv=CONV, position=0))["position"] == 0


def test_resumed_has_exactly_the_two_protocol_shapes() -> None:
    assert _wire(p.Resumed(conv=CONV, from_seq=3, to_seq=7)) == {
        "type": "resumed",
        "conv": CONV,
        "from_seq": 3,
        "to_seq": 7,
    }
    assert _wire(p.Resumed(conv=CONV, recovered=False)) == {
        "type": "resumed",
        "conv": CONV,
        "recovered": False,
    }


def test_defaults_of_client_frames() -> None:
    sync = decode_client_frame(b'{"type":"sync","conv":"%s"}' % CONV.encode(), msgpack=False)
    assert sync == p.Sync(conv=CONV, after=0, limit=p.DEFAULT_SYNC_LIMIT)
    hello = decode_client_frame(b'{"type":"hello","token":"t"}', msgpack=False)
    assert isinstance(hello, p.Hello) and hello.resume is None


def test_type_need_not_come_first() -> None:
    data = b'{"seq":3,"conv":"0123456789abcdef","type":"read"}'
    assert decode_client_frame(data, msgpack=False) == p.Read(conv=CONV, seq=3)
    packed = msgspec.msgpack.encode({"seq": 3, "conv": CONV, "type": "read"})
    assert decode_client_frame(packed, msgpack=True) == p.Read(conv=CONV, seq=3)


def test_unknown_fields_of_client_frames_are_ignored() -> None:
    frame = decode_client_frame(_send(future_field={"x": [1, 2]}), msgpack=False)
    assert frame == p.Send(conv=CONV, client_msg_id="c-1", text="hi")


def test_decoder_accepts_every_buffer_kind() -> None:
    data = _send()
    want = p.Send(conv=CONV, client_msg_id="c-1", text="hi")
    for buf in (data, bytearray(data), memoryview(data), data.decode()):
        assert FrameDecoder().decode(buf) == want
    packed = encode_msgpack(want)
    for buf in (packed, bytearray(packed), memoryview(packed)):
        assert FrameDecoder(msgpack=True).decode(buf) == want


# ---------------------------------------------------------------------------------------------
# Error codes


@pytest.mark.parametrize("data", [b"[]", b'"x"', b"1", b"null", b"true", b"1.5", b"[1, 2]"])
def test_not_an_object_is_bad_frame(data: bytes) -> None:
    err = _refused(data)
    assert (err.code, err.ref) == ("bad_frame", None)
    assert "not a JSON object" in err.message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   ",
        b"{",
        b"{'type': 'ping'}",
        b'{"type":"ping"} trailing',
        b'{"type":"ping",}',
        b"\xff\xfe",
        b'{"type":"send","conv":"0123456789abcdef","client_msg_id":"c","text":"\xff"}',
        b'{"type":"send","conv":"0123456789abcdef","client_msg_id":"c","text":"\xc3"}',
        b'{"type":"send","conv":"0123456789abcdef","client_msg_id":"c","text":"\\ud800"}',
        b'{"type":"send","conv":"0123456789abcdef","client_msg_id":"c","text":"\\udc00x"}',
    ],
    ids=[
        "empty",
        "blank",
        "truncated",
        "single-quotes",
        "trailing-data",
        "trailing-comma",
        "invalid-utf8",
        "invalid-utf8-in-string",
        "truncated-utf8",
        "lone-high-surrogate",
        "lone-low-surrogate",
    ],
)
def test_malformed_json_is_bad_frame(data: bytes) -> None:
    err = _refused(data)
    assert err.code == "bad_frame"
    assert err.message.startswith("frame is not valid JSON")


@pytest.mark.parametrize(
    "data",
    [b"{}", b'{"conv":"0123456789abcdef"}', b'{"type":5}', b'{"type":null}', b'{"type":["send"]}'],
)
def test_object_without_a_string_type_is_bad_frame(data: bytes) -> None:
    err = _refused(data)
    assert err.code == "bad_frame"
    assert "`type`" in err.message


def test_unknown_type() -> None:
    err = _refused(b'{"type":"subscribe","channel":"x"}')
    assert err.code == "unknown_type"
    assert "'subscribe'" in err.message
    assert err.ref == "subscribe"
    # A server frame type is not a client frame type.
    assert _refused(b'{"type":"welcome"}').code == "unknown_type"
    # The echo of a long type is bounded.
    err = _refused(msgspec.json.encode({"type": "x" * 10_000}))
    assert err.code == "unknown_type" and len(err.message) < 200 and err.ref is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'{"type":"send","conv":"0123456789abcdef","text":"hi"}', "client_msg_id"),
        (b'{"type":"send","client_msg_id":"c-1","text":"hi"}', "conv"),
        (b'{"type":"read","conv":"0123456789abcdef"}', "seq"),
        (b'{"type":"hello"}', "token"),
        (b'{"type":"status"}', "status"),
    ],
)
def test_missing_field_is_invalid_and_named(data: bytes, field: str) -> None:
    err = _refused(data)
    assert err.code == "invalid"
    assert err.message == f"missing required field `{field}`"


def test_missing_nested_field_names_its_path() -> None:
    data = b'{"type":"hello","token":"t","resume":[{"conv":"0123456789abcdef","epoch":1}]}'
    err = _refused(data)
    assert err.code == "invalid"
    assert err.message == "missing required field `last_seq` - at `$.resume[0]`"
    assert err.ref == "hello"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"text": 5}, "Expected `str`, got `int` - at `$.text`"),
        ({"text": None}, "Expected `str`, got `null` - at `$.text`"),
        ({"conv": ["x"]}, "Expected `str`, got `array` - at `$.conv`"),
        ({"client_msg_id": {"a": 1}}, "Expected `str`, got `object` - at `$.client_msg_id`"),
    ],
)
def test_wrong_type_is_invalid_and_named(fields: dict[str, Any], message: str) -> None:
    err = _refused(_send(**fields))
    assert (err.code, err.message) == ("invalid", message)


def test_ref_is_the_client_msg_id_else_the_type() -> None:
    assert _refused(_send(text="")).ref == "c-1"
    assert _refused(b'{"type":"read","conv":"0123456789abcdef","seq":-1}').ref == "read"
    # A client_msg_id that is itself wrong is still echoed when short enough to be one...
    assert _refused(_send(client_msg_id="bad\u00e9")).ref == "bad\u00e9"
    # ...but not when it is too long or not a string: then the type stands in.
    assert _refused(_send(client_msg_id="x" * 65)).ref == "send"
    assert _refused(_send(client_msg_id=12)).ref == "send"
    assert _refused(b"[1]").ref is None


@pytest.mark.parametrize(
    "conv",
    [
        "0123456789ABCDEF",
        "0123456789abcde",
        "0123456789abcdef0",
        "0123456789abcdeg",
        "",
        "0123456789abcdef\n",
        " 0123456789abcde",
        "0x23456789abcdef",
    ],
)
def test_conv_ids_are_exactly_16_lowercase_hex_digits(conv: str) -> None:
    err = _refused(_send(conv=conv))
    assert err.code == "invalid"
    assert "`$.conv`" in err.message
    assert not p.is_conv_id(conv)


def test_valid_conv_ids() -> None:
    for conv in ("0000000000000000", "ffffffffffffffff", CONV):
        assert p.is_conv_id(conv)
        assert decode_client_frame(_send(conv=conv), msgpack=False).conv == conv  # type: ignore[union-attr]
    assert not p.is_conv_id(None) and not p.is_conv_id(b"0123456789abcdef")


def test_text_is_capped_in_characters() -> None:
    longest = decode_client_frame(_send(text="x" * MAX_TEXT_CHARS), msgpack=False)
    assert isinstance(longest, p.Send) and len(longest.text) == MAX_TEXT_CHARS
    err = _refused(_send(text="x" * (MAX_TEXT_CHARS + 1)))
    assert err.code == "invalid"
    assert err.message == f"Expected `str` of length <= {MAX_TEXT_CHARS} - at `$.text`"
    assert _refused(_send(text="")).message == "Expected `str` of length >= 1 - at `$.text`"


def test_a_maximal_text_fits_the_default_frame_limit() -> None:
    # 4-byte UTF-8 characters, a 64-character client_msg_id: the largest legal send frame.
    frame = p.Send(conv=CONV, client_msg_id="c" * 64, text="😀" * MAX_TEXT_CHARS)
    assert len(encode_json(frame)) <= 65_536
    assert decode_client_frame(encode_json(frame), msgpack=False) == frame


@pytest.mark.parametrize("cmid", ["", "x" * 65, "é", "tab\there", "line\n", "\x7f"])
def test_client_msg_id_is_1_to_64_printable_ascii(cmid: str) -> None:
    assert _refused(_send(client_msg_id=cmid)).code == "invalid"


def test_client_msg_id_accepts_printable_ascii() -> None:
    for cmid in ("x" * 64, "a", "550e8400-e29b-41d4-a716-446655440000", "m 1: ~!@#$%^&*()"):
        frame = decode_client_frame(_send(client_msg_id=cmid), msgpack=False)
        assert frame.client_msg_id == cmid  # type: ignore[union-attr]


def test_resume_list_is_bounded() -> None:
    point = {"conv": CONV, "epoch": 1, "last_seq": 0}
    ok = msgspec.json.encode({"type": "hello", "token": "t", "resume": [point] * MAX_RESUME})
    assert len(decode_client_frame(ok, msgpack=False).resume or []) == MAX_RESUME  # type: ignore[union-attr]
    too_many = msgspec.json.encode(
        {"type": "hello", "token": "t", "resume": [point] * (MAX_RESUME + 1)}
    )
    err = _refused(too_many)
    assert err.code == "invalid"
    assert err.message == f"Expected `array` of length <= {MAX_RESUME} - at `$.resume`"


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"limit": 0}, "$.limit"),
        ({"limit": 501}, "$.limit"),
        ({"after": -1}, "$.after"),
        ({"limit": 1.5}, "$.limit"),
        ({"limit": True}, "$.limit"),
    ],
)
def test_sync_limits(fields: dict[str, Any], where: str) -> None:
    data = msgspec.json.encode({"type": "sync", "conv": CONV, **fields})
    err = _refused(data)
    assert err.code == "invalid" and f"`{where}`" in err.message


def test_sync_limit_bounds_are_inclusive() -> None:
    for limit in (1, p.MAX_SYNC_LIMIT):
        data = msgspec.json.encode({"type": "sync", "conv": CONV, "limit": limit})
        assert decode_client_frame(data, msgpack=False) == p.Sync(conv=CONV, limit=limit)


def test_transfer_needs_exactly_one_target() -> None:
    for fields in ({}, {"to_agent": "bob", "to_group": "sales"}):
        data = msgspec.json.encode({"type": "transfer", "conv": CONV, **fields})
        err = _refused(data)
        assert err.code == "invalid"
        assert err.message == "exactly one of `to_agent` and `to_group` must be set"
        assert err.ref == "transfer"
    err = _refused(msgspec.json.encode({"type": "transfer", "conv": CONV, "to_agent": "a/b"}))
    assert err.code == "invalid" and "`$.to_agent`" in err.message
    with pytest.raises(ValueError):  # also when built in code
        p.Transfer(conv=CONV)


def test_status_values() -> None:
    err = _refused(b'{"type":"status","status":"busy"}')
    assert err.code == "invalid" and "`$.status`" in err.message
    err = _refused(b'{"type":"status","status":"online","max_chats":101}')
    assert err.code == "invalid" and "`$.max_chats`" in err.message


def test_huge_numbers_are_refused_not_crashed_on() -> None:
    read = '{"type":"read","conv":"%s","seq":%s}'
    err = _refused(read % (CONV, 10**30))
    assert err.code == "invalid" and "`$.seq`" in err.message
    assert _refused(read % (CONV, 2**63)).code == "invalid"
    assert decode_client_frame(read % (CONV, 2**63 - 1), msgpack=False) == p.Read(
        conv=CONV, seq=2**63 - 1
    )
    # Numbers no decoder can represent make the frame unparseable.
    assert _refused(read % (CONV, "9" * 5_000)).code == "bad_frame"
    assert _refused(read % (CONV, "1e400")).code == "bad_frame"
    # An unknown field is skipped without being converted.
    huge = '{"type":"ping","x":%s}' % ("9" * 50_000)
    assert decode_client_frame(huge, msgpack=False) == p.Ping()


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b"{" * 100_000,
        b'{"a":' * 100_000,
        b'{"type":"ping","x":' + b"[" * 100_000,
        b'{"type":"ping","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        _send()[:-1] + b',"y":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"type":"send","conv":"0123456789abcdef","client_msg_id":"c","text":' + b"[" * 100_000,
    ],
    ids=["arrays", "objects", "object-values", "unterminated-field", "field", "send", "text"],
)
def test_deep_nesting_is_bad_frame(data: bytes) -> None:
    err = _refused(data)
    assert err.code == "bad_frame"


def test_duplicate_keys_keep_the_last() -> None:
    data = b'{"type":"send","conv":"0123456789abcdef","client_msg_id":"c","text":"a","text":"b"}'
    assert decode_client_frame(data, msgpack=False).text == "b"  # type: ignore[union-attr]
    err = _refused(b'{"type":"ping","type":"close","conv":"0123456789abcdef"}')
    assert (err.code, err.message) == ("invalid", "conflicting `type` keys")
    err = _refused(b'{"type":"ping","type":"nope"}')
    assert err.code == "unknown_type"


def test_protocol_error_makes_the_error_frame() -> None:
    err = _refused(_send(text=5))
    assert _wire(err.to_frame()) == {
        "type": "error",
        "code": "invalid",
        "message": "Expected `str`, got `int` - at `$.text`",
        "ref": "c-1",
    }
    assert "invalid" in repr(err)


# ---------------------------------------------------------------------------------------------
# MessagePack


def test_msgpack_errors() -> None:
    mp = msgspec.msgpack.encode
    assert _refused(b"\xc1", msgpack=True).code == "bad_frame"  # never-used opcode
    assert _refused(b"", msgpack=True).code == "bad_frame"
    assert _refused(mp([1, 2]), msgpack=True).code == "bad_frame"
    assert _refused(mp({1: "send"}), msgpack=True).code == "bad_frame"
    assert _refused(b"\x81\xa4type\xa2\xff\xfe", msgpack=True).code == "bad_frame"  # bad UTF-8
    assert _refused(b"\x91" * 100_000, msgpack=True).code == "bad_frame"
    assert _refused(b"\x81\xa1x" * 100_000, msgpack=True).code == "bad_frame"
    assert _refused(mp({"type": "nope"}), msgpack=True).code == "unknown_type"
    err = _refused(
        mp({"type": "send", "conv": CONV, "client_msg_id": "c", "text": 1}), msgpack=True
    )
    assert (err.code, err.message, err.ref) == (
        "invalid",
        "Expected `str`, got `int` - at `$.text`",
        "c",
    )
    # MessagePack integers beyond int64 are still bounded like JSON ones.
    big = mp({"type": "read", "conv": CONV, "seq": 2**64 - 1})
    assert _refused(big, msgpack=True).code == "invalid"
    # A text frame on a MessagePack connection.
    err = _refused('{"type":"ping"}', msgpack=True)
    assert err.code == "bad_frame" and "binary" in err.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.booleans())
def test_arbitrary_bytes_never_escape_as_anything_but_protocol_error(
    data: bytes, msgpack: bool
) -> None:
    try:
        frame = decode_client_frame(data, msgpack=msgpack)
    except ProtocolError as err:
        assert err.code in ("bad_frame", "unknown_type", "invalid")
    else:
        assert _tag(frame) in p.CLIENT_FRAME_TYPES


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what MessagePack can hold
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


_FIELD_NAMES = [
    "conv",
    "client_msg_id",
    "text",
    "seq",
    "token",
    "resume",
    "limit",
    "after",
    "status",
    "max_chats",
    "to_agent",
    "to_group",
    "x",
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([*sorted(p.CLIENT_FRAME_TYPES), "nope"]),
    st.dictionaries(st.sampled_from(_FIELD_NAMES), _json_values | st.just(CONV), max_size=5),
    st.booleans(),
)
def test_arbitrary_objects_get_a_protocol_error_or_a_frame(
    kind: str, fields: dict[str, Any], msgpack: bool
) -> None:
    obj = {"type": kind, **fields}
    data = msgspec.msgpack.encode(obj) if msgpack else msgspec.json.encode(obj)
    try:
        frame = decode_client_frame(data, msgpack=msgpack)
    except ProtocolError as err:
        assert err.code == ("unknown_type" if kind == "nope" else "invalid")
    else:
        assert _tag(frame) == kind


# ---------------------------------------------------------------------------------------------
# REST bodies


def test_rest_bodies_have_schemas() -> None:
    schemas, components = msgspec.json.schema_components(p.REST_BODIES)
    assert len(schemas) == len(p.REST_BODIES)
    for cls in p.REST_BODIES:
        assert cls.__name__ in components
    assert components["Msg"]["properties"]["from"] == {"$ref": "#/$defs/Sender"}
    assert "session_id" in components["SendRequest"]["required"]


def test_create_chat_request() -> None:
    body = decode_body(b"{}", p.CreateChatRequest)
    assert body == p.CreateChatRequest()
    full = {"user_id": "u-1", "name": "Ann", "user_hash": "ab" * 32, "metadata": {"plan": "pro"}}
    assert decode_body(msgspec.json.encode(full), p.CreateChatRequest) == p.CreateChatRequest(
        **full
    )
    # Any user_hash shape decodes: a wrong hash is a 401 of the identity check, not a 400.
    assert decode_body(b'{"user_hash":"nope"}', p.CreateChatRequest).user_hash == "nope"


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(p.MAX_METADATA_KEYS + 1)},
        {"k" * (p.MAX_METADATA_KEY_CHARS + 1): "v"},
        {"k": "v" * (p.MAX_METADATA_VALUE_CHARS + 1)},
        {"": "v"},
        {"k": 1},
    ],
    ids=["too-many-keys", "long-key", "long-value", "empty-key", "non-string-value"],
)
def test_metadata_is_bounded(metadata: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_body(msgspec.json.encode({"metadata": metadata}), p.CreateChatRequest)
    assert info.value.code == "invalid"
    assert "metadata" in info.value.message


def test_metadata_at_its_bounds() -> None:
    metadata = {f"{i:0>64}": "v" * p.MAX_METADATA_VALUE_CHARS for i in range(p.MAX_METADATA_KEYS)}
    body = decode_body(msgspec.json.encode({"metadata": metadata}), p.CreateChatRequest)
    assert body.metadata == metadata


def test_decode_body_errors() -> None:
    for bad in (b"", b"{", b"[" * 100_000, b"\xff"):
        with pytest.raises(ProtocolError) as info:
            decode_body(bad, p.SendRequest)
        assert info.value.code == "bad_request"
    with pytest.raises(ProtocolError) as info:
        decode_body(b"[]", p.SendRequest)
    assert (info.value.code, info.value.message) == ("bad_request", "body is not a JSON object")
    with pytest.raises(ProtocolError) as info:
        decode_body(b'{"text":"hi"}', p.SendRequest)
    assert (info.value.code, info.value.message) == (
        "invalid",
        "missing required field `session_id`",
    )
    body = decode_body(b'{"session_id":"%s","text":"hi"}' % CONV.encode(), p.SendRequest)
    assert body == p.SendRequest(session_id=CONV, text="hi", client_msg_id=None, stream=False)


def test_agent_bodies() -> None:
    created = decode_body(b'{"id":"alice","name":"Alice"}', p.AgentCreate)
    assert (created.weight, created.max_chats, created.groups, created.token) == (1, 5, [], None)
    for bad in (
        b'{"id":"","name":"A"}',
        b'{"id":"a/b","name":"A"}',
        b'{"id":".hidden","name":"A"}',
        b'{"id":"alice\\n","name":"A"}',
        b'{"id":"a","name":"A","weight":0}',
        b'{"id":"a","name":"A","max_chats":-1}',
        b'{"id":"a","name":"A","groups":["has space"]}',
    ):
        with pytest.raises(ProtocolError) as info:
            decode_body(bad, p.AgentCreate)
        assert info.value.code == "invalid"
    update = decode_body(b'{"disabled":true}', p.AgentUpdate)
    assert update == p.AgentUpdate(disabled=True)
    view = p.AgentCreated(
        id="a",
        name="A",
        weight=1,
        max_chats=5,
        groups=[],
        disabled=False,
        status="offline",
        active_chats=0,
        token="secret",
    )
    assert _wire(view)["token"] == "secret" and _wire(view)["disabled"] is False


def test_response_bodies_write_every_required_field() -> None:
    assert _wire(p.CloseResponse(session_id=CONV, status="closed")) == {
        "session_id": CONV,
        "status": "closed",
    }
    assert _wire(p.ErrorBody(error=p.ErrorDetail(code="not_found", message="no such chat"))) == {
        "error": {"code": "not_found", "message": "no such chat"}
    }
    assert _wire(p.SendResponse(seq=1, status="bot", replies=[])) == {
        "seq": 1,
        "status": "bot",
        "replies": [],
    }


_SEND_ALPHABET = st.characters(codec="utf-8") | st.sampled_from(
    [
        *("\t", "\n", "\r", "\x00", "\x07", "\x0b", "\x1f", "\x7f", "\x85", "\x9f"),
        *("\ufffe", "\uffff", "\u00a0", "\u2028", "\u200d", "a", "F", "0", " ", "~", "é", "你"),
    ]
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    conv=st.text(alphabet="0123456789abcdefABCDEFg ", min_size=16, max_size=16),
    cmid=st.text(alphabet=_SEND_ALPHABET, min_size=1, max_size=8),
    text=st.text(alphabet=_SEND_ALPHABET, min_size=1, max_size=12),
    msgpack=st.booleans(),
)
def test_send_checks_exactly_the_patterns_of_its_fields(
    conv: str, cmid: str, text: str, msgpack: bool
) -> None:
    """``Send`` checks ConvId's, ClientMsgId's and Text's patterns itself (its doc): a frame is
    taken exactly when ``re`` says all three match, and refused with msgspec's message for the
    first field that does not, as a patterned field would be."""
    import re

    patterns = [
        ("conv", p.CONV_ID_PATTERN, conv),
        ("client_msg_id", p.CLIENT_MSG_ID_PATTERN, cmid),
        ("text", p.TEXT_PATTERN, text),
    ]
    failing = [(name, pat) for name, pat, value in patterns if re.search(pat, value) is None]
    raw = {"type": "send", "conv": conv, "client_msg_id": cmid, "text": text}
    data = msgspec.msgpack.encode(raw) if msgpack else msgspec.json.encode(raw)
    decoder = p.FrameDecoder(msgpack=msgpack)
    if not failing:
        assert decoder.decode(data) == p.Send(conv=conv, client_msg_id=cmid, text=text)
        return
    with pytest.raises(p.ProtocolError) as caught:
        decoder.decode(data)
    name, pattern = failing[0]
    assert caught.value.code == "invalid"
    assert str(caught.value).endswith(f" - at `$.{name}`")
    if name != "text":
        assert str(caught.value) == f"Expected `str` matching regex {pattern!r} - at `$.{name}`"
    else:
        assert "without control characters" in str(caught.value)
