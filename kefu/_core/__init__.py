"""kefu's native hot paths, each with a pure-Python twin of the same API.

The compiled modules are used unless ``KEFU_NO_EXTENSIONS=1`` is set in the environment or the
package was installed without them. Both implementations stay importable by name (the
compiled ``kefu._core.ringbuf`` extension and its twin ``kefu._core._ringbuf_py``), so one test
suite runs over both; ``implementations("ringbuf")`` returns them.

Note that a compiled submodule and the selected implementation share a name: importing the
submodule makes Python set the package attribute to it, so every such import goes through
:func:`_import_compiled`, which puts the selection back.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from kefu._core import (
    _bloom_py,
    _meters_py,
    _mq_py,
    _outbox_py,
    _ringbuf_py,
    _router_py,
    _tfidf_py,
)

__all__ = [
    "MODULES",
    "NO_EXTENSIONS",
    "USING_EXTENSIONS",
    "bloom",
    "implementations",
    "meters",
    "mq",
    "outbox",
    "ringbuf",
    "router",
    "tfidf",
]

MODULES = ("ringbuf", "mq", "router", "tfidf", "bloom", "meters", "outbox")

NO_EXTENSIONS = os.environ.get("KEFU_NO_EXTENSIONS", "").strip().lower() not in (
    "",
    "0",
    "false",
    "no",
    "off",
)

ringbuf: ModuleType = _ringbuf_py
mq: ModuleType = _mq_py
router: ModuleType = _router_py
tfidf: ModuleType = _tfidf_py
bloom: ModuleType = _bloom_py
meters: ModuleType = _meters_py
outbox: ModuleType = _outbox_py
USING_EXTENSIONS = False


def _import_compiled(name: str) -> ModuleType | None:
    selected = globals()[name]
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None
    finally:
        globals()[name] = selected
    return module if module.__name__ == f"{__name__}.{name}" else None


if not NO_EXTENSIONS:
    _compiled = [_import_compiled(name) for name in MODULES]
    if all(m is not None for m in _compiled):
        ringbuf, mq, router, tfidf, bloom, meters, outbox = (m for m in _compiled if m is not None)
        USING_EXTENSIONS = True
    del _compiled


def implementations(name: str) -> dict[str, ModuleType]:
    """Both implementations of ``name`` importable here: ``{"py": twin, "c": compiled}``.

    ``"c"`` is missing when the package was built with ``KEFU_NO_EXTENSIONS=1``.
    """
    if name not in MODULES:
        raise ValueError(f"unknown core module {name!r}; expected one of {MODULES}")
    found = {"py": importlib.import_module(f"{__name__}._{name}_py")}
    compiled = _import_compiled(name)
    if compiled is not None:
        found["c"] = compiled
    return found
