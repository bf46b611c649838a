cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t


# One agent's routing state. Slots are dense (a removal moves the last agent into the hole), so
# a pick over all agents walks one contiguous array.
cdef struct AgentSlot:
    int64_t current_weight
    int64_t weight
    int64_t load
    int64_t capacity
    uint64_t seq        # order of addition: breaks ties between equal current weights
    uint8_t online
    uint8_t eligible    # online and load < capacity, kept up to date by every change


@cython.final
cdef class GroupMembers:
    """The slots of one group's members, in no particular order (ties are broken by seq)."""
    cdef int32_t* slots
    cdef Py_ssize_t size
    cdef Py_ssize_t allocated

    cdef int reserve(self, Py_ssize_t size) except -1
    cdef void append(self, int32_t slot) noexcept
    cdef void discard(self, int32_t slot) noexcept
    cdef void replace(self, int32_t old, int32_t new) noexcept


@cython.final
cdef class Router:
    cdef AgentSlot* _slots
    cdef Py_ssize_t _size
    cdef Py_ssize_t _allocated
    cdef Py_ssize_t _max_agents
    cdef list _ids            # slot -> agent id (the stored object pick returns)
    cdef list _groups_of      # slot -> frozenset of group names
    cdef dict _index          # agent id -> slot; insertion order is the order of addition
    cdef dict _groups         # group name -> GroupMembers; a group exists while it has members
    cdef uint64_t _next_seq
    cdef int64_t _total_load
    cdef int64_t _total_capacity

    cdef Py_ssize_t _slot_of(self, object agent_id) except -1
    cdef int _reserve_slots(self, Py_ssize_t size) except -1
    cdef Py_ssize_t _pick_all(self) noexcept
    cdef Py_ssize_t _pick_in(self, GroupMembers members) noexcept
    cdef void _take(self, Py_ssize_t slot) noexcept
    cdef void _set_online(self, AgentSlot* agent, bint online) noexcept
    cdef list _prepare_join(self, frozenset names)
    cdef int _leave(self, object name, int32_t slot) except -1
