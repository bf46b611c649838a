"""``kefu serve`` as a real process: start, first-start credentials, signals, start failures.

Each test runs ``python -m kefu serve`` on ports 0 with its own data directory, reads the real
ports from the lines it prints, and talks to it over loopback. Every wait has a bound far above
what the step needs (a slow machine only makes the test slower), and every process started is
killed when its test ends, whatever happened.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]

START_TIMEOUT = 60.0  # from exec to `kefu: ready` (imports, RocksDB open)
EXIT_TIMEOUT = 30.0  # from a signal or a failed start to the process's exit
IO_TIMEOUT = 10.0  # one HTTP request or one WebSocket frame

# A self-signed certificate for localhost and 127.0.0.1 (EC P-256, valid 2025-2125), made for
# these tests only.
TEST_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBWzCCAQGgAwIBAgIUKt44/f2R83o+57FAPdGC5LTD82AwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI1MDEwMTAwMDAwMFoYDzIxMjUwMTAx
MDAwMDAwWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAARL6Ec/A6YO5cZgLg9iDS6PcQTDmUH7dmVmFa4cV8WAai/8qAL+E/9C
MXlTGRqfHvnk3WEUJUzdjjJcJzAIFAOsoy8wLTAaBgNVHREEEzARgglsb2NhbGhv
c3SHBH8AAAEwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEAguJT
u89btcR9ZV18S128wgVAjoJTlIzp0gpPT4PzPHUCIGz/ATw+b56kUzrWLvKeLNM+
dAjQpiCLvVCOxv4Hgd22
-----END CERTIFICATE-----
"""
TEST_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgu5dyPiyInhlVkhMR
eIfMHMEdGUZ8Uc7mojTvqheAsAehRANCAARL6Ec/A6YO5cZgLg9iDS6PcQTDmUH7
dmVmFa4cV8WAai/8qAL+E/9CMXlTGRqfHvnk3WEUJUzdjjJcJzAIFAOs
-----END PRIVATE KEY-----
"""


def _env() -> dict[str, str]:
    # The KEFU_* variables of the shell running the tests must not reach the server.
    # Only the build switches that choose the implementation under test go through.
    keep = {"KEFU_NO_EXTENSIONS", "KEFU_SIMD"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_") or k in keep}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


class Server:
    """One ``kefu serve`` process; stdout is read line by line, stderr goes to a file."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.stderr_path = workdir / f"{name}.stderr"
        self.stdout_lines: list[str] = []
        self.http_url = ""
        self.ws_url = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kefu", "serve", *args],
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=workdir,
                env=_env(),
                text=True,
            )
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    @property
    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self) -> Server:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no `kefu: ready` within {START_TIMEOUT} s; stderr:\n{self.stderr}")
            if line is None:
                self.proc.wait(EXIT_TIMEOUT)
                pytest.fail(
                    f"exited with {self.proc.returncode} before `kefu: ready`; "
                    f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
                )
            self.stdout_lines.append(line)
            if m := re.fullmatch(r"kefu: http listening on (\S+)", line):
                self.http_url = m[1]
            elif m := re.fullmatch(r"kefu: ws listening on (\S+)", line):
                self.ws_url = m[1]
            elif line == "kefu: ready":
                assert self.http_url and self.ws_url, self.stdout
                return self

    def wait_exit(self) -> int:
        """The exit code; fails the test if the process is still running after the bound."""
        try:
            return self.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {EXIT_TIMEOUT} s later; stderr:\n{self.stderr}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(EXIT_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stdout_value(self, label: str) -> str:
        """The value of an indented ``label: value`` line of the first-start block."""
        m = re.search(rf"^\s+{re.escape(label)}:\s+(\S+)", self.stdout, re.M)
        assert m is not None, f"no `{label}` in stdout:\n{self.stdout}"
        return m[1]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """``start(*args)``: a :class:`Server` (not yet ready) with ``args`` after ``serve``."""
    servers: list[Server] = []

    def _start(*args: str) -> Server:
        server = Server(list(args), tmp_path, f"server{len(servers)}")
        servers.append(server)
        return server

    try:
        yield _start
    finally:
        for server in servers:
            server.kill()


def _ports0(data_dir: Path) -> list[str]:
    return ["--data-dir", str(data_dir), "--http-port", "0", "--ws-port", "0"]


def _host_port(url: str) -> tuple[str, int]:
    m = re.fullmatch(r"\w+://([^:/]+):(\d+)(/.*)?", url)
    assert m is not None, url
    return m[1], int(m[2])


def _http(
    url: str,
    body: object | None = None,
    token: str | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=IO_TIMEOUT, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _recv(ws: ClientConnection) -> dict[str, Any]:
    frame = json.loads(ws.recv(timeout=IO_TIMEOUT))
    assert isinstance(frame, dict)
    return frame


def _hello(ws: ClientConnection, token: str) -> dict[str, Any]:
    ws.send(json.dumps({"type": "hello", "token": token}))
    welcome = _recv(ws)
    assert welcome["type"] == "welcome", welcome
    return welcome


def _close_code_seen(ws: ClientConnection) -> int | None:
    """Reads until the server closes; the close code the client received."""
    try:
        while True:
            ws.recv(timeout=EXIT_TIMEOUT)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    raise AssertionError("unreachable")


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kefu.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------


def test_first_start_prints_credentials_once_and_keeps_them(start: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start(*_ports0(data)).wait_ready()
    admin_token = first.stdout_value("admin token")
    agent_id = first.stdout_value("demo agent id")
    agent_token = first.stdout_value("demo agent token")
    credentials = Path(first.stdout_value("saved in"))
    pages = {
        "visitor chat page": f"{first.http_url}/chat",
        "agent workbench": f"{first.http_url}/agent",
        "admin page": f"{first.http_url}/admin",
    }
    for line, url in pages.items():
        assert first.stdout_value(line) == url
        with urllib.request.urlopen(url, timeout=10) as page:  # what is printed is served
            assert page.status == 200 and b"<html" in page.read().lower()
    widget = f'  widget for a site: <script src="{first.http_url}/widget.js" async></script>'
    assert widget in first.stdout_lines
    # The credentials come before `ready`, which is the last line.
    assert first.stdout_lines[-1] == "kefu: ready"
    assert credentials.parent == data
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    saved = credentials.read_text()
    assert admin_token in saved and agent_token in saved
    # Logging: one line per record with time, level and logger; the open-files limit at info.
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO kefu\.\S+: .*open files limit \d+",
        first.stderr,
        re.M,
    ), first.stderr
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0

    second = start(*_ports0(data)).wait_ready()
    assert "admin token" not in second.stdout and "demo agent token" not in second.stdout
    assert f"credentials made at the first start are in {credentials}" in second.stdout
    assert credentials.read_text() == saved
    # The first start's agent token still logs in: nothing was regenerated.
    with connect(second.ws_url, open_timeout=IO_TIMEOUT, close_timeout=IO_TIMEOUT) as ws:
        welcome = _hello(ws, agent_token)
    assert (welcome["role"], welcome["id"]) == ("agent", agent_id)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_closes_connections_with_1001_and_exits_0(
    start: Any, tmp_path: Path, sig: signal.Signals
) -> None:
    server = start(*_ports0(tmp_path / "data")).wait_ready()
    assert server.http_url.startswith("http://127.0.0.1:")
    assert re.fullmatch(r"ws://127\.0\.0\.1:\d+/ws", server.ws_url)
    status, health = _http(f"{server.http_url}/healthz")
    assert (status, health["status"]) == (200, "ok")
    with connect(server.ws_url, open_timeout=IO_TIMEOUT, close_timeout=IO_TIMEOUT) as ws:
        welcome = _hello(ws, server.stdout_value("demo agent token"))
        assert welcome["role"] == "agent"
        server.signal(sig)
        assert _close_code_seen(ws) == 1001
    assert server.wait_exit() == 0
    assert "Traceback" not in server.stderr
    assert "aiohttp.access" not in server.stderr  # per-request lines only at debug


def test_acked_message_is_in_the_history_after_a_restart(start: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start(*_ports0(data)).wait_ready()
    status, chat = _http(f"{server.http_url}/v1/chat/create", {"name": "Ada"})
    assert status == 201, chat
    conv, token = chat["session_id"], chat["token"]
    with connect(server.ws_url, open_timeout=IO_TIMEOUT, close_timeout=IO_TIMEOUT) as ws:
        _hello(ws, token)
        ws.send(json.dumps({"type": "send", "conv": conv, "client_msg_id": "m1", "text": "hi"}))
        while (ack := _recv(ws))["type"] != "ack":
            assert ack["type"] not in ("error", "closed"), ack
        server.signal(signal.SIGTERM)  # right after the ack, nothing else happens in between
        assert _close_code_seen(ws) == 1001
    assert server.wait_exit() == 0

    again = start(*_ports0(data)).wait_ready()
    status, history = _http(f"{again.http_url}/v1/chat/{conv}/messages?after=0", token=token)
    assert status == 200, history
    texts = {m["seq"]: m["text"] for m in history["messages"]}
    assert texts.get(ack["seq"]) == "hi", history


def test_second_signal_during_the_stop_exits_1_at_once(start: Any, tmp_path: Path) -> None:
    server = start(*_ports0(tmp_path / "data")).wait_ready()
    # A WebSocket client that never reads: the stop waits for its close frame (5 s), so the
    # second signal is sure to arrive while the stop is under way.
    host, port = _host_port(server.ws_url)
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(4096)
            assert chunk, response
            response += chunk
        assert response.startswith(b"HTTP/1.1 101"), response
        server.signal(signal.SIGTERM)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while "SIGTERM received: stopping" not in server.stderr:
            assert time.monotonic() < deadline, server.stderr
            time.sleep(0.02)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 1
        assert time.monotonic() - signalled < 4.0  # did not wait for the 5 s close timeout
    assert "again during the stop: exiting now" in server.stderr


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("http:\n  prot: 8080\n", "http.prot"),
        ('session:\n  idle_ttl_minutes: "60"\n', "session.idle_ttl_minutes"),
        ("log_level: loud\n", "log_level"),
    ],
    ids=["unknown-key", "wrong-type", "bad-choice"],
)
def test_bad_config_exits_2_naming_the_key(
    start: Any, tmp_path: Path, config: str, key: str
) -> None:
    path = _write_config(tmp_path, config)
    server = start("--config", str(path), *_ports0(tmp_path / "data"))
    assert server.wait_exit() == 2
    assert f"`{key}`" in server.stderr and str(path) in server.stderr
    assert "Traceback" not in server.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was opened


def test_bad_command_line_value_exits_2(start: Any, tmp_path: Path) -> None:
    server = start("--data-dir", str(tmp_path / "data"), "--http-port", "70000")
    assert server.wait_exit() == 2
    assert "command line" in server.stderr and "`http.port`" in server.stderr


@pytest.mark.parametrize("which", ["http", "ws"])
def test_port_in_use_exits_1_with_a_clear_message(start: Any, tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = _ports0(tmp_path / "data")
        args[args.index(f"--{which}-port") + 1] = str(port)
        server = start(*args)
        assert server.wait_exit() == 1
    err = server.stderr
    assert re.search(rf"^kefu: error: cannot listen for .* on 127\.0\.0\.1:{port}: ", err, re.M)
    assert "address already in use" in err.lower()
    assert "Traceback" not in err


def test_second_server_on_one_data_dir_exits_1(start: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start(*_ports0(data)).wait_ready()
    second = start(*_ports0(data))
    assert second.wait_exit() == 1
    assert f"the data directory {data} is in use" in second.stderr
    assert "Traceback" not in second.stderr
    # The first one is not disturbed.
    assert _http(f"{first.http_url}/healthz")[0] == 200
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0


def test_tls_serves_https_and_wss_with_tls_1_3_only(start: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text(TEST_CERT)
    key.write_text(TEST_KEY)
    server = start(
        *_ports0(tmp_path / "data"), "--tls-cert", str(cert), "--tls-key", str(key)
    ).wait_ready()
    assert server.http_url.startswith("https://127.0.0.1:")
    assert server.ws_url.startswith("wss://127.0.0.1:")
    client = ssl.create_default_context(cafile=str(cert))
    assert _http(f"{server.http_url}/healthz", context=client)[0] == 200
    with connect(
        server.ws_url, ssl=client, open_timeout=IO_TIMEOUT, close_timeout=IO_TIMEOUT
    ) as ws:
        _hello(ws, server.stdout_value("demo agent token"))
    old = ssl.create_default_context(cafile=str(cert))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    for url in (server.http_url, server.ws_url):
        host, port = _host_port(url)
        with (
            socket.create_connection((host, port), timeout=IO_TIMEOUT) as sock,
            pytest.raises(ssl.SSLError),
        ):
            old.wrap_socket(sock, server_hostname=host)
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_unreadable_tls_file_exits_2_naming_it(start: Any, tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text(TEST_CERT)
    missing = tmp_path / "no-such-key.pem"
    server = start(*_ports0(tmp_path / "data"), "--tls-cert", str(cert), "--tls-key", str(missing))
    assert server.wait_exit() == 2
    assert f"cannot read `tls.key` file {missing}" in server.stderr
    assert "Traceback" not in server.stderr
    assert not (tmp_path / "data").exists()  # refused before the store was opened


def test_key_that_does_not_match_the_certificate_exits_2(start: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text(TEST_CERT)
    key.write_text(TEST_CERT)  # readable, but not a private key
    server = start(*_ports0(tmp_path / "data"), "--tls-cert", str(cert), "--tls-key", str(key))
    assert server.wait_exit() == 2
    assert f"cannot load the TLS certificate {cert} with the key {key}" in server.stderr
    assert "Traceback" not in server.stderr


def test_help_lists_the_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kefu", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        env=_env(),
        check=True,
    ).stdout
    for option in (
        "--config",
        "--data-dir",
        "--host",
        "--http-port",
        "--ws-port",
        "--tls-cert",
        "--tls-key",
        "--log-level",
        "KEFU_ADMIN_TOKEN",
    ):
        assert option in out


def test_json_logs_and_profile(start: Any, tmp_path: Path) -> None:
    import json
    import pstats

    profile = tmp_path / "run.prof"
    server = start(
        *_ports0(tmp_path / "data"), "--log-format", "json", "--profile", str(profile)
    ).wait_ready()
    status, _ = _http(f"{server.http_url}/healthz")
    assert status == 200
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    records = [json.loads(line) for line in server.stderr.splitlines() if line.strip()]
    assert records, "no log lines"
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert any(r["logger"] == "kefu.ws" and "connections" in r["msg"] for r in records)
    stats = pstats.Stats(str(profile))
    functions = {f"{path}:{name}" for path, _line, name in stats.stats}  # type: ignore[attr-defined]
    assert any(f.endswith("node.py:start") for f in functions), sorted(functions)[:20]
