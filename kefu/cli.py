"""The ``kefu`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kefu._version import __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kefu", description="kefu: self-hosted customer-service chat engine"
    )
    parser.add_argument("--version", action="version", version=f"kefu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="show the build: native core or pure Python, SIMD kernel in use")
    return parser


def _info() -> int:
    from kefu import _core

    print(f"kefu {__version__}")
    print(f"python {sys.version.split()[0]}")
    print(f"native core: {'yes' if _core.USING_EXTENSIONS else 'no (pure-Python twins)'}")
    print(f"simd kernel: {_core.tfidf.simd_impl()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    parser.print_help()
    return 0
