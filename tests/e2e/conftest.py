"""Fixtures of the end-to-end tests: a ``kefu serve`` process per test (``spawn``).

Modules whose tests do not interfere share one server through a module-scoped fixture of their
own built on :func:`tests.e2e.harness.running`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import ServerProcess

Spawn = Callable[[dict[str, Any]], ServerProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """``spawn(config)`` starts a server in a directory of its own; all end with the test."""
    servers: list[ServerProcess] = []

    def start(cfg: dict[str, Any]) -> ServerProcess:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        server = ServerProcess(workdir, cfg)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()
