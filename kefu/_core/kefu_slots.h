/* Slot access on a Python list of fixed length used as a ring's slot array (ringbuf, mq).
 *
 * Keeping items in a list rather than a raw PyObject* array lets the cyclic GC see them; these
 * helpers skip the list API's checks. No bounds checks: callers keep every index below the
 * length, which never changes while the list is used. */
#ifndef KEFU_SLOTS_H
#define KEFU_SLOTS_H
#include <Python.h>

/* Puts v in slot i (taking a new reference) and hands the slot's old reference over. */
static inline PyObject *kefu_slot_swap(PyObject *slots, Py_ssize_t i, PyObject *v)
{
    PyObject **slot = &((PyListObject *)slots)->ob_item[i];
    PyObject *old = *slot;
    Py_INCREF(v);
    *slot = v;
    return old;
}

/* Moves slots[i] into slot j of a new list (from PyList_New), leaving None behind. */
static inline void kefu_slot_move(PyObject *out, Py_ssize_t j, PyObject *slots, Py_ssize_t i)
{
    PyList_SET_ITEM(out, j, ((PyListObject *)slots)->ob_item[i]);
    Py_INCREF(Py_None);
    ((PyListObject *)slots)->ob_item[i] = Py_None;
}

/* Exchanges a[i] and b[j]; no reference count changes. */
static inline void kefu_slot_exchange(PyObject *a, Py_ssize_t i, PyObject *b, Py_ssize_t j)
{
    PyObject *t = ((PyListObject *)a)->ob_item[i];
    ((PyListObject *)a)->ob_item[i] = ((PyListObject *)b)->ob_item[j];
    ((PyListObject *)b)->ob_item[j] = t;
}

/* Fills slot j of a new list (from PyList_New) with a new reference to v. */
static inline void kefu_slot_fill(PyObject *out, Py_ssize_t j, PyObject *v)
{
    Py_INCREF(v);
    PyList_SET_ITEM(out, j, v);
}

static inline PyObject *kefu_slot_borrow(PyObject *slots, Py_ssize_t i)
{
    return ((PyListObject *)slots)->ob_item[i];
}

#endif
