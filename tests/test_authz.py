"""Authorization, end to end: every REST operation and every WS command against every kind of
caller, on a real ``kefu serve``.

Callers
-------
Each caller acts on a *target* conversation ``T`` (assigned to the agent alice):

=====================  ======================================================================
``none``               no ``Authorization`` header / a ``hello`` without a token
``garbage``            a string that is no token at all
``expired``            T's visitor token, signed with the node's key, expired a week ago
``forged``             a token for T of the right shape, signed with another key
``tampered``           T's own token with one character of the signature changed
``wrong_kind``         a token for T signed with the node's key, of kind ``agent``
``other_visitor``      the visitor of another conversation, with its valid token
``visitor``            T's own visitor
``visitor_resigned``   a token for T made here with the node's key: proves the test signs with
                       that key, so ``expired`` and ``wrong_kind`` fail for their own reason
``api_key``            the server-to-server key (acts as the visitor of any conversation)
``admin``              the admin token
``agent_holder``       alice, who holds T
``agent_other``        bob, who does not (T is assigned to alice)
``agent_closed``       alice on a closed conversation that was bob's
``agent_bot``          alice on a conversation the bot still owns (no agent may see it)
``agent_revoked``      the old token of an agent whose token was rotated
``agent_session``      a session token of alice (``POST /v1/agent/login``)
``agent_session_out``  a session token of alice after its ``POST /v1/agent/logout``
=====================  ======================================================================

The signing key of the node is fixed by writing the store's ``token_secret`` before the first
start (the node keeps the secret it finds), so the test can sign expired and wrong-kind tokens
with the node's own key.

REST
----
Which callers an operation admits is read from :data:`kefu.web.openapi.OPERATIONS` (its
``security``): the test iterates over that tuple, so an operation added without a request
case here fails. Every refusal must be 401 ``unauthorized`` (no credentials, with
``WWW-Authenticate: Bearer``) or 403 ``forbidden`` (credentials that do not grant it), in
PROTOCOL.md's error shape, with no message text of any conversation in the body, and nothing
written: T's history, alice's conversations and read marks, the agents, and the node's
conversation and message counts are the same before and after. Every admitted caller must get
the operation's success status (destructive operations run on a fresh target per caller), so
the matrix fails both ways.

WebSocket
---------
Every command (``send typing read sync accept transfer close status``) is sent pipelined after
a bad ``hello`` (each bad token kind, no token, an empty one) and as the first frame without
any ``hello``: the connection is closed with 1008 and no frame comes back. From an
authenticated connection that may not act on T the command is answered
``error {code: "forbidden"}`` (``ref`` naming the command), the connection stays usable, the
participants of T receive nothing, and T is unchanged. The same commands from the callers
allowed to send them succeed.

Identity
--------
With ``identity.required: true``: a ``user_id`` without ``user_hash``, with a wrong one, with
the hash of another user, or a ``user_hash`` without ``user_id`` is 401 and creates nothing;
the right hash (either case of hex) and an anonymous visitor are admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.exceptions import ConnectionClosed

from kefu.node import SECRET_META
from kefu.security import TokenSigner
from kefu.store import Store
from kefu.web.openapi import OPERATIONS
from tests.e2e.harness import (
    FAST_RATE,
    RECV_TIMEOUT,
    Closed,
    ServerProcess,
    WsClient,
    agent,
    config,
    run,
    token_of_agent,
)

pytestmark = pytest.mark.slow

SIGNING_SECRET = b"authz-suite-token-signing-secret-0123"
OTHER_SECRET = b"not-the-node-signing-secret-98765"
IDENTITY_SECRET = "authz-identity-secret-0123456789"
API_KEY = "authz-api-key-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789"  # tests.e2e.harness.config's
WEEK_S = 7 * 86_400

KB_TEXT = """\
entries:
  - id: shipping_fee
    questions: ["运费多少", "How much is shipping?"]
    answer: "满99元包邮 kb-answer-7f3a"
rules:
  - match: {keywords: ["vip"]}
    action: route
    group: vip
"""

CALLERS: tuple[str, ...] = (
    "none",
    "garbage",
    "expired",
    "forged",
    "tampered",
    "wrong_kind",
    "other_visitor",
    "visitor",
    "visitor_resigned",
    "api_key",
    "admin",
    "agent_holder",
    "agent_other",
    "agent_closed",
    "agent_bot",
    "agent_revoked",
    "agent_session",
    "agent_session_out",
)
#: Callers that carry a token which is not a valid credential of anybody.
BAD_TOKENS: tuple[str, ...] = (
    "garbage",
    "expired",
    "forged",
    "tampered",
    "wrong_kind",
    "agent_revoked",
    "agent_session_out",
)
AGENT_CALLERS = frozenset({"agent_holder", "agent_other", "agent_closed", "agent_bot"})
WS_COMMANDS: tuple[str, ...] = (
    "send",
    "typing",
    "read",
    "sync",
    "accept",
    "transfer",
    "close",
    "status",
)


# ---------------------------------------------------------------------------------------------
# The server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One node for the module; every test builds its own conversations on it."""
    workdir = tmp_path_factory.mktemp("authz")
    kb = workdir / "kb.yaml"
    kb.write_text(KB_TEXT, encoding="utf-8")
    cfg = config(
        [
            agent("alice", max_chats=100),
            agent("bob", max_chats=100),
            agent("carol", max_chats=100),
            agent("dave", groups=["vip"]),  # never connects: the vip queue stays waiting
        ],
        api_key=API_KEY,
        identity={"secret": IDENTITY_SECRET, "required": True},
        bot={"enabled": True, "kb": [str(kb)]},
        ws={"rate": FAST_RATE},
    )
    proc = ServerProcess(workdir, cfg)
    _seed_signing_secret(proc.data_dir)
    try:
        proc.start()
        yield proc
    finally:
        proc.close()


def _seed_signing_secret(data_dir: Path) -> None:
    """Write the token-signing secret the node will find at its first start."""

    async def write() -> None:
        store = Store.open(str(data_dir))
        try:
            await store.put_meta(SECRET_META, SIGNING_SECRET)
        finally:
            store.close()

    asyncio.run(write())


def _user_hash(user_id: str) -> str:
    return hmac.new(IDENTITY_SECRET.encode(), user_id.encode(), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------
# The world: conversations in every state, and the callers' credentials

#: Numbers for names (agents, client_msg_ids), unique across the module's tests: they share
#: one server.
_NUMBERS = itertools.count()


@dataclass
class Conv:
    id: str
    visitor_id: str
    token: str
    secret: str  # a text only this conversation holds


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class World:
    server: ServerProcess
    http: aiohttp.ClientSession
    agents: dict[str, WsClient] = field(default_factory=dict)
    convs: dict[str, Conv] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    revoked_token: str = ""
    session_token: str = ""  # alice's, renewed after each logout
    logged_out_token: str = ""
    counter: Iterator[int] = field(default_factory=lambda: _NUMBERS)

    # -- HTTP -------------------------------------------------------------------------------

    async def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> Reply:
        headers: dict[str, str] = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        async with self.http.request(
            method, self.server.http_url + path, data=data, headers=headers
        ) as resp:
            text = (await resp.read()).decode("utf-8", "replace")
            return Reply(resp.status, dict(resp.headers), text)

    async def ok(self, method: str, path: str, body: Any = None, *, token: str) -> Any:
        reply = await self.call(method, path, body, token=token)
        assert reply.status in (200, 201), (method, path, reply.status, reply.text)
        return reply.json()

    # -- conversations ----------------------------------------------------------------------

    async def create(self, first_text: str, *, user_id: str | None = None) -> Conv:
        """A conversation whose visitor said ``first_text`` (``human ...`` hands it off to
        the online agent; a KB question keeps it with the bot; ``vip`` queues it)."""
        n = next(self.counter)
        body: dict[str, Any] = {}
        if user_id is not None:
            body = {"user_id": user_id, "user_hash": _user_hash(user_id)}
        reply = await self.call("POST", "/v1/chat/create", body)
        assert reply.status == 201, reply.text
        out = reply.json()
        secret = f"secret-{n}-{out['session_id']}"
        conv = Conv(out["session_id"], out["visitor_id"], out["token"], secret)
        self.secrets.append(secret)
        await self.ok(
            "POST",
            "/v1/chat/send",
            {"session_id": conv.id, "text": f"{first_text} {secret}"},
            token=conv.token,
        )
        return conv

    async def handed_to(self, agent_id: str) -> Conv:
        """A new conversation assigned to ``agent_id`` (the only agent online)."""
        conv = await self.create("human please")
        await self.agents[agent_id].recv_match("assigned", conv=conv.id)
        return conv

    async def set_status(self, agent_id: str, status: str) -> None:
        client = self.agents[agent_id]
        await client.send(type="status", status=status)
        await client.recv_match("status", status=status)

    async def history(self, conv: Conv) -> list[dict[str, Any]]:
        page = await self.ok("GET", f"/v1/chat/{conv.id}/messages?limit=500", token=API_KEY)
        return list(page["messages"])

    async def snapshot(self, conv: Conv) -> dict[str, Any]:
        """What a refused call must not change."""
        stats = await self.ok("GET", "/v1/admin/stats", token=ADMIN_TOKEN)
        return {
            "history": await self.history(conv),
            "alice": await self.ok("GET", "/v1/agent/conversations", token=token_of_agent("alice")),
            "bob": await self.ok("GET", "/v1/agent/conversations", token=token_of_agent("bob")),
            "agents": await self.ok("GET", "/v1/admin/agents", token=ADMIN_TOKEN),
            "conversations": stats["conversations"],
            "messages_total": stats["messages_total"],
        }

    # -- callers ----------------------------------------------------------------------------

    def target_of(self, caller: str, target: Conv) -> Conv:
        """The conversation ``caller`` acts on: T, except for the callers of other states."""
        if caller == "agent_closed":
            return self.convs["closed"]
        if caller == "agent_bot":
            return self.convs["bot"]
        return target

    def token(self, caller: str, target: Conv) -> str | None:
        signer = TokenSigner(SIGNING_SECRET)
        claims = {"conv": target.id}
        if caller == "none":
            return None
        if caller == "garbage":
            return "garbage-token-0123456789"
        if caller == "expired":
            issued = time.time() - WEEK_S
            return signer.issue("visitor", target.visitor_id, 3_600, issued, extra=claims)
        if caller == "forged":
            other = TokenSigner(OTHER_SECRET)
            return other.issue("visitor", target.visitor_id, 3_600, extra=claims)
        if caller == "tampered":
            head, _, sig = target.token.rpartition(".")
            return f"{head}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"
        if caller == "wrong_kind":
            return signer.issue("agent", target.visitor_id, 3_600, extra=claims)
        if caller == "other_visitor":
            return self.convs["other"].token
        if caller == "visitor":
            return target.token
        if caller == "visitor_resigned":
            return signer.issue("visitor", target.visitor_id, 3_600, extra=claims)
        if caller == "api_key":
            return API_KEY
        if caller == "admin":
            return ADMIN_TOKEN
        if caller in ("agent_holder", "agent_closed", "agent_bot"):
            return token_of_agent("alice")
        if caller == "agent_other":
            return token_of_agent("bob")
        if caller == "agent_revoked":
            return self.revoked_token
        if caller == "agent_session":
            return self.session_token
        if caller == "agent_session_out":
            return self.logged_out_token
        raise AssertionError(f"unknown caller {caller}")


async def _build_world(server: ServerProcess, http: aiohttp.ClientSession) -> World:
    """alice holds T; bob holds ``other``'s conversation and a closed one; one conversation
    is still the bot's, one waits in the vip queue nobody serves. alice ends online, bob
    away, carol away: new handoffs go to alice."""
    world = World(server, http)
    for agent_id, status in (("alice", "online"), ("bob", "away"), ("carol", "away")):
        world.agents[agent_id] = await server.agent(agent_id, status=status)
    world.convs["target"] = await world.handed_to("alice")
    await world.agents["alice"].say(world.convs["target"].id, "a-1", "agent says hi")
    await world.set_status("alice", "away")
    await world.set_status("bob", "online")
    world.convs["other"] = await world.handed_to("bob")
    closed = world.convs["closed"] = await world.handed_to("bob")
    await world.agents["bob"].send(type="close", conv=closed.id)
    await world.agents["bob"].recv_match("closed", conv=closed.id)
    await world.set_status("bob", "away")
    world.convs["bot"] = await world.create("运费多少")  # answered by the KB: stays the bot's
    world.convs["queued"] = await world.create("vip")  # routed to the vip group: waits
    await world.set_status("alice", "online")
    world.revoked_token = await _revoked_agent_token(world)
    world.session_token = await _login(world, "alice")
    world.logged_out_token = await _login(world, "alice")
    out = await world.call("POST", "/v1/agent/logout", token=world.logged_out_token)
    assert out.status == 204, out.text
    for name, conv in world.convs.items():
        assert conv.secret in json.dumps(await world.history(conv), ensure_ascii=False), name
    return world


async def _login(world: World, agent_id: str) -> str:
    """A session token of ``agent_id`` (a config agent)."""
    session = await world.ok("POST", "/v1/agent/login", {}, token=token_of_agent(agent_id))
    assert session["agent_id"] == agent_id
    return str(session["token"])


async def _revoked_agent_token(world: World) -> str:
    """The first token of an agent made through the admin API, once rotated."""
    agent_id, token = await _fresh_agent(world)
    me = await world.ok("GET", "/v1/agent/me", token=token)
    assert me["id"] == agent_id  # it worked before the rotation
    await world.ok("POST", f"/v1/admin/agents/{agent_id}/token", {}, token=ADMIN_TOKEN)
    return token


def with_world(server: ServerProcess, body: Callable[[World], Awaitable[None]]) -> None:
    async def test() -> None:
        timeout = aiohttp.ClientTimeout(total=RECV_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            world = await _build_world(server, http)
            try:
                await body(world)
            finally:
                for client in world.agents.values():
                    await client.close()

    run(test, timeout=240)


# ---------------------------------------------------------------------------------------------
# REST: one request per operation


@dataclass(frozen=True)
class RestCase:
    """How to call one operation on target ``T``: ``(method, path, body)``, its success
    status, and whether a successful call consumes the target (then each admitted caller
    gets a fresh one)."""

    request: Callable[[Conv, str], tuple[str, str, Any]]  # (T, a fresh agent id) -> request
    ok: int = 200
    consumes: bool = False


def _get(path: str) -> Callable[[Conv, str], tuple[str, str, Any]]:
    return lambda t, a: ("GET", path.format(t=t.id, a=a), None)


REST_CASES: dict[str, RestCase] = {
    "createChat": RestCase(lambda t, a: ("POST", "/v1/chat/create", {}), ok=201),
    "sendMessage": RestCase(
        lambda t, a: ("POST", "/v1/chat/send", {"session_id": t.id, "text": "probe"})
    ),
    "closeChat": RestCase(
        lambda t, a: ("POST", "/v1/chat/close", {"session_id": t.id}), consumes=True
    ),
    "listMessages": RestCase(_get("/v1/chat/{t}/messages")),
    "getConfig": RestCase(_get("/v1/config")),
    "getHealth": RestCase(_get("/healthz")),
    "getMetrics": RestCase(_get("/metrics")),
    "getOpenApi": RestCase(_get("/openapi.json")),
    "listAgents": RestCase(_get("/v1/admin/agents")),
    "createAgent": RestCase(
        lambda t, a: ("POST", "/v1/admin/agents", {"id": a, "name": "Made"}), ok=201
    ),
    "getAgent": RestCase(_get("/v1/admin/agents/{a}")),
    "updateAgent": RestCase(
        lambda t, a: ("PATCH", f"/v1/admin/agents/{a}", {"name": "Renamed"}), consumes=True
    ),
    "deleteAgent": RestCase(
        lambda t, a: ("DELETE", f"/v1/admin/agents/{a}", None), ok=204, consumes=True
    ),
    "rotateAgentToken": RestCase(
        lambda t, a: ("POST", f"/v1/admin/agents/{a}/token", {}), consumes=True
    ),
    "adminCloseSession": RestCase(
        lambda t, a: ("POST", f"/v1/admin/sessions/{t.id}/close", None), consumes=True
    ),
    "sessionStats": RestCase(_get("/v1/admin/sessions/{t}/stats")),
    "kbSearch": RestCase(_get("/v1/admin/kb/search?q=%E8%BF%90%E8%B4%B9")),
    "kbReload": RestCase(lambda t, a: ("POST", "/v1/admin/kb/reload", None)),
    "adminStats": RestCase(_get("/v1/admin/stats")),
    "agentLogin": RestCase(lambda t, a: ("POST", "/v1/agent/login", {})),
    "agentLogout": RestCase(lambda t, a: ("POST", "/v1/agent/logout", None), ok=204),
    "agentMe": RestCase(_get("/v1/agent/me")),
    "agentConversations": RestCase(_get("/v1/agent/conversations")),
    "agentSessionStats": RestCase(_get("/v1/agent/sessions/{t}/stats")),
}

#: Operations that act on one conversation (a session in the path or the body).
_SESSION_BODIES = frozenset({"SendRequest", "CloseRequest"})


def _session_scoped(op: Any) -> bool:
    return "session" in op.parameters or op.body in _SESSION_BODIES


def admitted(op: Any) -> frozenset[str]:
    """The callers ``op``'s documented ``security`` admits (module doc)."""
    if not op.security:
        return frozenset(CALLERS)  # public
    schemes = {name for requirement in op.security for name in requirement}
    out: set[str] = set()
    if "visitorToken" in schemes:
        out |= {"visitor", "visitor_resigned"}
    if "apiKey" in schemes:
        out.add("api_key")
    if "adminToken" in schemes:
        out.add("admin")
    if "agentToken" in schemes:
        # An agent sees the conversations it holds; an agent-wide operation any agent may call.
        out |= {"agent_holder"} if _session_scoped(op) else AGENT_CALLERS
    if "agentSession" in schemes:
        out.add("agent_session")  # alice's: she holds T
        if op.operation_id == "agentLogout":
            out.add("agent_session_out")  # idempotent: a session logged out stays so, 204
    unknown = schemes - {"visitorToken", "apiKey", "adminToken", "agentToken", "agentSession"}
    assert not unknown, f"{op.operation_id}: no callers for security schemes {unknown}"
    return frozenset(out)


def test_every_rest_operation_has_a_case() -> None:
    """A new operation in the OpenAPI document needs its request here, or this fails."""
    documented = {op.operation_id for op in OPERATIONS}
    assert documented == set(REST_CASES), (
        f"missing: {sorted(documented - set(REST_CASES))}, "
        f"stale: {sorted(set(REST_CASES) - documented)}"
    )
    for op in OPERATIONS:
        allowed = admitted(op)
        # Refusals exist only where the document says the operation can refuse.
        if allowed != frozenset(CALLERS):
            assert {"401", "403"} <= set(op.errors), op.operation_id


def _check_refusal(reply: Reply, caller: str, secrets: list[str]) -> list[str]:
    """What is wrong with a refusal (empty: nothing)."""
    expected = (401, "unauthorized") if caller == "none" else (403, "forbidden")
    problems = []
    try:
        body = reply.json()
        got = (reply.status, body["error"]["code"])
        if set(body) != {"error"} or set(body["error"]) != {"code", "message"}:
            problems.append(f"not the error shape: {reply.text[:200]}")
    except (ValueError, KeyError, TypeError):
        got = (reply.status, reply.text[:100])
    if got != expected:
        problems.append(f"expected {expected}, got {got}")
    if reply.status == 401 and reply.headers.get("WWW-Authenticate") != "Bearer":
        problems.append("401 without WWW-Authenticate: Bearer")
    leaked = [s for s in secrets if s in reply.text]
    if leaked:
        problems.append(f"leaks {leaked}")
    return problems


async def _fresh_agent(world: World) -> tuple[str, str]:
    """An agent made through the admin API (those of the config file cannot change):
    ``(id, token)``."""
    agent_id = f"tmp{next(world.counter)}"
    body = {"id": agent_id, "name": "Temp"}
    made = await world.ok("POST", "/v1/admin/agents", body, token=ADMIN_TOKEN)
    return agent_id, made["token"]


async def _agent_for(world: World, op: Any) -> tuple[str, str | None]:
    """The agent an operation names: a fresh one for those with an agent in the path, else
    an id nobody has yet (``createAgent``); with its token when it has one."""
    if "agent" in op.parameters:
        return await _fresh_agent(world)
    return f"made{next(world.counter)}", None


async def _rest_matrix(world: World) -> list[str]:
    failures: list[str] = []
    for op in OPERATIONS:
        case = REST_CASES.get(op.operation_id)
        if case is None:
            failures.append(f"{op.operation_id}: no case in REST_CASES")
            continue
        allowed = admitted(op)
        # Refused callers first, on the shared target; then the admitted ones.
        for caller in sorted(set(CALLERS) - allowed):
            target = world.target_of(caller, world.convs["target"])
            agent_id, agent_token = await _agent_for(world, op)
            before = await world.snapshot(target)
            method, path, body = case.request(target, agent_id)
            reply = await world.call(method, path, body, token=world.token(caller, target))
            problems = _check_refusal(reply, caller, world.secrets)
            after = await world.snapshot(target)
            if after != before:
                changed = [k for k in before if before[k] != after[k]]
                problems.append(f"state changed: {changed}")
            if agent_token is not None:  # the agent named keeps its token
                me = await world.call("GET", "/v1/agent/me", token=agent_token)
                if me.status != 200:
                    problems.append(f"the agent's token stopped working: {me.status}")
            failures += [f"{op.operation_id} as {caller}: {p}" for p in problems]
        for caller in sorted(allowed):
            failures += await _admitted_call(world, op, case, caller)
    return failures


async def _admitted_call(world: World, op: Any, case: RestCase, caller: str) -> list[str]:
    target = world.convs["target"]
    if case.consumes and _session_scoped(op):
        target = await world.handed_to("alice")
    target = world.target_of(caller, target)
    agent_id, _ = await _agent_for(world, op)
    method, path, body = case.request(target, agent_id)
    reply = await world.call(method, path, body, token=world.token(caller, target))
    where = f"{op.operation_id} as {caller}"
    if reply.status != case.ok:
        return [f"{where}: expected {case.ok}, got {reply.status} {reply.text[:200]}"]
    if op.operation_id == "listMessages" and target.secret not in reply.text:
        return [f"{where}: the history does not hold the conversation's text"]
    if op.operation_id == "sendMessage":
        texts = [m["text"] for m in await world.history(target)]
        if texts[-1:] != ["probe"]:
            return [f"{where}: the message was not stored: {texts[-3:]}"]
    if op.operation_id == "agentLogout" and caller == "agent_session":
        # The session ended at once; the next operations get a new one.
        after = await world.call("GET", "/v1/agent/me", token=world.session_token)
        world.session_token = await _login(world, "alice")
        if after.status != 403:
            return [f"{where}: the session still works after its logout: {after.status}"]
    if op.operation_id == "agentLogin":
        session = reply.json()["token"]
        me = await world.call("GET", "/v1/agent/me", token=session)
        if me.status != 200:
            return [f"{where}: the session token does not work: {me.status}"]
    if not op.security:  # public: anyone reads it, so it must hold no conversation's text
        leaked = [s for s in world.secrets if s in reply.text]
        if leaked:
            return [f"{where}: a public answer leaks {leaked}"]
    return []


def test_rest_authorization_matrix(server: ServerProcess) -> None:
    async def body(world: World) -> None:
        failures = await _rest_matrix(world)
        assert not failures, "\n".join(failures)

    with_world(server, body)


# ---------------------------------------------------------------------------------------------
# REST: identity


def test_identity_required_refuses_wrong_user_hash(server: ServerProcess) -> None:
    async def body(world: World) -> None:
        secrets = world.secrets
        refused: list[tuple[str, dict[str, Any]]] = [
            ("no hash", {"user_id": "u-1"}),
            ("wrong hash", {"user_id": "u-1", "user_hash": "0" * 64}),
            ("another user's hash", {"user_id": "u-1", "user_hash": _user_hash("u-2")}),
            ("hash of a prefix", {"user_id": "u-10", "user_hash": _user_hash("u-1")}),
            ("not hex", {"user_id": "u-1", "user_hash": "nope"}),
            ("hash without user", {"user_hash": _user_hash("u-1")}),
            ("hash with a signature's key", {"user_id": "u-1", "user_hash": _sig_hash("u-1")}),
        ]
        for what, request in refused:
            before = await world.ok("GET", "/v1/admin/stats", token=ADMIN_TOKEN)
            reply = await world.call("POST", "/v1/chat/create", request)
            after = await world.ok("GET", "/v1/admin/stats", token=ADMIN_TOKEN)
            assert _check_refusal(reply, "none", secrets) == [], (what, reply.text)
            assert before["conversations"] == after["conversations"], what
        good = _user_hash("u-1")
        for what, request in [
            ("right hash", {"user_id": "u-1", "user_hash": good}),
            ("right hash, upper case", {"user_id": "u-1", "user_hash": good.upper()}),
            ("anonymous", {}),
        ]:
            reply = await world.call("POST", "/v1/chat/create", request)
            assert reply.status in (200, 201), (what, reply.status, reply.text)
            assert reply.json()["token"], what

    with_world(server, body)


def _sig_hash(user_id: str) -> str:
    """The user's HMAC under the token-signing secret instead of the identity secret."""
    return hmac.new(SIGNING_SECRET, user_id.encode(), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------
# WebSocket


def _command(name: str, conv: Conv, n: int) -> dict[str, Any]:
    frames: dict[str, dict[str, Any]] = {
        "send": {"conv": conv.id, "client_msg_id": f"intruder-{n}", "text": "intruder text"},
        "typing": {"conv": conv.id},
        "read": {"conv": conv.id, "seq": 1},
        "sync": {"conv": conv.id, "after": 0, "limit": 50},
        "accept": {"conv": conv.id},
        "transfer": {"conv": conv.id, "to_agent": "carol"},
        "close": {"conv": conv.id},
        "status": {"status": "online"},
    }
    return {"type": name, **frames[name]}


async def _expect_1008(client: WsClient, frames: list[dict[str, Any]]) -> str | None:
    """Send ``frames`` pipelined; None when the server closed with 1008 and sent nothing."""
    for frame in frames:
        with contextlib.suppress(ConnectionClosed):
            await client.send(**frame)
    try:
        got = await client.recv()
    except Closed as closed:
        if closed.code != 1008:
            return f"closed with {closed.code} {closed.reason!r}, not 1008"
        return None
    finally:
        await client.close()
    return f"answered {json.dumps(got)[:200]} instead of closing with 1008"


def _bad_hellos(world: World, target: Conv) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        "no token": {"type": "hello"},
        "empty token": {"type": "hello", "token": ""},
    }
    for caller in BAD_TOKENS:
        out[caller] = {"type": "hello", "token": world.token(caller, target)}
    return out


def test_ws_bad_hello_closes_1008_before_any_command(server: ServerProcess) -> None:
    async def body(world: World) -> None:
        target = world.convs["target"]
        failures: list[str] = []
        before = await world.snapshot(target)
        hellos = _bad_hellos(world, target)
        for command in WS_COMMANDS:
            frame = _command(command, target, next(world.counter))
            for what, hello in hellos.items():
                problem = await _expect_1008(await server.connect(), [hello, frame])
                if problem:
                    failures.append(f"{command} after hello with {what}: {problem}")
            problem = await _expect_1008(await server.connect(), [frame])
            if problem:
                failures.append(f"{command} without hello: {problem}")
        assert await world.snapshot(target) == before
        # Positive control: T's own token is welcomed, and so is one the test signs now with
        # the node's key (the expired one is refused for its age, not its signature).
        for token in (target.token, world.token("visitor_resigned", target)):
            assert token is not None
            client, welcome = await server.ws(token)
            assert (welcome["role"], welcome["id"]) == ("visitor", target.visitor_id)
            assert [c["conv"] for c in welcome["convs"]] == [target.id]
            await client.close()
        assert not failures, "\n".join(failures)

    with_world(server, body)


async def _intruders(world: World) -> dict[str, tuple[WsClient, Conv, tuple[str, ...]]]:
    """Authenticated connections that may not act on their target, with the commands each
    must be refused (a visitor's own conversation: only the agents' commands)."""
    target = world.convs["target"]
    other, _ = await world.server.ws(world.convs["other"].token)
    own, _ = await world.server.ws(target.token)
    bob = await world.server.agent("bob", status="away")
    alice2 = await world.server.agent("alice", status="online")
    for client in (other, own, bob, alice2):
        await client.until_pong()  # what a connection is told at its start (assigned, ...)
    conv_commands = tuple(c for c in WS_COMMANDS if c != "status")
    return {
        "other_visitor": (other, target, WS_COMMANDS),
        "visitor (agent commands)": (own, target, ("accept", "transfer", "status")),
        "agent_other": (bob, target, conv_commands),
        "agent_closed": (alice2, world.convs["closed"], conv_commands),
        "agent_bot": (alice2, world.convs["bot"], conv_commands),
    }


async def _resume_refused(world: World, target: Conv) -> list[str]:
    """``hello.resume`` naming T replays T's messages only to those who may see it: another
    visitor and another agent get ``error {forbidden, ref: hello}`` and no ``msg``."""
    epoch = (await world.ok("GET", f"/v1/chat/{target.id}/messages", token=API_KEY))["epoch"]
    resume = [{"conv": target.id, "epoch": epoch, "last_seq": 0}]
    failures = []
    for who, token in (
        ("other_visitor", world.convs["other"].token),
        ("agent_other", token_of_agent("bob")),
        ("agent_closed", token_of_agent("alice")),  # alice may not see the closed one
    ):
        conv = world.convs["closed"] if who == "agent_closed" else target
        point = [{**resume[0], "conv": conv.id}]
        client, _ = await world.server.ws(token, point)
        frames = await client.until_pong()
        errors = [f for f in frames if f["type"] == "error"]
        if [(f["code"], f.get("ref")) for f in errors] != [("forbidden", "hello")]:
            failures.append(f"resume as {who}: {errors}")
        leaked = [s for s in world.secrets if s in json.dumps(frames, ensure_ascii=False)]
        replayed = [f for f in frames if f["type"] in ("msg", "resumed") and f["conv"] == conv.id]
        if leaked or replayed:
            failures.append(f"resume as {who}: replayed {replayed[:2]} leaks {leaked}")
        await client.close()
    # Positive control: T's own visitor resuming from 0 gets T's messages.
    client, _ = await world.server.ws(target.token, resume)
    msgs, resumed = await client.replay(target.id)
    if target.secret not in json.dumps(msgs, ensure_ascii=False) or resumed["from_seq"] != 1:
        failures.append(f"resume as T's visitor: {resumed}, {len(msgs)} messages")
    await client.close()
    return failures


def test_ws_commands_refused_to_callers_who_may_not(server: ServerProcess) -> None:
    async def body(world: World) -> None:
        target = world.convs["target"]
        # Participants of T: they must hear nothing from the intruders.
        watcher, _ = await server.ws(target.token)
        holder = world.agents["alice"]
        await watcher.until_pong()
        await holder.until_pong()
        intruders = await _intruders(world)
        failures: list[str] = []
        for who, (client, conv, commands) in intruders.items():
            for command in commands:
                n = next(world.counter)
                frame = _command(command, conv, n)
                before = await world.snapshot(conv)
                await client.send(**frame)
                got = await client.recv()
                ref = frame["client_msg_id"] if command == "send" else command
                if (got.get("type"), got.get("code"), got.get("ref")) != (
                    "error",
                    "forbidden",
                    ref,
                ):
                    failures.append(f"{who} {command}: {json.dumps(got)[:200]}")
                leaked = [s for s in world.secrets if s in json.dumps(got, ensure_ascii=False)]
                if leaked:
                    failures.append(f"{who} {command}: leaks {leaked}")
                if await world.snapshot(conv) != before:
                    failures.append(f"{who} {command}: state changed")
                if await client.until_pong():  # still usable, and nothing else came
                    failures.append(f"{who} {command}: more frames after the error")
        failures += await _resume_refused(world, target)
        heard = await watcher.until_pong() + await holder.until_pong()
        assert heard == [], heard
        for client, _, _ in intruders.values():
            await client.close()
        await watcher.close()
        assert not failures, "\n".join(failures)

    with_world(server, body)


def test_ws_commands_allowed_to_their_callers(server: ServerProcess) -> None:
    """The positive side of the matrix: each command from a caller it is meant for."""

    async def body(world: World) -> None:
        target = world.convs["target"]
        alice = world.agents["alice"]
        visitor, _ = await server.ws(target.token)
        # The visitor: send, typing, read, sync on its own conversation.
        ack = await visitor.say(target.id, "v-ok-1", "visitor text")
        assert (await alice.recv_match("msg", conv=target.id, seq=ack["seq"]))["text"] == (
            "visitor text"
        )
        await visitor.send(type="typing", conv=target.id)
        relay = await alice.recv_match("typing", conv=target.id)
        assert relay["from"]["id"] == target.visitor_id
        await visitor.send(type="read", conv=target.id, seq=ack["seq"])
        assert (await alice.recv_match("read", conv=target.id))["seq"] == ack["seq"]
        await visitor.send(type="sync", conv=target.id, after=0, limit=50)
        history = await visitor.recv("history")
        assert target.secret in json.dumps(history, ensure_ascii=False)
        # The agent holding it: send, typing, read, sync.
        ack = await alice.say(target.id, "a-ok-1", "agent text")
        assert (await visitor.recv_match("msg", seq=ack["seq"]))["text"] == "agent text"
        await alice.send(type="typing", conv=target.id)
        assert (await visitor.recv_match("typing", conv=target.id))["from"]["id"] == "alice"
        await alice.send(type="read", conv=target.id, seq=ack["seq"])
        assert (await visitor.recv_match("read", conv=target.id))["from"]["id"] == "alice"
        await alice.send(type="sync", conv=target.id, after=0, limit=50)
        assert target.secret in json.dumps(await alice.recv("history"), ensure_ascii=False)
        await alice.send(type="status", status="online")
        assert (await alice.recv("status"))["status"] == "online"
        # accept: the vip conversation waits in the queue; an online agent may take it.
        queued = world.convs["queued"]
        await alice.send(type="accept", conv=queued.id)
        assert (await alice.recv_match("assigned", conv=queued.id))["agent"]["id"] == "alice"
        # transfer: alice hands a fresh conversation to bob (online for the moment).
        moved = await world.handed_to("alice")
        await world.set_status("bob", "online")
        await alice.send(type="transfer", conv=moved.id, to_agent="bob")
        assert (await alice.recv_match("transferred", conv=moved.id))["to"] == "bob"
        await world.agents["bob"].recv_match("assigned", conv=moved.id)
        await world.set_status("bob", "away")
        # close: the holder closes one, a visitor its own.
        for closer in ("agent", "visitor"):
            conv = await world.handed_to("alice")
            client = alice if closer == "agent" else (await server.ws(conv.token))[0]
            await client.send(type="close", conv=conv.id)
            closed = await client.recv_match("closed", conv=conv.id)
            assert closed["by"] == closer, closed
            if client is not alice:
                await client.close()
        await visitor.close()

    with_world(server, body)


def test_refusals_do_not_tell_which_conversations_exist(server: ServerProcess) -> None:
    """A caller that may not see T gets the same answer for T as for an id nobody has: the
    refusal is no oracle for which conversations exist (REST for the visitor-side callers,
    WS for visitors and agents alike)."""

    async def body(world: World) -> None:
        target = world.convs["target"]
        ghost = Conv("0123456789abcdef", target.visitor_id, target.token, "")
        assert (
            await world.call("GET", "/v1/admin/sessions/0123456789abcdef/stats", token=ADMIN_TOKEN)
        ).status == 404  # nobody has it
        requests = {
            "listMessages": lambda c: ("GET", f"/v1/chat/{c.id}/messages", None),
            "sendMessage": lambda c: ("POST", "/v1/chat/send", {"session_id": c.id, "text": "x"}),
            "closeChat": lambda c: ("POST", "/v1/chat/close", {"session_id": c.id}),
        }
        for caller in ("other_visitor", "garbage", "forged", "expired"):
            for name, request in requests.items():
                token = world.token(caller, target)
                answers = []
                for conv in (target, ghost):
                    reply = await world.call(*request(conv), token=token)
                    answers.append((reply.status, reply.text))
                assert answers[0] == answers[1], (caller, name, answers)
                assert answers[0][0] == 403, (caller, name, answers)
        other, _ = await server.ws(world.convs["other"].token)
        bob = await server.agent("bob", status="away")
        for who, client in (("other_visitor", other), ("agent_other", bob)):
            await client.until_pong()
            for command in WS_COMMANDS[:-1]:  # every command that names a conversation
                answers = []
                for conv in (target, ghost):
                    frame = _command(command, conv, 0)
                    await client.send(**frame)
                    answers.append(await client.recv())
                assert answers[0] == answers[1], (who, command, answers)
                assert answers[0]["code"] == "forbidden", (who, command, answers)
            await client.close()

    with_world(server, body)
