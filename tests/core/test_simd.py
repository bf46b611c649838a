"""The float32 dense kernels of kefu._core.tfidf (``dot``, ``matvec``) under every kernel.

Each test forces every kernel the CPU runs in turn (the twin has one: ``"numpy"``) and puts
the original selection back afterwards. Integer-valued inputs make every partial sum exact in
float32, so any kernel must match numpy exactly there, whatever its order of additions: a lost
tail element or a misread misaligned load cannot hide in a tolerance.
"""

from __future__ import annotations

import array
import os
import platform
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
LENGTHS = [*range(10), 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000]


@pytest.fixture(autouse=True)
def _restore_kernels(request: pytest.FixtureRequest) -> Iterator[None]:
    impls = [
        request.getfixturevalue(name)
        for name in ("tfidf_impl", "tfidf_pair")
        if name in request.fixturenames
    ]
    modules = [m for impl in impls for m in (impl if isinstance(impl, tuple) else (impl,))]
    saved = [(m, m.simd_impl()) for m in modules]
    yield
    for m, name in saved:
        m.set_simd_impl(name)


def kernels(impl: ModuleType) -> Iterator[str]:
    """Selects each kernel of ``impl`` in turn."""
    for name in impl.simd_impls():
        impl.set_simd_impl(name)
        assert impl.simd_impl() == name
        yield name


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def expected_kernels(impl: ModuleType) -> list[str]:
    if impl.__name__.endswith("_py"):
        return ["numpy"]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags = cpu_flags()
        return ["scalar", "sse2"] + (["avx2"] if {"avx2", "fma"} <= flags else [])
    if machine in ("aarch64", "arm64"):
        return ["scalar", "neon"]
    return ["scalar"]


def offset_vector(values: np.ndarray, offset: int) -> np.ndarray:
    """``values`` copied to a float32 array starting ``offset`` floats into its allocation."""
    backing = np.zeros(len(values) + offset, dtype=np.float32)
    out = backing[offset:]
    out[:] = values
    return out


def small_ints(rng: np.random.Generator, shape: Any) -> np.ndarray:
    return rng.integers(-8, 9, size=shape).astype(np.float32)


def reference_dot(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The exact-ish dot product (float64) and the sum of |a_i b_i| that scales its error."""
    products = a.astype(np.float64) * b.astype(np.float64)
    return float(products.sum()), float(np.abs(products).sum())


def tolerance(n: int, magnitude: float) -> float:
    # Float32 summation of n terms errs by at most about n * 2**-24 times the sum of |terms|.
    return (n + 2) * 2.0**-24 * magnitude + 1e-30


# ---------------------------------------------------------------------------------------------
# Selection.


def test_available_kernels(tfidf_impl: ModuleType) -> None:
    impls = tfidf_impl.simd_impls()
    assert impls == expected_kernels(tfidf_impl)
    tfidf_impl.set_simd_impl("auto")
    assert tfidf_impl.simd_impl() == impls[-1]


def test_every_kernel_can_be_forced(tfidf_impl: ModuleType) -> None:
    seen = list(kernels(tfidf_impl))
    assert seen == tfidf_impl.simd_impls()


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("bogus", ValueError),
        ("", ValueError),
        ("AVX2", ValueError),
        ("scalar\0", ValueError),
        (2, TypeError),
    ],
)
def test_set_simd_impl_rejects_unknown(tfidf_impl: ModuleType, name: Any, error: type) -> None:
    before = tfidf_impl.simd_impl()
    match = "name must be a str" if error is TypeError else re.escape(repr(name))
    with pytest.raises(error, match=match):
        tfidf_impl.set_simd_impl(name)
    assert tfidf_impl.simd_impl() == before


def test_set_simd_impl_rejects_kernels_this_cpu_lacks(tfidf_impl: ModuleType) -> None:
    missing = {"scalar", "sse2", "avx2", "neon", "numpy"} - set(tfidf_impl.simd_impls())
    assert missing
    for name in sorted(missing):
        with pytest.raises(ValueError, match=name):
            tfidf_impl.set_simd_impl(name)


def _simd_in_subprocess(impl: ModuleType, value: str) -> tuple[str, list[str]]:
    code = (
        "import importlib, sys, warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    module = importlib.import_module(sys.argv[1])\n"
        "print(module.simd_impl())\n"
        "for w in caught:\n"
        "    print(w.category.__name__, w.message)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")}
    env["KEFU_SIMD"] = value
    if impl.__name__.endswith("_py"):  # the twin's setting: no compiled module imported at all
        env["KEFU_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code, impl.__name__],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=REPO,
    )
    lines = out.stdout.splitlines()
    return lines[0], lines[1:]


@pytest.mark.slow
def test_kefu_simd_environment_forces_a_kernel(tfidf_impl: ModuleType) -> None:
    twin = tfidf_impl.__name__.endswith("_py")
    for name in tfidf_impl.simd_impls() if not twin else ["scalar"]:
        chosen, warned = _simd_in_subprocess(tfidf_impl, name)
        # The twin has one kernel and ignores KEFU_SIMD.
        assert (chosen, warned) == ("numpy" if twin else name, [])


@pytest.mark.slow
@pytest.mark.parametrize("value", ["bogus", "neon" if platform.machine() == "x86_64" else "avx2"])
def test_invalid_kefu_simd_warns_and_falls_back(tfidf_impl: ModuleType, value: str) -> None:
    chosen, warned = _simd_in_subprocess(tfidf_impl, value)
    if tfidf_impl.__name__.endswith("_py"):
        assert (chosen, warned) == ("numpy", [])
    else:
        assert chosen == tfidf_impl.simd_impls()[-1]
        assert len(warned) == 1
        assert warned[0].startswith(f"RuntimeWarning KEFU_SIMD='{value}' ignored")


# ---------------------------------------------------------------------------------------------
# dot.


def test_dot_exact_on_integers_all_lengths_and_offsets(tfidf_impl: ModuleType) -> None:
    rng = np.random.default_rng(1)
    for name in kernels(tfidf_impl):
        for n in LENGTHS:
            a0, b0 = small_ints(rng, n), small_ints(rng, n)
            want, _ = reference_dot(a0, b0)
            for off_a, off_b in ((0, 0), (1, 0), (0, 3), (5, 7), (7, 1)):
                got = tfidf_impl.dot(offset_vector(a0, off_a), offset_vector(b0, off_b))
                assert isinstance(got, float)
                assert got == want, (name, n, off_a, off_b)


def test_dot_random_floats_within_rounding(tfidf_impl: ModuleType) -> None:
    rng = np.random.default_rng(2)
    for name in kernels(tfidf_impl):
        for n in LENGTHS:
            a = offset_vector(rng.standard_normal(n).astype(np.float32), n % 5)
            b = rng.standard_normal(n).astype(np.float32)
            want, magnitude = reference_dot(a, b)
            assert abs(tfidf_impl.dot(a, b) - want) <= tolerance(n, magnitude), (name, n)


def test_dot_of_empty_vectors_is_zero(tfidf_impl: ModuleType) -> None:
    for _ in kernels(tfidf_impl):
        assert tfidf_impl.dot(np.zeros(0, np.float32), np.zeros(0, np.float32)) == 0.0


def test_dot_accepts_other_float32_buffers(tfidf_impl: ModuleType) -> None:
    a = array.array("f", [1.0, 2.0, 3.0])
    b = np.array([4.0, 5.0, 6.0], dtype=np.float32)
    assert tfidf_impl.dot(a, b) == 32.0
    assert tfidf_impl.dot(memoryview(b), a) == 32.0


def test_dot_sees_nan_and_inf(tfidf_impl: ModuleType) -> None:
    for _ in kernels(tfidf_impl):
        a = np.ones(37, dtype=np.float32)
        b = np.ones(37, dtype=np.float32)
        b[36] = np.inf
        assert tfidf_impl.dot(a, b) == np.inf
        b[0] = np.nan
        assert np.isnan(tfidf_impl.dot(a, b))


# ---------------------------------------------------------------------------------------------
# matvec.

SHAPES = [(r, c) for r in (0, 1, 2, 3, 4, 5, 7, 8, 9, 17) for c in (0, 1, 3, 7, 8, 9, 16, 17, 33)]
SHAPES += [(13, 384), (64, 31), (5, 1000)]


def matrices(values: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """``values`` laid out in memory in every way matvec accepts."""
    rows, cols = values.shape
    yield "contiguous", np.ascontiguousarray(values)
    wide = np.zeros((rows, cols + 5), dtype=np.float32)
    wide[:, 3 : 3 + cols] = values
    yield "column slice (misaligned, row stride cols+5)", wide[:, 3 : 3 + cols]
    every_other = np.zeros((2 * rows, cols), dtype=np.float32)
    every_other[::2] = values
    yield "every other row", every_other[::2]
    reversed_rows = np.ascontiguousarray(values[::-1])
    yield "negative row stride", reversed_rows[::-1]
    flat = np.zeros(rows * cols + 1, dtype=np.float32)
    yield "misaligned start", _fill(flat[1:].reshape(rows, cols), values)


def _fill(dest: np.ndarray, values: np.ndarray) -> np.ndarray:
    dest[...] = values
    return dest


def test_matvec_exact_on_integers_every_layout(tfidf_impl: ModuleType) -> None:
    rng = np.random.default_rng(3)
    for name in kernels(tfidf_impl):
        for rows, cols in SHAPES:
            values = small_ints(rng, (rows, cols))
            v0 = small_ints(rng, cols)
            want = values.astype(np.float64) @ v0.astype(np.float64)
            for layout, m in matrices(values):
                for v in (v0, offset_vector(v0, 1)):
                    got = tfidf_impl.matvec(m, v)
                    assert got.dtype == np.float32 and got.shape == (rows,)
                    np.testing.assert_array_equal(got, want, err_msg=f"{name} {layout}")


def test_matvec_random_floats_within_rounding(tfidf_impl: ModuleType) -> None:
    rng = np.random.default_rng(4)
    for name in kernels(tfidf_impl):
        for rows, cols in [(9, 384), (33, 17), (4, 1000), (1, 5)]:
            m = rng.standard_normal((rows, cols)).astype(np.float32)
            v = rng.standard_normal(cols).astype(np.float32)
            products = m.astype(np.float64) * v.astype(np.float64)
            want = products.sum(axis=1)
            bound = (cols + 2) * 2.0**-24 * np.abs(products).sum(axis=1) + 1e-30
            got = tfidf_impl.matvec(m, v)
            assert (np.abs(got - want) <= bound).all(), name
            # Each row agrees with dot under the same kernel, within the same bound.
            for r in range(rows):
                assert abs(tfidf_impl.dot(np.ascontiguousarray(m[r]), v) - want[r]) <= bound[r]


def test_matvec_beyond_the_caches(tfidf_impl: ModuleType) -> None:
    # Over 8M elements the SIMD kernels switch from four rows at a time to one (a single
    # memory stream); both paths must give the same exact sums.
    rng = np.random.default_rng(8)
    m = small_ints(rng, (21_000, 401))
    v = small_ints(rng, 401)
    want = m @ v  # exact: integer sums far below 2**24
    for name in kernels(tfidf_impl):
        np.testing.assert_array_equal(tfidf_impl.matvec(m, v), want, err_msg=name)
        np.testing.assert_array_equal(tfidf_impl.matvec(m[::2], v), want[::2], err_msg=name)


def test_matvec_in_threads(tfidf_impl: ModuleType) -> None:
    # Big calls run without the GIL: row blocks computed by concurrent threads into one out.
    rng = np.random.default_rng(9)
    m = small_ints(rng, (4096, 256))
    v = small_ints(rng, 256)
    out = np.zeros(4096, dtype=np.float32)
    blocks = [slice(i, i + 512) for i in range(0, 4096, 512)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            out[:] = 0
            list(pool.map(lambda b: tfidf_impl.matvec(m[b], v, out[b]), blocks))
            np.testing.assert_array_equal(out, m @ v)


def test_matvec_writes_into_out(tfidf_impl: ModuleType) -> None:
    rng = np.random.default_rng(5)
    m = small_ints(rng, (10, 20))
    v = small_ints(rng, 20)
    want = m @ v
    for _ in kernels(tfidf_impl):
        out = np.full(11, -1.0, dtype=np.float32)[1:]  # misaligned
        assert tfidf_impl.matvec(m, v, out=out) is out
        np.testing.assert_array_equal(out, want)
        out0 = np.full(0, 1.0, dtype=np.float32)
        assert tfidf_impl.matvec(m[:0], v, out=out0) is out0
        zeros = np.full(10, 7.0, dtype=np.float32)
        tfidf_impl.matvec(m[:, :0], v[:0], out=zeros)
        assert not zeros.any()


def test_matvec_out_may_overlap_the_inputs(tfidf_impl: ModuleType) -> None:
    rng = np.random.default_rng(6)
    for _ in kernels(tfidf_impl):
        m = small_ints(rng, (12, 12))
        v = small_ints(rng, 12)
        want = m.astype(np.float64) @ v.astype(np.float64)
        v_copy = v.copy()
        tfidf_impl.matvec(m, v_copy, out=v_copy)  # out is vec
        np.testing.assert_array_equal(v_copy, want)
        m_copy = m.copy()
        tfidf_impl.matvec(m_copy, v, out=m_copy[:, 0].copy())
        np.testing.assert_array_equal(m_copy, m)
        row = m.copy()
        want_row = row.astype(np.float64) @ v.astype(np.float64)
        tfidf_impl.matvec(row, v, out=row[5])  # out is a row of the matrix
        np.testing.assert_array_equal(row[5], want_row)


# ---------------------------------------------------------------------------------------------
# matvec on several threads.
#
# The compiled module shares the rows of a big matrix between the caller and a worker pool:
# from 64k elements per thread when its workers are awake (calls in quick succession, as
# here), and from 512k per thread when it must wake or start them. Each row is computed by the
# same kernel in the same order whatever the thread computing it, so every thread count must
# give the bits of threads=1 exactly; random floats (not integers) make that a real check.

# Rows chosen around the four-row blocking, sizes below every threshold (a few hundred
# elements), between them (384k), above them (1.2M), and past KEFU_MATVEC_STREAM_FLOATS, where
# the kernels walk one row at a time (8.4M).
THREAD_SHAPES = [(1, 384), (3, 401), (5, 7), (8, 33), (1001, 384), (1003, 385), (3001, 401)]
THREAD_COUNTS = [1, 2, 3, 8, None]


def _random_matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return rng.standard_normal((rows, cols)).astype(np.float32)


def test_matvec_threads_give_the_bits_of_one_thread(tfidf_impl: ModuleType) -> None:
    rng = np.random.default_rng(10)
    for rows, cols in THREAD_SHAPES:
        values = _random_matrix(rng, rows, cols)
        v = rng.standard_normal(cols).astype(np.float32)
        for name in kernels(tfidf_impl):
            for layout, m in matrices(values):
                want = tfidf_impl.matvec(m, v)
                for threads in THREAD_COUNTS:
                    got = tfidf_impl.matvec(m, v, threads=threads)
                    np.testing.assert_array_equal(
                        got, want, err_msg=f"{name} {rows}x{cols} {layout} threads={threads}"
                    )


def test_matvec_threads_past_the_caches(tfidf_impl: ModuleType) -> None:
    # 8.4M elements: the one-row-at-a-time walk, chosen for the whole matrix, not per block.
    rng = np.random.default_rng(11)
    m = _random_matrix(rng, 21_000, 401)
    v = rng.standard_normal(401).astype(np.float32)
    for name in kernels(tfidf_impl):
        want = tfidf_impl.matvec(m, v)
        want_reversed = tfidf_impl.matvec(m[::-1], v)
        for threads in (2, 3, 8):
            np.testing.assert_array_equal(tfidf_impl.matvec(m, v, threads=threads), want, name)
            got = tfidf_impl.matvec(m[::-1], v, threads=threads)
            np.testing.assert_array_equal(got, want_reversed, name)
        assert (np.abs(want - m @ v) <= 1e-3 * (np.abs(m) @ np.abs(v))).all(), name


def test_matvec_threads_into_out_and_over_the_inputs(tfidf_impl: ModuleType) -> None:
    rng = np.random.default_rng(12)
    m = _random_matrix(rng, 1200, 1200)
    v = rng.standard_normal(1200).astype(np.float32)
    want = tfidf_impl.matvec(m, v)
    for _ in kernels(tfidf_impl):
        want = tfidf_impl.matvec(m, v)
        out = np.full(1201, -1.0, dtype=np.float32)[1:]
        assert tfidf_impl.matvec(m, v, out, threads=2) is out
        np.testing.assert_array_equal(out, want)
        row = m.copy()
        tfidf_impl.matvec(row, v, out=row[5], threads=2)  # out is a row of the matrix
        np.testing.assert_array_equal(row[5], want)
        v_copy = v.copy()
        tfidf_impl.matvec(m, v_copy, out=v_copy, threads=2)  # out is vec
        np.testing.assert_array_equal(v_copy, want)


def test_matvec_threads_from_concurrent_callers(tfidf_impl: ModuleType) -> None:
    # One caller uses the pool at a time; the other computes on its own thread meanwhile.
    # Neither may see the other's rows, whichever gets the pool.
    rng = np.random.default_rng(13)
    jobs = []
    for rows, cols in [(3001, 401), (2003, 640), (1001, 384), (4096, 256)]:
        m = _random_matrix(rng, rows, cols)
        v = rng.standard_normal(cols).astype(np.float32)
        jobs.append((m, v, tfidf_impl.matvec(m, v)))
    barrier = threading.Barrier(len(jobs))

    def hammer(job: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
        m, v, want = job
        out = np.empty_like(want)
        barrier.wait()
        for i in range(150):
            tfidf_impl.matvec(m, v, out, threads=2 + i % 3)
            np.testing.assert_array_equal(out, want)
        return 150

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        assert sum(pool.map(hammer, jobs)) == 150 * len(jobs)


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


_POOL_SCRIPT = """
import os, sys, threading
import numpy as np
import importlib
impl = importlib.import_module(sys.argv[1])
compiled = not impl.__name__.endswith("_py")
cpus = len(os.sched_getaffinity(0))

def tasks():
    return len(os.listdir("/proc/self/task"))

rng = np.random.default_rng(0)
big = rng.standard_normal((3001, 401)).astype(np.float32)  # 1.2M elements: wakes workers
small = big[:40]  # 16k elements: never shared
v = rng.standard_normal(401).astype(np.float32)
want = impl.matvec(big, v)
want_reversed = impl.matvec(big[::-1], v)  # other groups of four rows: other bits
base = tasks()
impl.matvec(small, v, threads=8)
assert tasks() == base, "a small matrix started workers"
assert (impl.matvec(big, v, threads=2) == want).all()
helpers = min(1, cpus - 1) if compiled else 0
assert tasks() == base + helpers, (tasks(), base, helpers)
assert (impl.matvec(big, v, threads=8) == want).all()
helpers = min(7, cpus - 1) if compiled else 0
assert tasks() == base + helpers, (tasks(), base, helpers)

# Fork after the pool ran, and while another thread keeps using it: each child gets a pool of
# its own, with no worker until it needs one.
stop = threading.Event()

def background():
    out = np.empty_like(want)
    while not stop.is_set():
        impl.matvec(big, v, out, threads=2)
        assert (out == want).all()

thread = threading.Thread(target=background, daemon=True)
thread.start()
try:
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            checks = [
                tasks() == 1,
                (impl.matvec(big, v, threads=2) == want).all(),
                tasks() == 1 + (min(1, cpus - 1) if compiled else 0),
                (impl.matvec(big[::-1], v, threads=3) == want_reversed).all(),
            ]
            os._exit(0 if all(checks) else 1 + [bool(c) for c in checks].index(False))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, ("child check failed", status)
finally:
    stop.set()
    thread.join()
assert (impl.matvec(big, v, threads=2) == want).all()
print("ok")
# Leaving with the workers parked (or still spinning) must not hang the exit.
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_matvec_pool_lifecycle_and_fork(tfidf_impl: ModuleType) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    # One BLAS thread: OpenBLAS's own threads would not change the counts, but keep it quiet.
    env["OPENBLAS_NUM_THREADS"] = "1"
    out = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore::DeprecationWarning",
            "-c",
            _POOL_SCRIPT,
            tfidf_impl.__name__,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_max_threads(tfidf_impl: ModuleType) -> None:
    assert tfidf_impl.MAX_THREADS == 64
    m = np.ones((5000, 300), dtype=np.float32)
    v = np.ones(300, dtype=np.float32)
    for threads in (64, 65, 10**30, np.int64(3)):
        np.testing.assert_array_equal(tfidf_impl.matvec(m, v, threads=threads), 300.0)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, never a silent cast.

F32 = np.ones(4, dtype=np.float32)
M32 = np.ones((3, 4), dtype=np.float32)
MISALIGNED = np.frombuffer(b"\0" * 17, dtype=np.float32, count=4, offset=1)


@pytest.mark.parametrize(
    ("a", "b", "error", "match"),
    [
        (np.ones(4), F32, TypeError, "a must be a float32 array, got dtype float64"),
        (F32, np.ones(4, dtype=np.float16), TypeError, "b must be a float32 array, got dtype"),
        ([1.0, 2.0, 3.0, 4.0], F32, TypeError, "a must be a float32 array, got list"),
        (F32, None, TypeError, "b must be a float32 array, got NoneType"),
        (F32, np.ones(4, dtype=">f4"), TypeError, "b must be a float32 array"),
        (F32, array.array("d", [1.0] * 4), TypeError, "buffer format 'd'"),
        (F32, np.ones(4, dtype=np.int32), TypeError, "dtype int32"),
        (M32, F32, ValueError, "a must be 1-D, got 2-D"),
        (np.float32(1.0), F32, ValueError, "a must be 1-D, got 0-D"),
        (np.array(1.0, dtype=np.float32), F32, ValueError, "a must be 1-D, got 0-D"),
        (np.ones(8, dtype=np.float32)[::2], F32, ValueError, "a must be contiguous"),
        (F32, np.ones(5, dtype=np.float32), ValueError, "a and b differ in length: 4 != 5"),
        (MISALIGNED, F32, ValueError, "a is not aligned to 4 bytes"),
    ],
)
def test_dot_rejects_bad_input(
    tfidf_impl: ModuleType, a: Any, b: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        tfidf_impl.dot(a, b)


READ_ONLY = np.zeros(3, dtype=np.float32)
READ_ONLY.flags.writeable = False


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((np.ones((3, 4)), F32), TypeError, "matrix must be a float32 array, got dtype float64"),
        ((M32, np.ones(4)), TypeError, "vec must be a float32 array"),
        ((F32, F32), ValueError, "matrix must be 2-D, got 1-D"),
        ((np.ones((2, 3, 4), np.float32), F32), ValueError, "matrix must be 2-D, got 3-D"),
        ((np.ones((4, 3), np.float32).T, np.ones(4, np.float32)), ValueError, "column stride"),
        ((np.ones((3, 8), np.float32)[:, ::2], F32), ValueError, "column stride 4 bytes"),
        ((M32, np.ones(5, np.float32)), ValueError, "vec has length 5, matrix has 4 columns"),
        ((M32, M32), ValueError, "vec must be 1-D"),
        ((M32, F32, np.zeros(4, np.float32)), ValueError, "out has length 4, matrix has 3 rows"),
        ((M32, F32, np.zeros(3)), TypeError, "out must be a float32 array, got dtype float64"),
        ((M32, F32, array.array("f", [0.0] * 3)), TypeError, "out must be a numpy"),
        ((M32, F32, READ_ONLY), ValueError, "out is read-only"),
        ((M32, F32, np.zeros(6, np.float32)[::2]), ValueError, "out must be contiguous"),
        ((M32, MISALIGNED), ValueError, "vec is not aligned"),
    ],
)
def test_matvec_rejects_bad_input(
    tfidf_impl: ModuleType, args: tuple[Any, ...], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        tfidf_impl.matvec(*args)


@pytest.mark.parametrize(
    ("threads", "error", "match"),
    [
        (0, ValueError, "threads must be at least 1, got 0"),
        (-2, ValueError, "threads must be at least 1, got -2"),
        (-(10**30), ValueError, "threads must be at least 1"),
        (True, TypeError, "threads must be an int or None, got bool"),
        (False, TypeError, "threads must be an int or None, got bool"),
        (2.0, TypeError, "threads must be an int or None, got float"),
        ("2", TypeError, "threads must be an int or None, got str"),
    ],
)
def test_matvec_rejects_bad_threads(
    tfidf_impl: ModuleType, threads: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        tfidf_impl.matvec(M32, F32, threads=threads)
    # threads is checked first, before the arrays.
    with pytest.raises(error, match=match):
        tfidf_impl.matvec(None, None, threads=threads)


def test_matvec_threads_is_keyword_only(tfidf_impl: ModuleType) -> None:
    with pytest.raises(TypeError):
        tfidf_impl.matvec(M32, F32, None, 2)


def test_matvec_rejects_a_row_stride_that_splits_floats(tfidf_impl: ModuleType) -> None:
    raw = np.zeros(64, dtype=np.uint8)
    odd = np.lib.stride_tricks.as_strided(raw.view(np.float32)[:4], shape=(2, 3), strides=(6, 4))
    with pytest.raises(ValueError, match="row stride must be a multiple of 4 bytes, got 6"):
        tfidf_impl.matvec(odd, np.zeros(3, np.float32))


# ---------------------------------------------------------------------------------------------
# The twin against the compiled module on random shapes, under every compiled kernel.


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.integers(0, 20),
    cols=st.integers(0, 70),
    offset=st.integers(0, 7),
    seed=st.integers(0, 2**32 - 1),
)
def test_twin_and_compiled_agree_on_random_shapes(
    tfidf_pair: tuple[ModuleType, ModuleType], rows: int, cols: int, offset: int, seed: int
) -> None:
    py, c = tfidf_pair
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((rows, cols)).astype(np.float32)
    v = offset_vector(rng.standard_normal(cols).astype(np.float32), offset)
    products = m.astype(np.float64) * v.astype(np.float64)
    bound = 2 * (cols + 2) * 2.0**-24 * np.abs(products).sum(axis=1) + 1e-30
    want = py.matvec(m, v)
    for _ in kernels(c):
        assert (np.abs(c.matvec(m, v) - want) <= bound).all()
        if rows:
            assert abs(c.dot(m[0], v) - py.dot(m[0], v)) <= bound[0]
