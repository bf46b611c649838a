"""The server as a real process, and the clients that talk to it, for the end-to-end tests.

:class:`ServerProcess` runs ``python -m kefu serve`` with a config file written per test, a data
directory of its own and ports chosen by the OS, and reads the ports from the lines the server
prints once it listens (``kefu: http listening on ...``, ``kefu: ws listening on ...``,
``kefu: ready``). It can stop the server gracefully (SIGTERM) or kill it (SIGKILL) and start it
again on the same data directory, which is how the restart tests cut the power.

Clients are the ``websockets`` library for WebSocket and ``aiohttp`` for REST, as an integrator
would use them. Every wait is bounded: a server that does not answer fails the test with what
it printed on stderr, never hangs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

import kefu
from tests import aio

#: The repository root, put on the server's PYTHONPATH so that ``-m kefu`` runs this checkout.
REPO_ROOT = Path(kefu.__file__).resolve().parent.parent
#: From the start of the process to ``kefu: ready``: imports, RocksDB open, recovery.
READY_TIMEOUT = 20.0
#: A graceful stop flushes the store and closes every connection with 1001.
STOP_TIMEOUT = 20.0
#: One frame or one REST answer; generous, a slow machine must not fail a test.
RECV_TIMEOUT = 10.0
#: Frames a client holds that the test has not read yet.
CLIENT_QUEUE = 100_000
#: A whole test body.
TEST_TIMEOUT = 90.0

_HTTP_LINE = re.compile(r"^kefu: http listening on (https?)://(\S+):(\d+)\s*$")
_WS_LINE = re.compile(r"^kefu: ws listening on (wss?)://(\S+):(\d+)(/\S*)\s*$")
_READY_LINE = "kefu: ready"


def run(test: Callable[[], Awaitable[None]], timeout: float = TEST_TIMEOUT) -> None:
    aio.run(test, timeout)


def agent(
    agent_id: str,
    *,
    weight: int = 1,
    max_chats: int = 5,
    groups: Sequence[str] = (),
) -> dict[str, Any]:
    """One entry of the config's ``agents`` list; the token is ``token_of_agent(agent_id)``."""
    return {
        "id": agent_id,
        "name": agent_id.capitalize(),
        "token": token_of_agent(agent_id),
        "weight": weight,
        "max_chats": max_chats,
        "groups": list(groups),
    }


def token_of_agent(agent_id: str) -> str:
    return f"agent-token-{agent_id}-0123456789"


#: Per-connection token bucket wide enough for tests that send hundreds of commands.
FAST_RATE = {"per_second": 100_000.0, "burst": 100_000}


def config(agents: Sequence[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A config with the bot off and a known admin token; ``sections`` override or add keys."""
    out: dict[str, Any] = {
        "admin_token": "admin-token-0123456789",
        "agents": list(agents),
        "bot": {"enabled": False},
    }
    out.update(sections)
    return out


class ServerProcess:
    """``kefu serve`` in a child process, restartable on the same data directory."""

    def __init__(self, workdir: Path, cfg: dict[str, Any]) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.config_path = workdir / "kefu.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_url = ""
        self.ws_url = ""
        self.ws_port = 0
        self.http_port = 0
        self.starts = 0
        self._stdout: list[str] = []
        self._stderr_path = workdir / "stderr-0.log"

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait for ``kefu: ready`` (at most :data:`READY_TIMEOUT`)."""
        assert self.proc is None, "already running"
        self.starts += 1
        self._stderr_path = self.workdir / f"stderr-{self.starts}.log"
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        for name in ("KEFU_ADMIN_TOKEN", "KEFU_API_KEY", "KEFU_DATA_DIR", "KEFU_REDIS_URL"):
            env.pop(name, None)  # the test's config file is the whole configuration
        cmd = [
            sys.executable,
            "-m",
            "kefu",
            "serve",
            "--config",
            str(self.config_path),
            "--data-dir",
            str(self.data_dir),
            "--http-port",
            "0",
            "--ws-port",
            "0",
        ]
        with open(self._stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=self.workdir,
                env=env,
            )
        self.proc = proc
        self._stdout = []
        ready = threading.Event()
        # A thread drains stdout for the whole life of the process: a full pipe would block
        # the server on its next print.
        threading.Thread(target=self._drain, args=(proc, ready), daemon=True).start()
        if not ready.wait(READY_TIMEOUT) or not self.ws_url or not self.http_url:
            code = proc.poll()
            self._reap()
            raise AssertionError(
                f"kefu serve not ready within {READY_TIMEOUT}s (exit code {code});\n"
                f"stdout:\n{''.join(self._stdout)}\nstderr:\n{self.stderr()}"
            )

    def _drain(self, proc: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            if len(self._stdout) < 1_000:  # bounded: only the start-up lines matter
                self._stdout.append(line)
            if m := _HTTP_LINE.match(line):
                host = m[2]
                self.http_port = int(m[3])
                self.http_url = f"{m[1]}://{host}:{self.http_port}"
            elif m := _WS_LINE.match(line):
                self.ws_port = int(m[3])
                self.ws_url = f"{m[1]}://{m[2]}:{self.ws_port}{m[4]}"
            elif line.strip() == _READY_LINE:
                ready.set()
        ready.set()  # EOF: the process is gone; start() reports it

    def stderr(self) -> str:
        try:
            return self._stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self) -> int:
        """SIGTERM and wait for the exit; returns the exit code."""
        proc = self.proc
        assert proc is not None, "not running"
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._reap()
            raise AssertionError(
                f"kefu serve did not stop within {STOP_TIMEOUT}s of SIGTERM;\n"
                f"stderr:\n{self.stderr()}"
            ) from None
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to flush anything."""
        proc = self.proc
        assert proc is not None, "not running"
        proc.kill()
        proc.wait(STOP_TIMEOUT)
        self.proc = None

    def close(self) -> None:
        """End the process whatever its state (fixture teardown)."""
        self._reap()

    def _reap(self) -> None:
        proc = self.proc
        self.proc = None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    # -- clients --------------------------------------------------------------------------

    def rest(self) -> Rest:
        return Rest(self.http_url)

    async def ws(
        self,
        token: str,
        resume: list[dict[str, Any]] | None = None,
        *,
        origin: str | None = None,
    ) -> tuple[WsClient, dict[str, Any]]:
        """Connect, say hello, return the client and the ``welcome``."""
        client = await self.connect(origin=origin)
        frame: dict[str, Any] = {"type": "hello", "token": token}
        if resume is not None:
            frame["resume"] = resume
        await client.send(**frame)
        welcome = await client.recv()
        assert welcome["type"] == "welcome", welcome
        return client, welcome

    async def connect(self, *, origin: str | None = None) -> WsClient:
        """A connection that has not said hello yet."""
        conn = await asyncio.wait_for(
            connect(
                self.ws_url,
                origin=None if origin is None else Origin(origin),
                open_timeout=None,
                close_timeout=RECV_TIMEOUT,
            ),
            RECV_TIMEOUT,
        )
        return WsClient(conn)

    async def agent(self, agent_id: str, *, status: str = "online") -> WsClient:
        """An agent connection that has set its status (``online`` by default)."""
        client, welcome = await self.ws(token_of_agent(agent_id))
        assert (welcome["role"], welcome["id"]) == ("agent", agent_id), welcome
        await client.send(type="status", status=status)
        assert await client.recv("status") == {"type": "status", "status": status}
        return client


class Closed(Exception):
    """The server closed the connection while a frame was awaited."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"connection closed by the server: {code} {reason!r}")
        self.code = code
        self.reason = reason


class WsClient:
    """A ``websockets`` connection that speaks JSON frames; every wait is bounded.

    A reader task moves every frame into a queue as it arrives, so that waiting for a frame
    can be abandoned (a timeout, :func:`recv_any`) without losing one; the queue holds at most
    :data:`CLIENT_QUEUE` frames, then the reader waits and TCP pushes back on the server.
    """

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self._frames: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(CLIENT_QUEUE)
        self._reader = asyncio.ensure_future(self._read())
        self.arrived: asyncio.Event | None = None  # set on each frame while recv_any waits

    async def _read(self) -> None:
        try:
            async for raw in self.conn:
                await self._frames.put(json.loads(raw))
                if self.arrived is not None:
                    self.arrived.set()
        except ConnectionClosed:
            pass
        finally:
            await self._frames.put(None)  # end of the stream
            if self.arrived is not None:
                self.arrived.set()

    def close_code(self) -> tuple[int | None, str | None]:
        rcvd = self.conn.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)

    async def send(self, **frame: Any) -> None:
        await asyncio.wait_for(self.conn.send(json.dumps(frame)), RECV_TIMEOUT)

    async def send_raw(self, data: str | bytes) -> None:
        await asyncio.wait_for(self.conn.send(data), RECV_TIMEOUT)

    async def recv(self, kind: str | None = None, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        """The next frame; with ``kind``, the next frame of that type (others are dropped).

        ``presence`` frames (agents get one whenever any agent's load changes) are dropped
        unless asked for by name. Raises :class:`Closed` when the connection ends first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        dropped: deque[str] = deque(maxlen=20)
        while True:
            try:
                frame = await asyncio.wait_for(self._frames.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise AssertionError(
                    f"no {kind or 'frame'} within {timeout}s (dropped meanwhile: {list(dropped)})"
                ) from None
            if frame is None:
                self._frames.put_nowait(None)  # later calls see the end too
                raise Closed(*self.close_code())
            if frame["type"] == kind or (kind is None and frame["type"] != "presence"):
                return frame
            dropped.append(frame["type"])

    async def recv_until(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The next frame for which ``pred`` is true (others are dropped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECV_TIMEOUT
        dropped: deque[dict[str, Any]] = deque(maxlen=5)
        while True:
            try:
                frame = await self.recv(timeout=max(0.0, deadline - loop.time()))
            except AssertionError:
                raise AssertionError(
                    f"no awaited frame within {RECV_TIMEOUT}s (dropped meanwhile: {list(dropped)})"
                ) from None
            if pred(frame):
                return frame
            dropped.append(frame)

    async def recv_match(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The next frame of type ``kind`` whose ``fields`` have the given values."""
        return await self.recv_until(
            lambda f: f["type"] == kind and all(f.get(k) == v for k, v in fields.items())
        )

    async def say(self, conv: str, cid: str, text: str) -> dict[str, Any]:
        """Send one message and return its ``ack`` (frames before the ack are dropped)."""
        await self.send(type="send", conv=conv, client_msg_id=cid, text=text)
        ack = await self.recv_until(
            lambda f: f["type"] == "error" or (f["type"] == "ack" and f["client_msg_id"] == cid)
        )
        assert ack["type"] == "ack", ack
        return ack

    async def say_many(
        self, conv: str, prefix: str, count: int, *, window: int = 32
    ) -> dict[str, dict[str, Any]]:
        """Send ``count`` messages with at most ``window`` unacknowledged at a time (the
        server's inbox holds 64 commands per connection); returns ``client_msg_id -> ack``."""
        acks: dict[str, dict[str, Any]] = {}
        sent = 0
        while len(acks) < count:
            while sent < count and sent - len(acks) < window:
                await self.send(
                    type="send", conv=conv, client_msg_id=f"{prefix}{sent}", text=f"{prefix} {sent}"
                )
                sent += 1
            frame = await self.recv_until(lambda f: f["type"] in ("ack", "error"))
            assert frame["type"] == "ack", frame
            acks[frame["client_msg_id"]] = frame
        return acks

    async def replay(self, conv: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """After a ``hello`` with ``resume``: the ``msg`` frames of ``conv`` up to its
        ``resumed``, and that ``resumed``. Frames about other things (the state of the
        conversation, ``assigned`` or ``queued``, that a hello may bring) are skipped."""
        msgs: list[dict[str, Any]] = []
        while True:
            frame = await self.recv()
            if frame.get("conv") != conv:
                continue
            if frame["type"] == "resumed":
                return msgs, frame
            if frame["type"] == "msg":
                msgs.append(frame)
            else:
                assert frame["type"] in ("assigned", "queued"), frame

    async def until_pong(self) -> list[dict[str, Any]]:
        """Send ``ping``; the frames that came before the ``pong``."""
        await self.send(type="ping")
        before: list[dict[str, Any]] = []
        while (frame := await self.recv())["type"] != "pong":
            before.append(frame)
        return before

    async def ping(self) -> None:
        """Proof of life: a ``ping`` command answered by ``pong`` (other frames dropped)."""
        await self.send(type="ping")
        assert (await self.recv_until(lambda f: f["type"] in ("pong", "error")))["type"] == "pong"

    async def closed(self) -> tuple[int | None, str | None]:
        """Wait until the server closes the connection; ``(code, reason)`` of its close frame
        (``(None, None)`` when the connection ended without one). Frames still arriving are
        dropped."""

        async def drain() -> None:
            while await self._frames.get() is not None:
                pass
            self._frames.put_nowait(None)

        await asyncio.wait_for(drain(), RECV_TIMEOUT)
        await asyncio.wait_for(self.conn.wait_closed(), RECV_TIMEOUT)
        return self.close_code()

    async def close(self) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            await asyncio.wait_for(self.conn.close(), RECV_TIMEOUT)
        await asyncio.wait_for(asyncio.shield(self._reader), RECV_TIMEOUT)

    def drop(self) -> None:
        """Cut the TCP connection without a close handshake (a lost network)."""
        transport = self.conn.transport
        if transport is not None:
            transport.abort()


async def recv_any(
    clients: Sequence[WsClient], kind: str, timeout: float = RECV_TIMEOUT
) -> tuple[int, dict[str, Any]]:
    """The first frame of type ``kind`` on any of ``clients``: ``(index, frame)``.

    Other frames met on the way are dropped. One wait on an event every client's reader sets,
    rather than a task per client: nothing is cancelled, so nothing can be lost.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    arrived = asyncio.Event()
    for c in clients:
        c.arrived = arrived
    try:
        while True:
            arrived.clear()
            for i, c in enumerate(clients):
                while not c._frames.empty():
                    frame = c._frames.get_nowait()
                    if frame is None:
                        c._frames.put_nowait(None)
                        raise Closed(*c.close_code())
                    if frame["type"] == kind:
                        return i, frame
            try:
                async with asyncio.timeout_at(deadline):
                    await arrived.wait()
            except TimeoutError:
                raise AssertionError(f"no {kind} within {timeout}s on any client") from None
    finally:
        for c in clients:
            c.arrived = None


class Rest:
    """The REST API over one aiohttp session: ``async with server.rest() as api``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Rest:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=RECV_TIMEOUT))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """``(status, decoded JSON body)``; a body that is not JSON fails the test."""
        assert self._session is not None
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        async with self._session.request(
            method, self.base_url + path, data=data, headers=hdrs
        ) as resp:
            raw = await resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                raise AssertionError(
                    f"{method} {path}: {resp.status} not JSON: {raw[:300]!r}"
                ) from None

    async def create_chat(self, **body: Any) -> dict[str, Any]:
        status, out = await self.call("POST", "/v1/chat/create", body)
        assert status in (200, 201), (status, out)
        return dict(out)

    async def send(
        self, session_id: str, token: str, text: str, client_msg_id: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"session_id": session_id, "text": text}
        if client_msg_id is not None:
            body["client_msg_id"] = client_msg_id
        status, out = await self.call("POST", "/v1/chat/send", body, token=token)
        assert status == 200, (status, out)
        return dict(out)

    async def history(
        self, session_id: str, token: str, after: int = 0, limit: int = 50
    ) -> dict[str, Any]:
        status, out = await self.call(
            "GET", f"/v1/chat/{session_id}/messages?after={after}&limit={limit}", token=token
        )
        assert status == 200, (status, out)
        return dict(out)

    async def full_history(self, session_id: str, token: str) -> list[dict[str, Any]]:
        """Every message, paged 500 at a time (bounded: stops at 1,000 pages)."""
        out: list[dict[str, Any]] = []
        after = 0
        for _ in range(1_000):
            page = await self.history(session_id, token, after, 500)
            out += page["messages"]
            if not page["more"]:
                return out
            after = page["messages"][-1]["seq"]
        raise AssertionError("history did not end within 1,000 pages")


@contextlib.contextmanager
def running(workdir: Path, cfg: dict[str, Any]) -> Iterator[ServerProcess]:
    """A started server, ended on the way out whatever happened."""
    server = ServerProcess(workdir, cfg)
    try:
        server.start()
        yield server
    finally:
        server.close()
