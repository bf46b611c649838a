"""``kefu kb check|query|eval``: the knowledge base from the command line.

- ``kefu kb check FILE...``: validate; exit 0, or 1 with ``file:line: problem``.
- ``kefu kb query FILE... -- TEXT [-k 5]``: the hits for a question, with scores.
- ``kefu kb eval --kb FILE... --queries FILE [--json]``: retrieval quality over labelled
  queries (CSV with columns ``text,expected_id``, or JSON lines ``{"text", "expected_id"}``):
  R@1, R@5, MRR, and the answered-vs-correct curve: for each threshold t from 0 to 1 by 0.05,
  the share of queries answered (top score >= t) and the precision among them, which is how
  ``bot.answer_threshold`` is chosen.

``query`` and ``eval`` take ``--tokenizer default|jieba`` (``bot.tokenizer``, default
``default``): the knowledge base is indexed and queried with it, as the server would.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from kefu.bot.kb import KbError, KnowledgeBase, load_knowledge_base
from kefu.text import TOKENIZERS

__all__ = ["add_kb_parser", "evaluate", "run_kb"]


def add_kb_parser(sub: Any) -> None:
    kb = sub.add_parser("kb", help="check, query and evaluate knowledge-base files")
    kb_sub = kb.add_subparsers(dest="kb_command", metavar="KB_COMMAND", required=True)
    check = kb_sub.add_parser("check", help="validate knowledge-base files")
    check.add_argument("files", nargs="+", metavar="FILE")
    query = kb_sub.add_parser("query", help="show the best entries for a question")
    query.add_argument("files", nargs="+", metavar="FILE")
    query.add_argument("--text", "-t", required=True, help="the question")
    query.add_argument("-k", type=int, default=5, help="how many hits (default 5)")
    _tokenizer_option(query)
    ev = kb_sub.add_parser("eval", help="R@1, R@5, MRR and the threshold curve")
    ev.add_argument("--kb", nargs="+", required=True, metavar="FILE")
    ev.add_argument("--queries", required=True, metavar="FILE", help="CSV or JSON lines")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    _tokenizer_option(ev)


def _tokenizer_option(parser: Any) -> None:
    parser.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default="default",
        help="as bot.tokenizer (default: default; jieba needs the jieba package)",
    )


def _load(files: list[str], tokenizer: str = "default") -> KnowledgeBase | None:
    try:
        return load_knowledge_base(files, tokenizer=tokenizer)
    except KbError as exc:
        print(f"kefu kb: {exc}", file=sys.stderr)
        return None


def _queries(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith((".jsonl", ".json")):
            rows = [json.loads(line) for line in f if line.strip()]
            return [(r["text"], str(r["expected_id"])) for r in rows]
        return [(r["text"], r["expected_id"]) for r in csv.DictReader(f)]


def evaluate(kb: KnowledgeBase, queries: list[tuple[str, str]]) -> dict[str, Any]:
    """R@1, R@5, MRR and the curve (module doc) of ``kb`` over ``(text, expected_id)``."""
    r1 = r5 = 0
    mrr = 0.0
    tops: list[tuple[float, bool]] = []
    for text, expected in queries:
        ids = [h.id for h in kb.search(text, 5)]
        hits = kb.search(text, 1)
        top = hits[0].score if hits else 0.0
        r1 += bool(ids) and ids[0] == expected
        r5 += expected in ids
        if expected in ids:
            mrr += 1 / (ids.index(expected) + 1)
        tops.append((top, bool(ids) and ids[0] == expected))
    n = max(len(queries), 1)
    curve = []
    for i in range(21):
        t = i / 20
        answered = [ok for score, ok in tops if score >= t and score > 0]
        curve.append(
            {
                "threshold": t,
                "answered": len(answered) / n,
                "precision": (sum(answered) / len(answered)) if answered else None,
            }
        )
    return {
        "queries": len(queries),
        "entries": len(kb),
        "r_at_1": r1 / n,
        "r_at_5": r5 / n,
        "mrr": mrr / n,
        "curve": curve,
    }


def run_kb(args: argparse.Namespace) -> int:
    if args.kb_command == "check":
        kb = _load(args.files)
        if kb is None:
            return 1
        print(f"ok: {len(kb)} entries, {len(kb.rules)} rules")
        return 0
    if args.kb_command == "query":
        kb = _load(args.files, args.tokenizer)
        if kb is None:
            return 1
        rule = kb.match_rule(args.text)
        if rule is not None:
            print(f"rule: reply={rule.reply!r} action={rule.action} group={rule.group}")
        for h in kb.search(args.text, max(args.k, 1)):
            print(f"{h.score:.4f}  {h.id}  ({h.question})")
        return 0
    kb = _load(args.kb, args.tokenizer)
    if kb is None:
        return 1
    result = evaluate(kb, _queries(args.queries))
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(
        f"{result['queries']} queries, {result['entries']} entries: R@1 {result['r_at_1']:.4f}  "
        f"R@5 {result['r_at_5']:.4f}  MRR {result['mrr']:.4f}"
    )
    print("threshold  answered  precision")
    for point in result["curve"]:
        p = point["precision"]
        print(
            f"  {point['threshold']:.2f}     {point['answered']:.3f}    "
            f"{'-' if p is None else f'{p:.3f}'}"
        )
    return 0
