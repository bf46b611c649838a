"""The code stays clean: ruff (lint and format), cython-lint, and mypy on ``kefu/``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PY_TREES = ["kefu", "tests", "bench", "loadtest", "fuzz", "setup.py"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)


def test_ruff_lint() -> None:
    out = _run("ruff", "check", *PY_TREES)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format() -> None:
    out = _run("ruff", "format", "--check", *PY_TREES)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cython_lint() -> None:
    sources = sorted(str(p.relative_to(REPO)) for p in (REPO / "kefu").rglob("*.pyx"))
    sources += sorted(str(p.relative_to(REPO)) for p in (REPO / "kefu").rglob("*.pxd"))
    assert sources
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from cython_lint.cython_lint import main; sys.exit(main(sys.argv[1:]))",
            *sources,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy_strict_on_package() -> None:
    out = _run("mypy", "kefu")
    assert out.returncode == 0, out.stdout + out.stderr
