"""Fixtures of the browser tests: Debian's Chromium driven by Playwright (sync API) against a
real ``kefu serve`` process.

- ``browser`` (per module): one headless Chromium at :data:`CHROMIUM`; every test opens its own
  contexts, so tests share no cookies, storage or cache.
- ``server_factory(**overrides)``: a started :class:`~tests.e2e.harness.ServerProcess` with two
  agents (alice and bob, tokens from :func:`~tests.e2e.harness.token_of_agent`), the admin token
  :data:`ADMIN_TOKEN`, and the bot on with the sample knowledge base. ``kb_yaml=TEXT`` serves
  that knowledge base instead; any other keyword replaces a top-level config section.
- ``new_page(viewport=None, **context_options)``: a page in a fresh context. Uncaught errors
  in a page (``pageerror``) and ``console.error`` lines fail the test at teardown: a front that
  throws is broken even when the assertions pass. ``page_errors`` holds them for a test that
  means to look.
- ``shot(page, name)``: a PNG in :data:`ARTIFACTS` (``test-artifacts/screenshots/``, ignored by
  git, kept by CI as an artifact).

Chromium comes from the system (``apt-get install chromium``, done by ``scripts/system-deps``,
which the README's test command runs). Its absence is a failure, not a skip: the browser
tests are part of the suite.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from tests.e2e.conftest import Spawn, spawn  # noqa: F401 (spawn: a fixture used here)
from tests.e2e.harness import (
    FAST_RATE,
    REPO_ROOT,
    ServerProcess,
    agent,
    config,
    token_of_agent,
)

#: Debian's Chromium; the tests never download a browser of their own.
CHROMIUM = Path(os.environ.get("KEFU_CHROMIUM", "/usr/bin/chromium"))
#: Screenshots of every page, for people to look at (and a few for the README).
ARTIFACTS = REPO_ROOT / "test-artifacts" / "screenshots"
ADMIN_TOKEN = "admin-token-0123456789"
ALICE = token_of_agent("alice")
BOB = token_of_agent("bob")
#: Default Playwright timeout for actions and expectations: generous, never a slowness check.
TIMEOUT_MS = 15_000

# Chromium flags for a closed network and a root user: no sandbox as root (Chromium refuses to
# start otherwise), no background fetches to Google's hosts (refused here, and slow to fail).
_FLAGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-dev-shm-usage",
]

# Console lines that are not the front's fault (the browser's own complaints about a closed
# network or a favicon nobody asked for, a WebSocket that cannot connect while the test has
# cut the network, a resource answered with an error the page handles, such as a stale
# token's 401).
_BENIGN_CONSOLE = re.compile(
    r"favicon\.ico|net::ERR_INTERNET_DISCONNECTED|ERR_NETWORK_CHANGED"
    r"|WebSocket connection to .* failed|Failed to load resource"
)


# Module scope, not session: while Playwright's sync API is started, its event loop counts as
# running in this thread, so every later `asyncio.run` of the suite (the other test files)
# would fail. Each browser module starts and stops its own (about a second).
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: run `sh scripts/system-deps` (apt-get install "
            "chromium) or set KEFU_CHROMIUM to a Chromium binary"
        )
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    flags = list(_FLAGS)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")
    b = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=flags)
    try:
        yield b
    finally:
        b.close()


ServerFactory = Callable[..., ServerProcess]


def browser_config(**overrides: Any) -> dict[str, Any]:
    """Two agents, a known admin token, the bot on with the sample knowledge base."""
    cfg = config(
        [agent("alice", max_chats=5, groups=["sales"]), agent("bob", max_chats=5)],
        bot={"enabled": True},
        ws={"rate": FAST_RATE},  # the XSS corpus goes out faster than a person types
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture
def server_factory(spawn: Spawn, tmp_path: Path) -> ServerFactory:  # noqa: F811
    """:func:`tests.e2e.conftest.spawn` with :func:`browser_config`; ``kb_yaml`` is written to
    ``kb-N.yaml`` in the test's directory (the server's ``bot.kb``)."""
    made = 0

    def start(*, kb_yaml: str | None = None, **overrides: Any) -> ServerProcess:
        nonlocal made
        cfg = browser_config(**overrides)
        if kb_yaml is not None:
            made += 1
            kb = tmp_path / f"kb-{made}.yaml"
            kb.write_text(kb_yaml, encoding="utf-8")
            cfg["bot"] = {**(cfg.get("bot") or {}), "enabled": True, "kb": [str(kb)]}
        return spawn(cfg)

    return start


@pytest.fixture
def page_errors() -> list[str]:
    return []


@pytest.fixture
def new_page(browser: Browser, page_errors: list[str]) -> Iterator[Callable[..., Page]]:
    contexts = []

    def make(viewport: dict[str, int] | None = None, **options: Any) -> Page:
        if viewport is not None:
            options["viewport"] = viewport
        options.setdefault("locale", "en-US")
        ctx = browser.new_context(**options)
        ctx.set_default_timeout(TIMEOUT_MS)
        contexts.append(ctx)
        page = ctx.new_page()

        def on_console(msg: ConsoleMessage) -> None:
            if msg.type == "error" and not _BENIGN_CONSOLE.search(msg.text):
                page_errors.append(f"console: {msg.text}")

        page.on("pageerror", lambda exc: page_errors.append(f"pageerror: {exc}"))
        page.on("console", on_console)
        return page

    yield make
    for ctx in contexts:
        ctx.close()
    assert not page_errors, "errors in the pages:\n" + "\n".join(page_errors)


@pytest.fixture
def shot() -> Callable[[Page, str], Path]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(page: Page, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=False)
        return path

    return take
