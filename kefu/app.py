"""One node as a process: what ``kefu serve`` runs once the configuration is valid.

:func:`run` sets up logging, builds the TLS context, starts a uvloop event loop and runs
:func:`serve` in it; it returns the process's exit code.

Start
-----
The node starts first (store, agents, conversations, WebSocket listener), then the HTTP server,
which needs the node to answer anything. Once both listen, stdout gets, flushed::

    kefu: http listening on http://HOST:PORT
    kefu: ws listening on ws://HOST:PORT/ws
    kefu: grpc listening on grpc://HOST:PORT    (only with grpc.port; grpcs:// with TLS)
    kefu: ready

(``https://`` and ``wss://`` with TLS). Tools and tests wait for ``kefu: ready`` and read the
real ports from the two lines before it (the config may say port 0). Before ``ready``, a first
start on an empty data directory prints the credentials it created (admin token, demo agent)
and the pages to open; later starts print where the credentials file is. The open-files limit
and the connections it leaves room for are logged at ``info`` by the WebSocket server.

TLS
---
With ``tls.cert`` and ``tls.key`` set, one ``SSLContext`` with TLS 1.3 as the minimum serves
both listeners (PROTOCOL.md: "TLS 1.3 as the minimum version"). It is built before anything
listens, so an unreadable or invalid certificate stops the start with a message naming the
file, before the store is opened.

Stop
----
SIGINT and SIGTERM start a graceful stop: the gRPC server (when on) ends its subscriptions
(UNAVAILABLE) and lets its calls in flight finish, the HTTP server stops accepting and lets the
requests in flight finish, then the node closes every WebSocket connection with 1001, flushes
the store and closes it; the exit code is 0. The stop is bounded by the servers' own
timeouts: requests in flight get ``kefu.web.http.SHUTDOWN_TIMEOUT_S``, the WebSocket close
handshakes ``kefu.web.ws.CLOSE_TIMEOUT_S`` (5 s each). A second signal during the stop ends the
process at once with exit code 1 without waiting for anything: an operator who presses Ctrl-C twice
means it. Nothing acknowledged is lost that way (ack after persist: an
acknowledged message is already in RocksDB's write-ahead log); what is lost is only the
orderly close of connections. A signal that arrives while the node is still starting is acted
on once the start has finished (the start is then followed directly by the stop).

Bounds
------
This module holds no queue, buffer or cache of its own; the limits are those of the node, the
WebSocket front and the HTTP front, all from the configuration.

Exit codes
----------
=====  ======================================================================================
0      stopped by SIGINT/SIGTERM after a graceful stop
1      a start failure (a port in use, the data directory in use by another process, a store
       that cannot be opened), or a forced stop by a second signal
2      a configuration error, including a TLS certificate or key that cannot be loaded
=====  ======================================================================================

A start failure is one line on stderr, ``kefu: error: ...``, and no traceback: the traceback
of an unexpected failure is logged at ``debug`` only (``--log-level debug``).

Logging
-------
One line per record on stderr: time, level, logger, message. The level is
``config.log_level``. Library loggers follow the same level through the root logger, except
aiohttp's per-request access log, shown at ``debug`` only (:func:`configure_logging`).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import errno
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import time
from typing import TYPE_CHECKING, Final, cast

import msgspec
import uvloop

from kefu._version import __version__
from kefu.config import Config, TlsConfig
from kefu.node import Node
from kefu.store import StoreError
from kefu.web.http import HttpServer

if TYPE_CHECKING:
    from kefu.grpc.server import GrpcServer

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "LOG_FORMAT",
    "StartError",
    "configure_logging",
    "run",
    "serve",
    "tls_context",
]

log = logging.getLogger("kefu.app")

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_CONFIG: Final = 2  # also argparse's code for a bad command line

LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


class StartError(Exception):
    """The node could not start; ``str()`` is the one line for the operator."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO 8601, UTC, milliseconds), ``level``,
    ``logger``, ``msg``, and ``exc`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, object] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(out).decode()


#: Allocations between two young collections (CPython's default is 700). A node allocates a
#: few dozen short-lived objects per message; at the default, collections ran hundreds of
#: times a second under load.
GC_THRESHOLD: Final = (50_000, 20, 100)


def tune_gc() -> None:
    """Once started: everything allocated so far (modules, config, restored state) moves to
    the permanent generation, which collections no longer walk, and young collections run
    less often. Measured under the chat load of ``python -m loadtest``: 8.3k -> 13.4k msgs/s,
    and p99 at 4,000 msgs/s from 96 ms (full collections of up to 234 ms) to under 2 ms."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Every logger to stderr, one line per record, at ``level`` (a ``log_level`` value);
    ``fmt`` is ``text`` or ``json`` (``log_format``).

    aiohttp's access log (one ``info`` record per request) shows only at ``debug``: at
    ``info`` it would be a write per request on the hot path, and the reverse proxy in front
    of a deployment usually keeps the access log.
    """
    logging.basicConfig(
        level=getattr(logging, level.upper()), format=LOG_FORMAT, stream=sys.stderr, force=True
    )
    if fmt == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    logging.getLogger("aiohttp.access").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )


def tls_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The server context for both listeners, or None without ``tls.cert``/``tls.key``.

    Raises :class:`StartError` (exit code 2) naming the file that cannot be read, or both
    files when they are readable but do not form a certificate chain with its key.
    """
    if tls.cert is None or tls.key is None:
        return None
    for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StartError(f"cannot read `{key}` file {path}: {reason}", EXIT_CONFIG) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as exc:
        raise StartError(
            f"cannot load the TLS certificate {tls.cert} with the key {tls.key}: "
            f"{exc.reason or exc}",
            EXIT_CONFIG,
        ) from None
    return ctx


def _grpc_front() -> type[GrpcServer]:
    """The gRPC server class, or :class:`StartError` (exit code 2) when the ``grpc`` extra is
    not installed: checked before anything starts, as a configuration error."""
    try:
        from kefu.grpc.server import GrpcServer
    except ImportError as exc:
        from kefu.grpc import INSTALL_HINT

        raise StartError(
            f"`grpc.port` is set but gRPC support is not installed ({exc}): {INSTALL_HINT}",
            EXIT_CONFIG,
        ) from None
    return GrpcServer


def _tls_files(tls: TlsConfig) -> tuple[bytes, bytes] | None:
    """The PEM certificate chain and key for the gRPC port (already checked by
    :func:`tls_context`), or None without TLS."""
    if tls.cert is None or tls.key is None:
        return None
    with open(tls.cert, "rb") as cert, open(tls.key, "rb") as key:
        return cert.read(), key.read()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _listen_failure(what: str, host: str, port: int, exc: OSError) -> StartError:
    """The one line for an OSError while ``what`` starts to listen on ``host:port``."""
    if exc.filename is not None:  # a file, not the socket (e.g. the credentials file)
        return StartError(f"cannot start: {exc.filename}: {exc.strerror or exc}")
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        reason = exc.strerror or str(exc)  # getaddrinfo: an unknown host name
    else:
        reason = os.strerror(exc.errno)  # uvloop's own message repeats the address
    if exc.errno == errno.EADDRINUSE:
        reason += " (another process listens there; choose another port)"
    return StartError(f"cannot listen for {what} on {_url_host(host)}:{port}: {reason}")


def _store_failure(data_dir: str, exc: StoreError) -> StartError:
    # RocksDB reports a second process on the directory as a failure to take its LOCK file
    # ("While lock file: DIR/LOCK: Resource temporarily unavailable"); the store has no
    # dedicated error for it, so its message is what tells the two cases apart.
    if "lock" in str(exc).lower():
        return StartError(
            f"the data directory {data_dir} is in use by another kefu process "
            "(one node per data directory)"
        )
    return StartError(str(exc))


class _StopSignals:
    """SIGINT/SIGTERM handlers: the first sets ``requested``, a second one exits at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.requested = asyncio.Event()
        self.signal_name = ""
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.requested.is_set():
            # Documented in the module: a second signal means "now". The write-ahead log
            # already holds every acknowledged message, so only the orderly close is skipped.
            sys.stdout.flush()
            sys.stderr.write(f"kefu: {sig.name} again during the stop: exiting now\n")
            sys.stderr.flush()
            os._exit(EXIT_FAILURE)
        self.signal_name = sig.name
        self.requested.set()

    def remove(self) -> None:
        for sig in STOP_SIGNALS:
            self._loop.remove_signal_handler(sig)


def _say(line: str = "") -> None:
    print(line, flush=True)


def _announce_credentials(node: Node, http_base: str) -> None:
    bootstrap = node.bootstrap
    path = node.credentials_path
    if bootstrap is not None:
        _say("kefu: first start: created these credentials (shown once; keep them secret)")
        if bootstrap.admin_token is not None:
            _say(f"  admin token:       {bootstrap.admin_token}")
        if bootstrap.demo_agent_token is not None:
            _say(f"  demo agent id:     {bootstrap.demo_agent_id}")
            _say(f"  demo agent token:  {bootstrap.demo_agent_token}")
        _say(f"  saved in:          {bootstrap.credentials_path} (mode 0600)")
        _say(f"  visitor chat page: {http_base}/chat")
        _say(f"  agent workbench:   {http_base}/agent")
        _say(f"  admin page:        {http_base}/admin")
        _say(f'  widget for a site: <script src="{http_base}/widget.js" async></script>')
    elif os.path.exists(path):
        _say(f"kefu: the credentials made at the first start are in {path}")


async def serve(config: Config) -> None:
    """Run one node until SIGINT or SIGTERM, then stop it gracefully (module doc).

    Raises :class:`StartError` when the node cannot start; whatever had started is stopped.
    """
    ssl_ctx = tls_context(config.tls)
    grpc_front = _grpc_front() if config.grpc.port is not None else None
    log.info(
        "kefu %s starting: data dir %s, durability %s, TLS %s",
        __version__,
        os.path.abspath(config.data_dir),
        config.durability,
        "on (1.3 minimum)" if ssl_ctx is not None else "off",
    )
    async with contextlib.AsyncExitStack() as started:  # stops what started, in reverse order
        signals = _StopSignals(asyncio.get_running_loop())
        started.callback(signals.remove)

        node = Node(config, ssl=ssl_ctx)
        try:
            await node.start()
        except StoreError as exc:
            raise _store_failure(config.data_dir, exc) from exc
        except OSError as exc:
            raise _listen_failure("WebSocket", config.ws.host, config.ws.port, exc) from exc
        started.push_async_callback(node.stop)

        http = HttpServer(config, node, ssl=ssl_ctx)
        # Stopped even when start fails: it may have set up part of its server by then.
        started.push_async_callback(http.stop)
        try:
            await http.start()
        except OSError as exc:
            raise _listen_failure("HTTP", config.http.host, config.http.port, exc) from exc

        grpc_url = None
        if grpc_front is not None:
            grpc_server = grpc_front(config, node, tls=_tls_files(config.tls))
            started.push_async_callback(grpc_server.stop)  # stopped first, before HTTP
            try:
                await grpc_server.start()
            except OSError as exc:
                raise _listen_failure("gRPC", grpc_server.host, config.grpc.port or 0, exc) from exc
            grpc_scheme = "grpcs" if ssl_ctx is not None else "grpc"
            grpc_url = f"{grpc_scheme}://{_url_host(grpc_server.host)}:{grpc_server.port}"

        tune_gc()
        scheme, ws_scheme = ("https", "wss") if ssl_ctx is not None else ("http", "ws")
        http_base = f"{scheme}://{_url_host(config.http.host)}:{http.port}"
        ws_url = f"{ws_scheme}://{_url_host(config.ws.host)}:{node.ws_port}{config.ws.path}"
        _announce_credentials(node, http_base)
        _say(f"kefu: http listening on {http_base}")
        _say(f"kefu: ws listening on {ws_url}")
        if grpc_url is not None:
            _say(f"kefu: grpc listening on {grpc_url}")
        _say("kefu: ready")

        await signals.requested.wait()
        log.info("%s received: stopping", signals.signal_name)
    log.info("stopped")


def run(config: Config, *, profile: str | None = None) -> int:
    """Serve ``config`` in a uvloop event loop; the process's exit code (module doc).

    ``profile``: a path where a cProfile of the whole run is written when it ends (``pstats``
    format: ``python -m pstats FILE``, or snakeviz). cProfile costs the hot loops about a
    third of their speed; for a profile of a node under full load, sample it from outside
    instead: ``py-spy record -p PID`` (no cost to the node).
    """
    configure_logging(config.log_level, config.log_format)
    profiler = cProfile.Profile() if profile is not None else None
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            if profiler is not None:
                profiler.enable()
            try:
                runner.run(serve(config))
            finally:
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(cast(str, profile))
                    log.info("profile written to %s", profile)
    except StartError as exc:
        log.debug("start failed", exc_info=True)
        print(f"kefu: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:  # SIGINT before the handlers were installed: nothing to stop
        print("kefu: interrupted while starting", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    except Exception as exc:
        log.debug("unexpected failure", exc_info=True)
        print(f"kefu: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    return EXIT_OK
