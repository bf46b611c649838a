"""The embeddable widget on a plain host page served from another origin.

The host page is what an integrator writes: one `<script src=".../widget.js">` tag and its own
hostile-enough CSS. The launcher must appear (in a shadow root the host's CSS cannot break),
open kefu's /chat in an iframe, and the visitor must get the bot's answer inside it; closing from
inside the frame and the unread badge go through postMessage, accepted from kefu's origin only.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from playwright.sync_api import Page, expect

from tests.browser.test_visitor import KB_ANSWER, KB_QUESTION, WAIT_MS, agent_online
from tests.e2e.harness import ServerProcess

NewPage = Callable[..., Page]
Shot = Callable[[Page, str], Any]

#: Host CSS that would wreck a launcher living in the host's DOM.
HOSTILE_CSS = """
  body > *:not(kefu-widget) { display: none !important; }
  button { color: red !important; font-size: 40px !important; background: yellow !important;
           width: 300px !important; height: 10px !important; position: static !important; }
  iframe { display: none !important; }
  div { display: none !important; }
  * { font-family: serif !important; letter-spacing: 10px !important; }
"""


def host_page(kefu: str, *, css: str = "", attrs: str = "") -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Host shop</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{css}</style></head>
<body>
  <h1>Welcome to the host shop</h1>
  <p>Some content of the host page.</p>
  <button id="host-button">A host button</button>
  <script src="{html.escape(kefu)}/widget.js" {attrs} async></script>
</body></html>"""


@contextmanager
def host_site(pages: dict[str, str]) -> Iterator[str]:
    """A second origin (127.0.0.1, another port) serving `pages` (path → HTML)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path.split("?")[0])
            if body is None:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def launcher(page: Page) -> Any:
    return page.locator("kefu-widget").locator("button.launcher")


def test_widget_on_another_origin_answers_inside_its_frame(
    server_factory: Callable[..., ServerProcess], new_page: NewPage, shot: Shot
) -> None:
    server = server_factory()
    attrs = 'data-color="#7a1fa2" data-title="Shop help" data-lang="en" data-name="Ann"'
    with host_site({"/": host_page(server.http_url, attrs=attrs)}) as host:
        assert host.split(":")[-1] != server.http_url.split(":")[-1]
        page = new_page(viewport={"width": 1280, "height": 800})
        page.goto(host + "/")
        button = launcher(page)
        expect(button).to_be_visible(timeout=WAIT_MS)
        expect(button).to_have_attribute("aria-label", "Open chat")
        expect(button).to_have_attribute("aria-expanded", "false")
        # Only one global.
        assert page.evaluate("Object.keys(window.KefuWidget).sort()") == ["close", "open", "toggle"]

        button.click()
        expect(button).to_have_attribute("aria-expanded", "true")
        frame_el = page.locator("kefu-widget").locator("iframe")
        expect(frame_el).to_be_visible()
        src = frame_el.get_attribute("src") or ""
        assert src.startswith(server.http_url + "/chat?embed=1"), src
        assert "color=%237a1fa2" in src and "name=Ann" in src and "lang=en" in src

        frame = page.frame_locator("kefu-widget >> iframe")
        expect(frame.locator("#chat-title")).to_have_text("Shop help", timeout=WAIT_MS)
        expect(frame.locator("body")).to_have_attribute("data-conn", "open", timeout=WAIT_MS)
        frame.locator("#chat-input").fill(KB_QUESTION)
        frame.locator("#chat-input").press("Enter")
        expect(frame.locator(".row.role-bot .bubble", has_text=KB_ANSWER)).to_have_count(
            1, timeout=WAIT_MS
        )
        expect(frame.locator(".row.own .bubble", has_text=KB_QUESTION)).to_have_count(1)
        shot(page, "widget-open")

        # The frame's own close button closes the panel (postMessage to the host).
        frame.get_by_role("button", name="Close chat").click()
        expect(frame_el).to_be_hidden(timeout=WAIT_MS)
        expect(button).to_have_attribute("aria-expanded", "false")
        page.evaluate("window.KefuWidget.open()")
        expect(frame_el).to_be_visible()
        page.evaluate("window.KefuWidget.toggle()")
        expect(frame_el).to_be_hidden()


def test_host_css_cannot_break_the_launcher(
    server_factory: Callable[..., ServerProcess], new_page: NewPage, shot: Shot
) -> None:
    server = server_factory()
    with host_site(
        {"/": host_page(server.http_url, css=HOSTILE_CSS, attrs='data-lang="zh"')}
    ) as host:
        page = new_page(viewport={"width": 1280, "height": 800})
        page.goto(host + "/")
        button = launcher(page)
        expect(button).to_be_visible(timeout=WAIT_MS)
        expect(button).to_have_attribute("aria-label", "打开客服聊天")
        box = button.bounding_box()
        assert box is not None
        assert 50 <= box["width"] <= 60 and 50 <= box["height"] <= 60, box
        assert box["x"] + box["width"] <= 1280 - 10 and box["y"] + box["height"] <= 800 - 10, box
        style = button.evaluate(
            "el => { const s = getComputedStyle(el);"
            " return [s.color, s.fontSize, s.backgroundColor] }"
        )
        assert style[0] != "rgb(255, 0, 0)" and style[1] != "40px", style
        assert style[2] == "rgb(10, 124, 102)", style  # the default colour, not the host's yellow
        # The host's own button did get the host's style: the CSS is live on the page.
        host_color = page.locator("#host-button").evaluate("el => getComputedStyle(el).color")
        assert host_color == "rgb(255, 0, 0)"

        button.click()
        frame = page.frame_locator("kefu-widget >> iframe")
        expect(frame.locator("#chat-input")).to_have_attribute(
            "placeholder", "输入消息…", timeout=WAIT_MS
        )
        expect(page.locator("kefu-widget").locator("iframe")).to_be_visible()
        shot(page, "widget-hostile-css")


def test_small_screen_panel_is_full_screen(
    server_factory: Callable[..., ServerProcess], new_page: NewPage, shot: Shot
) -> None:
    server = server_factory()
    with host_site({"/": host_page(server.http_url)}) as host:
        page = new_page(viewport={"width": 375, "height": 700}, is_mobile=True, has_touch=True)
        page.goto(host + "/")
        launcher(page).click()
        frame_el = page.locator("kefu-widget").locator("iframe")
        expect(frame_el).to_be_visible(timeout=WAIT_MS)
        box = frame_el.bounding_box()
        assert box is not None and box["x"] == 0 and box["y"] == 0, box
        assert box["width"] == 375 and box["height"] == 700, box
        frame = page.frame_locator("kefu-widget >> iframe")
        expect(frame.locator("body")).to_have_attribute("data-conn", "open", timeout=WAIT_MS)
        expect(frame.locator("#chat-input")).to_be_in_viewport()
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 375, width
        shot(page, "widget-mobile")
        frame.get_by_role("button", name="Close chat").click()
        expect(frame_el).to_be_hidden(timeout=WAIT_MS)
        expect(launcher(page)).to_be_visible()


def test_unread_badge_while_closed(
    server_factory: Callable[..., ServerProcess], new_page: NewPage
) -> None:
    server = server_factory()
    with host_site({"/": host_page(server.http_url)}) as host:
        page = new_page()
        page.goto(host + "/")
        button = launcher(page)
        button.click()
        frame = page.frame_locator("kefu-widget >> iframe")
        expect(frame.locator("body")).to_have_attribute("data-conn", "open", timeout=WAIT_MS)
        frame.locator("#chat-input").fill("I have a complaint")
        frame.locator("#chat-input").press("Enter")
        expect(frame.locator(".row.notice.queue")).to_be_visible(timeout=WAIT_MS)
        button.click()  # closed: the frame stays, hidden, and counts what arrives
        expect(page.locator("kefu-widget").locator("iframe")).to_be_hidden()
        badge = page.locator("kefu-widget").locator(".badge")
        expect(badge).to_be_hidden()

        with agent_online(server) as alice:
            assigned = alice.recv_until(lambda f: f["type"] == "assigned")
            conv = assigned["conv"]
            for i in range(2):
                alice.send(type="send", conv=conv, client_msg_id=f"a-{i}", text=f"reply {i}")
            expect(badge).to_have_text("2", timeout=WAIT_MS)
            expect(button).to_have_attribute("aria-label", "Open chat (2 unread)")
            # A message posted by another origin is ignored.
            page.evaluate("window.postMessage({type: 'kefu:unread', count: 7}, '*')")
            page.wait_for_timeout(300)
            expect(badge).to_have_text("2")
            button.click()
            expect(badge).to_be_hidden()
            expect(frame.locator(".row.role-agent .bubble")).to_have_count(2)
            # Read once shown: the agent is told the newest seq.
            read = alice.recv_until(lambda f: f["type"] == "read" and f["conv"] == conv)
            assert read["seq"] >= 1
