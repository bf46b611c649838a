"""What must hold for any input to the frame decoder and the knowledge-base loader.

The atheris harnesses (``fuzz/fuzz_frames.py``, ``fuzz/fuzz_kb.py``) and the hypothesis tests
(``tests/test_fuzz.py``) call :func:`check_frame` and :func:`check_kb` on every input they make:
an ``AssertionError`` or any exception other than the documented refusal escaping them is the
bug the fuzzer reports.

Frames (:class:`kefu.protocol.FrameDecoder`, PROTOCOL.md "Errors and limits"): the result is a
client frame or a :class:`~kefu.protocol.ProtocolError` whose code is ``bad_frame``,
``unknown_type`` or ``invalid``, with a message of at most :data:`MAX_ERROR_MESSAGE_CHARS`
characters whatever the input's size, a ``ref`` of at most 64 characters, and an ``error``
frame that encodes in both encodings (the server must be able to send it). A frame that decodes
re-encodes in both encodings and decodes to itself: nothing the decoder accepts is something
the server cannot send on (a lone surrogate, an int past 64 bits).

Knowledge base (:func:`kefu.bot.kb.load_knowledge_base`): the result is a knowledge base or a
:class:`~kefu.bot.kb.KbError` whose message starts with ``file:line:`` (a line of the file);
a knowledge base that loads holds only text that encodes as UTF-8, and can be searched with
each of its own questions.

The mutators at the end make near-valid inputs from valid ones; they take a ``pick(n)``
callback returning an int in ``[0, n)`` so that hypothesis (``st.data()``) and atheris
(``FuzzedDataProvider``) drive them alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, Final

from kefu.bot.kb import KbError, KnowledgeBase, load_knowledge_base
from kefu.protocol import (
    Accept,
    ClientFrame,
    Close,
    FrameDecoder,
    Hello,
    Ping,
    ProtocolError,
    Read,
    Send,
    Status,
    Sync,
    Transfer,
    Typing,
    encode_json,
    encode_msgpack,
)

#: PROTOCOL.md's codes for a refused frame.
FRAME_ERROR_CODES: Final = frozenset({"bad_frame", "unknown_type", "invalid"})
#: An error frame's message is bounded whatever the frame's size (an echoed value is cut).
MAX_ERROR_MESSAGE_CHARS: Final = 1_024
MAX_REF_CHARS: Final = 64
CLIENT_FRAME_CLASSES: Final = (
    Hello,
    Send,
    Typing,
    Read,
    Sync,
    Status,
    Accept,
    Transfer,
    Close,
    Ping,
)

DECODERS: Final = {False: FrameDecoder(msgpack=False), True: FrameDecoder(msgpack=True)}

CONV: Final = "0123456789abcdef"

#: One valid frame of each client type (and both shapes of ``transfer``): the seeds the
#: structured fuzzers mutate.
SEED_FRAMES: Final[tuple[dict[str, Any], ...]] = (
    {"type": "hello", "token": "v1.payload.signature-0123456789"},
    {"type": "hello", "token": "t", "resume": [{"conv": CONV, "epoch": 7, "last_seq": 3}]},
    {"type": "send", "conv": CONV, "client_msg_id": "c-1", "text": "你好, hello"},
    {"type": "typing", "conv": CONV},
    {"type": "read", "conv": CONV, "seq": 12},
    {"type": "sync", "conv": CONV, "after": 5, "limit": 50},
    {"type": "status", "status": "online", "max_chats": 3},
    {"type": "accept", "conv": CONV},
    {"type": "transfer", "conv": CONV, "to_agent": "bob"},
    {"type": "transfer", "conv": CONV, "to_group": "sales"},
    {"type": "close", "conv": CONV},
    {"type": "ping"},
)

#: Values of every JSON/MessagePack type and at the edges of the limits, for mutated fields.
EDGE_VALUES: Final[tuple[Any, ...]] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    500,
    501,
    (1 << 63) - 1,
    1 << 63,
    -(1 << 63),
    (1 << 64) - 1,
    1.5,
    -0.0,
    1e308,
    "",
    " ",
    "x",
    CONV,
    CONV.upper(),
    CONV + "0",
    CONV[:-1],
    CONV + "\n",
    "a" * 64,
    "a" * 65,
    "x" * 16_000,
    "x" * 16_001,
    "字" * 16_000,
    "\x00",
    "\u2028",
    "\U0010ffff",
    "online",
    "away",
    "offline",
    "hello",
    "send",
    [],
    [None],
    [{"conv": CONV, "epoch": 1, "last_seq": 1}] * 101,
    {},
    {"type": "send"},
    {"conv": CONV},
)


def check_frame(data: bytes | str, *, msgpack: bool) -> ClientFrame | ProtocolError:
    """Decode ``data`` as the server does and check the invariants (module doc)."""
    try:
        frame = DECODERS[msgpack].decode(data)
    except ProtocolError as err:
        check_error(err)
        return err
    assert isinstance(frame, CLIENT_FRAME_CLASSES), repr(frame)
    for again_msgpack, encode in ((False, encode_json), (True, encode_msgpack)):
        again = DECODERS[again_msgpack].decode(encode(frame))
        assert again == frame, (frame, again)
    return frame


def check_error(err: ProtocolError) -> None:
    """A refusal the server can send back as PROTOCOL.md's ``error`` frame."""
    assert err.code in FRAME_ERROR_CODES, err
    assert isinstance(err.message, str) and err.message, err
    assert len(err.message) <= MAX_ERROR_MESSAGE_CHARS, (len(err.message), err.message[:200])
    assert err.ref is None or (isinstance(err.ref, str) and 0 < len(err.ref) <= MAX_REF_CHARS)
    frame = err.to_frame()
    encode_json(frame)  # raises for text no frame can carry (a lone surrogate)
    encode_msgpack(frame)


_LOCATION: Final = re.compile(r"(?P<file>[^:\n]+):(?P<line>[0-9]+): \S")


_YAML_BREAK: Final = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def check_kb(path: str) -> KnowledgeBase | KbError:
    """Load the knowledge-base file ``path`` and check the invariants (module doc)."""
    with open(path, "rb") as f:
        # Lines as YAML counts them: \r\n, \r, \n, NEL, LS and PS all end a line.
        lines = len(_YAML_BREAK.findall(f.read().decode("utf-8", "replace"))) + 1
    try:
        kb = load_knowledge_base([path])
    except KbError as err:
        found = _LOCATION.match(str(err))
        assert found is not None, f"no file:line in {str(err)[:300]!r}"
        assert found["file"] == os.path.basename(path), str(err)[:300]
        assert 1 <= int(found["line"]) <= lines + 1, (str(err)[:300], lines)
        return err
    for entry in kb.entries:
        for text in (entry.id, *entry.questions, entry.answer, *entry.tags):
            text.encode("utf-8")
        if entry.group is not None:
            entry.group.encode("utf-8")
    for rule in kb.rules:
        for text in (*rule.keywords, rule.regex or "", rule.reply or "", rule.group or ""):
            text.encode("utf-8")
    for entry in kb.entries[:20]:
        hits = kb.search(entry.questions[0], 3)
        assert all(0.0 <= h.score <= 1.0 for h in hits), hits
    return kb


# ---------------------------------------------------------------------------------------------
# Mutators

Pick = Callable[[int], int]


def fdp_pick(fdp: Any) -> Pick:
    """A :data:`Pick` drawing from an ``atheris.FuzzedDataProvider``."""

    def pick(n: int) -> int:
        return int(fdp.ConsumeIntInRange(0, n - 1)) if n > 1 else 0

    return pick


def _value(pick: Pick) -> Any:
    return EDGE_VALUES[pick(len(EDGE_VALUES))]


def mutate_frame(seed: dict[str, Any], pick: Pick, steps: int) -> dict[str, Any]:
    """``seed`` with ``steps`` changes: a field dropped, set to an edge value, added, the type
    changed, or the frame wrapped in another level."""
    frame: dict[str, Any] = dict(seed)
    for _ in range(steps):
        keys = sorted(frame)
        op = pick(6)
        if op == 0 and keys:
            del frame[keys[pick(len(keys))]]
        elif op == 1 and keys:
            frame[keys[pick(len(keys))]] = _value(pick)
        elif op == 2:
            names = ("conv", "text", "seq", "token", "resume", "limit", "to_agent", "zz")
            frame[names[pick(len(names))]] = _value(pick)
        elif op == 3:
            frame["type"] = SEED_FRAMES[pick(len(SEED_FRAMES))]["type"]
        elif op == 4 and keys:
            key = keys[pick(len(keys))]
            frame[key] = [frame[key]] if pick(2) else {"v": frame[key]}
        else:
            frame = {"type": frame.get("type"), "resume": [frame]}
    return frame


def mutate_bytes(data: bytes, pick: Pick, steps: int) -> bytes:
    """``data`` with ``steps`` byte-level changes: flip, insert, delete, truncate, repeat."""
    buf = bytearray(data)
    for _ in range(steps):
        op = pick(5)
        at = pick(len(buf) + 1)
        if op == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << pick(8)
        elif op == 1:
            buf[at:at] = bytes([pick(256)])
        elif op == 2 and buf:
            del buf[min(at, len(buf) - 1)]
        elif op == 3:
            del buf[at:]
        else:
            buf[at:at] = buf[at : at + pick(16)] * pick(4)
    return bytes(buf)


#: A small knowledge base that uses every feature of the format.
SEED_KB: Final = """\
entries:
  - id: shipping_fee
    questions: ["运费多少", "How much is shipping?"]
    answer: "满99元包邮。"
    tags: [shipping]
  - id: refund
    questions:
      - 退款多久到账
      - "When will I get my money back?"
    answer: 1-3 working days
    group: billing
rules:
  - match: {keywords: ["转人工", "human"]}
    action: handoff
  - match: {regex: "发票|invoice"}
    reply: "电子发票会在发货后24小时内发送。"
  - match: {keywords: [refund]}
    action: route
    group: billing
"""

#: Pieces spliced into knowledge-base lines: YAML syntax, the format's keys, and the values
#: that have broken loaders before (aliases, tags, escapes, nesting).
KB_PIECES: Final[tuple[str, ...]] = (
    "",
    " ",
    "  ",
    "- ",
    ": ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "#",
    "&a ",
    "*a",
    "!!binary ",
    "!!int ",
    "!custom ",
    "? ",
    "---",
    "...",
    "|",
    ">",
    '"',
    "'",
    "~",
    "null",
    "123",
    "1e999",
    '"\\ud800"',
    '"\\x00"',
    '"\\U0010ffff"',
    "id: dup",
    "entries:",
    "rules:",
    "questions: []",
    "answer:",
    "match: {regex: '('}",
    "match: {regex: 'a{99999999999}'}",
    "match: {keywords: []}",
    "action: route",
    "reply: x",
    "group: ",
    "[" * 300,
    "\t",
    "\x00",
    "\x85",
    "\ufeff",
    "字",
)


def mutate_kb(text: str, pick: Pick, steps: int) -> str:
    """``text`` (a knowledge-base file) with ``steps`` line-level changes."""
    lines = text.split("\n")
    for _ in range(steps):
        at = pick(len(lines) + 1)
        line = lines[at] if at < len(lines) else ""
        op = pick(6)
        piece = KB_PIECES[pick(len(KB_PIECES))]
        if op == 0 and at < len(lines):
            del lines[at]
        elif op == 1:
            lines.insert(at, line)
        elif op == 2:
            lines.insert(at, " " * (2 * pick(4)) + piece)
        elif op == 3 and at < len(lines):
            cut = pick(len(line) + 1)
            lines[at] = line[:cut] + piece + line[cut + pick(4) :]
        elif op == 4 and at < len(lines):
            lines[at] = line[2:] if pick(2) and line.startswith("  ") else "  " + line
        elif op == 5 and at + 1 < len(lines):
            lines[at], lines[at + 1] = lines[at + 1], lines[at]
    return "\n".join(lines)
