"""Weighted smooth round-robin over agents (compiled; the twin is ``kefu._core._router_py``).

nginx's smooth weighted round-robin: on each pick, every eligible candidate's current weight
grows by its weight, the largest current weight wins (ties: the agent added earliest) and drops
by the total weight of the eligible candidates. Weights 5, 1, 1 give ``a a b a c a a``.
An agent that drops out of the candidates keeps its current weight; a change of weight resets
it to 0.
"""

from collections.abc import Iterable
from typing import Final, final

from kefu._core._router_py import AgentInfo as AgentInfo

__all__ = [
    "MAX_AGENTS",
    "MAX_CAPACITY",
    "MAX_GROUPS_PER_AGENT",
    "MAX_WEIGHT",
    "AgentInfo",
    "Router",
    "debug_counters",
]

MAX_AGENTS: Final[int]
"""Upper bound of ``Router(max_agents=...)``."""
MAX_WEIGHT: Final[int]
"""Largest weight of one agent."""
MAX_CAPACITY: Final[int]
"""Largest capacity (concurrent chats) of one agent."""
MAX_GROUPS_PER_AGENT: Final[int]
"""Largest number of groups one agent belongs to."""

def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build (``live_routers``, ``live_groups``).

    A release build, like the twin, counts nothing: every counter is 0.
    """

@final
class Router:
    """Assigns chats to agents by nginx's smooth weighted round-robin.

    Each agent has a weight (its share of new chats), a capacity (concurrent chats), a load
    (chats it holds now), an online flag and a set of groups. :meth:`pick` chooses among the
    eligible agents (online, load below capacity, in the group if one is given) and takes a
    slot; :meth:`release` gives it back when the chat ends. At most ``max_agents`` agents;
    adding one more raises ``ValueError``.
    """

    def __init__(self, max_agents: int = 100_000) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, agent_id: object) -> bool: ...
    @property
    def max_agents(self) -> int:
        """The most agents this router holds."""
    @property
    def total_load(self) -> int:
        """Chats held by all agents, online or not."""
    @property
    def total_capacity(self) -> int:
        """Sum of the capacities of the online agents."""
    def add(
        self,
        agent_id: str,
        weight: int,
        capacity: int,
        groups: Iterable[str] = (),
        online: bool = True,
    ) -> None:
        """Add an agent with load 0 and current weight 0.

        Raises ``ValueError`` if the id is taken or the router holds ``max_agents`` agents.
        """
    def remove(self, agent_id: str) -> None:
        """Remove an agent; the chats it held leave ``total_load`` with it. KeyError if unknown."""
    def update(
        self,
        agent_id: str,
        *,
        weight: int | None = None,
        capacity: int | None = None,
        groups: Iterable[str] | None = None,
        online: bool | None = None,
    ) -> None:
        """Change any of an agent's settings; ``None`` keeps the current one.

        A new weight (different from the current one) resets the agent's current weight to 0.
        A capacity below the current load is allowed: the agent is not picked until its load
        drops below it. Nothing changes if any argument is invalid.
        """
    def set_online(self, agent_id: str, online: bool) -> None:
        """Mark an agent online or offline; an offline agent keeps its load and current weight."""
    def pick(self, group: str | None = None) -> str | None:
        """Choose the next eligible agent by SWRR, take one of its slots, return its id.

        Eligible: online, load below capacity, and in ``group`` unless it is ``None``. Returns
        ``None`` when no agent is eligible (an unknown group has no eligible agent).
        """
    def acquire(self, agent_id: str, *, force: bool = False) -> bool:
        """Take a slot of a given agent (it accepted a queued chat, or a transfer).

        Returns ``True`` and increments the load if the agent is online with load below
        capacity, else ``False``. ``force=True`` takes the slot regardless of the online flag
        and the capacity (a transfer an admin forces) and returns ``True``. Current weights are
        left as they are: a manual assignment is not a round-robin turn.
        """
    def release(self, agent_id: str) -> None:
        """Give back one slot when a chat ends. ValueError if the agent's load is already 0."""
    def load(self, agent_id: str) -> int:
        """Chats the agent holds now."""
    def info(self, agent_id: str) -> AgentInfo:
        """A snapshot of everything the router knows about the agent."""
    def agents(self) -> list[str]:
        """Agent ids in order of addition."""
    def groups(self) -> list[str]:
        """Names of the groups that have at least one member, sorted."""
    def eligible_count(self, group: str | None = None) -> int:
        """How many agents :meth:`pick` would choose among now."""
