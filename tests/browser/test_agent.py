"""The agent workbench (/agent) with a visitor on /chat, each in its own browser context,
against a real ``kefu serve``: bot answer, handoff, notification, profile and history, reply,
read marks, transfer to another agent, close; and a network cut on the agent's side while the
visitor writes, after which every message is in the workbench exactly once."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.browser.conftest import ADMIN_TOKEN, ALICE, BOB, ServerFactory
from tests.e2e.harness import ServerProcess

TIMEOUT = 15_000

NewPage = Callable[..., Page]
Shot = Callable[[Page, str], Path]

#: Records desktop notifications instead of showing them (permission granted up front).
NOTIFICATION_STUB = """
window.__notes = [];
window.Notification = class {
  static permission = 'granted';
  static requestPermission() { return Promise.resolve('granted'); }
  constructor(title, options) { window.__notes.push({ title, body: (options || {}).body }); }
  close() {}
};
"""


def agent_status(server: ServerProcess, agent_id: str) -> str:
    req = urllib.request.Request(
        f"{server.http_url}/v1/admin/agents/{agent_id}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(json.load(resp)["status"])


def wait_online(server: ServerProcess, agent_id: str, timeout: float = 10.0) -> None:
    """Routing assigns only to online agents: wait until the server counts this one."""
    deadline = time.monotonic() + timeout
    while agent_status(server, agent_id) != "online":
        assert time.monotonic() < deadline, f"{agent_id} never came online"
        time.sleep(0.1)


def open_workbench(new_page: NewPage, server: ServerProcess, token: str, **ctx: object) -> Page:
    page = new_page(**ctx)
    page.context.add_init_script(NOTIFICATION_STUB)
    page.goto(server.http_url + "/agent")
    page.get_by_label("Agent token").fill(token)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
    return page


def open_chat(page: Page, server: ServerProcess, query: str = "") -> None:
    """The visitor's page, once its WebSocket is up (text typed before that is not sent)."""
    page.goto(f"{server.http_url}/chat{query}")
    expect(page.locator("body")).to_have_attribute("data-conn", "open", timeout=TIMEOUT)


def visitor_send(page: Page, text: str) -> None:
    page.locator("#chat-input").fill(text)
    page.locator("#chat-input").press("Enter")


def bubbles(page: Page, selector: str) -> list[str]:
    return page.locator(selector).all_text_contents()


def test_handoff_reply_transfer_close(
    server_factory: ServerFactory, new_page: NewPage, shot: Shot
) -> None:
    server = server_factory()
    alice = open_workbench(new_page, server, ALICE, viewport={"width": 1280, "height": 800})
    wait_online(server, "alice")
    expect(alice.locator("#me-name")).to_have_text("Alice")
    assert alice.title() == "kefu"

    # The visitor asks a question of the knowledge base, then for a person.
    visitor = new_page(viewport={"width": 420, "height": 760})
    open_chat(visitor, server, "?name=Zhang%20San")
    visitor_send(visitor, "运费多少")
    chat = visitor.locator("#chat-list")
    expect(chat.locator(".role-bot .bubble").last).to_contain_text("包邮", timeout=TIMEOUT)
    visitor_send(visitor, "转人工")

    # Alice is told: the conversation in her list, an unread badge in the title, a notification.
    item = alice.locator("#conv-list .conv-item")
    expect(item).to_have_count(1, timeout=TIMEOUT)
    expect(item.locator(".conv-name")).to_have_text("Zhang San")
    expect(alice).to_have_title(re.compile(r"^\(\d+\) kefu$"), timeout=TIMEOUT)
    notes = alice.evaluate("window.__notes")
    assert any("Zhang San" in n["title"] for n in notes), notes
    expect(item.locator(".unread-badge")).to_have_text(re.compile(r"^[1-9]"))

    # She opens it: the visitor's profile and the earlier messages, bot answer included.
    item.click()
    expect(alice.locator("#conv-title")).to_have_text("Zhang San")
    profile = alice.locator("#profile")
    expect(profile.locator("[data-field=user_agent] dd")).to_contain_text("Mozilla/5.0")
    expect(profile.locator("[data-field=language] dd")).to_have_text("en-US")
    expect(profile.locator("[data-field=page] dd")).to_contain_text("/chat")
    msgs = alice.locator("#msg-list")
    expect(msgs.locator(".role-visitor .bubble").first).to_have_text("运费多少")
    expect(msgs.locator(".role-bot .bubble").first).to_contain_text("包邮")
    expect(msgs.locator(".role-visitor .bubble").last).to_have_text("转人工")
    expect(alice).to_have_title("kefu", timeout=TIMEOUT)  # read on open
    expect(item.locator(".unread-badge")).to_have_count(0)
    expect(alice.locator("#stat-mem")).to_have_text(
        re.compile(r"\d+(\.\d+)? (B|KB|MB)"), timeout=TIMEOUT
    )
    expect(alice.locator("#stat-cpu")).to_have_text(re.compile(r"\d+\.\d+ m?s"))

    # The visitor types: Alice sees it; Alice replies (Enter) and the visitor sees the reply.
    # (typing frames go out at most every 2 s: type for longer than that)
    visitor.locator("#chat-input").press_sequentially("请问一下", delay=700)
    expect(alice.locator("#typing")).not_to_be_empty(timeout=TIMEOUT)
    visitor.locator("#chat-input").fill("")
    alice.get_by_label("Message", exact=True).fill("您好，我是 Alice，请问有什么可以帮您？")
    alice.get_by_label("Message", exact=True).press("Enter")
    expect(alice.get_by_label("Message", exact=True)).to_have_value("")
    own = msgs.locator(".role-own:not(.pending)")
    expect(own).to_have_count(1, timeout=TIMEOUT)
    expect(chat.locator(".role-agent .bubble").last).to_have_text(
        "您好，我是 Alice，请问有什么可以帮您？", timeout=TIMEOUT
    )
    # The visitor's page is visible: it marks the reply read, and Alice sees ✓✓.
    expect(own.locator(".readmark")).to_have_text("✓✓", timeout=TIMEOUT)

    # A quick reply: the search filters, a click puts the text into the composer.
    alice.get_by_label("Search quick replies").fill("moment (en)")
    replies = alice.locator("#qr-list .qr-item")
    expect(replies).to_have_count(1)
    replies.click()
    expect(alice.get_by_label("Message", exact=True)).to_have_value(re.compile(r"\S"))
    alice.get_by_label("Message", exact=True).press("Enter")
    expect(own).to_have_count(2, timeout=TIMEOUT)
    expect(chat.locator(".role-agent .bubble")).to_have_count(2, timeout=TIMEOUT)
    shot(alice, "workbench")

    # Transfer to Bob, who logs in now (so that the handoff above could only go to Alice).
    bob = open_workbench(new_page, server, BOB, viewport={"width": 1280, "height": 800})
    wait_online(server, "bob")
    alice.get_by_role("button", name="Transfer", exact=True).click()
    target = alice.get_by_label("Transfer to")
    expect(target.locator("option[value='agent:bob']")).to_have_count(1, timeout=TIMEOUT)
    target.select_option("agent:bob")
    alice.locator("#transfer-form button[type=submit]").click()
    expect(alice.locator("#conv-list .conv-item")).to_have_count(0, timeout=TIMEOUT)
    expect(alice.locator("#conv-none")).to_be_visible()
    bob_item = bob.locator("#conv-list .conv-item")
    expect(bob_item).to_have_count(1, timeout=TIMEOUT)
    expect(bob).to_have_title(re.compile(r"^\(\d+\) kefu$"), timeout=TIMEOUT)
    assert any("Zhang San" in n["title"] for n in bob.evaluate("window.__notes"))
    bob_item.click()
    bob_msgs = bob.locator("#msg-list")
    # Bob sees the whole conversation, Alice's replies as another agent's.
    expect(bob_msgs.locator(".role-agent .bubble").first).to_have_text(
        "您好，我是 Alice，请问有什么可以帮您？", timeout=TIMEOUT
    )
    expect(bob_msgs.locator(".role-visitor .bubble").first).to_have_text("运费多少")
    bob.get_by_label("Message", exact=True).fill("我是 Bob")
    bob.get_by_role("button", name="Send").click()
    expect(chat.locator(".role-agent .bubble").last).to_have_text("我是 Bob", timeout=TIMEOUT)
    shot(bob, "workbench-transferred")

    # Bob closes: the visitor sees the closed notice, Bob's composer is off.
    bob.get_by_role("button", name="Close", exact=True).click()
    expect(visitor.locator("#chat-closed")).to_be_visible(timeout=TIMEOUT)
    expect(bob.locator("#conv-notice")).to_contain_text("closed", timeout=TIMEOUT)
    expect(bob.get_by_label("Message", exact=True)).to_be_disabled()
    texts = bubbles(bob, "#msg-list li[data-seq] .bubble")
    assert len(texts) == len(
        set(
            bob.locator("#msg-list li[data-seq]").evaluate_all("els => els.map(e => e.dataset.seq)")
        )
    ), texts
    shot(visitor, "chat-closed-by-agent")


def test_agent_offline_and_back_loses_and_doubles_nothing(
    server_factory: ServerFactory, new_page: NewPage, shot: Shot
) -> None:
    server = server_factory()
    alice = open_workbench(new_page, server, ALICE)
    wait_online(server, "alice")
    visitor = new_page()
    open_chat(visitor, server)
    visitor_send(visitor, "转人工")
    item = alice.locator("#conv-list .conv-item")
    expect(item).to_have_count(1, timeout=TIMEOUT)
    item.click()
    msgs = alice.locator("#msg-list")
    expect(msgs.locator(".role-visitor .bubble")).to_have_text(["转人工"], timeout=TIMEOUT)

    alice.context.set_offline(True)
    expect(alice.locator("#conn-state")).not_to_have_attribute(
        "data-state", "open", timeout=TIMEOUT
    )
    sent = [f"离线消息 {i} / offline {i}" for i in range(1, 6)]
    for text in sent:
        visitor_send(visitor, text)
    chat = visitor.locator("#chat-list")
    expect(chat.locator(".role-visitor[data-seq] .bubble")).to_have_count(6, timeout=TIMEOUT)
    # Alice types while cut off: the message waits in the outbox and goes out once.
    alice.get_by_label("Message", exact=True).fill("网络恢复后发出")
    alice.get_by_label("Message", exact=True).press("Enter")
    expect(msgs.locator("li.pending .bubble")).to_have_text(["网络恢复后发出"])
    alice.wait_for_timeout(1000)  # the visitor's messages are stored while Alice is away
    assert msgs.locator(".role-visitor .bubble").count() == 1

    alice.context.set_offline(False)
    expect(alice.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
    expect(msgs.locator(".role-visitor .bubble")).to_have_text(["转人工", *sent], timeout=TIMEOUT)
    expect(msgs.locator(".role-own:not(.pending) .bubble")).to_have_text(
        ["网络恢复后发出"], timeout=TIMEOUT
    )
    expect(msgs.locator("li.pending")).to_have_count(0)
    expect(chat.locator(".role-agent .bubble")).to_have_text(["网络恢复后发出"], timeout=TIMEOUT)
    # Nothing doubled, in the page or in the store: seqs unique and gap-free.
    alice.wait_for_timeout(1000)
    seqs = [
        int(s)
        for s in msgs.locator("li[data-seq]").evaluate_all("els => els.map(e => e.dataset.seq)")
    ]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    counts = Counter(bubbles(alice, "#msg-list .role-visitor .bubble"))
    assert all(counts[t] == 1 for t in sent), counts
    assert counts["转人工"] == 1
    shot(alice, "workbench-after-reconnect")

    # A reload keeps the session (sessionStorage) and shows the same history once.
    alice.reload()
    expect(alice.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
    alice.locator("#conv-list .conv-item").click()
    expect(msgs.locator(".role-visitor .bubble")).to_have_text(["转人工", *sent], timeout=TIMEOUT)
    expect(msgs.locator(".role-own .bubble")).to_have_text(["网络恢复后发出"])


def test_workbench_at_375px(server_factory: ServerFactory, new_page: NewPage, shot: Shot) -> None:
    server = server_factory()
    phone = {"width": 375, "height": 740}
    alice = open_workbench(new_page, server, ALICE, viewport=phone)
    wait_online(server, "alice")
    visitor = new_page(viewport=phone)
    open_chat(visitor, server)
    visitor_send(visitor, "转人工")
    item = alice.locator("#conv-list .conv-item")
    expect(item).to_have_count(1, timeout=TIMEOUT)
    shot(alice, "workbench-375-list")
    # Keyboard: focus the conversation and open it with Enter; the list gives way to the view.
    item.focus()
    alice.keyboard.press("Enter")
    expect(alice.locator("#conv")).to_be_visible()
    expect(alice.locator("#sidebar")).to_be_hidden()
    composer = alice.get_by_label("Message", exact=True)
    expect(composer).to_be_focused()
    composer.press_sequentially("第一行")
    composer.press("Shift+Enter")
    composer.press_sequentially("第二行")
    composer.press("Enter")
    expect(visitor.locator("#chat-list .role-agent .bubble")).to_have_text(
        ["第一行\n第二行"], timeout=TIMEOUT
    )
    assert alice.evaluate("document.documentElement.scrollWidth") <= 375 + 1
    shot(alice, "workbench-375-conversation")
    alice.get_by_role("button", name="Visitor").click()
    expect(alice.locator("#profile")).to_be_visible()
    expect(alice.locator("#conv")).to_be_hidden()
    shot(alice, "workbench-375-visitor")
    alice.get_by_role("button", name="Back to the conversation").click()
    alice.get_by_role("button", name="Back to the list").click()
    expect(alice.locator("#sidebar")).to_be_visible()


def test_away_agent_takes_a_queued_conversation_by_hand(
    server_factory: ServerFactory, new_page: NewPage, shot: Shot
) -> None:
    server = server_factory()
    alice = open_workbench(new_page, server, ALICE)
    wait_online(server, "alice")
    alice.get_by_label("My status").select_option("away")
    deadline = time.monotonic() + 10
    while agent_status(server, "alice") != "away":
        assert time.monotonic() < deadline, "the status switch never reached the server"
        time.sleep(0.1)

    # Nobody online: the conversation waits in the queue, which the workbench lists.
    visitor = new_page()
    open_chat(visitor, server, "?name=Li%20Si")
    visitor_send(visitor, "转人工")
    waiting = alice.locator("#queue-list .queue-item")
    expect(waiting).to_have_count(1, timeout=TIMEOUT)
    expect(waiting.locator(".conv-name")).to_have_text("Li Si")
    expect(waiting.locator(".conv-preview")).to_contain_text("#1")
    expect(alice).to_have_title("(1) kefu")
    expect(alice.locator("#conv-list .conv-item")).to_have_count(0)
    shot(alice, "workbench-queue")

    # Accepting means being at work: the workbench goes online, and the conversation is hers.
    alice.get_by_role("button", name="Accept Li Si").click()
    expect(alice.get_by_label("My status")).to_have_value("online")
    item = alice.locator("#conv-list .conv-item")
    expect(item).to_have_count(1, timeout=TIMEOUT)
    expect(waiting).to_have_count(0, timeout=TIMEOUT)
    item.click()
    expect(alice.locator("#msg-list .role-visitor .bubble")).to_have_text(
        ["转人工"], timeout=TIMEOUT
    )
    alice.get_by_label("Message", exact=True).fill("您好，李四")
    alice.get_by_label("Message", exact=True).press("Enter")
    expect(visitor.locator("#chat-list .role-agent .bubble")).to_have_text(
        ["您好，李四"], timeout=TIMEOUT
    )


def agent_me_status(server: ServerProcess, token: str) -> int:
    req = urllib.request.Request(
        f"{server.http_url}/v1/agent/me", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_login_keeps_a_session_token_and_logout_revokes_it(
    server_factory: ServerFactory, new_page: NewPage
) -> None:
    """The page trades the agent's token for a session token and keeps only that one; Log out
    revokes it on the server; a session refused meanwhile brings back the login form."""
    server = server_factory()
    alice = open_workbench(new_page, server, ALICE)
    kept = alice.evaluate("() => JSON.stringify(Object.values(sessionStorage))")
    assert ALICE not in kept
    session = alice.evaluate("() => sessionStorage.getItem('kefu.agent.token')")
    assert session.startswith("v1.") and session != ALICE
    assert agent_me_status(server, session) == 200

    alice.get_by_role("button", name="Log out").click()
    expect(alice.get_by_label("Agent token")).to_be_visible(timeout=TIMEOUT)
    assert alice.evaluate("() => sessionStorage.getItem('kefu.agent.token')") is None
    deadline = time.monotonic() + 10
    while agent_me_status(server, session) != 403:
        assert time.monotonic() < deadline, "the session token still works after Log out"
        time.sleep(0.1)
    assert agent_me_status(server, ALICE) == 200

    # Logged in again; the session is ended from elsewhere: the WebSocket is closed with
    # 1008 and the page asks for the token again.
    token_field = alice.get_by_label("Agent token")
    token_field.fill(ALICE)
    alice.get_by_role("button", name="Log in").click()
    expect(alice.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
    second = alice.evaluate("() => sessionStorage.getItem('kefu.agent.token')")
    assert second.startswith("v1.") and second != session
    req = urllib.request.Request(
        f"{server.http_url}/v1/agent/logout",
        method="POST",
        headers={"Authorization": f"Bearer {second}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 204
    expect(alice.get_by_label("Agent token")).to_be_visible(timeout=TIMEOUT)
    expect(alice.locator("#login-error")).to_have_text(
        "The token was refused: log in again", timeout=TIMEOUT
    )
