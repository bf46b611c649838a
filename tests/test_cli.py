from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kefu
from kefu import _core
from kefu.cli import main


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"kefu {kefu.__version__}"


def test_info_names_the_core_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"simd kernel: {_core.tfidf.simd_impl()}" in out
    assert ("native core: yes" in out) == _core.USING_EXTENSIONS


def test_console_script_and_module_entry_agree() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kefu", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"kefu {kefu.__version__}"


def test_unknown_command_is_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_no_extensions_switch_selects_the_twins() -> None:
    code = (
        "import kefu._core as c\nprint(c.USING_EXTENSIONS, c.ringbuf.__name__, c.tfidf.simd_impl())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KEFU_NO_EXTENSIONS": "1"},
    )
    assert out.stdout.split() == ["False", "kefu._core._ringbuf_py", "numpy"]


def test_serve_refuses_a_bad_config_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "kefu.yaml"
    path.write_text("ws:\n  hots: 127.0.0.1\n")
    assert main(["serve", "--config", str(path), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kefu: configuration error: {path}: unknown key `ws.hots`")
    assert not (tmp_path / "data").exists()


def test_serve_names_a_missing_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.yaml"
    assert main(["serve", "--config", str(missing)]) == 2
    assert f"{missing}: cannot read the file" in capsys.readouterr().err
