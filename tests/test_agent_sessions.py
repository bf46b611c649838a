"""Agent session tokens (``kefu.node``, "Agent tokens"), in process: ``POST /v1/agent/login``
trades the agent's own token for a signed, expiring session token that works wherever the own
token does (REST and ``hello``); forged, tampered, expired and logged-out ones are refused
(REST 403, ``hello`` 1008) and the live connections of an ended session are closed; rotation,
disabling and deletion end every older session; logouts and ``not_before`` survive a restart;
the agent's own token keeps working throughout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from kefu.config import AgentConfig, BotConfig, Config, HttpConfig, WsConfig
from kefu.node import AGENT_REVOKED_MAX, Node
from kefu.protocol import AGENT_SESSION_TTL_S, MAX_AGENT_SESSION_TTL_S
from kefu.security import CLOCK_SKEW_S, TokenSigner
from tests import aio
from tests.test_http import serving as http_serving

TIMEOUT = 30.0
RECV_TIMEOUT = 5.0
ALICE_TOKEN = "alice-own-token"
ADMIN_TOKEN = "admin-token"


def make_config(data_dir: Path, alice_token: str = ALICE_TOKEN) -> Config:
    return Config(
        data_dir=str(data_dir),
        http=HttpConfig(host="127.0.0.1", port=0),
        ws=WsConfig(host="127.0.0.1", port=0),
        admin_token=ADMIN_TOKEN,
        agents=[AgentConfig(id="alice", name="Alice", token=alice_token, max_chats=5)],
        bot=BotConfig(enabled=False),
    )


class Harness:
    def __init__(self, node: Node, http: aiohttp.ClientSession) -> None:
        self.node = node
        self.http = http

    async def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        headers: dict[str, str] = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        async with self.http.request(method, path, data=data, headers=headers) as resp:
            raw = await resp.read()
            return resp.status, json.loads(raw) if raw else None

    async def login(self, token: str, **body: Any) -> dict[str, Any]:
        status, answer = await self.call("POST", "/v1/agent/login", body, token=token)
        assert status == 200, answer
        assert isinstance(answer, dict)
        return answer

    async def me_status(self, token: str) -> int:
        status, answer = await self.call("GET", "/v1/agent/me", token=token)
        if status == 200:
            assert answer["id"] in ("alice", "carol"), answer
        else:
            assert (status, answer["error"]["code"]) == (403, "forbidden"), answer
        return status

    async def ws(self, token: str) -> tuple[ClientConnection, dict[str, Any]]:
        """A connection that said ``hello`` with ``token``: (connection, welcome)."""
        ws = await connect(f"ws://127.0.0.1:{self.node.ws_port}/ws")
        await ws.send(json.dumps({"type": "hello", "token": token}))
        return ws, await recv(ws, "welcome")

    async def refused_hello(self, token: str) -> tuple[int | None, str]:
        """The close code and reason the server gives a ``hello`` with ``token``."""
        ws = await connect(f"ws://127.0.0.1:{self.node.ws_port}/ws")
        await ws.send(json.dumps({"type": "hello", "token": token}))
        with pytest.raises(ConnectionClosed):
            await recv(ws, "welcome")
        return ws.close_code, ws.close_reason or ""

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = await self.call(method, path, body, token=ADMIN_TOKEN)
        assert status in (200, 201, 204), answer
        return answer


async def recv(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next frame of type ``kind`` (others skipped)."""
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT))
        if frame["type"] == kind:
            return frame


async def closed_with(ws: ClientConnection) -> tuple[int | None, str]:
    with pytest.raises(ConnectionClosed):
        await recv(ws, "never")
    return ws.close_code, ws.close_reason or ""


async def still_open(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"type": "ping"}))
    await recv(ws, "pong")


@contextlib.asynccontextmanager
async def serving(data_dir: Path, alice_token: str = ALICE_TOKEN) -> AsyncIterator[Harness]:
    async with http_serving(data_dir, config=make_config(data_dir, alice_token)) as h:
        yield Harness(h.node, h.http)


def run(body: Any) -> None:
    aio.run(body, TIMEOUT)


# ---------------------------------------------------------------------------------------------


def test_login_gives_a_session_token_for_rest_and_ws(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            before = time.time()
            session = await h.login(ALICE_TOKEN)
            assert session["agent_id"] == "alice"
            token = session["token"]
            assert token.startswith("v1.") and ALICE_TOKEN not in token
            expected = (before + AGENT_SESSION_TTL_S) * 1000
            assert expected - 2_000 <= session["expires_ts"] <= expected + 2_000

            # REST: the agent operations, and the history of a conversation alice holds.
            status, me = await h.call("GET", "/v1/agent/me", token=token)
            assert (status, me["id"]) == (200, "alice")
            ws, welcome = await h.ws(token)
            assert (welcome["role"], welcome["id"]) == ("agent", "alice")
            await ws.send(json.dumps({"type": "status", "status": "online"}))
            assert (await recv(ws, "status"))["status"] == "online"
            status, chat = await h.call("POST", "/v1/chat/create", {})
            assert status == 201
            status, _ = await h.call(
                "POST",
                "/v1/chat/send",
                {"session_id": chat["session_id"], "text": "hello agent"},
                token=chat["token"],
            )
            assert status == 200
            assigned = await recv(ws, "assigned")
            assert assigned["conv"] == chat["session_id"]
            status, page = await h.call(
                "GET", f"/v1/chat/{chat['session_id']}/messages", token=token
            )
            assert status == 200 and [m["text"] for m in page["messages"]] == ["hello agent"]
            status, listed = await h.call("GET", "/v1/agent/conversations", token=token)
            assert status == 200
            assert [c["session_id"] for c in listed["conversations"]] == [chat["session_id"]]
            # The same frames on the session's connection as on one with the own token.
            await ws.send(
                json.dumps(
                    {
                        "type": "send",
                        "conv": chat["session_id"],
                        "client_msg_id": "s-1",
                        "text": "hi",
                    }
                )
            )
            assert (await recv(ws, "ack"))["seq"] == 2

            # The own token still works everywhere, next to the session.
            assert await h.me_status(ALICE_TOKEN) == 200
            own, welcome = await h.ws(ALICE_TOKEN)
            assert welcome["id"] == "alice"
            await still_open(ws)
            await own.close()
            await ws.close()

    run(body)


def test_login_rules(tmp_path: Path) -> None:
    """Who may log in and for how long: the own token only, ttl_s within its bounds, never
    past the own token's expiry; no body is the default."""

    async def body() -> None:
        async with serving(tmp_path) as h:
            session = await h.login(ALICE_TOKEN, ttl_s=600)
            assert abs(session["expires_ts"] - (time.time() + 600) * 1000) < 2_000
            async with h.http.post(
                "/v1/agent/login", headers={"Authorization": f"Bearer {ALICE_TOKEN}"}
            ) as resp:  # no body at all
                assert resp.status == 200
                default = await resp.json()
            assert abs(default["expires_ts"] - (time.time() + AGENT_SESSION_TTL_S) * 1000) < 2e3
            for ttl in (59, MAX_AGENT_SESSION_TTL_S + 1, "60", None):
                status, answer = await h.call(
                    "POST", "/v1/agent/login", {"ttl_s": ttl}, token=ALICE_TOKEN
                )
                if ttl is None:
                    assert status == 200, answer  # null: the default
                else:
                    assert (status, answer["error"]["code"]) == (400, "invalid"), (ttl, answer)
            # A session cannot open another one (else it could renew itself for ever); other
            # tokens prove nothing about an agent.
            for token in (session["token"], ADMIN_TOKEN, "nope"):
                status, answer = await h.call("POST", "/v1/agent/login", {}, token=token)
                assert (status, answer["error"]["code"]) == (403, "forbidden"), token
            status, answer = await h.call("POST", "/v1/agent/login", {})
            assert (status, answer["error"]["code"]) == (401, "unauthorized")
            # An agent whose own token expires in a day gets no session beyond that day.
            made = await h.admin(
                "POST", "/v1/admin/agents", {"id": "carol", "name": "C", "token_ttl_days": 1}
            )
            capped = await h.login(made["token"], ttl_s=MAX_AGENT_SESSION_TTL_S)
            assert capped["expires_ts"] <= made["token_expires_ts"]
            assert capped["expires_ts"] > (time.time() + 86_000) * 1000

    run(body)


def test_forged_tampered_and_expired_session_tokens_are_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            node = h.node
            good = (await h.login(ALICE_TOKEN))["token"]
            head, _, sig = good.rpartition(".")
            version, payload = head.split(".")
            issued = node.agent_login(ALICE_TOKEN, ttl_s=60, now=time.time() - 3_600)
            # Right key and claims but no `cred`: not obtained through a login.
            unbound = node.signer.issue("agent", "alice", 3_600)
            other = TokenSigner(b"another-signing-secret-0123456789")
            cred = {"cred": node.agent_session(good).extra["cred"]}  # type: ignore[union-attr]
            bad = {
                "forged": other.issue("agent", "alice", 3_600, extra=cred),
                "tampered signature": f"{head}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}",
                "tampered payload": f"{version}.{payload[:-2]}{'AA' if payload[-2:] != 'AA' else 'BB'}.{sig}",  # noqa: E501
                "expired": issued.token,
                "unbound": unbound,
                "wrong subject": node.signer.issue("agent", "nobody", 3_600, extra=cred),
                "visitor kind": node.signer.issue("visitor", "alice", 3_600, extra=cred),
            }
            for what, token in bad.items():
                assert node.agent_of_token(token) is None, what
                assert await h.me_status(token) == 403, what
                status, answer = await h.call("POST", "/v1/agent/logout", token=token)
                if what == "wrong subject":
                    # The node's own session token, of an agent that is no more: over already.
                    assert (status, answer) == (204, None)
                else:
                    assert (status, answer["error"]["code"]) == (403, "forbidden"), what
                code, _ = await h.refused_hello(token)
                assert code == 1008, what
            # Positive control: the same construction with the node's key and a fresh clock.
            fresh = node.agent_login(ALICE_TOKEN, ttl_s=60)
            assert await h.me_status(fresh.token) == 200

            # The clock: valid until exp + CLOCK_SKEW_S, refused from then on.
            claims = node.agent_session(fresh.token)
            assert claims is not None
            assert node.agent_session(fresh.token, now=claims.exp + CLOCK_SKEW_S - 1) is not None
            assert node.agent_session(fresh.token, now=claims.exp + CLOCK_SKEW_S) is None

    run(body)


def test_logout_revokes_at_once_and_closes_its_connections(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            first = (await h.login(ALICE_TOKEN))["token"]
            second = (await h.login(ALICE_TOKEN))["token"]
            a1, _ = await h.ws(first)
            a2, _ = await h.ws(first)
            b, _ = await h.ws(second)
            own, _ = await h.ws(ALICE_TOKEN)
            for ws in (a1, a2, b, own):
                await still_open(ws)  # past on_ready: the session connections are known

            status, answer = await h.call("POST", "/v1/agent/logout", token=first)
            assert (status, answer) == (204, None)
            assert await closed_with(a1) == (1008, "token revoked")
            assert await closed_with(a2) == (1008, "token revoked")
            assert await h.me_status(first) == 403
            assert (await h.refused_hello(first))[0] == 1008
            # Idempotent: a retry (the first answer lost) is answered the same, changes nothing.
            status, answer = await h.call("POST", "/v1/agent/logout", token=first)
            assert (status, answer) == (204, None)
            assert await h.me_status(first) == 403
            # The other session and the own token are untouched.
            await still_open(b)
            await still_open(own)
            assert await h.me_status(second) == 200
            # Logout takes a session token: the own token is ended by rotating it.
            status, answer = await h.call("POST", "/v1/agent/logout", token=ALICE_TOKEN)
            assert (status, answer["error"]["code"]) == (403, "forbidden")
            status, answer = await h.call("POST", "/v1/agent/logout")
            assert (status, answer["error"]["code"]) == (401, "unauthorized")
            assert await h.me_status(ALICE_TOKEN) == 200
            for ws in (b, own):
                await ws.close()

    run(body)


def test_too_many_revocations_end_every_session(tmp_path: Path) -> None:
    """Past AGENT_REVOKED_MAX revocations in force, a logout ends all the agent's sessions
    (more is ended, never less); a new login works."""

    async def body() -> None:
        async with serving(tmp_path) as h:
            node = h.node
            bystander = node.agent_login(ALICE_TOKEN).token
            for _ in range(AGENT_REVOKED_MAX):
                await node.agent_logout(node.agent_login(ALICE_TOKEN).token)
            assert node.agent_session(bystander) is not None
            await node.agent_logout(node.agent_login(ALICE_TOKEN).token)
            assert node.agent_session(bystander) is None
            # A login in the same second as the cut-off still gets a working token.
            assert await h.me_status((await h.login(ALICE_TOKEN))["token"]) == 200

    run(body)


def test_expired_session_connection_is_closed_by_housekeeping(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            session = await h.login(ALICE_TOKEN, ttl_s=60)
            ws, _ = await h.ws(session["token"])
            own, _ = await h.ws(ALICE_TOKEN)
            await still_open(ws)
            await still_open(own)
            ends_ms = session["expires_ts"] + CLOCK_SKEW_S * 1000
            h.node.housekeeping(ends_ms - 1_000)
            await still_open(ws)
            h.node.housekeeping(ends_ms)
            assert await closed_with(ws) == (1008, "token expired")
            await still_open(own)  # the own token has no expiry
            await own.close()

    run(body)


def test_rotation_disable_and_delete_end_every_older_session(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            made = await h.admin("POST", "/v1/admin/agents", {"id": "carol", "name": "Carol"})
            token = made["token"]

            # Rotation: the sessions of the old token end with it, connections closed.
            old = (await h.login(token))["token"]
            ws, _ = await h.ws(old)
            await still_open(ws)
            rotated = await h.admin("POST", "/v1/admin/agents/carol/token", {})
            assert await closed_with(ws) == (1008, "token revoked")
            assert await h.me_status(old) == 403
            token = rotated["token"]
            # Rotating to the very same token still ends the sessions (not_before).
            same = (await h.login(token))["token"]
            await h.admin("POST", "/v1/admin/agents/carol/token", {"token": token})
            assert await h.me_status(same) == 403

            # Disabling ends them for good: re-enabling brings none back.
            before_disable = (await h.login(token))["token"]
            ws, _ = await h.ws(before_disable)
            await still_open(ws)
            await h.admin("PATCH", "/v1/admin/agents/carol", {"disabled": True})
            assert await closed_with(ws) == (1008, "agent disabled")
            assert await h.me_status(before_disable) == 403
            status, _ = await h.call("POST", "/v1/agent/login", {}, token=token)
            assert status == 403  # a disabled agent opens no session
            await h.admin("PATCH", "/v1/admin/agents/carol", {"disabled": False})
            assert await h.me_status(before_disable) == 403
            assert await h.me_status(token) == 200
            after = (await h.login(token))["token"]
            assert await h.me_status(after) == 200

            # Deletion; a new agent of the same id, even with the same token, gets none back.
            await h.admin("DELETE", "/v1/admin/agents/carol")
            assert await h.me_status(after) == 403
            await h.admin(
                "POST", "/v1/admin/agents", {"id": "carol", "name": "Carol", "token": token}
            )
            assert await h.me_status(after) == 403
            assert await h.me_status((await h.login(token))["token"]) == 200

    run(body)


def test_restart_keeps_logouts_and_not_before(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            logged_out = (await h.login(ALICE_TOKEN))["token"]
            kept = (await h.login(ALICE_TOKEN))["token"]
            status, _ = await h.call("POST", "/v1/agent/logout", token=logged_out)
            assert status == 204
            made = await h.admin("POST", "/v1/admin/agents", {"id": "carol", "name": "Carol"})
            carol_old = (await h.login(made["token"]))["token"]
            await h.admin("PATCH", "/v1/admin/agents/carol", {"disabled": True})
            await h.admin("PATCH", "/v1/admin/agents/carol", {"disabled": False})
            carol_new = (await h.login(made["token"]))["token"]
            assert await h.me_status(carol_old) == 403

        async with serving(tmp_path) as h:
            assert await h.me_status(logged_out) == 403
            assert (await h.refused_hello(logged_out))[0] == 1008
            assert await h.me_status(carol_old) == 403
            # Sessions not ended survive (the signing secret is the store's).
            assert await h.me_status(kept) == 200
            assert await h.me_status(carol_new) == 200
            ws, welcome = await h.ws(kept)
            assert welcome["id"] == "alice"
            await ws.close()

        # The config file gives alice another token: the sessions of the old one end.
        async with serving(tmp_path, alice_token="alice-new-token") as h:
            assert await h.me_status(kept) == 403
            assert await h.me_status(carol_new) == 200
            assert await h.me_status((await h.login("alice-new-token"))["token"]) == 200

    run(body)
