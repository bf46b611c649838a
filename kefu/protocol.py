"""The wire protocol: msgspec Structs for every WebSocket frame and REST body, and the codecs.

This module is the executable form of ``PROTOCOL.md`` (v1). Field names, frame types and error
codes here are the contract; the server may add types and fields, never rename or remove them.

Frames
------
Client frames form one tagged union, :data:`ClientFrame`, keyed by ``"type"``; server frames
form :data:`ServerFrame`. One msgspec decoder call turns a frame into its Struct and validates
every field on the way (types, lengths, ranges, patterns), so the server never handles an
unchecked value. Unknown fields in client frames are ignored, so that a client written against
a later protocol version still talks to this server.

Optional fields (``?`` in PROTOCOL.md) default to ``None`` and are left out of the output when
``None`` (``omit_defaults``); fields PROTOCOL.md lists without ``?`` have no default, so they are
always written. ``from`` is a Python keyword: the attribute is ``from_``, the wire name ``from``.

Limits checked by decoding (each refusal is ``error {code: "invalid"}``):

=========================  ===========================================================
conversation ids           exactly 16 lowercase hex digits (``session_id`` in REST too)
``client_msg_id``          1 to 64 printable ASCII characters, so it is at most 64 bytes,
                           the store's dedup-key bound
``text``                   1 to 16,000 characters: 16,000 characters of 4-byte UTF-8 are
                           64,000 bytes, so every text within the cap fits the default
                           64 KiB frame with its envelope (the frame limit alone would
                           allow 4 times more ASCII than CJK text)
``hello.token``            1 to 4,096 characters
``hello.resume``           at most 100 entries (as many as an agent's ``max_chats`` bound,
                           so one ``hello`` can resume every conversation it may hold)
``sync.limit``             1 to 500 (default 50); ``after`` at least 0 (default 0)
seq and epoch numbers      0 to 2**63 - 1: every client language holds them in an int64
agent ids, group names     1 to 64 of ``A-Z a-z 0-9 _ . @ -``, not starting with ``.``,
                           ``@`` or ``-`` (safe as a URL path segment)
``transfer``               exactly one of ``to_agent`` and ``to_group``
=========================  ===========================================================

Decoding errors
---------------
:func:`decode_client_frame` (and :class:`FrameDecoder`, its per-connection form) raises
:class:`ProtocolError` with the code PROTOCOL.md names:

- ``bad_frame``: not valid JSON or MessagePack (including invalid UTF-8, lone surrogates, and
  nesting deeper than the decoder's recursion limit), not an object, or no string ``type``;
- ``unknown_type``: a string ``type`` this server does not know;
- ``invalid``: a known type with a missing field, a wrong type or a broken limit; the message
  names the field (``missing required field `conv```, ``Expected `str`, got `int` - at
  `$.text```). A message quoting a refused value is cut to 256 characters, the path kept.

``ref`` is the frame's ``client_msg_id`` when it is a plausible one (a string of at most 64
characters), else its ``type`` when that is a string of at most 64 characters, else ``None``.
The happy path is one decoder call; only a failed frame is decoded a second time, untyped, to
classify the failure and find ``ref``.

Duplicate keys in a JSON object: the last one wins, as in every mainstream JSON parser; two
different ``type`` values are refused as ``invalid``.

REST
----
The REST request and response bodies are Structs too; :data:`REST_BODIES` lists them for the
OpenAPI document (``msgspec.json.schema_components(REST_BODIES)``), and :func:`decode_body`
decodes a request body with the same error classification (``bad_request`` for a body that is
not a JSON object, ``invalid`` for a field).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar

import msgspec
from msgspec import Meta, Struct, field

from kefu.errors import KefuError

__all__ = [
    "AGENT_ID_PATTERN",
    "AGENT_SESSION_TTL_S",
    "CLIENT_FRAME_TYPES",
    "CONV_ID_PATTERN",
    "DEFAULT_SYNC_LIMIT",
    "LINE_PATTERN",
    "MAX_AGENT_SESSION_TTL_S",
    "MAX_AGENT_TOKEN_TTL_DAYS",
    "MAX_AGENT_WEIGHT",
    "MAX_CHATS_LIMIT",
    "MAX_CLIENT_MSG_ID_CHARS",
    "MAX_GROUPS",
    "MAX_METADATA_KEYS",
    "MAX_METADATA_KEY_CHARS",
    "MAX_METADATA_VALUE_CHARS",
    "MAX_NAME_CHARS",
    "MAX_RESUME",
    "MAX_SEQ",
    "MAX_SYNC_LIMIT",
    "MAX_TEXT_CHARS",
    "MAX_TOKEN_CHARS",
    "MIN_AGENT_SESSION_TTL_S",
    "PATTERN_END",
    "PROTOCOL_VERSION",
    "REST_BODIES",
    "SERVER_FRAME_TYPES",
    "TEXT_PATTERN",
    "Accept",
    "Ack",
    "AgentCreate",
    "AgentCreated",
    "AgentId",
    "AgentList",
    "AgentLoginRequest",
    "AgentPresence",
    "AgentRef",
    "AgentSession",
    "AgentStatus",
    "AgentToken",
    "AgentTokenRequest",
    "AgentUpdate",
    "AgentView",
    "Assigned",
    "ClientFrame",
    "ClientMsgId",
    "Close",
    "CloseRequest",
    "CloseResponse",
    "Closed",
    "ClosedBy",
    "ConvId",
    "ConvState",
    "ConversationStatus",
    "CreateChatRequest",
    "CreateChatResponse",
    "Delta",
    "Error",
    "ErrorBody",
    "ErrorDetail",
    "FrameDecoder",
    "GroupName",
    "Groups",
    "Handoff",
    "Health",
    "Hello",
    "History",
    "HistoryResponse",
    "KbHit",
    "KbReloadResponse",
    "KbSearchResponse",
    "MaxChats",
    "Msg",
    "Name",
    "Ping",
    "Pong",
    "Presence",
    "ProtocolError",
    "PublicConfig",
    "Queued",
    "Read",
    "ReadRelay",
    "ResumePoint",
    "Resumed",
    "Role",
    "Send",
    "SendRequest",
    "SendResponse",
    "Sender",
    "SenderRole",
    "Seq",
    "ServerFrame",
    "SessionStats",
    "Status",
    "StatusFrame",
    "Sync",
    "Text",
    "Token",
    "Transfer",
    "Transferred",
    "Typing",
    "TypingRelay",
    "VisitorProfile",
    "Weight",
    "Welcome",
    "decode_body",
    "decode_client_frame",
    "decode_server_frame",
    "encode_json",
    "encode_msgpack",
    "is_conv_id",
]

PROTOCOL_VERSION: Final = 1

# ---------------------------------------------------------------------------------------------
# Limits and constrained types (the table in the module docstring gives the reasons)

MAX_TEXT_CHARS: Final = 16_000
MAX_CLIENT_MSG_ID_CHARS: Final = 64
MAX_TOKEN_CHARS: Final = 4_096
MAX_RESUME: Final = 100
DEFAULT_SYNC_LIMIT: Final = 50
MAX_SYNC_LIMIT: Final = 500  # the store's HISTORY_MAX_LIMIT
MAX_SEQ: Final = (1 << 63) - 1
# Names shown to people (visitor, agent, bot). 64 characters of 4-byte UTF-8 are 256 bytes,
# the store's bound for ids and names.
MAX_NAME_CHARS: Final = 64
MAX_METADATA_KEYS: Final = 32
MAX_METADATA_KEY_CHARS: Final = 64
MAX_METADATA_VALUE_CHARS: Final = 1_024
MAX_AGENT_WEIGHT: Final = 1_000
MAX_CHATS_LIMIT: Final = MAX_RESUME
MAX_GROUPS: Final = 64  # kefu._core.router.MAX_GROUPS_PER_AGENT

#: Ends a constraint pattern. msgspec checks patterns with re.search, where `$` also matches
#: before a final newline: "alice\n" would pass "^[a-z]+$". The lookahead refuses it, and
#: means the same in the ECMAScript regexes of JSON Schema. (A conversation id needs none: its
#: length is fixed.)
PATTERN_END: Final = "$(?!\\n)"
CONV_ID_PATTERN: Final = "^[0-9a-f]{16}$"
AGENT_ID_PATTERN: Final = "^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}" + PATTERN_END
_CONV_ID_RE: Final = re.compile(CONV_ID_PATTERN)

# Each pattern is one call into Python's re per decoded value: measured on a typical `send`
# frame, decoding takes 0.16 us with neither of the patterns below and 0.87 us with both. The
# price buys validation in one place, at the edge, before any handler sees the frame; `Send`,
# the frame of every message, checks the same patterns itself for less (its doc).
ConvId: TypeAlias = Annotated[
    str,
    Meta(
        min_length=16,
        max_length=16,
        pattern=CONV_ID_PATTERN,
        description="16 lowercase hex digits",
    ),
]
CLIENT_MSG_ID_PATTERN: Final = "^[ -~]+" + PATTERN_END
ClientMsgId: TypeAlias = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_CLIENT_MSG_ID_CHARS,
        pattern=CLIENT_MSG_ID_PATTERN,
        description="1 to 64 printable ASCII characters, unique per sender and conversation",
    ),
]
# Control characters (Unicode category Cc: C0, DEL and C1) and the noncharacters U+FFFE and
# U+FFFF have no place in what people read: they hide text, break terminals and logs, and
# U+FFFE/U+FFFF are "not a character" by definition. Text and metadata values may keep tab, LF
# and CR (a message has lines); names, user ids and metadata keys are one line and keep none.
# Lone surrogates never get this far: msgspec refuses them (and invalid UTF-8) as malformed
# input. A pattern, not code, so that the OpenAPI schema says it too; one scan of the string.
_CONTROLS: Final = "\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f\\ufffe\\uffff"
TEXT_PATTERN: Final = "^[^\\u0000-\\u0008" + _CONTROLS + "]*$"
LINE_PATTERN: Final = "^[^\\u0000-\\u001f\\u007f-\\u009f\\ufffe\\uffff]*" + PATTERN_END
_NO_CONTROLS: Final = "text without control characters (tab, LF and CR allowed)"
_ONE_LINE: Final = "one line of text without control characters"
_TEXT_RE: Final = re.compile(TEXT_PATTERN)
_HEX_DIGITS: Final = "0123456789abcdef"


def _pattern_error(pattern: str, field: str) -> str:
    """msgspec's message for a top-level frame's field that does not match ``pattern``."""
    return f"Expected `str` matching regex {pattern!r} - at `$.{field}`"


Text: TypeAlias = Annotated[
    str,
    Meta(min_length=1, max_length=MAX_TEXT_CHARS, pattern=TEXT_PATTERN, description=_NO_CONTROLS),
]
Token: TypeAlias = Annotated[str, Meta(min_length=1, max_length=MAX_TOKEN_CHARS)]
Seq: TypeAlias = Annotated[int, Meta(ge=0, le=MAX_SEQ)]
Name: TypeAlias = Annotated[
    str,
    Meta(min_length=1, max_length=MAX_NAME_CHARS, pattern=LINE_PATTERN, description=_ONE_LINE),
]
_ID_WORDS: Final = "1 to 64 characters of A-Z a-z 0-9 _ . @ -, the first not . @ -"
AgentId: TypeAlias = Annotated[str, Meta(pattern=AGENT_ID_PATTERN, description=_ID_WORDS)]
GroupName: TypeAlias = Annotated[str, Meta(pattern=AGENT_ID_PATTERN, description=_ID_WORDS)]
Weight: TypeAlias = Annotated[int, Meta(ge=1, le=MAX_AGENT_WEIGHT)]
MaxChats: TypeAlias = Annotated[int, Meta(ge=0, le=MAX_CHATS_LIMIT)]
Groups: TypeAlias = Annotated[list[GroupName], Meta(max_length=MAX_GROUPS)]
# A free-form id chosen by the host site (user_id): any characters, bounded like a name.
ExternalId: TypeAlias = Annotated[
    str,
    Meta(min_length=1, max_length=MAX_NAME_CHARS, pattern=LINE_PATTERN, description=_ONE_LINE),
]
Metadata: TypeAlias = Annotated[
    dict[
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=MAX_METADATA_KEY_CHARS,
                pattern=LINE_PATTERN,
                description=_ONE_LINE,
            ),
        ],
        Annotated[
            str,
            Meta(
                max_length=MAX_METADATA_VALUE_CHARS, pattern=TEXT_PATTERN, description=_NO_CONTROLS
            ),
        ],
    ],
    Meta(max_length=MAX_METADATA_KEYS),
]

Role = Literal["visitor", "agent"]
SenderRole = Literal["visitor", "agent", "bot", "system"]
AgentStatus = Literal["online", "away", "offline"]
ConversationStatus = Literal["bot", "queued", "assigned", "closed"]
ClosedBy = Literal["visitor", "agent", "expired", "admin"]


def is_conv_id(text: object) -> bool:
    """Whether ``text`` is a conversation id as the wire spells it (for URL path parameters)."""
    return isinstance(text, str) and _CONV_ID_RE.fullmatch(text) is not None


# ---------------------------------------------------------------------------------------------
# Client to server


# Frames and bodies are not tracked by the garbage collector (``gc=False``): they hold strings,
# numbers and other such structs, never a reference back to themselves, and a node keeps
# hundreds of thousands of them (the rings of recent messages), which every full collection
# would otherwise walk: under load, collections were a third of the node's CPU time.
class _Frame(Struct, tag_field="type", omit_defaults=True, gc=False):
    """Base of every frame: tagged by ``type``, ``None`` optionals left out.

    msgspec applies ``kw_only`` to the fields of the class that sets it, so each frame sets it:
    frames are built by keyword, and optional fields may come before required ones.
    """


class ResumePoint(Struct, kw_only=True, gc=False):
    conv: ConvId
    epoch: Seq
    last_seq: Seq


class Hello(_Frame, tag="hello", kw_only=True):
    token: Token
    resume: Annotated[list[ResumePoint], Meta(max_length=MAX_RESUME)] | None = None


class Send(_Frame, tag="send", kw_only=True):
    """Every message comes in as one of these: its fields' patterns (those of ``ConvId``,
    ``ClientMsgId`` and ``Text``) are checked by ``__post_init__`` with ``str`` methods, not by
    msgspec, whose check is a call into ``re`` per field: decoding a typical ``send`` took 1.39
    µs that way and takes 0.54 µs this way. The answer, and the error (``__post_init__`` raises
    msgspec's own message, with the field's path), are the same; a text with a tab, a newline or
    a character Python does not print is checked by the pattern itself."""

    conv: Annotated[str, Meta(min_length=16, max_length=16)]
    client_msg_id: Annotated[str, Meta(min_length=1, max_length=MAX_CLIENT_MSG_ID_CHARS)]
    text: Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_CHARS)]

    def __post_init__(self) -> None:
        if self.conv.strip(_HEX_DIGITS):  # not all of it lowercase hex
            raise ValueError(_pattern_error(CONV_ID_PATTERN, "conv"))
        cmid = self.client_msg_id
        if not (cmid.isascii() and cmid.isprintable()):  # exactly U+0020 to U+007E
            raise ValueError(_pattern_error(CLIENT_MSG_ID_PATTERN, "client_msg_id"))
        # Printable: no Cc and no U+FFFE/U+FFFF (Cn), so TEXT_PATTERN holds; else it decides.
        text = self.text
        if not text.isprintable() and _TEXT_RE.search(text) is None:
            raise ValueError(_pattern_error(TEXT_PATTERN, "text"))


class Typing(_Frame, tag="typing", kw_only=True):
    conv: ConvId


class Read(_Frame, tag="read", kw_only=True):
    conv: ConvId
    seq: Seq


class Sync(_Frame, tag="sync", kw_only=True):
    conv: ConvId
    after: Seq = 0
    limit: Annotated[int, Meta(ge=1, le=MAX_SYNC_LIMIT)] = DEFAULT_SYNC_LIMIT


class Status(_Frame, tag="status", kw_only=True):
    status: AgentStatus
    max_chats: MaxChats | None = None


class Accept(_Frame, tag="accept", kw_only=True):
    conv: ConvId


class Transfer(_Frame, tag="transfer", kw_only=True):
    conv: ConvId
    to_agent: AgentId | None = None
    to_group: GroupName | None = None

    def __post_init__(self) -> None:
        # msgspec turns this ValueError into a ValidationError, so decode reports "invalid".
        if (self.to_agent is None) == (self.to_group is None):
            raise ValueError("exactly one of `to_agent` and `to_group` must be set")


class Close(_Frame, tag="close", kw_only=True):
    conv: ConvId


class Ping(_Frame, tag="ping", kw_only=True):
    pass


ClientFrame: TypeAlias = (
    Hello | Send | Typing | Read | Sync | Status | Accept | Transfer | Close | Ping
)

# ---------------------------------------------------------------------------------------------
# Server to client


class Sender(Struct, kw_only=True, gc=False):
    role: SenderRole
    id: str
    name: str


class AgentRef(Struct, kw_only=True, gc=False):
    id: str
    name: str


class VisitorProfile(Struct, omit_defaults=True, kw_only=True, gc=False):
    """What an agent is told about the visitor of a conversation assigned to them."""

    id: str
    name: str | None = None
    user_id: str | None = None
    metadata: dict[str, str] | None = None


class ConvState(Struct, kw_only=True, gc=False):
    conv: str
    epoch: int
    top_seq: int
    status: ConversationStatus


class AgentPresence(Struct, kw_only=True, gc=False):
    id: str
    status: AgentStatus
    active_chats: int


class Welcome(_Frame, tag="welcome", kw_only=True):
    role: Role
    id: str
    convs: list[ConvState]
    ping_interval_ms: int
    max_msg_bytes: int


class Msg(_Frame, tag="msg", kw_only=True):
    conv: str
    seq: int
    epoch: int
    id: str
    client_msg_id: str | None = None
    from_: Sender = field(name="from")
    text: str
    ts: int  # milliseconds since the Unix epoch
    meta: dict[str, Any] | None = None


class Delta(_Frame, tag="delta", kw_only=True):
    conv: str
    stream_id: str
    text: str


class Ack(_Frame, tag="ack", kw_only=True):
    conv: str
    client_msg_id: str
    seq: int
    ts: int
    dup: bool


class Resumed(_Frame, tag="resumed", kw_only=True):
    """End of a resume: ``from_seq``/``to_seq`` when replayed, ``recovered: false`` when not.

    ``recovered`` defaults to true and is then left out, which gives exactly PROTOCOL.md's two
    shapes: ``{conv, from_seq, to_seq}`` and ``{conv, recovered: false}``.
    """

    conv: str
    from_seq: int | None = None
    to_seq: int | None = None
    recovered: bool = True


class History(_Frame, tag="history", kw_only=True):
    conv: str
    epoch: int
    messages: list[Msg]
    more: bool


class Assigned(_Frame, tag="assigned", kw_only=True):
    """``visitor`` and ``messages`` (the last ones) go to the agent only."""

    conv: str
    agent: AgentRef
    visitor: VisitorProfile | None = None
    messages: list[Msg] | None = None
    # An addition to PROTOCOL.md: the conversation's epoch, so that a client holding no
    # message of it yet can still name it in ``hello.resume``.
    epoch: int | None = None


class Queued(_Frame, tag="queued", kw_only=True):
    conv: str
    position: int


class Handoff(_Frame, tag="handoff", kw_only=True):
    conv: str
    reason: str


class Closed(_Frame, tag="closed", kw_only=True):
    conv: str
    by: ClosedBy
    reason: str


class TypingRelay(_Frame, tag="typing", kw_only=True):
    conv: str
    from_: Sender = field(name="from")


class ReadRelay(_Frame, tag="read", kw_only=True):
    conv: str
    seq: int
    from_: Sender = field(name="from")


class Presence(_Frame, tag="presence", kw_only=True):
    agent: AgentPresence


class StatusFrame(_Frame, tag="status", kw_only=True):
    status: AgentStatus
    max_chats: int | None = None


class Transferred(_Frame, tag="transferred", kw_only=True):
    """``to`` is the agent id or the group name the transfer asked for."""

    conv: str
    to: str


class Pong(_Frame, tag="pong", kw_only=True):
    pass


class Error(_Frame, tag="error", kw_only=True):
    code: str
    message: str
    ref: str | None = None


ServerFrame: TypeAlias = (
    Welcome
    | Msg
    | Delta
    | Ack
    | Resumed
    | History
    | Assigned
    | Queued
    | Handoff
    | Closed
    | TypingRelay
    | ReadRelay
    | Presence
    | StatusFrame
    | Transferred
    | Pong
    | Error
)


def _tags(*classes: type[_Frame]) -> frozenset[str]:
    return frozenset(str(c.__struct_config__.tag) for c in classes)


CLIENT_FRAME_TYPES: Final = _tags(
    Hello, Send, Typing, Read, Sync, Status, Accept, Transfer, Close, Ping
)
SERVER_FRAME_TYPES: Final = _tags(
    Welcome,
    Msg,
    Delta,
    Ack,
    Resumed,
    History,
    Assigned,
    Queued,
    Handoff,
    Closed,
    TypingRelay,
    ReadRelay,
    Presence,
    StatusFrame,
    Transferred,
    Pong,
    Error,
)

# ---------------------------------------------------------------------------------------------
# REST bodies


class _Body(Struct, omit_defaults=True, gc=False):
    """Base of every REST body (each sets ``kw_only``, as frames do)."""


class CreateChatRequest(_Body, kw_only=True):
    user_id: ExternalId | None = None
    name: Name | None = None
    # Not checked for shape here: any wrong hash, malformed or not, is the same 401.
    user_hash: Annotated[str, Meta(max_length=128)] | None = None
    metadata: Metadata | None = None


class CreateChatResponse(_Body, kw_only=True):
    session_id: str
    visitor_id: str
    token: str
    ws_url: str
    status: ConversationStatus


class SendRequest(_Body, kw_only=True):
    session_id: ConvId
    text: Text
    client_msg_id: ClientMsgId | None = None
    stream: bool = False


class SendResponse(_Body, kw_only=True):
    seq: int
    status: ConversationStatus
    replies: list[Msg]


class CloseRequest(_Body, kw_only=True):
    session_id: ConvId


class CloseResponse(_Body, kw_only=True):
    session_id: str
    status: Literal["closed"]


class HistoryResponse(_Body, kw_only=True):
    messages: list[Msg]
    more: bool
    epoch: int


class ErrorDetail(_Body, kw_only=True):
    code: str
    message: str


class ErrorBody(_Body, kw_only=True):
    error: ErrorDetail


class PublicConfig(_Body, kw_only=True):
    """``GET /v1/config``: what the widget needs before it connects."""

    ws_url: str
    protocol: int
    max_msg_bytes: int
    max_text_chars: int
    ping_interval_ms: int
    bot_enabled: bool
    bot_name: str


class Health(_Body, kw_only=True):
    """``GET /healthz``: ``status`` is ``ok`` (200) or ``unavailable`` (503).

    ``checks`` names each part looked at (``store``, ``loop``, ...) and its state.
    """

    status: Literal["ok", "unavailable"]
    version: str
    uptime_s: float
    checks: dict[str, str]


#: Longest lifetime of an agent token given with ``token_ttl_days``: ten years.
MAX_AGENT_TOKEN_TTL_DAYS: Final = 3_650
TokenTtlDays: TypeAlias = Annotated[
    int,
    Meta(
        ge=1,
        le=MAX_AGENT_TOKEN_TTL_DAYS,
        description="days the token works from now; absent: until it is rotated",
    ),
]


class AgentCreate(_Body, kw_only=True):
    """``POST /v1/admin/agents``; without ``token`` the server makes one and returns it once.

    With ``token_ttl_days`` the token stops working that many days from now (rotate it with
    ``POST /v1/admin/agents/{id}/token`` before then)."""

    id: AgentId
    name: Name
    weight: Weight = 1
    max_chats: MaxChats = 5
    groups: Groups = field(default_factory=list)
    token: Token | None = None
    token_ttl_days: TokenTtlDays | None = None


class AgentTokenRequest(_Body, kw_only=True):
    """``POST /v1/admin/agents/{id}/token``: a new token for the agent (the server makes one
    when ``token`` is absent), valid ``token_ttl_days`` if given. The old token stops working
    at once and the agent's open connections are closed (1008)."""

    token: Token | None = None
    token_ttl_days: TokenTtlDays | None = None


class AgentToken(_Body, kw_only=True):
    """The agent's new token: the only time the server shows it. ``token_expires_ts`` (ms since
    the epoch) when it expires."""

    id: str
    token: str
    token_expires_ts: int | None = None


#: Lifetime of an agent session token (``POST /v1/agent/login``): default, least and most.
AGENT_SESSION_TTL_S: Final = 12 * 3_600
MIN_AGENT_SESSION_TTL_S: Final = 60
MAX_AGENT_SESSION_TTL_S: Final = 7 * 86_400
SessionTtl: TypeAlias = Annotated[
    int,
    Meta(
        ge=MIN_AGENT_SESSION_TTL_S,
        le=MAX_AGENT_SESSION_TTL_S,
        description="seconds the session token works from now (60 s to 7 days; default 12 h)",
    ),
]


class AgentLoginRequest(_Body, kw_only=True):
    """``POST /v1/agent/login`` (optional body): how long the session token should work. It
    never outlives the agent's token (``token_ttl_days``)."""

    ttl_s: SessionTtl | None = None


class AgentSession(_Body, kw_only=True):
    """A signed agent session token: what the workbench keeps instead of the agent's token.
    ``expires_ts`` (ms since the epoch) when it stops working; ``POST /v1/agent/logout``
    ends it before then."""

    agent_id: str
    token: str
    expires_ts: int


class AgentUpdate(_Body, kw_only=True):
    """``PATCH /v1/admin/agents/{id}``: the fields given change, the others stay."""

    name: Name | None = None
    weight: Weight | None = None
    max_chats: MaxChats | None = None
    groups: Groups | None = None
    disabled: bool | None = None


class AgentView(_Body, kw_only=True):
    id: str
    name: str
    weight: int
    max_chats: int
    groups: list[str]
    disabled: bool
    status: AgentStatus
    active_chats: int
    # When the agent's token expires (ms since the epoch); absent: it does not.
    token_expires_ts: int | None = None


class AgentCreated(AgentView, kw_only=True):
    """An :class:`AgentView` with the agent's token: the only time the server shows it."""

    token: str


class AgentList(_Body, kw_only=True):
    agents: list[AgentView]


class KbHit(_Body, kw_only=True):
    id: str
    score: float
    question: str
    answer: str


class KbSearchResponse(_Body, kw_only=True):
    """``GET /v1/admin/kb/search?q=TEXT&k=5``: hits best first, ``score`` in [0, 1]."""

    version: int
    hits: list[KbHit]


class KbReloadResponse(_Body, kw_only=True):
    version: int
    entries: int


class SessionStats(_Body, kw_only=True):
    """``GET /v1/admin/sessions/{id}/stats``: resources held by one conversation."""

    session_id: str
    cpu_seconds: float
    memory_bytes: int


class QuickReply(_Body, kw_only=True):
    title: str
    text: str


class AgentMe(_Body, kw_only=True):
    """``GET /v1/agent/me``: the calling agent, and the quick replies of the workbench."""

    id: str
    name: str
    weight: int
    max_chats: int
    groups: list[str]
    status: AgentStatus
    active_chats: int
    quick_replies: list[QuickReply]


class AgentConversation(_Body, kw_only=True):
    """One open conversation of the calling agent; ``read_seq`` is the agent's read mark, so
    ``top_seq - read_seq`` is its unread count."""

    session_id: str
    status: ConversationStatus
    epoch: int
    top_seq: int
    read_seq: int
    created_ts: int
    updated_ts: int
    visitor: VisitorProfile
    last_message: Msg | None = None


class WaitingConversation(_Body, kw_only=True):
    """One conversation of the waiting queue, as an agent sees it before accepting it."""

    session_id: str
    position: int
    created_ts: int
    visitor: VisitorProfile
    group: str | None = None


class AgentConversations(_Body, kw_only=True):
    """``GET /v1/agent/conversations``: my open conversations and the head of the queue."""

    conversations: list[AgentConversation]
    queue: list[WaitingConversation]


class CacheFigures(_Body, kw_only=True):
    hits: int
    misses: int
    hit_rate: float


class KbFigures(_Body, kw_only=True):
    version: int | None
    entries: int
    error: str | None = None


class NodeFigures(_Body, kw_only=True):
    """One node of a cluster in ``GET /v1/admin/stats``: its own figures when it answered
    (``up``), else why not (``error``)."""

    id: str
    up: bool
    connections: dict[str, int] | None = None
    conversations: dict[str, int] | None = None
    messages_total: int | None = None
    uptime_s: float | None = None
    error: str | None = None


class ClusterFigures(_Body, kw_only=True):
    """The nodes behind a cluster's ``GET /v1/admin/stats``: ``node`` is the one that
    answered, ``nodes`` the nodes the cluster knows (live ones first, at most
    ``kefu.cluster.member.MAX_STATS_NODES``). ``error`` says why the figures are only this
    node's view (Redis unreachable)."""

    node: str
    nodes: list[NodeFigures]
    error: str | None = None


class AdminStats(_Body, kw_only=True):
    """``GET /v1/admin/stats``: live figures for the admin page. A single node gives its own;
    in a cluster, ``connections``, ``conversations`` and ``messages_total`` are summed over
    the nodes that answered, ``queue_length`` is the cluster's queue, ``cache``, ``kb`` and
    ``uptime_s`` stay the answering node's, and ``cluster`` lists the nodes."""

    connections: dict[str, int]
    conversations: dict[str, int]
    queue_length: int
    messages_total: int
    cache: CacheFigures
    kb: KbFigures
    uptime_s: float
    cluster: ClusterFigures | None = None


REST_BODIES: Final[tuple[type[Struct], ...]] = (
    CreateChatRequest,
    CreateChatResponse,
    SendRequest,
    SendResponse,
    CloseRequest,
    CloseResponse,
    HistoryResponse,
    ErrorBody,
    PublicConfig,
    Health,
    AgentCreate,
    AgentUpdate,
    AgentView,
    AgentCreated,
    AgentList,
    AgentTokenRequest,
    AgentToken,
    AgentLoginRequest,
    AgentSession,
    KbSearchResponse,
    KbReloadResponse,
    SessionStats,
    AgentMe,
    AgentConversations,
    AdminStats,
)

# ---------------------------------------------------------------------------------------------
# Codecs

_json_encoder: Final = msgspec.json.Encoder()
_msgpack_encoder: Final = msgspec.msgpack.Encoder()

# Bound methods, not wrappers: a frame is encoded once per message and fan-out, and a Python
# wrapper would add a call to each.
encode_json: Final[Callable[[Any], bytes]] = _json_encoder.encode
"""Encode a frame or body as compact UTF-8 JSON."""
encode_msgpack: Final[Callable[[Any], bytes]] = _msgpack_encoder.encode
"""Encode a frame as MessagePack (subprotocol ``kefu.msgpack``)."""

# Every failure a decoder call can raise on hostile input: ValidationError and DecodeError
# (msgspec), UnicodeDecodeError (invalid UTF-8 in a string), RecursionError (nesting deeper
# than msgspec's recursion limit, e.g. 100,000 ``[``), TypeError (a str given to a
# MessagePack decoder).
_DECODE_FAILURES: Final = (ValueError, RecursionError, TypeError)
_MAX_REF_CHARS: Final = 64
_MAX_ECHO_CHARS: Final = 64
#: Longest message of a ProtocolError made from a decoder's message (:func:`_field_message`).
_MAX_MESSAGE_CHARS: Final = 256


class ProtocolError(KefuError):
    """A frame or body the server refuses; ``code`` is PROTOCOL.md's error code."""

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, ref={self.ref!r})"

    def to_frame(self) -> Error:
        """The ``error`` frame that answers the refused frame."""
        return Error(code=self.code, message=self.message, ref=self.ref)


Buffer: TypeAlias = bytes | bytearray | memoryview | str


def _echo(value: str) -> str:
    """A client-supplied string quoted for an error message, cut to a bounded length."""
    if len(value) > _MAX_ECHO_CHARS:
        value = value[:_MAX_ECHO_CHARS] + "..."
    return repr(value)


def _ref(raw: dict[Any, Any]) -> str | None:
    cmid = raw.get("client_msg_id")
    if isinstance(cmid, str) and 0 < len(cmid) <= _MAX_REF_CHARS:
        return cmid
    kind = raw.get("type")
    if isinstance(kind, str) and 0 < len(kind) <= _MAX_REF_CHARS:
        return kind
    return None


_PATTERN_WORDS: Final = (
    (TEXT_PATTERN, "without control characters (tab, LF and CR allowed)"),
    (LINE_PATTERN, "without control characters"),
)


def _field_message(err: BaseException) -> str:
    """msgspec's message, which names the field by its path (``- at `$.text```).

    Some messages quote the refused value (``Invalid enum value '...'``): a value of 60 KB
    would come back whole in the ``error`` frame, so a message longer than
    :data:`_MAX_MESSAGE_CHARS` is cut to that length, keeping the path that names the field.
    """
    if isinstance(err, RecursionError):
        return "nested too deeply"
    message = str(err).removeprefix("Object ")
    for pattern, words in _PATTERN_WORDS:
        # msgspec quotes the pattern; the client is better served by what it means.
        message = message.replace(f"matching regex {pattern!r}", words)
    if len(message) <= _MAX_MESSAGE_CHARS:
        return message
    head, sep, path = message.rpartition(" - at `")
    if not sep or len(path) > _MAX_MESSAGE_CHARS // 2:
        head, sep, path = message, "", ""
    tail = sep + path
    return head[: _MAX_MESSAGE_CHARS - len(tail) - 3] + "..." + tail


class FrameDecoder:
    """Decodes client frames of one encoding: JSON (text or bytes) or MessagePack (bytes).

    Holds one msgspec decoder; create one per encoding and share it (it keeps no state between
    calls). :meth:`decode` returns a :data:`ClientFrame` or raises :class:`ProtocolError`.
    """

    __slots__ = ("_decode", "_decode_any", "_kind", "msgpack")

    def __init__(self, *, msgpack: bool = False) -> None:
        self.msgpack = msgpack
        self._decode: Callable[[Buffer], ClientFrame]
        self._decode_any: Callable[[Buffer], Any]
        if msgpack:
            # msgpack decoders take bytes-like data only: a str raises TypeError, which
            # _classify answers with bad_frame.
            self._decode = msgspec.msgpack.Decoder(ClientFrame).decode  # type: ignore[assignment]
            self._decode_any = msgspec.msgpack.Decoder().decode  # type: ignore[assignment]
            self._kind = "MessagePack"
        else:
            self._decode = msgspec.json.Decoder(ClientFrame).decode
            self._decode_any = msgspec.json.Decoder().decode
            self._kind = "JSON"

    def decode(self, data: Buffer) -> ClientFrame:
        """The frame in ``data``; :class:`ProtocolError` with PROTOCOL.md's code if refused."""
        try:
            return self._decode(data)
        except _DECODE_FAILURES as exc:
            raise self._classify(data, exc) from exc

    def _classify(self, data: Buffer, exc: BaseException) -> ProtocolError:
        """Why ``data`` was refused. Runs only for a refused frame, so it may decode again."""
        if self.msgpack and isinstance(data, str):
            return ProtocolError("bad_frame", "MessagePack frames must be binary")
        try:
            raw = self._decode_any(data)
        except _DECODE_FAILURES as exc2:
            detail = "nested too deeply" if isinstance(exc2, RecursionError) else str(exc2)
            return ProtocolError("bad_frame", f"frame is not valid {self._kind}: {detail}")
        if not isinstance(raw, dict):
            return ProtocolError("bad_frame", f"frame is not a {self._kind} object")
        kind = raw.get("type")
        if not isinstance(kind, str):
            return ProtocolError("bad_frame", "frame has no string `type`", _ref(raw))
        if kind not in CLIENT_FRAME_TYPES:
            return ProtocolError("unknown_type", f"unknown frame type {_echo(kind)}", _ref(raw))
        message = _field_message(exc)
        if message.startswith("Invalid value") and message.endswith("at `$.type`"):
            # The untyped decode kept the last `type` and it is known, the typed one saw
            # another: the frame has two `type` keys.
            message = "conflicting `type` keys"
        return ProtocolError("invalid", message, _ref(raw))


_json_frames: Final = FrameDecoder(msgpack=False)
_msgpack_frames: Final = FrameDecoder(msgpack=True)


def decode_client_frame(data: Buffer, *, msgpack: bool) -> ClientFrame:
    """Decode one client frame (JSON, or MessagePack when ``msgpack``); see the module doc."""
    return (_msgpack_frames if msgpack else _json_frames).decode(data)


_server_json: Final = msgspec.json.Decoder(ServerFrame)
_server_msgpack: Final = msgspec.msgpack.Decoder(ServerFrame)


def decode_server_frame(data: Buffer, *, msgpack: bool = False) -> ServerFrame:
    """Decode a frame the server sent: for clients written in Python (tests, load generator).

    Raises msgspec's errors unchanged: a server frame that does not decode is a server bug.
    """
    if msgpack:
        if isinstance(data, str):
            raise TypeError("MessagePack frames are bytes")
        return _server_msgpack.decode(data)
    return _server_json.decode(data)


B = TypeVar("B", bound=Struct)
# One decoder per body class, made on first use; keyed by the classes above, so bounded.
_body_decoders: dict[type[Struct], msgspec.json.Decoder[Any]] = {}


def decode_body(data: Buffer, cls: type[B]) -> B:
    """Decode a JSON request body into ``cls``.

    Raises :class:`ProtocolError`: ``bad_request`` when the body is not a JSON object,
    ``invalid`` (the message naming the field) when a field is missing, mistyped or out of its
    limits. The HTTP layer answers both with 400 and :class:`ErrorBody`.
    """
    decoder = _body_decoders.get(cls)
    if decoder is None:
        decoder = _body_decoders[cls] = msgspec.json.Decoder(cls)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except _DECODE_FAILURES as exc:
        try:
            raw = msgspec.json.decode(data)
        except _DECODE_FAILURES as exc2:
            detail = "nested too deeply" if isinstance(exc2, RecursionError) else str(exc2)
            raise ProtocolError("bad_request", f"body is not valid JSON: {detail}") from exc
        if not isinstance(raw, dict):
            raise ProtocolError("bad_request", "body is not a JSON object") from exc
        if any(type(v) is float and v.is_integer() for v in raw.values()):
            # JSON Schema counts 62.0 as an integer, so the OpenAPI document's `type: integer`
            # admits it: an integral number is the integer it equals. Only the top-level
            # fields (where the bodies' integers are), and only on this slow path.
            fields = {
                k: int(v) if type(v) is float and v.is_integer() else v for k, v in raw.items()
            }
            try:
                return decoder.decode(encode_json(fields))  # type: ignore[no-any-return]
            except _DECODE_FAILURES as exc3:
                raise ProtocolError("invalid", _field_message(exc3)) from exc
        raise ProtocolError("invalid", _field_message(exc)) from exc
