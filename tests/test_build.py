"""The build switches of setup.py, exercised on a copy of the source tree.

- ``KEFU_NO_EXTENSIONS=1`` must give a wheel with no native code whose core tests still pass;
- ``KEFU_DEBUG=1`` (with ``KEFU_ANNOTATE=1``) must give working extensions with the debug
  counters compiled in, and Cython's annotation beside each ``.pyx``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE_MODULES = ("ringbuf", "mq", "router", "tfidf", "bloom", "meters", "outbox")

pytestmark = pytest.mark.slow


def _copy_source(dest: Path) -> Path:
    """The unpacked source distribution of the checkout: proves MANIFEST.in carries every file
    the build needs (Cython sources, C headers, SIMD kernels), with no build output in it."""
    dist = dest / "sdist"
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        env=_env(),
    )
    (archive,) = dist.glob("kefu-*.tar.gz")
    with tarfile.open(archive) as tf:
        names = tf.getnames()
        assert not [n for n in names if n.endswith((".so", ".o"))], names
        tf.extractall(dest, filter="data")
    (src,) = (p for p in dest.iterdir() if p.name.startswith("kefu-") and p.is_dir())
    return src


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")}
    env.update(extra)
    return env


def test_pure_python_wheel_has_no_native_code_and_passes_core_tests(tmp_path: Path) -> None:
    src = _copy_source(tmp_path)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(src),
        ],
        check=True,
        env=_env(KEFU_NO_EXTENSIONS="1"),
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("kefu-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        native = [n for n in names if n.endswith((".so", ".pyd", ".c"))]
        assert native == []
        for mod in CORE_MODULES:
            assert f"kefu/_core/_{mod}_py.py" in names
            assert f"kefu/_core/{mod}.pyi" in names
        assert "kefu/py.typed" in names
        # What `kefu serve` needs at run time: the sample knowledge base and the web front.
        assert "kefu/data/kb/shop.yaml" in names
        for page in ("chat.html", "agent.html", "admin.html", "widget.js", "kefu-client.js"):
            assert f"kefu/web/static/{page}" in names
        site = tmp_path / "site"
        zf.extractall(site)

    # The installed package, not the checkout, must be the one imported by the tests below.
    env = _env(KEFU_NO_EXTENSIONS="1", PYTHONPATH=str(site))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import kefu, kefu._core as c; print(kefu.__file__); print(c.USING_EXTENSIONS)",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    where, using = probe.stdout.split()
    assert Path(where).is_relative_to(site)
    assert using == "False"

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(REPO),
            "-c",
            str(REPO / "pyproject.toml"),
            str(REPO / "tests" / "core"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    tail = run.stdout[-3000:]
    assert run.returncode == 0, tail + run.stderr[-2000:]
    assert " passed" in tail and " failed" not in tail, tail


def test_debug_build_counts_live_objects_and_annotates(tmp_path: Path) -> None:
    src = _copy_source(tmp_path)
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        check=True,
        env=_env(KEFU_DEBUG="1", KEFU_ANNOTATE="1"),
        cwd=src,
        capture_output=True,
    )
    for mod in CORE_MODULES:
        assert list((src / "kefu" / "_core").glob(f"{mod}.*.so")), f"{mod} not built"
        html = src / "build" / "cython-debug" / "kefu" / "_core" / f"{mod}.html"
        assert html.exists(), f"{mod} not annotated"
    code = (
        "import kefu._core as c\n"
        "assert c.USING_EXTENSIONS\n"
        "for name in c.MODULES:\n"
        "    mod = getattr(c, name)\n"
        "    counters = mod.debug_counters()\n"
        "    assert counters, name\n"
        "    print(name, sorted(counters.items()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env=_env(PYTHONPATH=str(src)),
        cwd=tmp_path,
    )
    assert out.stdout.count("\n") == len(CORE_MODULES)
