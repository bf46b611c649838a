"""The visitor's chat page (/chat) in a real browser against a real server.

What a visitor relies on: the bot answers a knowledge-base question; a reload shows the same
conversation with each message once; messages typed while the network is cut are shown as
sending, then delivered exactly once (on screen and in the server's history) when it returns;
a person joining, typing, reading and closing is shown; the page works at 375 px and in Chinese.
The agent's side is a plain WebSocket client here (the workbench has its own tests).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from playwright.sync_api import Page, expect
from websockets.sync.client import ClientConnection, connect

from tests.browser.conftest import ALICE
from tests.e2e.harness import ServerProcess

#: From the sample knowledge base (kefu/data/kb/shop.yaml, entry shipping_fee).
KB_QUESTION = "How much is shipping?"
KB_ANSWER = "Orders of 99 yuan or more ship free"
KB_QUESTION_ZH = "运费多少"
KB_ANSWER_ZH = "订单满99元包邮"
#: A rule of the sample knowledge base hands this to a person.
HANDOFF_TEXT = "I have a complaint"
WAIT_MS = 15_000

NewPage = Callable[..., Page]
Shot = Callable[[Page, str], Any]


def open_chat(page: Page, server: ServerProcess, query: str = "") -> None:
    """Open /chat and wait until its WebSocket is up."""
    page.goto(f"{server.http_url}/chat{query}")
    expect(page.locator("body")).to_have_attribute("data-conn", "open", timeout=WAIT_MS)


def say(page: Page, text: str) -> None:
    page.locator("#chat-input").fill(text)
    page.locator("#chat-input").press("Enter")


def session_of(page: Page) -> dict[str, Any]:
    raw = page.evaluate("localStorage.getItem('kefu:session')")
    assert raw, "no session kept in localStorage"
    session: dict[str, Any] = json.loads(raw)
    return session


def server_history(page: Page, server: ServerProcess) -> list[dict[str, Any]]:
    """Every stored message of the page's conversation, from REST with the page's own token."""
    session = session_of(page)
    messages: list[dict[str, Any]] = []
    after = 0
    for _ in range(20):  # bounded: 20 pages of 500
        resp = page.request.get(
            f"{server.http_url}/v1/chat/{session['session_id']}/messages?after={after}&limit=500",
            headers={"Authorization": f"Bearer {session['token']}"},
        )
        assert resp.status == 200, resp.text()
        body = resp.json()
        messages += body["messages"]
        if not body["more"] or not body["messages"]:
            break
        after = body["messages"][-1]["seq"]
    return messages


def own_bubbles(page: Page, text: str) -> Any:
    return page.locator(".row.own .bubble", has_text=text)


# -- the agent's side, as a plain WebSocket client ---------------------------------------------


class Agent:
    """An agent connected over WebSocket: hello, online, then frames read with a bound."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        #: Every frame received, in order (bounded by what one test exchanges).
        self.frames: list[dict[str, Any]] = []

    def send(self, **frame: Any) -> None:
        self.conn.send(json.dumps(frame))

    def recv_until(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"frame not received; saw {seen}"
            try:
                frame: dict[str, Any] = json.loads(self.conn.recv(timeout=left))
            except TimeoutError:
                continue
            seen.append(frame.get("type", "?"))
            self.frames.append(frame)
            if pred(frame):
                return frame


@contextmanager
def agent_online(server: ServerProcess, token: str = ALICE) -> Iterator[Agent]:
    with connect(server.ws_url, open_timeout=10) as conn:
        agent = Agent(conn)
        agent.send(type="hello", token=token)
        agent.recv_until(lambda f: f["type"] == "welcome")
        agent.send(type="status", status="online")
        yield agent


# -- tests ---------------------------------------------------------------------------------------


def test_bot_answers_and_reload_shows_the_history_once(
    server_factory: Callable[..., ServerProcess], new_page: NewPage, shot: Shot
) -> None:
    server = server_factory()
    page = new_page(viewport={"width": 1280, "height": 800})
    open_chat(page, server)
    expect(page.locator("#chat-input")).to_have_attribute("placeholder", "Type a message…")
    say(page, KB_QUESTION)
    answer = page.locator(".row.role-bot .bubble", has_text=KB_ANSWER)
    expect(answer).to_have_count(1, timeout=WAIT_MS)
    expect(own_bubbles(page, KB_QUESTION)).to_have_count(1)
    expect(page.locator(".row.pending")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator(".row.role-bot .sender").first).to_have_text("Assistant")
    before = session_of(page)
    shot(page, "chat-desktop")

    page.reload()
    expect(page.locator("body")).to_have_attribute("data-conn", "open", timeout=WAIT_MS)
    after = session_of(page)
    assert after["session_id"] == before["session_id"]
    assert after["token"] == before["token"]
    expect(answer).to_have_count(1)
    expect(own_bubbles(page, KB_QUESTION)).to_have_count(1)
    stored = server_history(page, server)
    expect(page.locator(".row[data-seq]")).to_have_count(len(stored))
    shown = page.locator(".row[data-seq]").evaluate_all(
        "rows => rows.map(r => Number(r.dataset.seq))"
    )
    assert shown == [m["seq"] for m in stored]


def test_messages_sent_offline_arrive_exactly_once(
    server_factory: Callable[..., ServerProcess], new_page: NewPage
) -> None:
    server = server_factory()
    page = new_page()
    open_chat(page, server)
    say(page, KB_QUESTION)
    expect(page.locator(".row.role-bot .bubble", has_text=KB_ANSWER)).to_have_count(
        1, timeout=WAIT_MS
    )

    page.context.set_offline(True)
    expect(page.locator("#chat-banner")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#chat-banner")).to_contain_text("offline")
    tag = uuid.uuid4().hex[:8]
    texts = [f"offline {tag} #{i}" for i in range(4)]
    for text in texts:
        say(page, text)
    expect(page.locator(".row.pending")).to_have_count(len(texts))
    expect(page.locator(".row.pending .tick.sending")).to_have_count(len(texts))

    page.context.set_offline(False)
    expect(page.locator(".row.pending")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#chat-banner")).to_be_hidden(timeout=WAIT_MS)
    for text in texts:
        expect(own_bubbles(page, text)).to_have_count(1)

    stored = server_history(page, server)
    by_text = Counter(m["text"] for m in stored if m["from"]["role"] == "visitor")
    assert all(by_text[text] == 1 for text in texts), by_text
    ids = Counter(m.get("client_msg_id") for m in stored if m["text"] in texts)
    assert len(ids) == len(texts) and set(ids.values()) == {1}, ids
    # Shown in the order the server stored them, and nothing else doubled.
    shown = page.locator(".row[data-seq]").evaluate_all(
        "rows => rows.map(r => Number(r.dataset.seq))"
    )
    assert shown == [m["seq"] for m in stored]

    # Cut again while the page reloads: the outbox kept in localStorage survives the reload.
    page.context.set_offline(True)
    expect(page.locator("#chat-banner")).to_be_visible(timeout=WAIT_MS)
    late = f"late {tag}"
    say(page, late)
    expect(page.locator(".row.pending")).to_have_count(1)
    page.context.set_offline(False)
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-conn", "open", timeout=WAIT_MS)
    expect(own_bubbles(page, late)).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator(".row.pending")).to_have_count(0, timeout=WAIT_MS)
    stored = server_history(page, server)
    assert [m["text"] for m in stored].count(late) == 1


def test_person_joins_types_reads_and_closes(
    server_factory: Callable[..., ServerProcess], new_page: NewPage
) -> None:
    server = server_factory()
    page = new_page()
    open_chat(page, server)
    say(page, HANDOFF_TEXT)
    expect(page.locator(".row.notice", has_text="Connecting you to a person")).to_have_count(
        1, timeout=WAIT_MS
    )
    expect(page.locator(".row.notice.queue")).to_have_text(
        "You are number 1 in the queue", timeout=WAIT_MS
    )
    conv = session_of(page)["session_id"]

    with agent_online(server) as alice:
        assigned = alice.recv_until(lambda f: f["type"] == "assigned" and f["conv"] == conv)
        assert assigned["agent"]["id"] == "alice"
        expect(page.locator(".row.notice.joined")).to_have_text(
            "Alice joined the conversation", timeout=WAIT_MS
        )
        expect(page.locator(".row.notice.queue")).to_have_count(0)
        expect(page.locator("#chat-status")).to_have_text("Alice")

        alice.send(type="typing", conv=conv)
        expect(page.locator("#chat-typing")).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#chat-typing")).to_contain_text("Alice is typing…")

        alice.send(type="send", conv=conv, client_msg_id="a-1", text="Hello, <b>I am</b> Alice")
        reply = page.locator(".row.role-agent")
        expect(reply.locator(".bubble")).to_have_text("Hello, <b>I am</b> Alice", timeout=WAIT_MS)
        expect(reply.locator(".sender")).to_have_text("Alice")
        expect(page.locator("#chat-typing")).to_be_hidden()
        # The visitor's page is visible: it tells the agent it has read the reply.
        read = alice.recv_until(lambda f: f["type"] == "read" and f["conv"] == conv)
        assert read["seq"] >= int(reply.get_attribute("data-seq") or 0)

        # Typing frames reach the agent, at most one per 2 s however fast the visitor types
        # (the last input event, the fill of `say`, may be less than 2 s old: let it pass).
        page.wait_for_timeout(2_100)
        alice.frames.clear()
        page.locator("#chat-input").press_sequentially("abcdef", delay=40)
        say(page, "thanks")
        mine = own_bubbles(page, "thanks")
        expect(mine).to_have_count(1, timeout=WAIT_MS)
        msg = alice.recv_until(lambda f: f["type"] == "msg" and f.get("text") == "thanks")
        typing = [f for f in alice.frames if f["type"] == "typing"]
        assert len(typing) == 1 and typing[0]["from"]["role"] == "visitor", alice.frames
        row = page.locator(f".row[data-seq='{msg['seq']}']")
        expect(row.locator(".tick")).to_have_class("tick sent")
        alice.send(type="read", conv=conv, seq=msg["seq"])
        expect(row.locator(".tick")).to_have_class("tick read", timeout=WAIT_MS)

        alice.send(type="close", conv=conv)
        expect(page.locator(".row.notice.closed")).to_have_text(
            "This conversation has ended", timeout=WAIT_MS
        )
        expect(page.locator("#chat-composer")).to_be_hidden()
        expect(page.locator("#chat-new")).to_be_visible()

    # A reload of the closed conversation shows it closed, without announcing it again.
    page.reload()
    expect(page.locator("#chat-new")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator(".row.notice.joined")).to_have_count(0)
    page.locator("#chat-new").click()
    expect(page.locator("#chat-composer")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("body")).to_have_attribute("data-conn", "open", timeout=WAIT_MS)
    assert session_of(page)["session_id"] != conv
    expect(page.locator(".row")).to_have_count(0)
    say(page, KB_QUESTION)
    expect(page.locator(".row.role-bot .bubble", has_text=KB_ANSWER)).to_have_count(
        1, timeout=WAIT_MS
    )


def test_small_screen_has_no_horizontal_scroll(
    server_factory: Callable[..., ServerProcess], new_page: NewPage, shot: Shot
) -> None:
    server = server_factory()
    page = new_page(viewport={"width": 375, "height": 720}, is_mobile=True, has_touch=True)
    open_chat(page, server)
    say(page, KB_QUESTION)
    expect(page.locator(".row.role-bot .bubble", has_text=KB_ANSWER)).to_have_count(
        1, timeout=WAIT_MS
    )
    say(page, "x" * 400)  # one unbreakable word must wrap, not widen the page
    say(page, "https://example.com/" + "long/path/" * 30)
    expect(page.locator(".row.own[data-seq]")).to_have_count(3, timeout=WAIT_MS)
    width = page.evaluate("document.scrollingElement.scrollWidth")
    assert width <= 375, width
    for sel in ("#chat-input", "#chat-send"):
        expect(page.locator(sel)).to_be_in_viewport()
    box = page.locator("#chat-composer").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375
    assert box["y"] + box["height"] <= 720 + 1
    shot(page, "chat-mobile")


def test_chinese_colour_and_title(
    server_factory: Callable[..., ServerProcess], new_page: NewPage, shot: Shot
) -> None:
    server = server_factory()
    page = new_page()
    open_chat(page, server, "?lang=zh&color=%23aa3300&title=%E5%B8%AE%E5%8A%A9%E4%B8%AD%E5%BF%83")
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    expect(page.locator("#chat-input")).to_have_attribute("placeholder", "输入消息…")
    expect(page.locator("#chat-input")).to_have_attribute("aria-label", "消息")
    expect(page.locator("#chat-send-label")).to_have_text("发送")
    expect(page.locator("#chat-title")).to_have_text("帮助中心")
    bg = page.locator(".chat-header").evaluate("el => getComputedStyle(el).backgroundColor")
    assert bg == "rgb(170, 51, 0)", bg
    say(page, KB_QUESTION_ZH)
    expect(page.locator(".row.role-bot .bubble", has_text=KB_ANSWER_ZH)).to_have_count(
        1, timeout=WAIT_MS
    )
    say(page, "我要投诉")
    expect(page.locator(".row.notice", has_text="正在为您转接人工客服")).to_have_count(
        1, timeout=WAIT_MS
    )
    expect(page.locator(".row.notice.queue")).to_have_text(
        "马上为您接入，您是下一位", timeout=WAIT_MS
    )
    shot(page, "chat-zh")

    # A colour that is not a hex colour is ignored; the default title is the language's.
    other = new_page()
    open_chat(other, server, "?lang=zh&color=red%3B%7D")
    expect(other.locator("#chat-title")).to_have_text("在线客服")
    default_bg = other.locator(".chat-header").evaluate(
        "el => getComputedStyle(el).backgroundColor"
    )
    assert default_bg == "rgb(10, 124, 102)", default_bg
    english = new_page(locale="en-US")
    open_chat(english, server)
    expect(english.locator("#chat-title")).to_have_text("Customer service")
    chinese = new_page(locale="zh-CN")
    open_chat(chinese, server)
    expect(chinese.locator("#chat-title")).to_have_text("在线客服")


def test_embedded_page_asks_its_parent_to_close(
    server_factory: Callable[..., ServerProcess], new_page: NewPage
) -> None:
    server = server_factory()
    page = new_page()
    open_chat(page, server, "?embed=1&lang=en")
    expect(page.locator("body")).to_have_class("kefu-chat-page embed")
    close = page.get_by_role("button", name="Close chat")
    expect(close).to_be_visible()
    page.evaluate(
        "window.__posted = [];window.addEventListener('message', e => window.__posted.push(e.data))"
    )
    close.click()
    page.wait_for_function("window.__posted.length > 0", timeout=WAIT_MS)
    assert page.evaluate("window.__posted") == [{"type": "kefu:close"}]


def test_missed_replies_are_resumed_after_a_cut(
    server_factory: Callable[..., ServerProcess], new_page: NewPage
) -> None:
    server = server_factory(bot={"enabled": False})
    page = new_page()
    open_chat(page, server)
    say(page, "hello")
    expect(page.locator(".row.own[data-seq]")).to_have_count(1, timeout=WAIT_MS)
    conv = session_of(page)["session_id"]
    with agent_online(server) as alice:
        alice.recv_until(lambda f: f["type"] == "assigned" and f["conv"] == conv)
        expect(page.locator(".row.notice.joined")).to_have_count(1, timeout=WAIT_MS)
        page.context.set_offline(True)
        expect(page.locator("#chat-banner")).to_contain_text("offline", timeout=WAIT_MS)
        for i in range(5):
            alice.send(type="send", conv=conv, client_msg_id=f"cut-{i}", text=f"while away {i}")
            alice.recv_until(lambda f, i=i: f["type"] == "ack" and f["client_msg_id"] == f"cut-{i}")
        say(page, "typed while away")
        page.context.set_offline(False)
        replies = page.locator(".row.role-agent .bubble")
        expect(replies).to_have_count(5, timeout=WAIT_MS)
        assert replies.all_inner_texts() == [f"while away {i}" for i in range(5)]
        expect(own_bubbles(page, "typed while away")).to_have_count(1, timeout=WAIT_MS)
        expect(page.locator(".row.pending")).to_have_count(0, timeout=WAIT_MS)
        # The same assignment told again on reconnect is not announced twice.
        expect(page.locator(".row.notice.joined")).to_have_count(1)
    stored = server_history(page, server)
    shown = page.locator(".row[data-seq]").evaluate_all(
        "rows => rows.map(r => Number(r.dataset.seq))"
    )
    assert shown == [m["seq"] for m in stored]


def test_long_history_pages_back(
    server_factory: Callable[..., ServerProcess], new_page: NewPage
) -> None:
    server = server_factory(bot={"enabled": False})
    page = new_page()
    open_chat(page, server)
    session = session_of(page)
    for i in range(1, 71):
        resp = page.request.post(
            f"{server.http_url}/v1/chat/send",
            data={"session_id": session["session_id"], "text": f"m{i}", "client_msg_id": f"r-{i}"},
            headers={"Authorization": f"Bearer {session['token']}"},
        )
        assert resp.status == 200, resp.text()
    expect(page.locator(".row.own[data-seq]")).to_have_count(70, timeout=WAIT_MS)
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-conn", "open", timeout=WAIT_MS)
    rows = page.locator(".row[data-seq]")
    expect(rows).to_have_count(50)
    expect(rows.first).to_have_attribute("data-seq", "21")
    earlier = page.get_by_role("button", name="Load earlier messages")
    expect(earlier).to_be_visible()
    earlier.click()
    expect(rows).to_have_count(70, timeout=WAIT_MS)
    expect(earlier).to_be_hidden()
    shown = rows.evaluate_all("rows => rows.map(r => Number(r.dataset.seq))")
    assert shown == list(range(1, 71))


def test_refused_token_starts_a_new_session(
    server_factory: Callable[..., ServerProcess], new_page: NewPage
) -> None:
    server = server_factory()
    page = new_page()
    open_chat(page, server)
    old = session_of(page)
    page.evaluate(
        "s => localStorage.setItem('kefu:session', JSON.stringify({...s, token: 'v1.bogus'}))", old
    )
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-conn", "open", timeout=WAIT_MS)
    new = session_of(page)
    assert new["session_id"] != old["session_id"] and new["token"] != "v1.bogus"
    say(page, KB_QUESTION)
    expect(page.locator(".row.role-bot .bubble", has_text=KB_ANSWER)).to_have_count(
        1, timeout=WAIT_MS
    )


def test_visitor_ends_the_conversation_with_two_presses(
    server_factory: Callable[..., ServerProcess], new_page: NewPage
) -> None:
    server = server_factory()
    page = new_page()
    open_chat(page, server)
    end = page.get_by_role("button", name="End conversation")
    expect(end).to_be_hidden()  # nothing to end yet
    say(page, KB_QUESTION)
    expect(page.locator(".row.role-bot .bubble", has_text=KB_ANSWER)).to_have_count(
        1, timeout=WAIT_MS
    )
    end.click()
    expect(page.locator("#chat-banner")).to_contain_text("again")
    expect(page.locator("#chat-composer")).to_be_visible()
    end.click()
    expect(page.locator(".row.notice.closed")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#chat-composer")).to_be_hidden()
    expect(end).to_be_hidden()
    page.reload()
    expect(page.locator("#chat-new")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#chat-composer")).to_be_hidden()
