"""Router: one pick (smooth weighted round-robin) and the release of that chat, per operation.

Every agent is online with a capacity no benchmark reaches, so each pick walks every candidate:
all agents, or the members of one group holding a tenth of them. Weights 1 to 10 keep the
sequence from degenerating into plain round-robin.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from bench._harness import Row, rate
from kefu._core import implementations

BATCH = 200  # pick+release pairs per timed call


def _router(impl: ModuleType, agents: int, grouped: bool) -> Any:
    router = impl.Router(max_agents=agents)
    for i in range(agents):
        groups = ("vip",) if grouped and i % 10 == 0 else ()
        router.add(f"agent-{i}", 1 + i % 10, 1_000_000, groups)
    return router


def _pick_release(router: Any, group: str | None) -> Callable[[], None]:
    pick, release = router.pick, router.release

    def run() -> None:
        for _ in range(BATCH):
            release(pick(group))

    return run


def run(quick: bool) -> list[Row]:
    impls = implementations("router")
    names = {"c": "kefu c", "py": "kefu py"}
    cases = [
        (10, None, "router pick+release, 10 agents"),
        (100, None, "router pick+release, 100 agents"),
        (1_000, None, "router pick+release, 1,000 agents"),
        (1_000, "vip", "router pick+release, 1,000 agents, group of 100"),
    ]
    rows: list[Row] = []
    for agents, group, case in cases:
        for kind in ("c", "py"):
            if kind not in impls:
                continue
            router = _router(impls[kind], agents, grouped=group is not None)
            fn = _pick_release(router, group)
            fn()  # warm up, and fail loudly here if a pick returns None
            rows.append(Row(case, names[kind], rate(fn, BATCH, quick=quick), "picks/s"))
    return rows
