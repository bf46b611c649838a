"""The ``kefu`` command line.

``kefu serve`` reads the configuration (defaults, then ``--config FILE``, then the environment,
then its own options; see :mod:`kefu.config`) and runs one node (:mod:`kefu.app`). A refused
configuration is one message on stderr and exit code 2, the code argparse uses for a bad
command line, so "you asked for something invalid" is always 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Final

from kefu._version import __version__
from kefu.config import ENV_OVERRIDES, ConfigError, load_config, overrides_from_cli

EXIT_CONFIG: Final = 2  # kefu.app.EXIT_CONFIG; not imported so that `kefu info` stays light


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kefu", description="kefu: self-hosted customer-service chat engine"
    )
    parser.add_argument("--version", action="version", version=f"kefu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="show the build: native core or pure Python, SIMD kernel in use")
    serve = sub.add_parser(
        "serve",
        help="run a node: the HTTP and WebSocket servers",
        description=(
            "Run one kefu node until SIGINT or SIGTERM (a second signal during the stop exits "
            "at once with code 1). Options given here win over the environment, which wins over "
            "the config file; the defaults shown apply when neither sets the value. "
            "Exit codes: 0 stopped, 1 start failure, 2 configuration error."
        ),
        epilog="environment: " + ", ".join(f"{var} ({key})" for var, key in ENV_OVERRIDES.items()),
    )
    serve.add_argument("--config", metavar="FILE", help="YAML config file (default: none)")
    serve.add_argument(
        "--data-dir", metavar="DIR", help="where the store lives (default: ./kefu-data)"
    )
    serve.add_argument(
        "--host", metavar="H", help="address the servers listen on (default: 127.0.0.1)"
    )
    serve.add_argument(
        "--http-port", metavar="P", type=int, help="HTTP port, 0 for any free one (default: 8080)"
    )
    serve.add_argument(
        "--ws-port",
        metavar="Q",
        type=int,
        help="WebSocket port, 0 for any free one (default: 8081)",
    )
    serve.add_argument(
        "--grpc-port",
        metavar="G",
        type=int,
        help="gRPC port, 0 for any free one (default: none, no gRPC; needs kefu[grpc])",
    )
    serve.add_argument(
        "--cluster",
        metavar="URL",
        help="join the cluster of nodes sharing this Redis (redis://host:port/db); "
        "default: none, a single node",
    )
    serve.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain (PEM)")
    serve.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="log level on stderr (default: info)",
    )
    serve.add_argument(
        "--log-format", choices=("text", "json"), help="log lines as text or JSON (default: text)"
    )
    serve.add_argument(
        "--profile",
        metavar="FILE",
        help="write a cProfile of the whole run to FILE when it stops (python -m pstats FILE)",
    )
    from kefu.bot.kbtool import add_kb_parser

    add_kb_parser(sub)
    return parser


def _info() -> int:
    from kefu import _core

    print(f"kefu {__version__}")
    print(f"python {sys.version.split()[0]}")
    print(f"native core: {'yes' if _core.USING_EXTENSIONS else 'no (pure-Python twins)'}")
    print(f"simd kernel: {_core.tfidf.simd_impl()}")
    return 0


def _serve(args: argparse.Namespace) -> int:

    overrides = overrides_from_cli(
        data_dir=args.data_dir,
        host=args.host,
        http_port=args.http_port,
        ws_port=args.ws_port,
        grpc_port=args.grpc_port,
    )
    # overrides_from_cli knows only the options above; these take the same dotted keys.
    for key, value in (
        ("cluster.redis_url", args.cluster),
        ("tls.cert", args.tls_cert),
        ("tls.key", args.tls_key),
        ("log_level", args.log_level),
        ("log_format", args.log_format),
    ):
        if value is not None:
            overrides[key] = value
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"kefu: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from kefu import app

    return app.run(config, profile=args.profile)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "serve":
        return _serve(args)
    if args.command == "kb":
        from kefu.bot.kbtool import run_kb

        return run_kb(args)
    parser.print_help()
    return 0
