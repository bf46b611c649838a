"""Fuzzing of the two parsers of untrusted or hand-written input: WS frames and KB files.

The invariants are :mod:`fuzz.invariants` (one statement, shared with the atheris harnesses):

- the frame decoder (:class:`kefu.protocol.FrameDecoder`, JSON and MessagePack) answers every
  input with a client frame or a ``ProtocolError`` of PROTOCOL.md's codes, with a bounded
  message and an error frame that can be sent; whatever decodes re-encodes to itself;
- the knowledge-base loader answers every file with a knowledge base or a ``KbError`` that
  names the file and a line.

Inputs come from hypothesis (arbitrary bytes and text, arbitrary JSON and MessagePack values,
valid frames and KB files with mutated fields, types, sizes and lines), from a plain random
loop of 100,000 inputs under ``tracemalloc`` (memory must not grow), and from the atheris
harnesses in ``fuzz/`` run for a bounded number of inputs in a subprocess. Longer runs are
the commands of ``fuzz/README.md``. Each bug these found has a regression test here.
"""

from __future__ import annotations

import gc
import os
import random
import re
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import invariants as inv
from kefu import protocol as p
from kefu.bot import kb as kb_module
from kefu.bot.kb import KbError, load_knowledge_base, sample_kb_path
from kefu.protocol import ProtocolError

REPO = Path(__file__).resolve().parent.parent
FUZZ_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
#: For the strategies whose examples are costly to generate (deep, wide values).
HEAVY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# ---------------------------------------------------------------------------------------------
# Frames: strategies

_surrogates = st.characters(categories=("Cs",))
#: Text with lone surrogates mixed in (hypothesis leaves them out by default).
_any_text = st.text(st.characters() | _surrogates, max_size=40)

_scalars = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from([inv.CONV, "x" * 16_001, *sorted(p.CLIENT_FRAME_TYPES)])
)
_json_scalars = _scalars | st.integers(-(2**64), 2**65)  # JSON numbers have no bound
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)
# MessagePack holds more than JSON: bytes, extension types, maps keyed by anything hashable.
_msgpack_scalars = (
    _scalars
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=20)
    | st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=8))
)
_msgpack_values = st.recursive(
    _msgpack_scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.text(max_size=12) | st.integers(-(2**63), 2**63) | st.binary(max_size=4),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)
# Field values both encodings hold (MessagePack integers stop at 64 bits).
_frame_values = st.recursive(
    _scalars | st.integers(-(2**63), 2**64 - 1),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)
_frame_objects = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from([*sorted(p.CLIENT_FRAME_TYPES), "nope", ""]),
    st.dictionaries(
        st.sampled_from(
            [
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
                "type",
                "zz",
            ]
        ),
        _frame_values,
        max_size=6,
    ),
)


def _encode(value: Any, msgpack: bool) -> bytes:
    return msgspec.msgpack.encode(value) if msgpack else msgspec.json.encode(value)


# ---------------------------------------------------------------------------------------------
# Frames: properties


def test_seed_frames_are_valid_and_cover_every_client_type() -> None:
    kinds = set()
    for seed in inv.SEED_FRAMES:
        for msgpack in (False, True):
            frame = inv.check_frame(_encode(seed, msgpack), msgpack=msgpack)
            assert isinstance(frame, inv.CLIENT_FRAME_CLASSES), (seed, frame)
            kinds.add(seed["type"])
    assert kinds == set(p.CLIENT_FRAME_TYPES)


@FUZZ_SETTINGS
@given(st.binary(max_size=512), st.booleans())
def test_arbitrary_bytes(data: bytes, msgpack: bool) -> None:
    inv.check_frame(data, msgpack=msgpack)


@FUZZ_SETTINGS
@given(_any_text, st.booleans())
def test_arbitrary_text_frames(text: str, msgpack: bool) -> None:
    result = inv.check_frame(text, msgpack=msgpack)
    if msgpack:  # a text frame on a MessagePack connection
        assert isinstance(result, ProtocolError) and result.code == "bad_frame"


@HEAVY_SETTINGS
@given(_json_values)
def test_arbitrary_json_values(value: Any) -> None:
    inv.check_frame(msgspec.json.encode(value), msgpack=False)


@HEAVY_SETTINGS
@given(_msgpack_values)
def test_arbitrary_msgpack_values(value: Any) -> None:
    inv.check_frame(msgspec.msgpack.encode(value), msgpack=True)


@HEAVY_SETTINGS
@given(_frame_objects, st.booleans())
def test_objects_with_frame_fields(obj: dict[str, Any], msgpack: bool) -> None:
    result = inv.check_frame(_encode(obj, msgpack), msgpack=msgpack)
    if isinstance(result, ProtocolError) and obj["type"] in ("nope", ""):
        assert result.code == "unknown_type"


@FUZZ_SETTINGS
@given(st.data(), st.booleans(), st.integers(0, 6), st.integers(0, 4))
def test_near_valid_frames(data: st.DataObject, msgpack: bool, steps: int, damage: int) -> None:
    def pick(n: int) -> int:
        return data.draw(st.integers(0, n - 1)) if n > 1 else 0

    seed = inv.SEED_FRAMES[pick(len(inv.SEED_FRAMES))]
    frame = inv.mutate_frame(seed, pick, steps)
    encoded = inv.mutate_bytes(_encode(frame, msgpack), pick, damage)
    inv.check_frame(encoded, msgpack=msgpack)


@FUZZ_SETTINGS
@given(st.sampled_from(inv.SEED_FRAMES), st.booleans())
def test_duplicate_keys_and_deep_nesting(seed: dict[str, Any], msgpack: bool) -> None:
    """Shapes the encoders cannot make from a dict: repeated keys, nesting past any limit."""
    if msgpack:
        body = b"".join(
            msgspec.msgpack.encode(k) + msgspec.msgpack.encode(v) for k, v in seed.items()
        )
        twice = bytes([0x80 | 2 * len(seed)]) + body + body
        inv.check_frame(twice, msgpack=True)
        inv.check_frame(b"\x81\xa4type" + b"\x91" * 50_000 + b"\xc0", msgpack=True)
    else:
        text = msgspec.json.encode(seed).decode()
        inv.check_frame(text[:-1] + ',"type":"send"}', msgpack=False)
        inv.check_frame('{"type":"send","conv":' + "[" * 50_000, msgpack=False)


def test_error_messages_do_not_echo_large_values() -> None:
    """Regression: ``Invalid enum value '<the whole value>'`` echoed a 60 KB value back."""
    for msgpack in (False, True):
        huge = {"type": "status", "status": "x" * 60_000}
        err = inv.check_frame(_encode(huge, msgpack), msgpack=msgpack)
        assert isinstance(err, ProtocolError) and err.code == "invalid"
        assert len(err.message) <= 256, len(err.message)
        assert err.message.startswith("Invalid enum value 'xxx")
        assert err.message.endswith("- at `$.status`"), err.message
    # REST bodies go through the same message maker.
    with pytest.raises(ProtocolError) as info:
        p.decode_body(b'{"session_id":"' + b"z" * 50_000 + b'","text":"x"}', p.SendRequest)
    assert len(info.value.message) <= 256


def test_invariants_catch_a_decoder_that_misbehaves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks have teeth: an exception other than ProtocolError, an undocumented code and
    an unbounded message all fail."""

    class Broken:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def decode(self, data: object) -> None:
            raise self.exc

    cases: list[tuple[BaseException, type[BaseException]]] = [
        (KeyError("type"), KeyError),
        (ProtocolError("oops", "m"), AssertionError),
        (ProtocolError("invalid", "m" * 5_000), AssertionError),
        (ProtocolError("invalid", "m", ref="r" * 65), AssertionError),
        (ProtocolError("invalid", "\ud800"), UnicodeEncodeError),
    ]
    for raised, expected in cases:
        monkeypatch.setitem(inv.DECODERS, False, Broken(raised))
        with pytest.raises(expected):
            inv.check_frame(b"{}", msgpack=False)


# ---------------------------------------------------------------------------------------------
# Frames: memory


def _random_inputs(rnd: random.Random, count: int) -> Iterator[tuple[bytes, bool]]:
    """Random bytes, and valid frames damaged at random; (data, msgpack)."""
    seeds = [(_encode(s, m), m) for s in inv.SEED_FRAMES for m in (False, True)]
    for i in range(count):
        if i % 2:
            yield rnd.randbytes(rnd.randrange(0, 200)), bool(i & 2)
        else:
            data, msgpack = seeds[rnd.randrange(len(seeds))]
            yield inv.mutate_bytes(data, rnd.randrange, rnd.randrange(1, 4)), msgpack


def test_decoder_memory_stays_bounded_over_100k_inputs() -> None:
    """100,000 refused or accepted frames leave no memory behind: the decoder keeps nothing
    per call (no cache of errors, types or strings). 25,000 inputs are made first (outside the
    measure), then decoded four times over."""
    inputs = list(_random_inputs(random.Random(7), 25_000))
    decoders = inv.DECODERS

    def run(rounds: int) -> int:
        refused = 0
        for _ in range(rounds):
            for data, msgpack in inputs:
                try:
                    decoders[msgpack].decode(data)
                except ProtocolError:
                    refused += 1
        return refused

    run(1)  # warm-up: interned strings, msgspec's caches, the allocator's pools
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        refused = run(4)
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused > 50_000  # the inputs did exercise the error path
    growth = after - before
    assert growth < 64 * 1024, f"{growth} bytes retained after 100,000 frames"
    assert peak - before < 4 * 1024 * 1024, f"peak {peak - before} bytes"


def test_kb_loader_memory_stays_bounded(tmp_path: Path) -> None:
    """300 loads of broken and valid files leave nothing behind (no cache keyed by input)."""
    rnd = random.Random(11)
    path = tmp_path / "kb.yaml"

    def run(count: int) -> None:
        for _ in range(count):
            text = inv.mutate_kb(inv.SEED_KB, rnd.randrange, rnd.randrange(0, 4))
            path.write_bytes(text.encode("utf-8", "surrogatepass"))
            inv.check_kb(str(path))

    run(50)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(300)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 256 * 1024, f"{growth} bytes retained after 300 loads"


# ---------------------------------------------------------------------------------------------
# Knowledge base: strategies and properties


@pytest.fixture(scope="module")
def kb_dir() -> Iterator[Path]:
    # hypothesis runs many examples per test: one directory for all, one file rewritten.
    with tempfile.TemporaryDirectory(prefix="kefu-fuzz-kb-") as d:
        yield Path(d)


def _check_kb_text(directory: Path, text: str | bytes) -> KbError | kb_module.KnowledgeBase:
    path = directory / "kb.yaml"
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    path.write_bytes(raw)
    return inv.check_kb(str(path))


_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    _any_text,
    st.sampled_from(["", "   ", "x" * 8_001, "handoff", "route", "close", "sales"]),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2),
    st.binary(max_size=6),
)
_texts = st.lists(_any_text, max_size=4) | _junk
_entry = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=12) | _junk,
        "questions": _texts,
        "answer": _any_text | _junk,
    },
    optional={"tags": _texts, "group": _junk, "extra": _junk},
)
_match = (
    st.fixed_dictionaries({"keywords": _texts})
    | st.fixed_dictionaries(
        {"regex": st.sampled_from(["a|b", "(", "a{99999999999}", "((a))"]) | _junk}
    )
    | st.fixed_dictionaries({"keywords": _texts, "regex": _junk})
    | _junk
)
_rule = st.fixed_dictionaries(
    {"match": _match},
    optional={
        "reply": _junk,
        "action": st.sampled_from(["handoff", "close", "route", "fly"]),
        "group": _junk,
    },
)
_kb_doc = st.fixed_dictionaries(
    {},
    optional={
        "entries": st.lists(_entry, max_size=4) | _junk,
        "rules": st.lists(_rule, max_size=3) | _junk,
        "other": _junk,
    },
)
_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _any_text | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)


def test_sample_and_seed_knowledge_bases_load(kb_dir: Path) -> None:
    shop = Path(sample_kb_path()).read_text(encoding="utf-8")
    for text in (shop, inv.SEED_KB):
        kb = _check_kb_text(kb_dir, text)
        assert not isinstance(kb, KbError), kb
        assert len(kb) >= 2 and kb.rules


@FUZZ_SETTINGS
@given(_kb_doc, st.booleans())
def test_near_valid_kb_documents(kb_dir: Path, doc: dict[str, Any], unicode: bool) -> None:
    _check_kb_text(kb_dir, yaml.safe_dump(doc, allow_unicode=unicode))


@FUZZ_SETTINGS
@given(_yaml_values)
def test_arbitrary_yaml_documents(kb_dir: Path, value: Any) -> None:
    _check_kb_text(kb_dir, yaml.safe_dump(value))


@FUZZ_SETTINGS
@given(st.binary(max_size=300) | _any_text)
def test_arbitrary_kb_bytes(kb_dir: Path, data: bytes | str) -> None:
    _check_kb_text(kb_dir, data)


@FUZZ_SETTINGS
@given(st.data(), st.integers(1, 8))
def test_mutated_kb_files(kb_dir: Path, data: st.DataObject, steps: int) -> None:
    def pick(n: int) -> int:
        return data.draw(st.integers(0, n - 1)) if n > 1 else 0

    _check_kb_text(kb_dir, inv.mutate_kb(inv.SEED_KB, pick, steps))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(1, 6))
def test_mutated_shop_kb(kb_dir: Path, data: st.DataObject, steps: int) -> None:
    shop = Path(sample_kb_path()).read_text(encoding="utf-8")

    def pick(n: int) -> int:
        return data.draw(st.integers(0, n - 1)) if n > 1 else 0

    _check_kb_text(kb_dir, inv.mutate_kb(shop, pick, steps))


# Regressions: each of these escaped the loader as something other than KbError (or loaded
# text that no frame can carry) before the fix.
_KB_REGRESSIONS = [
    ("entries: " + "[" * 1_000 + "]" * 1_000, 1, "nested too deeply"),
    ("entries:\n" + "".join(" " * i + f"k{i}:\n" for i in range(2_000)), None, "nested too deeply"),
    ("entries:\n  - id: a\x00\n", 2, "unacceptable character #x0000"),
    (b"entries:\n  - id: \xff\n", 2, "not UTF-8"),
    ('entries:\n  - id: a\n    questions: ["\\ud800"]\n    answer: x\n', 3, "lone surrogate"),
    ('entries:\n  - id: a\n    questions: [q]\n    answer: "\\udc00"\n', 4, "lone surrogate"),
    ('rules:\n  - match: {regex: "a{4294967296}"}\n    action: handoff\n', 2, "bad regex"),
    (
        'rules:\n  - match: {regex: "' + "(" * 480 + ")" * 480 + '"}\n    action: handoff\n',
        2,
        "bad regex",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    _KB_REGRESSIONS,
    ids=[
        "deep-flow",
        "deep-block",
        "nul",
        "bad-utf8",
        "surrogate-question",
        "surrogate-answer",
        "regex-overflow",
        "regex-recursion",
    ],
)
def test_kb_regressions(kb_dir: Path, text: str | bytes, line: int | None, words: str) -> None:
    err = _check_kb_text(kb_dir, text)
    assert isinstance(err, KbError), err
    found = re.match(r"kb\.yaml:([0-9]+): ", str(err))
    assert found is not None, str(err)
    if line is not None:
        assert int(found[1]) == line, str(err)
    assert words in str(err), str(err)


def test_kb_vocabulary_full_is_a_kb_error(kb_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a knowledge base with more distinct terms than the index holds raised the
    vocabulary's plain ValueError (the hot reload only catches KbError, and would have died)."""
    small = kb_module.Vocabulary
    monkeypatch.setattr(kb_module, "Vocabulary", lambda: small(max_terms=8))
    err = _check_kb_text(kb_dir, inv.SEED_KB)
    assert isinstance(err, KbError)
    assert re.match(r"kb\.yaml:[0-9]+: entry '(shipping_fee|refund)': vocabulary full", str(err)), (
        err
    )
    monkeypatch.setattr(kb_module, "Vocabulary", small)
    assert not isinstance(_check_kb_text(kb_dir, inv.SEED_KB), KbError)


def test_kb_invariants_catch_a_loader_that_misbehaves(
    kb_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks have teeth: a KbError without a line, or another exception, fails them."""
    path = kb_dir / "kb.yaml"
    path.write_text(inv.SEED_KB, encoding="utf-8")
    for raised, expected in [
        (KbError("kb.yaml: no line"), AssertionError),
        (KbError("other.yaml:1: wrong file"), AssertionError),
        (KbError("kb.yaml:999: past the end"), AssertionError),
        (RecursionError(), RecursionError),
    ]:

        def load(paths: list[str], raised: BaseException = raised) -> None:
            raise raised

        monkeypatch.setattr(inv, "load_knowledge_base", load)
        with pytest.raises(expected):
            inv.check_kb(str(path))
    monkeypatch.setattr(inv, "load_knowledge_base", load_knowledge_base)
    assert not isinstance(inv.check_kb(str(path)), KbError)


# ---------------------------------------------------------------------------------------------
# atheris harnesses, bounded


@pytest.mark.slow
@pytest.mark.parametrize(("harness", "runs"), [("fuzz_frames.py", 100_000), ("fuzz_kb.py", 500)])
def test_atheris_harness_runs_without_a_crash(tmp_path: Path, harness: str, runs: int) -> None:
    """Each harness for a bounded number of inputs (at most ~10 s): exit 0, no crash file.

    Run from an empty directory: libFuzzer writes ``crash-*`` there when a target fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")}
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "fuzz" / harness),
            f"-atheris_runs={runs}",
            "-max_total_time=10",
            "-seed=1",
            "-rss_limit_mb=1024",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    log = out.stderr[-3_000:]
    assert out.returncode == 0, log
    assert re.search(r"^Done [0-9]+ (runs )?in [0-9]+ second", out.stderr, re.MULTILINE), log
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("leak-*")), log
