"""``python -m loadtest.chat_throughput ARGS`` is ``python -m loadtest chat ARGS``.

Kept so that the command in the changelog still runs; the harness and its options are in
:mod:`loadtest.scenarios` (``python -m loadtest --help``).
"""

from __future__ import annotations

from loadtest.scenarios import main as _main


def main(argv: list[str] | None = None) -> int:
    import sys

    return _main(["chat", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
