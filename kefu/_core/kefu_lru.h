/* A recency order over slots 0..n-1 (meters.Ledger, ringbuf.RingSet): a doubly linked list in
 * two index arrays, oldest to newest, with O(1) unlink, append and touch.
 *
 * The owner keeps a dict from its keys to slots and the slots' payloads in arrays or lists of
 * its own; this file only orders the slots. Freed slots are chained through ``next`` from
 * ``free`` (-1: none). No bounds checks: callers pass slots below ``allocated``. */
#ifndef KEFU_LRU_H
#define KEFU_LRU_H
#include <Python.h>

typedef struct {
    Py_ssize_t *prev; /* towards the oldest */
    Py_ssize_t *next; /* towards the newest; for a free slot, the next free one */
    Py_ssize_t oldest;
    Py_ssize_t newest;
    Py_ssize_t free;
    Py_ssize_t allocated;
} kefu_lru;

static inline void kefu_lru_init(kefu_lru *l)
{
    l->prev = NULL;
    l->next = NULL;
    l->oldest = l->newest = l->free = -1;
    l->allocated = 0;
}

/* Room for n slots (n >= allocated); -1 and a MemoryError when it cannot be had. */
static inline int kefu_lru_grow(kefu_lru *l, Py_ssize_t n)
{
    Py_ssize_t *prev = (Py_ssize_t *)PyMem_Realloc(l->prev, (size_t)n * sizeof(Py_ssize_t));
    if (prev == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    l->prev = prev;
    Py_ssize_t *next = (Py_ssize_t *)PyMem_Realloc(l->next, (size_t)n * sizeof(Py_ssize_t));
    if (next == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    l->next = next;
    l->allocated = n;
    return 0;
}

static inline void kefu_lru_free(kefu_lru *l)
{
    PyMem_Free(l->prev);
    PyMem_Free(l->next);
    kefu_lru_init(l);
}

static inline void kefu_lru_unlink(kefu_lru *l, Py_ssize_t i)
{
    Py_ssize_t p = l->prev[i], n = l->next[i];
    if (p < 0)
        l->oldest = n;
    else
        l->next[p] = n;
    if (n < 0)
        l->newest = p;
    else
        l->prev[n] = p;
}

/* Slot i (not in the order) becomes the newest. */
static inline void kefu_lru_append(kefu_lru *l, Py_ssize_t i)
{
    l->prev[i] = l->newest;
    l->next[i] = -1;
    if (l->newest < 0)
        l->oldest = i;
    else
        l->next[l->newest] = i;
    l->newest = i;
}

/* Slot i (in the order) becomes the newest. */
static inline void kefu_lru_touch(kefu_lru *l, Py_ssize_t i)
{
    if (i != l->newest) {
        kefu_lru_unlink(l, i);
        kefu_lru_append(l, i);
    }
}

/* Slot i leaves the order for the free chain. */
static inline void kefu_lru_release(kefu_lru *l, Py_ssize_t i)
{
    kefu_lru_unlink(l, i);
    l->next[i] = l->free;
    l->free = i;
}

/* A free slot taken off the chain, or -1 when there is none. */
static inline Py_ssize_t kefu_lru_take_free(kefu_lru *l)
{
    Py_ssize_t i = l->free;
    if (i >= 0)
        l->free = l->next[i];
    return i;
}

#endif
