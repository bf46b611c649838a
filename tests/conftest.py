"""Shared test wiring.

Every ``_core`` module is tested through one suite run over both implementations: the fixtures
``ringbuf_impl``, ``mq_impl``, ``router_impl``, ``tfidf_impl``, ``bloom_impl``, ``meters_impl``
and ``outbox_impl`` are parametrized with ids such as ``py-ringbuf`` and ``c-ringbuf``. Tests
that compare the two directly take ``ringbuf_pair`` (and so on), a ``(py, c)`` tuple.

A checkout whose extensions are not built is an error, not a silent pure-Python run, unless the
build was asked to be pure Python with ``KEFU_NO_EXTENSIONS=1``; then the ``c-`` cases and the
pair comparisons are not collected.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from kefu import _core

NATIVE = {name: _core.implementations(name) for name in _core.MODULES}


class _NotBuilt:
    """Stands for a compiled module that is missing while extensions were not switched off."""

    def __init__(self, name: str) -> None:
        self.name = name


def _resolve(name: str, mod: object) -> ModuleType:
    if isinstance(mod, _NotBuilt):
        pytest.fail(
            f"kefu._core.{mod.name} is not built: run `pip install -e .`, "
            "or set KEFU_NO_EXTENSIONS=1 to test the pure-Python twins only"
        )
    return mod  # type: ignore[return-value]


def _impls(name: str) -> dict[str, object]:
    impls: dict[str, object] = dict(NATIVE[name])
    if "c" not in impls and not _core.NO_EXTENSIONS:
        impls["c"] = _NotBuilt(name)
    return impls


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def _params(name: str) -> list[object]:
    impls = _impls(name)
    return [pytest.param(mod, id=f"{kind}-{name}") for kind, mod in sorted(impls.items())]


def _pair(name: str) -> list[object]:
    impls = _impls(name)
    if "c" not in impls:  # KEFU_NO_EXTENSIONS=1: nothing to compare against
        return []
    return [pytest.param((impls["py"], impls["c"]), id=f"py-vs-c-{name}")]


@pytest.fixture(scope="session", params=_params("ringbuf"))
def ringbuf_impl(request: pytest.FixtureRequest) -> ModuleType:
    return _resolve("ringbuf", request.param)


@pytest.fixture(scope="session", params=_params("mq"))
def mq_impl(request: pytest.FixtureRequest) -> ModuleType:
    return _resolve("mq", request.param)


@pytest.fixture(scope="session", params=_params("router"))
def router_impl(request: pytest.FixtureRequest) -> ModuleType:
    return _resolve("router", request.param)


@pytest.fixture(scope="session", params=_params("tfidf"))
def tfidf_impl(request: pytest.FixtureRequest) -> ModuleType:
    return _resolve("tfidf", request.param)


@pytest.fixture(scope="session", params=_params("bloom"))
def bloom_impl(request: pytest.FixtureRequest) -> ModuleType:
    return _resolve("bloom", request.param)


@pytest.fixture(scope="session", params=_pair("bloom"))
def bloom_pair(request: pytest.FixtureRequest) -> tuple[ModuleType, ModuleType]:
    py, c = request.param
    return py, _resolve("bloom", c)


@pytest.fixture(scope="session", params=_params("meters"))
def meters_impl(request: pytest.FixtureRequest) -> ModuleType:
    return _resolve("meters", request.param)


@pytest.fixture(scope="session", params=_pair("meters"))
def meters_pair(request: pytest.FixtureRequest) -> tuple[ModuleType, ModuleType]:
    py, c = request.param
    return py, _resolve("meters", c)


@pytest.fixture(scope="session", params=_params("outbox"))
def outbox_impl(request: pytest.FixtureRequest) -> ModuleType:
    return _resolve("outbox", request.param)


@pytest.fixture(scope="session", params=_pair("ringbuf"))
def ringbuf_pair(request: pytest.FixtureRequest) -> tuple[ModuleType, ModuleType]:
    py, c = request.param
    return py, _resolve("ringbuf", c)


@pytest.fixture(scope="session", params=_pair("mq"))
def mq_pair(request: pytest.FixtureRequest) -> tuple[ModuleType, ModuleType]:
    py, c = request.param
    return py, _resolve("mq", c)


@pytest.fixture(scope="session", params=_pair("router"))
def router_pair(request: pytest.FixtureRequest) -> tuple[ModuleType, ModuleType]:
    py, c = request.param
    return py, _resolve("router", c)


@pytest.fixture(scope="session", params=_pair("tfidf"))
def tfidf_pair(request: pytest.FixtureRequest) -> tuple[ModuleType, ModuleType]:
    py, c = request.param
    return py, _resolve("tfidf", c)


@pytest.fixture
def shared_data() -> str:
    """``../shared/data`` beside the repository (BANKING77, AFQMC); never copied into it."""
    if not os.path.isdir(SHARED_DATA):
        pytest.fail(f"shared datasets not found at {SHARED_DATA}")
    return SHARED_DATA
