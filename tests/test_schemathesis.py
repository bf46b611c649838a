"""The REST API against its own OpenAPI document: schemathesis, every check, every operation.

A real ``kefu serve`` (bot on, with the sample knowledge base, so that the knowledge-base
operations answer) is driven by schemathesis's engine, the one behind ``schemathesis run``,
through its Python API: every phase (examples, coverage, fuzzing, stateful) and every check
(``not_a_server_error``, status code, content type, response schema and headers conformance,
positive data acceptance, negative data rejection, use after free, resource availability,
ignored auth, missing required header, unsupported method, ``Allow`` header ...). Each security
scheme gets its credential: the admin token, the API key, a visitor token from ``create`` and an
agent's token. Generated session and agent ids are half the time real ones (schemathesis
dictionaries), so that the operations run past "no such session" to their success answers; a
coverage assertion checks that every operation was answered with success at least once, so that a
run that only ever met 401s cannot pass.

The CI run is small (:data:`MAX_EXAMPLES` per operation, a fixed seed). The long run, with a
random seed::

    KEFU_SCHEMATHESIS_EXAMPLES=200 KEFU_SCHEMATHESIS_SEED=random \\
        python -m pytest tests/test_schemathesis.py -q

(5 to 10 minutes on 2 cores; a failure prints its seed, which replays it with
``KEFU_SCHEMATHESIS_SEED=<seed>``).
"""

from __future__ import annotations

import collections
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis import engine as st_engine
from schemathesis.engine import events as st_events

from kefu.protocol import AgentCreate, ProtocolError, decode_body
from kefu.web.openapi import OPERATIONS
from tests.e2e.harness import ServerProcess, agent, config, running, token_of_agent

MAX_EXAMPLES = int(os.environ.get("KEFU_SCHEMATHESIS_EXAMPLES", "10"))
_SEED = os.environ.get("KEFU_SCHEMATHESIS_SEED", "7")
SEED = random.randrange(1 << 32) if _SEED == "random" else int(_SEED)
API_KEY = "api-key-for-schemathesis-0123456789"
MUTABLE_AGENTS = ("dave", "erin", "frank")
#: Success statuses of each operation (its ``ok`` answers in the document): the coverage check.
#: schemathesis does not call the document it was loaded from; the loading is that call.
SUCCESS: dict[str, set[int]] = {
    f"{op.method.upper()} {op.path}": {int(s) for s in op.ok if int(s) < 300}
    for op in OPERATIONS
    if op.path != "/openapi.json"
}


class Credentials:
    """What the run authenticates with, and the real ids it feeds the generator."""

    def __init__(self, server: ServerProcess) -> None:
        base = server.http_url
        first = _create(base)
        second = _create(base)
        self.admin: str = server.cfg["admin_token"]
        self.agent = token_of_agent("alice")
        login = requests.post(
            f"{base}/v1/agent/login",
            json={},
            headers={"Authorization": f"Bearer {self.agent}"},
            timeout=10,
        )
        assert login.status_code == 200, login.text
        # alice's session token (logout ends it; a repeated logout is answered 204 still).
        self.agent_session: str = login.json()["token"]
        # The visitor writes to and reads its own conversation; a second conversation is the one
        # closed (by the API key and by the admin), so that the first stays open for `send`.
        self.visitor: str = first["token"]
        self.session: str = first["session_id"]
        self.closing_session: str = second["session_id"]
        # Agents of the config file are read-only through the API (409): the agents the admin
        # operations change and delete are made through the API.
        for agent_id in MUTABLE_AGENTS:
            made = requests.post(
                f"{base}/v1/admin/agents",
                json={"id": agent_id, "name": agent_id.capitalize()},
                headers={"Authorization": f"Bearer {self.admin}"},
                timeout=10,
            )
            assert made.status_code == 201, made.text


def _create(base: str) -> dict[str, Any]:
    answer = requests.post(f"{base}/v1/chat/create", json={}, timeout=10)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cfg = config(
        [agent("alice")],  # alice's token authenticates the agent operations
        api_key=API_KEY,
        bot={"enabled": True},
    )
    with running(tmp_path_factory.mktemp("schemathesis"), cfg) as proc:
        yield proc


def _config(server: ServerProcess, creds: Credentials, auth: dict[str, Any]) -> Any:
    half = 0.5
    closing = {
        "path.session_id": {"dictionary": "closing", "probability": half},
        "body.session_id": {"dictionary": "closing", "probability": half},
    }
    return schemathesis.Config.from_dict(
        {
            "base-url": server.http_url,
            "seed": SEED,
            "cache": {"enabled": False},
            "checks": {"enabled": True},
            "generation": {"max-examples": MAX_EXAMPLES, "mode": "all", "database": "none"},
            "phases": {"stateful": {"enabled": True}},
            "request-timeout": 30,
            "auth": {"openapi": {name: {"bearer": token} for name, token in auth.items()}},
            "dictionaries": {
                "sessions": {"values": [creds.session]},
                "closing": {"values": [creds.closing_session]},
                "agents": {"values": list(MUTABLE_AGENTS)},
            },
            "parameters": {
                "path.session_id": {"dictionary": "sessions", "probability": half},
                "body.session_id": {"dictionary": "sessions", "probability": half},
                "path.agent_id": {"dictionary": "agents", "probability": half},
            },
            "operations": [
                # The closes aim at the second conversation, not the one `send` writes to.
                {"include-operation-id": "closeChat", "parameters": closing},
                {"include-operation-id": "adminCloseSession", "parameters": closing},
            ],
        }
    )


def _bearer_role(headers: dict[str, Any], creds: Credentials) -> str:
    value = headers.get("Authorization") or headers.get("authorization") or ""
    if isinstance(value, list):
        value = value[0] if value else ""
    token = str(value).removeprefix("Bearer ").strip()
    roles = {
        creds.admin: "admin",
        API_KEY: "apiKey",
        creds.visitor: "visitor",
        creds.agent: "agent",
    }
    return roles.get(token, "none" if not token else "other")


def _run(
    server: ServerProcess, creds: Credentials, auth: dict[str, str], tag: str | None = None
) -> dict[str, collections.Counter[tuple[int, str]]]:
    """One engine run; fails on any check failure or engine error. Returns, per operation,
    how many answers of each ``(status, credential)`` it got."""
    schema = schemathesis.openapi.from_url(
        f"{server.http_url}/openapi.json", config=_config(server, creds, auth)
    )
    if tag is not None:
        schema = schema.include(tag=tag)
    failures: list[str] = []
    errors: list[str] = []
    answered: dict[str, collections.Counter[tuple[int, str]]] = collections.defaultdict(
        collections.Counter
    )
    finished = False
    for event in st_engine.from_schema(schema).execute():
        if isinstance(event, st_events.ScenarioFinished):
            recorder = event.recorder
            for case_id, interaction in recorder.interactions.items():
                if interaction.response is None:
                    continue
                label = f"{interaction.request.method} {_template(recorder, case_id)}"
                role = _bearer_role(dict(interaction.request.headers), creds)
                answered[label][(interaction.response.status_code, role)] += 1
            for checks in recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(
                            f"{recorder.label}: {check.name}: {failure.title}: "
                            f"{str(failure.message)[:500]}\n    {check.failure_info.code_sample}"
                        )
        elif isinstance(event, (st_events.NonFatalError, st_events.FatalError)):
            errors.append(repr(event))
        elif isinstance(event, st_events.EngineFinished):
            finished = True
    assert finished
    assert not errors, "\n".join(errors)
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures[:20])
    # The server never logged a fault of its own.
    assert not _errors_of(server), _errors_of(server)[-3000:]
    return answered


def test_every_operation_passes_every_check(server: ServerProcess) -> None:
    creds = Credentials(server)
    # A bearer token fits each scheme; where an operation takes the visitor token or the API
    # key, schemathesis uses the first, the visitor token. The API key gets a run of its own.
    answered = _run(
        server,
        creds,
        {
            "adminToken": creds.admin,
            "apiKey": API_KEY,
            "visitorToken": creds.visitor,
            "agentToken": creds.agent,
            "agentSession": creds.agent_session,
        },
    )
    for label, counts in _run(server, creds, {"apiKey": API_KEY}, tag="chat").items():
        answered[label].update(counts)
    # Every operation was reached and answered with success at least once.
    missing = {
        label: sorted(answered.get(label, {}).items())
        for label, ok in SUCCESS.items()
        if not any(status in ok for status, _ in answered.get(label, {}))
    }
    assert not missing, "\n".join(f"{label}: {counts}" for label, counts in missing.items())
    # Each security scheme's credential got a success from an operation it protects.
    succeeded_roles = {
        role for counts in answered.values() for (status, role) in counts if status < 300
    }
    assert {"admin", "apiKey", "visitor", "agent"} <= succeeded_roles, succeeded_roles
    # schemathesis probes with malformed headers (a NUL byte): aiohttp answers 400, and the
    # log says so in one line, not with a traceback.
    assert "Traceback" not in server.stderr(), server.stderr()[-3000:]


def _template(recorder: Any, case_id: str) -> str:
    """The path template of the operation a recorded case called."""
    node = recorder.cases.get(case_id)
    case = getattr(node, "value", None)
    operation = getattr(case, "operation", None)
    path = getattr(operation, "path", None)
    return str(path) if path is not None else "?"


def _errors_of(server: ServerProcess) -> str:
    """The ERROR lines of kefu's log (a 500 is logged there, with its traceback)."""
    return "\n".join(line for line in server.stderr().splitlines() if " ERROR kefu" in line)


def test_the_document_declares_every_security_scheme_used(server: ServerProcess) -> None:
    """The five schemes the run authenticates with are the document's whole set."""
    document = requests.get(f"{server.http_url}/openapi.json", timeout=10).json()
    schemes = set(document["components"]["securitySchemes"])
    assert schemes == {"adminToken", "apiKey", "visitorToken", "agentToken", "agentSession"}
    used = {
        name
        for path in document["paths"].values()
        for operation in path.values()
        for requirement in operation["security"]
        for name in requirement
    }
    assert used == schemes


# ---------------------------------------------------------------------------------------------
# What the runs found, pinned so that each stays fixed whatever the generator draws


def test_an_integral_number_is_an_integer() -> None:
    """JSON Schema's `type: integer` admits 62.0, so the server does too; 62.5 stays invalid."""
    body = b'{"id": "dave", "name": "Dave", "max_chats": 62.0, "weight": 2}'
    assert decode_body(body, AgentCreate).max_chats == 62
    for bad in (b'{"id": "d", "name": "D", "max_chats": 62.5}', b'{"id": 1.0, "name": "D"}'):
        with pytest.raises(ProtocolError) as refused:
            decode_body(bad, AgentCreate)
        assert refused.value.code == "invalid"


def test_a_blank_knowledge_base_query_is_valid(server: ServerProcess) -> None:
    """The document allows `q` of 1 to 1,000 characters, whitespace included: no hits."""
    answer = requests.get(
        f"{server.http_url}/v1/admin/kb/search",
        params={"q": "\x0b \t"},
        headers={"Authorization": f"Bearer {server.cfg['admin_token']}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["hits"] == []


def test_the_longest_valid_query_fits_the_request_line(server: ServerProcess) -> None:
    """1,000 four-byte characters, percent-encoded, are 12,000 bytes of request line: over
    aiohttp's default limit (a plain-text 400), within the server's."""
    answer = requests.get(
        f"{server.http_url}/v1/admin/kb/search",
        params={"q": "\U000171bb" * 1000, "k": "50"},
        headers={"Authorization": f"Bearer {server.cfg['admin_token']}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")


def test_the_event_stream_matches_its_documented_events(server: ServerProcess) -> None:
    """`send` with `stream: true`: `delta` and `msg` events, then one `done`, each `data`
    JSON (PROTOCOL.md); the document names those three events."""
    chat = _create(server.http_url)
    answer = requests.post(
        f"{server.http_url}/v1/chat/send",
        json={"session_id": chat["session_id"], "text": "运费多少", "stream": True},
        headers={"Authorization": f"Bearer {chat['token']}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    events = [block for block in answer.text.split("\n\n") if block]
    names = [block.split("\n")[0].removeprefix("event: ") for block in events]
    assert names[-1] == "done" and set(names[:-1]) <= {"delta", "msg"}, names
    document = requests.get(f"{server.http_url}/openapi.json", timeout=10).json()
    media = document["paths"]["/v1/chat/send"]["post"]["responses"]["200"]["content"]
    event_schema = media["text/event-stream"]["schema"]
    assert event_schema["properties"]["event"]["enum"] == ["delta", "msg", "done"]
    done = json.loads(events[-1].split("\n")[1].removeprefix("data: "))
    assert set(done) == {"seq", "status", "replies"}


@pytest.fixture(autouse=True)
def _no_stray_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """schemathesis and hypothesis write nothing into the checkout."""
    monkeypatch.chdir(tmp_path)
