"""The one way tests run an async body: on uvloop, bounded by a timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import uvloop

DEFAULT_TIMEOUT = 20.0


def run(test: Callable[[], Awaitable[None]], timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run ``test()`` in a fresh uvloop event loop; fail with TimeoutError past ``timeout``."""

    async def bounded() -> None:
        await asyncio.wait_for(test(), timeout)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(bounded())
