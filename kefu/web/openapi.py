"""The OpenAPI 3.1 description of the REST API (``GET /openapi.json``).

The schemas are not written by hand: they come from the msgspec Structs of
:mod:`kefu.protocol` (``msgspec.json.schema_components(REST_BODIES)``), the same types the
server decodes and encodes with, so the document cannot drift from the wire. This module adds
what the Structs do not say: the operations, their parameters with their limits, the security
schemes, and every status each operation can answer, error statuses included (each with
:class:`~kefu.protocol.ErrorBody`). A test walks the aiohttp router and compares it with
:data:`OPERATIONS`, so a route added without a description here fails.

OpenAPI 3.1 schemas are JSON Schema 2020-12, which is msgspec's dialect; the patterns (with
``$(?!\\n)``, see :data:`kefu.protocol.PATTERN_END`) mean the same in ECMAScript regexes.

The document is built once, on first use, and kept encoded (:func:`openapi_json`): it depends
only on the code, not on the configuration (no ``servers`` entry; a client uses the address it
fetched the document from).
"""

from __future__ import annotations

import functools
from typing import Any, Final

import msgspec

from kefu._version import __version__
from kefu.protocol import (
    AGENT_ID_PATTERN,
    CONV_ID_PATTERN,
    DEFAULT_SYNC_LIMIT,
    MAX_SEQ,
    MAX_SYNC_LIMIT,
    PROTOCOL_VERSION,
    REST_BODIES,
    Delta,
    encode_json,
)

__all__ = ["OPERATIONS", "openapi_document", "openapi_json"]

_REF: Final = "#/components/schemas/{name}"

#: Why each error status is answered, for the descriptions of the responses.
_ERROR_WORDS: Final[dict[str, str]] = {
    "400": "The body is not a JSON object (`bad_request`), or a field or query parameter is "
    "missing, mistyped or out of its limits (`invalid`, the message names it).",
    "401": "No `Authorization: Bearer` token (`unauthorized`).",
    "403": "The token does not grant this operation (`forbidden`).",
    "404": "No such session or agent, or no knowledge base (`not_found`, `unknown_agent`).",
    "409": "The request contradicts the state (`conflict`, `conversation_closed`, ...).",
    "413": "The body is larger than 1 MiB (`payload_too_large`).",
    "415": "The body is not `application/json` in UTF-8 (`unsupported_media_type`).",
    "429": "Over a rate limit of this client address or visitor (`rate_limited`); retry after "
    "`Retry-After` seconds, the time until the limit lets a call through again.",
    "422": "The knowledge-base files do not load (`invalid_kb`, the message names the file "
    "and line); the version in service stays.",
    "500": "A server fault (`internal`); the details are in the server's log.",
    "503": "The store is busy or unavailable, or a queue is full (`busy`, `unavailable`, "
    "`queue_full`, `too_many_conversations`); retry after `Retry-After` seconds.",
}

# Status sets shared by the operations.
_BODY_ERRORS: Final = ("400", "413", "415")
_CHAT_AUTH: Final = ("401", "403")
_ALWAYS: Final = ("500",)
_STORE: Final = ("503",)

_Security = list[dict[str, list[str]]]
_VISITOR_OR_KEY: Final[_Security] = [{"visitorToken": []}, {"apiKey": []}]
_ADMIN: Final[_Security] = [{"adminToken": []}]
_AGENT_OWN: Final[_Security] = [{"agentToken": []}]
_AGENT_SESSION: Final[_Security] = [{"agentSession": []}]
#: Wherever an agent's token is taken, one of its session tokens is too.
_AGENT: Final[_Security] = [*_AGENT_OWN, *_AGENT_SESSION]
_PUBLIC: Final[_Security] = []


def _schema(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _json_content(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _schema(name)}}


def _send_event() -> dict[str, Any]:
    """One event of ``send``'s ``text/event-stream`` answer.

    OpenAPI 3.1 has no ``itemSchema`` (3.2 does): for an event stream the ``schema`` describes
    each event, as a JSON object of the event's fields (``event``, ``data``), which is how
    tools that check the stream (schemathesis) read it.
    """
    return {
        "type": "object",
        "description": "`delta` events while a reply is generated (data: the Delta frame's "
        "JSON), `msg` once per reply (data: the Msg frame's JSON), then `done` (data: the "
        "SendResponse JSON).",
        "properties": {
            "event": {"enum": ["delta", "msg", "done"]},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {
                    "anyOf": [_schema("Delta"), _schema("Msg"), _schema("SendResponse")]
                },
            },
        },
        "required": ["event", "data"],
    }


def _session_path() -> dict[str, Any]:
    return {
        "name": "session_id",
        "in": "path",
        "required": True,
        "description": "The conversation: 16 lowercase hex digits.",
        "schema": {"type": "string", "pattern": CONV_ID_PATTERN, "minLength": 16, "maxLength": 16},
    }


def _agent_path() -> dict[str, Any]:
    return {
        "name": "agent_id",
        "in": "path",
        "required": True,
        "description": "The agent's id.",
        "schema": {"type": "string", "pattern": AGENT_ID_PATTERN, "minLength": 1, "maxLength": 64},
    }


def _history_query() -> list[dict[str, Any]]:
    return [
        {
            "name": "after",
            "in": "query",
            "required": False,
            "description": "Messages with a seq above this one.",
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ, "default": 0},
        },
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": f"At most this many messages (1 to {MAX_SYNC_LIMIT}).",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_SYNC_LIMIT,
                "default": DEFAULT_SYNC_LIMIT,
            },
        },
    ]


def _kb_query() -> list[dict[str, Any]]:
    return [
        {
            "name": "q",
            "in": "query",
            "required": True,
            "description": "The text to match (a visitor's question).",
            "schema": {"type": "string", "minLength": 1, "maxLength": 1000},
        },
        {
            "name": "k",
            "in": "query",
            "required": False,
            "description": "At most this many hits (1 to 50).",
            "schema": {"type": "integer", "minimum": 1, "maximum": 50, "default": 5},
        },
    ]


class _Op(msgspec.Struct, frozen=True, kw_only=True):
    """One operation: what the document says about ``method path``."""

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    security: _Security
    # status -> (description, {media type: schema}) for the success answers
    ok: dict[str, tuple[str, dict[str, Any] | None]]
    errors: tuple[str, ...] = ()
    body: str | None = None
    body_required: bool = True
    parameters: tuple[str, ...] = ()  # "session", "agent", "history"


OPERATIONS: Final[tuple[_Op, ...]] = (
    _Op(
        method="post",
        path="/v1/chat/create",
        operation_id="createChat",
        summary="Start a conversation, or get back the user's open one",
        tag="chat",
        security=_PUBLIC,
        body="CreateChatRequest",
        ok={
            "201": ("A new conversation.", _json_content("CreateChatResponse")),
            "200": ("The user's open conversation.", _json_content("CreateChatResponse")),
        },
        errors=(*_BODY_ERRORS, "401", "429", *_ALWAYS, *_STORE),
    ),
    _Op(
        method="post",
        path="/v1/chat/send",
        operation_id="sendMessage",
        summary="Post a visitor message; answered once it is durable",
        tag="chat",
        security=_VISITOR_OR_KEY,
        body="SendRequest",
        ok={
            "200": (
                "Stored. With `stream: true` the answer is `text/event-stream`: one `msg` event "
                "per reply, then a `done` event carrying the SendResponse JSON.",
                {
                    **_json_content("SendResponse"),
                    "text/event-stream": {"schema": _send_event()},
                },
            )
        },
        errors=(*_BODY_ERRORS, *_CHAT_AUTH, "404", "409", "429", *_ALWAYS, *_STORE),
    ),
    _Op(
        method="post",
        path="/v1/chat/close",
        operation_id="closeChat",
        summary="Close a conversation (idempotent)",
        tag="chat",
        security=_VISITOR_OR_KEY,
        body="CloseRequest",
        ok={"200": ("Closed (or already closed).", _json_content("CloseResponse"))},
        errors=(*_BODY_ERRORS, *_CHAT_AUTH, "404", *_ALWAYS, *_STORE),
    ),
    _Op(
        method="get",
        path="/v1/chat/{session_id}/messages",
        operation_id="listMessages",
        summary="A page of a conversation's messages, oldest first",
        tag="chat",
        security=[*_VISITOR_OR_KEY, *_AGENT, *_ADMIN],
        parameters=("session", "history"),
        ok={
            "200": ("The page; `more` when later messages exist.", _json_content("HistoryResponse"))
        },
        errors=("400", *_CHAT_AUTH, "404", *_ALWAYS, *_STORE),
    ),
    _Op(
        method="get",
        path="/v1/config",
        operation_id="getConfig",
        summary="Public settings for the widget",
        tag="public",
        security=_PUBLIC,
        ok={"200": ("The settings.", _json_content("PublicConfig"))},
        errors=_ALWAYS,
    ),
    _Op(
        method="get",
        path="/healthz",
        operation_id="getHealth",
        summary="Whether the node takes work",
        tag="public",
        security=_PUBLIC,
        ok={
            "200": ("Healthy.", _json_content("Health")),
            "503": ("Unhealthy: `checks` names the part at fault.", _json_content("Health")),
        },
        errors=_ALWAYS,
    ),
    _Op(
        method="get",
        path="/metrics",
        operation_id="getMetrics",
        summary="Prometheus metrics (text exposition format 0.0.4)",
        tag="public",
        security=_PUBLIC,
        ok={"200": ("The metrics.", {"text/plain": {"schema": {"type": "string"}}})},
        errors=_ALWAYS,
    ),
    _Op(
        method="get",
        path="/openapi.json",
        operation_id="getOpenApi",
        summary="This document",
        tag="public",
        security=_PUBLIC,
        ok={"200": ("The OpenAPI document.", {"application/json": {"schema": {"type": "object"}}})},
        errors=_ALWAYS,
    ),
    _Op(
        method="get",
        path="/v1/admin/agents",
        operation_id="listAgents",
        summary="Every agent",
        tag="admin",
        security=_ADMIN,
        ok={"200": ("The agents.", _json_content("AgentList"))},
        errors=(*_CHAT_AUTH, *_ALWAYS),
    ),
    _Op(
        method="post",
        path="/v1/admin/agents",
        operation_id="createAgent",
        summary="Create an agent; its token is shown in this answer only",
        tag="admin",
        security=_ADMIN,
        body="AgentCreate",
        ok={"201": ("Created.", _json_content("AgentCreated"))},
        errors=(*_BODY_ERRORS, *_CHAT_AUTH, "409", *_ALWAYS, *_STORE),
    ),
    _Op(
        method="get",
        path="/v1/admin/agents/{agent_id}",
        operation_id="getAgent",
        summary="One agent",
        tag="admin",
        security=_ADMIN,
        parameters=("agent",),
        ok={"200": ("The agent.", _json_content("AgentView"))},
        errors=(*_CHAT_AUTH, "404", *_ALWAYS),
    ),
    _Op(
        method="patch",
        path="/v1/admin/agents/{agent_id}",
        operation_id="updateAgent",
        summary="Change an agent (name, weight, max_chats, groups, disabled)",
        tag="admin",
        security=_ADMIN,
        body="AgentUpdate",
        parameters=("agent",),
        ok={"200": ("The agent as changed.", _json_content("AgentView"))},
        errors=(*_BODY_ERRORS, *_CHAT_AUTH, "404", "409", *_ALWAYS, *_STORE),
    ),
    _Op(
        method="delete",
        path="/v1/admin/agents/{agent_id}",
        operation_id="deleteAgent",
        summary="Delete an agent; its conversations go back to the queue",
        tag="admin",
        security=_ADMIN,
        parameters=("agent",),
        ok={"204": ("Deleted.", None)},
        errors=(*_CHAT_AUTH, "404", "409", *_ALWAYS, *_STORE),
    ),
    _Op(
        method="post",
        path="/v1/admin/agents/{agent_id}/token",
        operation_id="rotateAgentToken",
        summary="Give an agent a new token; the old one stops working and its connections close",
        tag="admin",
        security=_ADMIN,
        body="AgentTokenRequest",
        parameters=("agent",),
        ok={"200": ("The new token, shown in this answer only.", _json_content("AgentToken"))},
        errors=(*_BODY_ERRORS, *_CHAT_AUTH, "404", "409", *_ALWAYS, *_STORE),
    ),
    _Op(
        method="post",
        path="/v1/admin/sessions/{session_id}/close",
        operation_id="adminCloseSession",
        summary="Close a conversation as the administrator (idempotent)",
        tag="admin",
        security=_ADMIN,
        parameters=("session",),
        ok={"200": ("Closed (or already closed).", _json_content("CloseResponse"))},
        errors=(*_CHAT_AUTH, "404", *_ALWAYS, *_STORE),
    ),
    _Op(
        method="get",
        path="/v1/admin/sessions/{session_id}/stats",
        operation_id="sessionStats",
        summary="CPU time spent on a conversation and the memory it holds",
        tag="admin",
        security=_ADMIN,
        parameters=("session",),
        ok={"200": ("The conversation's resources.", _json_content("SessionStats"))},
        errors=(*_CHAT_AUTH, "404", *_ALWAYS),
    ),
    _Op(
        method="get",
        path="/v1/admin/kb/search",
        operation_id="kbSearch",
        summary="The knowledge-base entries that best match a text, best first, scores in [0, 1]",
        tag="admin",
        security=_ADMIN,
        parameters=("kb_query",),
        ok={"200": ("The hits and the knowledge-base version.", _json_content("KbSearchResponse"))},
        errors=("400", *_CHAT_AUTH, "404", *_ALWAYS),
    ),
    _Op(
        method="post",
        path="/v1/admin/kb/reload",
        operation_id="kbReload",
        summary="Rebuild the knowledge base from its files now",
        tag="admin",
        security=_ADMIN,
        ok={"200": ("The new version.", _json_content("KbReloadResponse"))},
        errors=(*_CHAT_AUTH, "404", "422", *_ALWAYS),
    ),
    _Op(
        method="get",
        path="/v1/admin/stats",
        operation_id="adminStats",
        summary="Live figures: connections, conversations, queue, messages, cache, KB version",
        tag="admin",
        security=_ADMIN,
        ok={
            "200": (
                "The figures now (in a cluster, summed over its nodes).",
                _json_content("AdminStats"),
            )
        },
        errors=(*_CHAT_AUTH, *_ALWAYS),
    ),
    _Op(
        method="post",
        path="/v1/agent/login",
        operation_id="agentLogin",
        summary="Trade the agent's own token for a signed, expiring session token",
        tag="agent",
        security=_AGENT_OWN,
        body="AgentLoginRequest",
        body_required=False,
        ok={
            "200": (
                "A session token for every agent operation and the WebSocket `hello`, until "
                "`expires_ts` or its logout; the agent's own token is needed to log in "
                "(a session token is refused: it cannot extend itself).",
                _json_content("AgentSession"),
            )
        },
        errors=(*_BODY_ERRORS, *_CHAT_AUTH, *_ALWAYS),
    ),
    _Op(
        method="post",
        path="/v1/agent/logout",
        operation_id="agentLogout",
        summary="End the calling session token now; its connections are closed (1008)",
        tag="agent",
        security=_AGENT_SESSION,
        ok={"204": ("Ended (durably: a restart does not bring it back).", None)},
        errors=(*_CHAT_AUTH, *_ALWAYS, *_STORE),
    ),
    _Op(
        method="get",
        path="/v1/agent/me",
        operation_id="agentMe",
        summary="The calling agent, and the quick replies of the workbench",
        tag="agent",
        security=_AGENT,
        ok={"200": ("The agent.", _json_content("AgentMe"))},
        errors=(*_CHAT_AUTH, *_ALWAYS),
    ),
    _Op(
        method="get",
        path="/v1/agent/conversations",
        operation_id="agentConversations",
        summary="The calling agent's open conversations with read marks, and the waiting queue",
        tag="agent",
        security=_AGENT,
        ok={"200": ("Conversations and queue.", _json_content("AgentConversations"))},
        errors=(*_CHAT_AUTH, *_ALWAYS),
    ),
    _Op(
        method="get",
        path="/v1/agent/sessions/{session_id}/stats",
        operation_id="agentSessionStats",
        summary="CPU time and memory of a conversation the calling agent may see",
        tag="agent",
        security=_AGENT,
        parameters=("session",),
        ok={"200": ("The conversation's resources.", _json_content("SessionStats"))},
        errors=(*_CHAT_AUTH, "404", *_ALWAYS),
    ),
)


def _operation(op: _Op) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, (description, content) in op.ok.items():
        entry: dict[str, Any] = {"description": description}
        if content is not None:
            entry["content"] = content
        responses[status] = entry
    for status in op.errors:
        if status in responses:
            continue
        entry = {"description": _ERROR_WORDS[status], "content": _json_content("ErrorBody")}
        if status == "401":
            entry["headers"] = {
                "WWW-Authenticate": {
                    "description": "`Bearer`",
                    "schema": {"type": "string"},
                }
            }
        elif status in ("429", "503"):
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        responses[status] = entry
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "security": [dict(s) for s in op.security],
        "responses": dict(sorted(responses.items())),
    }
    parameters: list[dict[str, Any]] = []
    for kind in op.parameters:
        if kind == "session":
            parameters.append(_session_path())
        elif kind == "agent":
            parameters.append(_agent_path())
        elif kind == "kb_query":
            parameters += _kb_query()
        else:
            parameters += _history_query()
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": _schema(op.body)}},
        }
    return out


def openapi_document() -> dict[str, Any]:
    """The whole document as plain data (a new dict each call; :func:`openapi_json` caches)."""
    # Delta: the data of the event stream's `delta` events (_send_event).
    _, schemas = msgspec.json.schema_components((*REST_BODIES, Delta), ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    bearer = {"type": "http", "scheme": "bearer"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kefu REST API",
            "version": __version__,
            "description": f"Wire protocol v{PROTOCOL_VERSION}. Errors are always "
            '`{"error": {"code", "message"}}` (ErrorBody) with a 4xx or 5xx status.',
        },
        "tags": [
            {"name": "chat", "description": "Conversations, as a visitor or with the API key."},
            {"name": "public", "description": "Open to anyone."},
            {"name": "admin", "description": "Needs the admin token."},
            {"name": "agent", "description": "Needs an agent's token (the workbench)."},
        ],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "visitorToken": {
                    **bearer,
                    "description": "The visitor token from `POST /v1/chat/create`; it acts "
                    "on its own conversation only.",
                },
                "apiKey": {
                    **bearer,
                    "description": "The server-to-server API key (`api_key`), acting as the "
                    "visitor of any conversation.",
                },
                "adminToken": {**bearer, "description": "The admin token (`admin_token`)."},
                "agentToken": {
                    **bearer,
                    "description": "An agent's token: the agent's own conversations, the "
                    "queued ones, and its own profile.",
                },
                "agentSession": {
                    **bearer,
                    "description": "A session token from `POST /v1/agent/login` (signed, "
                    "expiring, revocable with `POST /v1/agent/logout`): what the agent's "
                    "token grants, except opening another session.",
                },
            },
        },
    }


@functools.cache
def openapi_json() -> bytes:
    """The document encoded once (it depends only on the code)."""
    return encode_json(openapi_document())
