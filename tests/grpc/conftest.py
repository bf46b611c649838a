"""A real ``kefu serve`` with its gRPC port, and the generated client, for ``tests/grpc``.

:class:`GrpcNode` runs ``python -m kefu serve`` with a config file of its own on ports the OS
chooses, reads the ports from the lines the server prints (``kefu: grpc listening on ...``),
and gives clients: a ``grpc.aio`` channel with the generated stub (``kefu.grpc.v1``), as a back
end would use it, and ``aiohttp`` for the REST calls the tests compare with. One server serves
the whole package (module ``node`` fixture); every test makes its own visitors, so the tests
do not disturb each other. Every wait is bounded.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import kefu

REPO_ROOT = Path(kefu.__file__).resolve().parent.parent
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
CALL_TIMEOUT = 10.0  # one gRPC or REST call

API_KEY = "grpc-test-api-key-0123456789"
ADMIN_TOKEN = "grpc-test-admin-token-0123456789"
#: Each visitor may send this many messages at once (then 1 a second): the rate-limit test
#: sends more, the others fewer.
VISITOR_BURST = 30

_LINE = re.compile(r"^kefu: (http|ws|grpc) listening on (\w+)://(\S+?):(\d+)(/\S*)?$")


class GrpcNode:
    """One ``kefu serve`` process with gRPC on (``stop()`` or ``kill()`` ends it)."""

    def __init__(self, workdir: Path, cfg: dict[str, Any], args: list[str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "kefu.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        self.stderr_path = workdir / "stderr.log"
        self.urls: dict[str, tuple[str, str, int]] = {}
        self.stdout: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")}
        for keep in ("KEFU_NO_EXTENSIONS", "KEFU_SIMD"):
            if keep in os.environ:
                env[keep] = os.environ[keep]
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "kefu", "serve", "--config", str(config_path)]
        cmd += ["--data-dir", str(workdir / "data"), "--http-port", "0", "--ws-port", "0", *args]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=workdir,
                env=env,
                text=True,
            )
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self) -> GrpcNode:
        while True:
            try:
                line = self._lines.get(timeout=READY_TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"not ready in {READY_TIMEOUT} s:\n{self.stderr}") from None
            if line is None:
                code = self.proc.wait(STOP_TIMEOUT)
                raise AssertionError(f"exited with {code} before ready:\n{self.stderr}")
            self.stdout.append(line)
            if m := _LINE.match(line):
                self.urls[m[1]] = (m[2], m[3], int(m[4]))
            elif line == "kefu: ready":
                return self

    @property
    def grpc_target(self) -> str:
        _, host, port = self.urls["grpc"]
        return f"{host}:{port}"

    @property
    def http_url(self) -> str:
        scheme, host, port = self.urls["http"]
        return f"{scheme}://{host}:{port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"no exit {STOP_TIMEOUT} s after SIGTERM:\n{self.stderr}"
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)


def node_config(**sections: Any) -> dict[str, Any]:
    """The tests' config: the API key and admin token above, the sample knowledge base's bot,
    per-visitor rate limit of :data:`VISITOR_BURST`."""
    out: dict[str, Any] = {
        "api_key": API_KEY,
        "admin_token": ADMIN_TOKEN,
        "grpc": {"port": 0},
        "limits": {"per_visitor": {"per_second": 1.0, "burst": VISITOR_BURST}},
    }
    out.update(sections)
    return out


@pytest.fixture(scope="package")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcNode]:
    """One server for the package, gRPC on from the config file's ``grpc: {port: 0}``."""
    server = GrpcNode(tmp_path_factory.mktemp("grpc-node"), node_config(), [])
    try:
        yield server.wait_ready()
    finally:
        server.kill()
