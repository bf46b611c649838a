"""The knowledge base: YAML files of entries and rules, a TF-IDF index, and hot reload.

File format (PROTOCOL.md, "Knowledge-base file format")::

    entries:
      - id: shipping_fee                  # unique across all files
        questions: ["运费多少", "How much is shipping?"]
        answer: "满99元包邮，不满收取10元运费。"
        tags: [shipping]                  # optional
        group: sales                      # optional: the agents' group for this topic,
                                          # where handoffs about it go (kefu.bot.policy)
    rules:                                # optional, checked before retrieval, in order
      - match: {keywords: ["转人工", "human"]}
        action: handoff                   # handoff | close | route (with group:)
      - match: {regex: "发票|invoice"}
        reply: "电子发票会在发货后24小时内发送到您的邮箱。"

Validation names the file and the line of the offending node (``shop.yaml:12: entries[3]:
answer is missing``); an id used twice names both places. Limits: :data:`MAX_ENTRIES` entries
in all, :data:`MAX_QUESTIONS` phrasings an entry, :data:`MAX_TEXT_CHARS` characters a question
or answer, :data:`MAX_RULES` rules, :data:`MAX_FILE_BYTES` a file.

Retrieval: each phrasing is a document of tokens in a :class:`kefu._core.tfidf.TfidfIndex`
(scikit-learn's TF-IDF weights, cosine similarity); an entry scores as its best phrasing
(``query_grouped``), so scores are in [0, 1]. The tokens come from the tokenizer named by
``bot.tokenizer`` (:func:`kefu.text.get_tokenizer`: ``default`` or ``jieba``); a knowledge
base keeps the one it was built with and tokenizes every query with it, so the index and the
queries always agree. jieba configured but not installed is a :class:`KbError` at the build.

Rules: keywords match case-insensitively as substrings (Chinese has no spaces to find words
by; an ASCII keyword must also stand as a whole word, so ``agent`` does not fire on
``agenda``); a regex is searched (``re.search``, case-insensitive). The first rule that
matches wins.

Hot reload (:class:`KbWatcher`): the files' (mtime, size, inode) are polled every
``bot.kb_reload_interval_s``; a change rebuilds the whole knowledge base in a worker thread
and swaps the reference in one assignment, so searches never see a half-built one and never
find none. A broken edit keeps the version in service, logs the error with its file and line
and counts it (``reload_failures_total``, ``last_error``). Every build has a ``version``: a
counter, and ``digest``, a hash of the files' contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any, Final

import msgspec
import numpy as np
import yaml

from kefu._core import tfidf as _tfidf
from kefu.text import TokenizerUnavailable, Vocabulary, get_tokenizer

__all__ = [
    "MAX_ENTRIES",
    "MAX_FILE_BYTES",
    "MAX_QUESTIONS",
    "MAX_RULES",
    "MAX_TEXT_CHARS",
    "Entry",
    "Hit",
    "KbError",
    "KbWatcher",
    "KnowledgeBase",
    "Rule",
    "load_knowledge_base",
    "sample_kb_path",
]

log = logging.getLogger("kefu.kb")

MAX_ENTRIES: Final = 100_000
MAX_QUESTIONS: Final = 200
MAX_TEXT_CHARS: Final = 8_000
MAX_RULES: Final = 1_000
MAX_FILE_BYTES: Final = 64 << 20
MAX_TAGS: Final = 32
ACTIONS: Final = frozenset({"handoff", "close", "route"})
_ASCII_WORD: Final = re.compile(r"^[0-9a-z ]+$")


class KbError(ValueError):
    """A knowledge-base file is invalid; the message starts with ``file:line:``."""


class _VocabularyFull(KbError):
    """The entry ``entry_id`` brings more distinct terms than the index holds."""

    def __init__(self, entry_id: str, message: str) -> None:
        super().__init__(message)
        self.entry_id = entry_id


class Entry(msgspec.Struct, frozen=True, gc=False):
    id: str
    questions: tuple[str, ...]
    answer: str
    tags: tuple[str, ...] = ()
    group: str | None = None


class Rule(msgspec.Struct, frozen=True, gc=False):
    keywords: tuple[str, ...] = ()
    regex: str | None = None
    reply: str | None = None
    action: str | None = None
    group: str | None = None


class Hit(msgspec.Struct, frozen=True, gc=False):
    """One search result: the entry, its score in [0, 1], the phrasing that matched, and the
    entry's agents' group (None when it names none)."""

    id: str
    score: float
    question: str
    answer: str
    group: str | None = None


def sample_kb_path() -> str:
    """The knowledge base shipped with kefu (a small online shop, Chinese and English)."""
    return str(resources.files("kefu") / "data" / "kb" / "shop.yaml")


# ---------------------------------------------------------------------------------------------
# Loading


def _where(path: str, node: yaml.Node) -> str:
    return f"{os.path.basename(path)}:{node.start_mark.line + 1}"


def _mapping(path: str, node: yaml.Node, what: str) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise KbError(f"{_where(path, node)}: {what} must be a mapping")
    out: dict[str, yaml.Node] = {}
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            raise KbError(f"{_where(path, key)}: {what}: keys must be strings")
        if key.value in out:
            raise KbError(f"{_where(path, key)}: {what}: key `{key.value}` given twice")
        out[key.value] = value
    return out


def _text(path: str, node: yaml.Node, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    # A scalar's text as written (``id: 404`` is the id "404"); null and lists are refused.
    if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
        raise KbError(f"{_where(path, node)}: {what} must be a string")
    text = str(node.value).strip()
    if not text:
        raise KbError(f"{_where(path, node)}: {what} is empty")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # A "\ud800" escape in a double-quoted scalar: no frame could carry the text.
            raise KbError(f"{_where(path, node)}: {what} holds a lone surrogate") from None
    if len(text) > limit:
        raise KbError(f"{_where(path, node)}: {what} is longer than {limit} characters")
    return text


def _texts(path: str, node: yaml.Node, what: str, limit: int) -> tuple[str, ...]:
    if not isinstance(node, yaml.SequenceNode):
        raise KbError(f"{_where(path, node)}: {what} must be a list")
    if len(node.value) > limit:
        raise KbError(f"{_where(path, node)}: {what} has more than {limit} items")
    return tuple(_text(path, item, f"{what}[{i}]") for i, item in enumerate(node.value))


def _check_keys(path: str, node: yaml.Node, got: dict[str, yaml.Node], allowed: set[str]) -> None:
    for key in got:
        if key not in allowed:
            raise KbError(
                f"{_where(path, got[key])}: unknown key `{key}` (allowed: "
                f"{', '.join(sorted(allowed))})"
            )


def _compose(name: str, raw: bytes) -> yaml.Node | None:
    """The YAML node tree of a file's bytes; every failure is a :class:`KbError` naming
    ``name`` and the line.

    The composer is recursive: nesting a few hundred levels deep (``[[[[...``) exhausts
    Python's stack, which is reported like any other syntax error, with the line reached.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise KbError(f"{name}:{line}: not UTF-8") from None
    try:
        loader = yaml.SafeLoader(text)  # checks every character first
    except yaml.reader.ReaderError as exc:  # one YAML does not allow (NUL, ...)
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character  # the code point
        what = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        raise KbError(f"{name}:{line}: invalid YAML: unacceptable character {what}") from None
    try:
        return loader.get_single_node()  # what yaml.compose does, with the loader at hand
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else loader.get_mark().line + 1
        problem = exc.problem or exc.context or "syntax error"
        raise KbError(f"{name}:{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise KbError(f"{name}:{loader.get_mark().line + 1}: invalid YAML: {exc}") from None
    except RecursionError:
        raise KbError(f"{name}:{loader.get_mark().line + 1}: nested too deeply") from None
    finally:
        loader.dispose()


def _parse_file(path: str) -> tuple[list[tuple[Entry, str]], list[Rule], bytes]:
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise KbError(f"{os.path.basename(path)}: larger than {MAX_FILE_BYTES} bytes")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise KbError(f"{path}: cannot read: {exc.strerror or exc}") from None
    root = _compose(os.path.basename(path), raw)
    if root is None:
        return [], [], raw
    top = _mapping(path, root, "the file")
    _check_keys(path, root, top, {"entries", "rules"})
    entries: list[tuple[Entry, str]] = []
    node = top.get("entries")
    if node is not None:
        if not isinstance(node, yaml.SequenceNode):
            raise KbError(f"{_where(path, node)}: entries must be a list")
        for i, item in enumerate(node.value):
            what = f"entries[{i}]"
            fields = _mapping(path, item, what)
            _check_keys(path, item, fields, {"id", "questions", "answer", "tags", "group"})
            for required in ("id", "questions", "answer"):
                if required not in fields:
                    raise KbError(f"{_where(path, item)}: {what}: {required} is missing")
            entry_id = _text(path, fields["id"], f"{what}.id", 128)
            questions = _texts(path, fields["questions"], f"{what}.questions", MAX_QUESTIONS)
            if not questions:
                raise KbError(f"{_where(path, fields['questions'])}: {what}.questions is empty")
            answer = _text(path, fields["answer"], f"{what}.answer")
            tags = (
                _texts(path, fields["tags"], f"{what}.tags", MAX_TAGS) if "tags" in fields else ()
            )
            group = _text(path, fields["group"], f"{what}.group", 64) if "group" in fields else None
            entry = Entry(id=entry_id, questions=questions, answer=answer, tags=tags, group=group)
            entries.append((entry, _where(path, item)))
    rules: list[Rule] = []
    node = top.get("rules")
    if node is not None:
        if not isinstance(node, yaml.SequenceNode):
            raise KbError(f"{_where(path, node)}: rules must be a list")
        for i, item in enumerate(node.value):
            rules.append(_parse_rule(path, item, f"rules[{i}]"))
    return entries, rules, raw


def _parse_rule(path: str, item: yaml.Node, what: str) -> Rule:
    fields = _mapping(path, item, what)
    _check_keys(path, item, fields, {"match", "reply", "action", "group"})
    if "match" not in fields:
        raise KbError(f"{_where(path, item)}: {what}: match is missing")
    match = _mapping(path, fields["match"], f"{what}.match")
    _check_keys(path, fields["match"], match, {"keywords", "regex"})
    if len(match) != 1:
        raise KbError(
            f"{_where(path, fields['match'])}: {what}.match needs exactly one of keywords, regex"
        )
    keywords: tuple[str, ...] = ()
    regex = None
    if "keywords" in match:
        keywords = tuple(k.lower() for k in _texts(path, match["keywords"], "keywords", 1_000))
        if not keywords:
            raise KbError(f"{_where(path, match['keywords'])}: {what}.match.keywords is empty")
    else:
        regex = _text(path, match["regex"], f"{what}.match.regex", 1_000)
        try:
            re.compile(regex)
        except (re.error, OverflowError, RecursionError) as exc:
            # OverflowError: a repeat count past 2**32 (`a{9999999999}`); RecursionError:
            # hundreds of nested groups.
            raise KbError(f"{_where(path, match['regex'])}: {what}: bad regex: {exc}") from None
    if ("reply" in fields) == ("action" in fields):
        raise KbError(f"{_where(path, item)}: {what} needs exactly one of reply, action")
    reply = _text(path, fields["reply"], f"{what}.reply") if "reply" in fields else None
    action = None
    if "action" in fields:
        action = _text(path, fields["action"], f"{what}.action", 16)
        if action not in ACTIONS:
            raise KbError(
                f"{_where(path, fields['action'])}: {what}.action must be one of "
                f"{', '.join(sorted(ACTIONS))}, got {action!r}"
            )
    group = _text(path, fields["group"], f"{what}.group", 64) if "group" in fields else None
    if action == "route" and group is None:
        raise KbError(f"{_where(path, item)}: {what}: action route needs a group")
    return Rule(keywords=keywords, regex=regex, reply=reply, action=action, group=group)


# ---------------------------------------------------------------------------------------------
# The knowledge base


class KnowledgeBase:
    """An immutable snapshot: entries, rules and their index. Safe to search from any thread."""

    def __init__(
        self,
        entries: Sequence[Entry],
        rules: Sequence[Rule] = (),
        *,
        version: int = 1,
        digest: str = "",
        tokenizer: str = "default",
    ) -> None:
        """Index ``entries``. Raises :class:`KbError` when ``tokenizer`` is unknown or needs a
        package that is not installed."""
        try:
            self._tokenize = get_tokenizer(tokenizer)
        except (ValueError, TokenizerUnavailable) as exc:
            raise KbError(f"`bot.tokenizer`: {exc}") from None
        self.tokenizer = tokenizer
        self.entries = tuple(entries)
        self.rules = tuple(rules)
        self.version = version
        self.digest = digest
        self._by_id = {e.id: e for e in self.entries}
        self._vocab = Vocabulary()
        docs: list[list[int]] = []
        owners: list[int] = []
        phrasings: list[str] = []
        for n, entry in enumerate(self.entries):
            for q in entry.questions:
                try:
                    docs.append(self._vocab.add_document(self._tokenize(q)))
                except ValueError as exc:  # the vocabulary is bounded (kefu.text.Vocabulary)
                    raise _VocabularyFull(entry.id, f"entry {entry.id!r}: {exc}") from None
                owners.append(n)
                phrasings.append(q)
        self._groups = np.asarray(owners, dtype=np.int32)
        self._phrasings = phrasings
        self._index = _tfidf.TfidfIndex.build(docs, len(self._vocab)) if docs else None
        self._rules = [
            (r, re.compile(r.regex, re.IGNORECASE) if r.regex is not None else None)
            for r in self.rules
        ]

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, entry_id: str) -> Entry | None:
        return self._by_id.get(entry_id)

    def answer_of(self, entry_id: str) -> str | None:
        entry = self._by_id.get(entry_id)
        return None if entry is None else entry.answer

    def search(self, text: str, k: int = 5) -> list[Hit]:
        """The ``k`` best entries for ``text``, best first (none when nothing matches)."""
        if self._index is None or k < 1:
            return []
        ids = self._vocab.lookup(self._tokenize(text))
        if not ids:
            return []
        groups, docs, scores = self._index.query_grouped(ids, self._groups, k)
        out = []
        for g, d, s in zip(groups.tolist(), docs.tolist(), scores.tolist(), strict=True):
            entry = self.entries[g]
            score = min(max(float(s), 0.0), 1.0)
            out.append(Hit(entry.id, score, self._phrasings[d], entry.answer, entry.group))
        return out

    def match_rule(self, text: str) -> Rule | None:
        """The first rule that matches ``text`` (module doc)."""
        lowered = text.lower()
        for rule, pattern in self._rules:
            if pattern is not None:
                if pattern.search(text):
                    return rule
            elif any(_keyword_in(k, lowered) for k in rule.keywords):
                return rule
        return None


def _keyword_in(keyword: str, text: str) -> bool:
    if not _ASCII_WORD.match(keyword):
        return keyword in text
    return re.search(rf"(?<![0-9a-z]){re.escape(keyword)}(?![0-9a-z])", text) is not None


def load_knowledge_base(
    paths: Iterable[str], version: int = 1, *, tokenizer: str = "default"
) -> KnowledgeBase:
    """Read, validate and index ``paths`` with ``tokenizer`` (raises :class:`KbError`)."""
    entries: list[Entry] = []
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    digest = hashlib.blake2b(digest_size=8)
    for path in paths:
        file_entries, file_rules, raw = _parse_file(path)
        digest.update(raw)
        for entry, where in file_entries:
            if entry.id in seen:
                raise KbError(f"{where}: entry id {entry.id!r} is already used at {seen[entry.id]}")
            seen[entry.id] = where
            entries.append(entry)
        rules.extend(file_rules)
        if len(entries) > MAX_ENTRIES:
            raise KbError(f"{os.path.basename(path)}: more than {MAX_ENTRIES} entries in all")
        if len(rules) > MAX_RULES:
            raise KbError(f"{os.path.basename(path)}: more than {MAX_RULES} rules in all")
    try:
        return KnowledgeBase(
            entries, rules, version=version, digest=digest.hexdigest(), tokenizer=tokenizer
        )
    except _VocabularyFull as exc:
        raise KbError(f"{seen[exc.entry_id]}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Hot reload


class KbWatcher:
    """Keeps :attr:`current` up to date with the files (module doc, "Hot reload")."""

    def __init__(
        self, paths: Sequence[str], interval_s: float = 0.5, *, tokenizer: str = "default"
    ) -> None:
        self.paths = list(paths)
        self.interval_s = interval_s
        self.tokenizer = tokenizer
        self.current: KnowledgeBase | None = None
        self.reloads_total = 0
        self.reload_failures_total = 0
        self.last_error: str | None = None
        self._signature: tuple[Any, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _stat(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for p in self.paths:
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _load(self, version: int) -> KnowledgeBase:
        return load_knowledge_base(self.paths, version, tokenizer=self.tokenizer)

    async def start(self) -> None:
        """Load the files (raises :class:`KbError` when they are invalid), then watch them."""
        self._signature = self._stat()
        self.current = await asyncio.to_thread(self._load, 1)
        log.info(
            "knowledge base v%d: %d entries, %d rules from %d files",
            self.current.version,
            len(self.current),
            len(self.current.rules),
            len(self.paths),
        )
        self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            signature = self._stat()
            if signature != self._signature:
                self._signature = signature
                # A failure is logged and counted by reload(); the version in service stays.
                with contextlib.suppress(KbError):
                    await self.reload()

    async def reload(self) -> KnowledgeBase:
        """Rebuild from the files now and swap it in; raises :class:`KbError` and keeps the
        version in service when they are invalid."""
        async with self._lock:
            version = (self.current.version if self.current is not None else 0) + 1
            try:
                kb = await asyncio.to_thread(self._load, version)
            except KbError as exc:
                self.reload_failures_total += 1
                self.last_error = str(exc)
                log.error("knowledge base not reloaded, v%s stays: %s", version - 1, exc)
                raise
            self.current = kb  # one assignment: searches see the old or the new, never neither
            self.reloads_total += 1
            self.last_error = None
            log.info("knowledge base v%d: %d entries, %d rules", kb.version, len(kb), len(kb.rules))
            return kb

    def stats(self) -> dict[str, Any]:
        kb = self.current
        return {
            "version": kb.version if kb is not None else 0,
            "entries": len(kb) if kb is not None else 0,
            "rules": len(kb.rules) if kb is not None else 0,
            "reloads_total": self.reloads_total,
            "reload_failures_total": self.reload_failures_total,
            "healthy": 1 if self.last_error is None else 0,
        }
