"""The admin page (/admin) in a real browser against a real ``kefu serve``: login, agents
(create with the token shown once, change, delete; the config's agents refuse with 409),
the knowledge base (reload, a broken file's message, search with scores), live figures."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

from tests.browser.conftest import ADMIN_TOKEN, ALICE, ServerFactory
from tests.e2e.harness import ServerProcess

TIMEOUT = 15_000

NewPage = Callable[..., Page]
Shot = Callable[[Page, str], Path]


def rest(
    server: ServerProcess, method: str, path: str, token: str = ADMIN_TOKEN
) -> tuple[int, Any]:
    """One REST call outside the browser, to check what the page did on the server's side."""
    req = urllib.request.Request(
        server.http_url + path, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def login(page: Page, server: ServerProcess, token: str = ADMIN_TOKEN) -> None:
    page.goto(server.http_url + "/admin")
    page.locator("#admin-token").fill(token)  # by id: the label is in the page's language
    page.locator("#login-form button[type=submit]").click()


def test_admin_agents_kb_and_live_figures(
    server_factory: ServerFactory, new_page: NewPage, shot: Shot
) -> None:
    server = server_factory()
    page = new_page(viewport={"width": 1280, "height": 1000})

    # A wrong token is refused with the server's message and nothing else shows.
    login(page, server, "not-the-admin-token")
    expect(page.locator("#login-error")).to_contain_text("admin token", timeout=TIMEOUT)
    expect(page.locator("#dash")).to_be_hidden()

    login(page, server)
    rows = page.locator("#agents-body tr")
    expect(rows).to_have_count(2, timeout=TIMEOUT)
    expect(page.locator("tr[data-agent=alice] .cell-name")).to_have_text("Alice")
    assert page.evaluate("sessionStorage.getItem('kefu.admin.token')") == ADMIN_TOKEN

    # Create: the token is shown once, and it is the agent's real token.
    page.get_by_label("ID", exact=True).fill("carol")
    page.get_by_label("Name", exact=True).fill("Carol <b>Chen</b>")
    page.locator("#new-weight").fill("2")
    page.locator("#new-max").fill("3")
    page.locator("#new-groups").fill("sales, vip")
    page.get_by_role("button", name="Create").click()
    token_box = page.locator("#created-token")
    expect(token_box).to_have_text(re.compile(r"^\S{16,}$"), timeout=TIMEOUT)
    created_token = token_box.text_content() or ""
    status, me = rest(server, "GET", "/v1/agent/me", created_token)
    assert status == 200 and me["id"] == "carol", (status, me)
    carol = page.locator("tr[data-agent=carol]")
    expect(carol.locator(".cell-name")).to_have_text("Carol <b>Chen</b>")  # a name is text
    expect(carol.locator("b")).to_have_count(0)
    expect(carol.locator("input.groups")).to_have_value("sales, vip")
    shot(page, "admin-agent-created")
    page.get_by_role("button", name="Dismiss").click()
    expect(page.locator("#created-box")).to_be_hidden()

    # Change the weight and capacity inline.
    carol.locator("input.weight").fill("4")
    carol.locator("input.max-chats").fill("6")
    carol.get_by_role("button", name="Save carol").click()
    expect(page.locator("tr[data-agent=carol] input.weight")).to_have_value("4", timeout=TIMEOUT)
    status, view = rest(server, "GET", "/v1/admin/agents/carol")
    assert status == 200 and view["weight"] == 4 and view["max_chats"] == 6, view
    assert view["groups"] == ["sales", "vip"]

    # An agent of the config file refuses (409): its message is shown, nothing changes.
    alice = page.locator("tr[data-agent=alice]")
    alice.locator("input.weight").fill("9")
    alice.get_by_role("button", name="Save alice").click()
    expect(alice.locator(".row-error")).to_contain_text("config", timeout=TIMEOUT)
    assert rest(server, "GET", "/v1/admin/agents/alice")[1]["weight"] != 9

    # Delete (after the confirmation) removes carol on the server.
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete carol").click()
    expect(rows).to_have_count(2, timeout=TIMEOUT)
    expect(page.locator("tr[data-agent=carol]")).to_have_count(0)
    assert rest(server, "GET", "/v1/admin/agents/carol")[0] == 404

    # Knowledge base: reload shows the new version and the number of entries.
    status, stats = rest(server, "GET", "/v1/admin/stats")
    assert status == 200
    before = stats["kb"]["version"]
    page.get_by_role("button", name="Reload").click()
    expect(page.locator("#kb-status")).to_contain_text(f"version {before + 1}", timeout=TIMEOUT)
    expect(page.locator("#kb-version")).to_have_text(str(before + 1))
    expect(page.locator("#kb-entries")).to_have_text(str(stats["kb"]["entries"]))

    # Search: hits best first with a score bar and number, question and answer as text.
    page.get_by_label("Search the knowledge base").fill("运费")
    page.get_by_role("button", name="Search", exact=True).click()
    hits = page.locator("#hits li.hit")
    expect(hits.first).to_be_visible(timeout=TIMEOUT)
    assert hits.count() >= 2
    scores = [float(t) for t in page.locator("#hits .score-num").all_text_contents()]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1, scores
    _, found = rest(server, "GET", "/v1/admin/kb/search?q=%E8%BF%90%E8%B4%B9&k=5")
    assert page.locator("#hits .hit-q").first.text_content() == found["hits"][0]["question"]
    assert page.locator("#hits .hit-a").first.text_content() == found["hits"][0]["answer"]
    assert "运费" in (page.locator("#hits .hit-a").first.text_content() or "")
    width = page.locator("#hits .score-fill").first.evaluate("e => e.getBoundingClientRect().width")
    bar = page.locator("#hits .score-bar").first.evaluate("e => e.getBoundingClientRect().width")
    assert abs(width / bar - scores[0]) < 0.02, (width, bar, scores[0])

    # Live figures: a visitor who opens /chat shows up as a connection within a refresh or two.
    expect(page.locator("#fig-conn-visitor")).to_have_text("0", timeout=TIMEOUT)
    visitor = new_page()
    visitor.goto(server.http_url + "/chat")
    expect(page.locator("#fig-conn-visitor")).to_have_text(
        re.compile(r"^[1-9]\d*$"), timeout=TIMEOUT
    )
    # An agent who logs in to the workbench: a connection, and "online" in the agents table
    # (the table refreshes itself every few figures).
    workbench = new_page()
    workbench.goto(server.http_url + "/agent")
    workbench.locator("#agent-token").fill(ALICE)
    workbench.locator("#login-form button[type=submit]").click()
    expect(page.locator("#fig-conn-agent")).to_have_text("1", timeout=TIMEOUT)
    expect(page.locator("tr[data-agent=alice] .pill")).to_have_text("online", timeout=TIMEOUT)
    expect(page.locator("#fig-uptime")).to_have_text(re.compile(r"\d\d:\d\d:\d\d"))
    expect(page.locator("#fig-rate")).to_have_text(re.compile(r"^\d+(\.\d)?$"))
    expect(page.locator("#fig-cache")).to_have_text(re.compile(r"^\d+\.\d%$"))
    shot(page, "admin")

    # Chinese text, and the token survives a reload (sessionStorage) until logout.
    page.locator("#lang-select").select_option("zh")
    expect(page.locator("#agents-heading")).to_have_text("客服")
    page.reload()
    expect(rows).to_have_count(2, timeout=TIMEOUT)
    page.get_by_role("button", name="退出登录").click()
    expect(page.locator("#login-view")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('kefu.admin.token')") is None

    page.set_viewport_size({"width": 375, "height": 800})
    page.locator("#lang-select").select_option("en")
    login(page, server)
    expect(rows).to_have_count(2, timeout=TIMEOUT)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375 + 1
    shot(page, "admin-375")


def test_admin_broken_knowledge_base_shows_the_error(
    server_factory: ServerFactory, new_page: NewPage
) -> None:
    kb = 'entries:\n  - id: hello\n    questions: ["你好"]\n    answer: "您好！"\n'
    server = server_factory(kb_yaml=kb)
    page = new_page()
    login(page, server)
    expect(page.locator("#kb-entries")).to_have_text("1", timeout=TIMEOUT)
    kb_file = Path(server.cfg["bot"]["kb"][0])
    kb_file.write_text("entries:\n  - id: [unclosed\n", encoding="utf-8")
    page.get_by_role("button", name="Reload").click()
    error = page.locator("#kb-error")
    expect(error).to_contain_text(kb_file.name, timeout=TIMEOUT)
    status, body = rest(server, "POST", "/v1/admin/kb/reload")
    assert status == 422 and body["error"]["code"] == "invalid_kb"
    # The node keeps the knowledge base it had.
    page.get_by_label("Search the knowledge base").fill("你好")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#hits .hit-a").first).to_have_text("您好！", timeout=TIMEOUT)
