"""A corpus of XSS payloads (tests/browser/xss_payloads.py) goes through a real server twice:
as the knowledge base's answers (the bot sends them) and as the visitor's own text. In the
agent workbench and in the visitor's /chat page, every bubble's text is the payload exactly,
no element of a payload exists in the page, and no script ran."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml
from playwright.sync_api import Page, expect

from tests.browser.conftest import ALICE, ServerFactory
from tests.browser.test_agent import open_chat, open_workbench, visitor_send, wait_online
from tests.browser.xss_payloads import FORBIDDEN_TAGS, PAYLOADS

TIMEOUT = 15_000

NewPage = Callable[..., Page]
Shot = Callable[[Page, str], Path]

#: Any script a payload manages to run reports here; alert and friends are recorded too.
TRAP = """
window.__xss = [];
window.__alerts = [];
window.alert = (m) => { window.__alerts.push(String(m)); };
window.confirm = (m) => { window.__alerts.push(String(m)); return false; };
window.prompt = (m) => { window.__alerts.push(String(m)); return null; };
"""

#: The visitor's display name is hostile too: the workbench shows it in the list and profile.
HOSTILE_NAME = "<img src=x onerror=window.__xss.push(99)>"

#: Words that make each question distinct for the retrieval (one entry per payload).
WORDS = (
    "apple",
    "banana",
    "cherry",
    "damson",
    "elder",
    "fig",
    "grape",
    "hazel",
    "iris",
    "jasmine",
    "kiwi",
    "lemon",
    "mango",
    "nectar",
    "olive",
    "peach",
    "quince",
    "radish",
    "sage",
    "thyme",
    "umber",
    "violet",
    "walnut",
    "xigua",
    "yam",
    "zucchini",
    "acorn",
    "basil",
    "cedar",
    "dill",
    "endive",
    "fennel",
    "garlic",
    "hops",
    "indigo",
    "juniper",
    "kale",
    "leek",
    "mint",
    "nutmeg",
    "oat",
    "parsley",
    "quinoa",
    "rye",
    "saffron",
    "tarragon",
    "ube",
    "vanilla",
    "wasabi",
)


def question(i: int) -> str:
    return f"xss {WORDS[i]} question"


def kb_yaml() -> str:
    assert len(WORDS) >= len(PAYLOADS)
    entries = [
        {"id": f"xss_{i:02d}", "questions": [question(i)], "answer": payload}
        for i, payload in enumerate(PAYLOADS)
    ]
    rules = [{"match": {"keywords": ["转人工"]}, "action": "handoff"}]
    return yaml.safe_dump({"entries": entries, "rules": rules}, allow_unicode=True)


def assert_inert(page: Page, list_selector: str) -> None:
    """No element from a payload in the message list, no element inside a bubble, no script."""
    assert page.locator(f"{list_selector} .bubble *").count() == 0
    for tag in FORBIDDEN_TAGS:
        assert page.locator(f"{list_selector} {tag}").count() == 0, tag
    assert page.locator("[href^='javascript' i], [src^='javascript' i]").count() == 0
    assert page.evaluate("window.__xss") == []
    assert page.evaluate("window.__alerts") == []


def test_xss_corpus_renders_as_text(
    server_factory: ServerFactory, new_page: NewPage, shot: Shot
) -> None:
    server = server_factory(
        kb_yaml=kb_yaml(), bot={"enabled": True, "answer_threshold": 0.2, "handoff_threshold": 0.0}
    )
    alice = open_workbench(new_page, server, ALICE, viewport={"width": 1280, "height": 900})
    alice.context.add_init_script(TRAP)
    alice.reload()  # the trap is in place from the first script on
    expect(alice.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
    wait_online(server, "alice")

    visitor = new_page(viewport={"width": 480, "height": 900})
    visitor.context.add_init_script(TRAP)
    open_chat(visitor, server, f"?name={HOSTILE_NAME}")
    chat = visitor.locator("#chat-list")

    # 1. The bot answers every question with a payload (the knowledge base's answers).
    bot_bubbles = chat.locator(".role-bot[data-seq] .bubble")
    for i in range(len(PAYLOADS)):
        visitor_send(visitor, question(i))
        expect(bot_bubbles).to_have_count(i + 1, timeout=TIMEOUT)
    assert bot_bubbles.all_text_contents() == list(PAYLOADS)

    # 2. A person takes over; the visitor then sends every payload as text.
    visitor_send(visitor, "转人工")
    item = alice.locator("#conv-list .conv-item")
    expect(item).to_have_count(1, timeout=TIMEOUT)
    item.click()
    for payload in PAYLOADS:
        visitor_send(visitor, payload)
    visitor_texts = [question(i) for i in range(len(PAYLOADS))] + ["转人工", *PAYLOADS]
    mine = chat.locator(".role-visitor[data-seq] .bubble")
    expect(mine).to_have_count(len(visitor_texts), timeout=TIMEOUT)
    assert mine.all_text_contents() == visitor_texts

    # 3. The workbench: live ones at the bottom, the rest by paging back through the history.
    msgs = alice.locator("#msg-list")
    expect(msgs.locator(".role-visitor .bubble").last).to_have_text(PAYLOADS[-1], timeout=TIMEOUT)
    older = alice.locator("#older-btn")
    for _ in range(20):
        if older.is_hidden():
            break
        before = msgs.locator("li[data-seq]").count()
        older.click()
        expect(msgs.locator("li[data-seq]")).not_to_have_count(before, timeout=TIMEOUT)
    expect(older).to_be_hidden()
    seqs = msgs.locator("li[data-seq]").evaluate_all("els => els.map(e => Number(e.dataset.seq))")
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert msgs.locator(".role-bot .bubble").all_text_contents() == list(PAYLOADS)
    assert msgs.locator(".role-visitor .bubble").all_text_contents() == visitor_texts
    # Only the workbench's own markup in the list.
    odd = msgs.locator("*:not(li):not(div):not(span):not(time)").evaluate_all(
        "els => els.map(e => e.tagName)"
    )
    assert odd == [], odd
    assert_inert(alice, "#msg-list")
    # The hostile name is text in the list, the header and the profile.
    expect(alice.locator("#conv-title")).to_have_text(HOSTILE_NAME)
    expect(item.locator(".conv-name")).to_have_text(HOSTILE_NAME)
    expect(alice.locator("#profile [data-field=name] dd")).to_have_text(HOSTILE_NAME)
    assert alice.locator("#sidebar img, #info img, #conv-title img").count() == 0

    # The agent sends them back: the visitor's page shows them as text too.
    composer = alice.get_by_label("Message", exact=True)
    for payload in PAYLOADS[:10]:
        composer.fill(payload)
        composer.press("Enter")
    expect(chat.locator(".role-agent[data-seq] .bubble")).to_have_text(
        list(PAYLOADS[:10]), timeout=TIMEOUT
    )
    expect(msgs.locator(".role-own:not(.pending) .bubble")).to_have_text(
        list(PAYLOADS[:10]), timeout=TIMEOUT
    )

    alice.wait_for_timeout(500)  # let anything that was going to fire, fire
    assert_inert(alice, "#msg-list")
    assert_inert(visitor, "#chat-list")
    shot(alice, "workbench-xss")
    shot(visitor, "chat-xss")
