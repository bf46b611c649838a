"""A real ``redis-server`` on a free loopback port, for the cluster tests.

Started without a config file, persistence or a password, in its own temporary directory;
:meth:`RedisServer.stop` and :meth:`RedisServer.start` let a test take Redis away and give it
back on the same port (``tests/cluster/test_*``: "stop Redis for 5 s during traffic").
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process; ``url`` stays the same across stop/start."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        persistent: bool = False,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.workdir = workdir
        #: Append-only file synced on every write: the data survives a SIGKILL and a restart.
        self.persistent = persistent
        #: (certificate, key): the port speaks TLS only; clients check the certificate.
        self.tls = tls
        self.port = port or free_port()
        if tls is None:
            self.url = f"redis://127.0.0.1:{self.port}/0"
        else:
            self.url = f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={tls[0]}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("redis-server is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            cert, key = self.tls
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(cert),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(cert),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                *listen,
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes" if self.persistent else "no",
                "--appendfsync", "always",
                "--dir", str(self.workdir),
                "--protected-mode", "no",
                "--maxclients", "1000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                s = raw
                if self.tls is not None:
                    context = ssl.create_default_context(cafile=str(self.tls[0]))
                    s = context.wrap_socket(raw, server_hostname="127.0.0.1")
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL: Redis gone at once, as when its machine fails (nothing saved anyway)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)
