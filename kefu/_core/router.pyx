"""Weighted smooth round-robin over agents (compiled; the twin is ``kefu._core._router_py``).

The algorithm is nginx's smooth weighted round-robin (``ngx_http_upstream_get_peer``): on each
pick, every eligible candidate's current weight grows by its weight, the candidate with the
largest current weight wins (ties go to the agent added earliest) and its current weight drops
by the total weight of the eligible candidates. While eligibility does not change, the picks
follow the exact SWRR sequence: weights 5, 1, 1 give ``a a b a c a a`` and repeat.

An agent is eligible when it is online and its load is below its capacity (and, for
``pick(group)``, it belongs to the group). As in nginx, an agent that drops out of the
candidates keeps its current weight and resumes from it when it becomes eligible again; a change
of weight resets that agent's current weight to 0, as nginx does for a reloaded peer.

Agents live in one dense array of ``AgentSlot`` structs; a pick over all agents walks it once,
and ``pick(group)`` walks only that group's member slots. Removal moves the last agent into the
freed slot, so the slot order is not the order of addition: ties are broken by ``seq``.

Limits: at most ``max_agents`` agents (``MAX_AGENTS`` at most), weights 1 to ``MAX_WEIGHT``,
capacities 0 to ``MAX_CAPACITY``, ``MAX_GROUPS_PER_AGENT`` groups per agent. With these the
total weight stays below 10**12, so the current weights, which SWRR keeps within a small
multiple of the total weight, fit ``int64_t`` by a wide margin.
"""

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint64_t

from kefu._core._router_py import AgentInfo

__all__ = [
    "MAX_AGENTS",
    "MAX_CAPACITY",
    "MAX_GROUPS_PER_AGENT",
    "MAX_WEIGHT",
    "AgentInfo",
    "Router",
    "debug_counters",
]

cdef extern from "kefu_debug.h":
    int KEFU_DEBUG

MAX_AGENTS = 1_000_000
MAX_WEIGHT = 1_000_000
MAX_CAPACITY = 1_000_000
MAX_GROUPS_PER_AGENT = 64

cdef Py_ssize_t _live_routers = 0
cdef Py_ssize_t _live_groups = 0


def debug_counters():
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_routers``: Router objects not yet freed; ``live_groups``: group member arrays not
    yet freed. A release build (like the twin) counts nothing: every counter is 0.
    """
    return {"live_routers": _live_routers, "live_groups": _live_groups}


cdef int64_t _check_int(str name, object value, int64_t low, int64_t high) except -1:
    # bool is an int subclass; True as a weight is almost surely a mistake, so it is refused.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    # Compared as Python ints first: a huge int must give this error, not an OverflowError.
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return <int64_t>value


cdef bint _check_bool(str name, object value) except -1:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value is True


cdef int _check_id(object agent_id) except -1:
    if not isinstance(agent_id, str):
        raise TypeError(f"agent_id must be a str, not {type(agent_id).__name__}")
    return 0


cdef int _check_group(object group) except -1:
    if not isinstance(group, str):
        raise TypeError(f"group must be a str or None, not {type(group).__name__}")
    return 0


cdef frozenset _check_groups(object groups):
    if isinstance(groups, (str, bytes)):
        raise TypeError(f"groups must be an iterable of str, not a single {type(groups).__name__}")
    try:
        items = iter(groups)
    except TypeError:
        raise TypeError(
            f"groups must be an iterable of str, not {type(groups).__name__}"
        ) from None
    cdef set names = set()
    for name in items:
        if not isinstance(name, str):
            raise TypeError(f"groups must hold str, not {type(name).__name__}")
        if not name:
            raise ValueError("group names must be non-empty")
        names.add(name)
        if len(names) > MAX_GROUPS_PER_AGENT:
            raise ValueError(f"an agent belongs to at most {MAX_GROUPS_PER_AGENT} groups")
    return frozenset(names)


cdef inline void _refresh(AgentSlot* agent) noexcept nogil:
    agent.eligible = agent.online and agent.load < agent.capacity


ctypedef struct Choice:
    AgentSlot* best
    int64_t best_weight   # copies of best's fields: the loop compares registers, not memory
    uint64_t best_seq
    int64_t total


cdef inline void _offer(Choice* choice, AgentSlot* agent) noexcept nogil:
    # One SWRR step for one candidate; see the module docstring.
    cdef int64_t current
    if agent.eligible:
        current = agent.current_weight + agent.weight
        agent.current_weight = current
        choice.total += agent.weight
        if (
            choice.best == NULL
            or current > choice.best_weight
            or (current == choice.best_weight and agent.seq < choice.best_seq)
        ):
            choice.best = agent
            choice.best_weight = current
            choice.best_seq = agent.seq


cdef class GroupMembers:

    def __cinit__(self):
        global _live_groups
        self.slots = NULL
        self.size = 0
        self.allocated = 0
        if KEFU_DEBUG:
            _live_groups += 1

    def __dealloc__(self):
        global _live_groups
        PyMem_Free(self.slots)
        if KEFU_DEBUG:
            _live_groups -= 1

    cdef int reserve(self, Py_ssize_t size) except -1:
        cdef Py_ssize_t allocated
        cdef int32_t* grown
        if size <= self.allocated:
            return 0
        allocated = max(size, 2 * self.allocated, 4)
        grown = <int32_t*>PyMem_Realloc(self.slots, allocated * sizeof(int32_t))
        if grown == NULL:
            raise MemoryError()
        self.slots = grown
        self.allocated = allocated
        return 0

    cdef void append(self, int32_t slot) noexcept:
        # The caller has reserved room.
        self.slots[self.size] = slot
        self.size += 1

    cdef void discard(self, int32_t slot) noexcept:
        cdef Py_ssize_t i
        for i in range(self.size):
            if self.slots[i] == slot:
                self.size -= 1
                self.slots[i] = self.slots[self.size]
                return

    cdef void replace(self, int32_t old, int32_t new) noexcept:
        cdef Py_ssize_t i
        for i in range(self.size):
            if self.slots[i] == old:
                self.slots[i] = new
                return


cdef class Router:
    """Assigns chats to agents by nginx's smooth weighted round-robin.

    Each agent has a weight (its share of new chats), a capacity (concurrent chats), a load (chats
    it holds now), an online flag and a set of groups. ``pick`` chooses among the eligible
    agents (online, load below capacity, in the group if one is given) and takes a slot;
    ``release`` gives it back when the chat ends. At most ``max_agents`` agents; adding one
    more raises ``ValueError``.
    """

    def __cinit__(self):
        global _live_routers
        self._slots = NULL
        self._size = 0
        self._allocated = 0
        self._max_agents = 0
        # The two lists always have at least _allocated entries (None past _size), so storing
        # into a slot never allocates; see _reserve_slots.
        self._ids = []
        self._groups_of = []
        self._index = {}
        self._groups = {}
        self._next_seq = 0
        self._total_load = 0
        self._total_capacity = 0
        if KEFU_DEBUG:
            _live_routers += 1

    def __init__(self, max_agents=100_000):
        self._max_agents = _check_int("max_agents", max_agents, 1, MAX_AGENTS)

    def __dealloc__(self):
        global _live_routers
        PyMem_Free(self._slots)
        if KEFU_DEBUG:
            _live_routers -= 1

    def __repr__(self):
        return f"Router(agents={self._size}, max_agents={self._max_agents})"

    def __len__(self):
        return self._size

    def __contains__(self, agent_id):
        return isinstance(agent_id, str) and agent_id in self._index

    @property
    def max_agents(self):
        """The most agents this router holds."""
        return self._max_agents

    @property
    def total_load(self):
        """Chats held by all agents, online or not."""
        return self._total_load

    @property
    def total_capacity(self):
        """Sum of the capacities of the online agents."""
        return self._total_capacity

    cdef Py_ssize_t _slot_of(self, object agent_id) except -1:
        _check_id(agent_id)
        slot = self._index.get(agent_id)
        if slot is None:
            raise KeyError(agent_id)
        return <Py_ssize_t>slot

    cdef int _reserve_slots(self, Py_ssize_t size) except -1:
        cdef Py_ssize_t allocated
        cdef AgentSlot* grown
        if size <= self._allocated:
            return 0
        allocated = min(max(size, 2 * self._allocated, 8), self._max_agents)
        allocated = max(allocated, size)
        grown = <AgentSlot*>PyMem_Realloc(self._slots, allocated * sizeof(AgentSlot))
        if grown == NULL:
            raise MemoryError()
        self._slots = grown
        self._ids.extend([None] * (allocated - len(self._ids)))
        self._groups_of.extend([None] * (allocated - len(self._groups_of)))
        self._allocated = allocated
        return 0

    cdef list _prepare_join(self, frozenset names):
        """The member arrays of ``names``, each with room for one more slot.

        Groups that do not exist yet are created empty; if anything fails, they are dropped
        again and nothing else has changed.
        """
        cdef list arrays = []
        cdef list created = []
        cdef GroupMembers members
        try:
            for name in names:
                found = self._groups.get(name)
                if found is None:
                    members = GroupMembers()
                    self._groups[name] = members
                    created.append(name)
                else:
                    members = <GroupMembers>found
                members.reserve(members.size + 1)
                arrays.append(members)
        except BaseException:
            for name in created:
                del self._groups[name]
            raise
        return arrays

    cdef int _leave(self, object name, int32_t slot) except -1:
        cdef GroupMembers members = <GroupMembers>self._groups[name]
        members.discard(slot)
        if members.size == 0:
            del self._groups[name]
        return 0

    def add(self, agent_id, weight, capacity, groups=(), online=True):
        """Add an agent with load 0 and current weight 0.

        Raises ``ValueError`` if the id is taken or the router holds ``max_agents`` agents.
        """
        cdef int64_t checked_weight, checked_capacity
        cdef bint is_online
        cdef Py_ssize_t slot
        cdef AgentSlot* agent
        cdef GroupMembers members
        _check_id(agent_id)
        if not agent_id:
            raise ValueError("agent_id must be a non-empty str")
        checked_weight = _check_int("weight", weight, 1, MAX_WEIGHT)
        checked_capacity = _check_int("capacity", capacity, 0, MAX_CAPACITY)
        names = _check_groups(groups)
        is_online = _check_bool("online", online)
        if agent_id in self._index:
            raise ValueError(f"agent {agent_id!r} already exists")
        if self._size >= self._max_agents:
            raise ValueError(f"router is full: max_agents={self._max_agents}")
        # Everything that can fail comes first; the C state changes only once nothing can.
        slot = self._size
        self._reserve_slots(slot + 1)
        arrays = self._prepare_join(names)
        try:
            self._index[agent_id] = slot
        except BaseException:
            for name in names:
                if (<GroupMembers>self._groups[name]).size == 0:
                    del self._groups[name]
            raise
        self._ids[slot] = agent_id
        self._groups_of[slot] = names
        for members in arrays:
            members.append(<int32_t>slot)
        agent = &self._slots[slot]
        agent.current_weight = 0
        agent.weight = checked_weight
        agent.load = 0
        agent.capacity = checked_capacity
        agent.seq = self._next_seq
        agent.online = is_online
        _refresh(agent)
        self._next_seq += 1
        self._size += 1
        if is_online:
            self._total_capacity += checked_capacity

    def remove(self, agent_id):
        """Remove an agent; the chats it held leave ``total_load`` with it. KeyError if unknown."""
        cdef Py_ssize_t slot = self._slot_of(agent_id)
        cdef Py_ssize_t last = self._size - 1
        cdef AgentSlot* agent = &self._slots[slot]
        slot_number = slot  # made before any change: re-pointing the moved agent then cannot fail
        for name in <frozenset>self._groups_of[slot]:
            self._leave(name, <int32_t>slot)
        self._total_load -= agent.load
        if agent.online:
            self._total_capacity -= agent.capacity
        del self._index[agent_id]
        if slot != last:
            self._slots[slot] = self._slots[last]
            moved = self._ids[last]
            self._ids[slot] = moved
            self._groups_of[slot] = self._groups_of[last]
            self._index[moved] = slot_number
            for name in <frozenset>self._groups_of[slot]:
                (<GroupMembers>self._groups[name]).replace(<int32_t>last, <int32_t>slot)
        self._ids[last] = None
        self._groups_of[last] = None
        self._size -= 1

    def update(self, agent_id, *, weight=None, capacity=None, groups=None, online=None):
        """Change any of an agent's settings; ``None`` keeps the current one.

        A new weight (different from the current one) resets the agent's current weight to 0.
        A capacity below the current load is allowed: the agent is not picked until its load
        drops below it. Nothing changes if any argument is invalid.
        """
        cdef Py_ssize_t slot = self._slot_of(agent_id)  # KeyError first, as in the twin
        cdef AgentSlot* agent
        cdef int64_t new_weight = 0, new_capacity = 0
        cdef bint new_online = False
        cdef GroupMembers members
        if weight is not None:
            new_weight = _check_int("weight", weight, 1, MAX_WEIGHT)
        if capacity is not None:
            new_capacity = _check_int("capacity", capacity, 0, MAX_CAPACITY)
        names = None if groups is None else _check_groups(groups)
        if online is not None:
            new_online = _check_bool("online", online)
        # Iterating ``groups`` ran the caller's code, which may have added or removed agents.
        slot = self._slot_of(agent_id)
        current = <frozenset>self._groups_of[slot]
        if names is not None and names != current:
            arrays = self._prepare_join(names - current)
            for name in current - names:
                self._leave(name, <int32_t>slot)
            for members in arrays:
                members.append(<int32_t>slot)
            self._groups_of[slot] = names
        agent = &self._slots[slot]
        if weight is not None and new_weight != agent.weight:
            agent.weight = new_weight
            agent.current_weight = 0
        if capacity is not None:
            if agent.online:
                self._total_capacity += new_capacity - agent.capacity
            agent.capacity = new_capacity
        if online is not None:
            self._set_online(agent, new_online)
        _refresh(agent)

    cdef void _set_online(self, AgentSlot* agent, bint online) noexcept:
        if online != agent.online:
            agent.online = online
            self._total_capacity += agent.capacity if online else -agent.capacity
            _refresh(agent)

    def set_online(self, agent_id, online):
        """Mark an agent online or offline; an offline agent keeps its load and current weight."""
        cdef Py_ssize_t slot = self._slot_of(agent_id)
        self._set_online(&self._slots[slot], _check_bool("online", online))

    cdef Py_ssize_t _pick_all(self) noexcept:
        cdef Choice choice
        cdef Py_ssize_t i
        cdef AgentSlot* slots = self._slots
        choice = Choice(NULL, 0, 0, 0)
        for i in range(self._size):
            _offer(&choice, &slots[i])
        if choice.best == NULL:
            return -1
        choice.best.current_weight -= choice.total
        return choice.best - slots

    cdef Py_ssize_t _pick_in(self, GroupMembers members) noexcept:
        cdef Choice choice
        cdef Py_ssize_t i
        cdef AgentSlot* slots = self._slots
        cdef int32_t* member_slots = members.slots
        choice = Choice(NULL, 0, 0, 0)
        for i in range(members.size):
            _offer(&choice, &slots[member_slots[i]])
        if choice.best == NULL:
            return -1
        choice.best.current_weight -= choice.total
        return choice.best - slots

    cdef void _take(self, Py_ssize_t slot) noexcept:
        cdef AgentSlot* agent = &self._slots[slot]
        agent.load += 1
        self._total_load += 1
        _refresh(agent)

    def pick(self, group=None):
        """Choose the next eligible agent by SWRR, take one of its slots, return its id.

        Eligible: online, load below capacity, and in ``group`` unless it is ``None``. Returns
        ``None`` when no agent is eligible (an unknown group has no eligible agent).
        """
        cdef Py_ssize_t slot
        if group is None:
            slot = self._pick_all()
        else:
            _check_group(group)
            members = self._groups.get(group)
            if members is None:
                return None
            slot = self._pick_in(<GroupMembers>members)
        if slot < 0:
            return None
        self._take(slot)
        return self._ids[slot]

    def acquire(self, agent_id, *, force=False):
        """Take a slot of a given agent (it accepted a queued chat, or a transfer).

        Returns ``True`` and increments the load if the agent is online with load below
        capacity, else ``False``. ``force=True`` takes the slot regardless of the online flag and
        the capacity (a transfer an admin forces) and returns ``True``. Current weights are left
        as they are: a manual assignment is not a round-robin turn.
        """
        cdef Py_ssize_t slot = self._slot_of(agent_id)
        if not _check_bool("force", force) and not self._slots[slot].eligible:
            return False
        self._take(slot)
        return True

    def release(self, agent_id):
        """Give back one slot when a chat ends. ValueError if the agent's load is already 0."""
        cdef Py_ssize_t slot = self._slot_of(agent_id)
        cdef AgentSlot* agent = &self._slots[slot]
        if agent.load == 0:
            raise ValueError(f"agent {self._ids[slot]!r} has no chat to release (load is 0)")
        agent.load -= 1
        self._total_load -= 1
        _refresh(agent)

    def load(self, agent_id):
        """Chats the agent holds now."""
        return self._slots[self._slot_of(agent_id)].load

    def info(self, agent_id):
        """A snapshot of everything the router knows about the agent."""
        cdef Py_ssize_t slot = self._slot_of(agent_id)
        cdef AgentSlot* agent = &self._slots[slot]
        return AgentInfo(
            self._ids[slot],
            agent.weight,
            agent.capacity,
            agent.load,
            agent.online != 0,
            self._groups_of[slot],
            agent.current_weight,
        )

    def agents(self):
        """Agent ids in order of addition."""
        return list(self._index)

    def groups(self):
        """Names of the groups that have at least one member, sorted."""
        return sorted(self._groups)

    def eligible_count(self, group=None):
        """How many agents ``pick`` would choose among now."""
        cdef Py_ssize_t i, count = 0
        cdef GroupMembers members
        if group is None:
            for i in range(self._size):
                count += self._slots[i].eligible
            return count
        _check_group(group)
        found = self._groups.get(group)
        if found is None:
            return 0
        members = <GroupMembers>found
        for i in range(members.size):
            count += self._slots[members.slots[i]].eligible
        return count
