"""The server's configuration: one YAML file validated into msgspec Structs.

Every setting has a default, so ``kefu serve`` runs with no file: data in ``./kefu-data``, HTTP
on ``127.0.0.1:8080``, WebSocket on ``127.0.0.1:8081``. ``kefu.example.yaml`` at the root of
the repository documents every key, with its default and limits.

Sources, weakest first
----------------------
1. defaults (the Struct fields below);
2. the YAML file (``--config FILE``);
3. environment variables, for secrets and deployment paths, so they stay out of the file:

   ========================  =====================
   ``KEFU_ADMIN_TOKEN``      ``admin_token``
   ``KEFU_API_KEY``          ``api_key``
   ``KEFU_IDENTITY_SECRET``  ``identity.secret``
   ``KEFU_LLM_API_KEY``      ``bot.llm.api_key``
   ``KEFU_DATA_DIR``         ``data_dir``
   ``KEFU_REDIS_URL``        ``cluster.redis_url``
   ========================  =====================

   A variable set to the empty string counts as unset (``KEFU_API_KEY= kefu serve`` does not
   switch the API key off by accident);
4. the command line (``--data-dir``, ``--host``, ``--http-port``, ``--ws-port``,
   ``--grpc-port``), given to
   :func:`load_config` as ``overrides`` with dotted keys (:func:`overrides_from_cli` builds
   them; ``--host`` sets both ``http.host`` and ``ws.host``).

The command line wins because it is what the operator typed for this very run; the
environment beats the file because it is how containers and secret stores inject values into
one shared file.

Validation
----------
Every struct refuses unknown keys (``forbid_unknown_fields``), is immutable once loaded
(``frozen``) and takes keywords only. The merged values are converted with
``msgspec.convert(..., strict=True)``: nothing is coerced (``port: "8080"`` is refused, not
read as 8080), unknown keys are refused at every level, and every limit is checked. Then
:meth:`Config.__post_init__` checks the rules that span fields. Any failure is one
:class:`ConfigError` whose message starts with where the offending value came from (the file,
``environment variable KEFU_...``, or ``command line``) and names the full key:
``kefu.yaml: unknown key `http.prot` (did you mean `port`?)``,
``kefu.yaml: `session.idle_ttl_minutes` must be between 30 and 120, got 5``. Secrets are never
repeated in a message.

Relative paths (``data_dir``, ``bot.kb``, ``tls.cert``, ``tls.key``) are relative to the
working directory of the process, as on the command line; they are not resolved here.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec
import yaml
from msgspec import Meta, Struct, field

from kefu.protocol import PATTERN_END, AgentId, Groups, MaxChats, Name, Token, Weight
from kefu.text import jieba_available

__all__ = [
    "ENV_OVERRIDES",
    "AgentConfig",
    "BotConfig",
    "CacheConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "GrpcConfig",
    "HttpConfig",
    "IdentityConfig",
    "LimitsConfig",
    "LlmConfig",
    "LlmEndpointConfig",
    "RateConfig",
    "RoutingConfig",
    "SessionConfig",
    "StoreConfig",
    "TlsConfig",
    "WsConfig",
    "load_config",
    "overrides_from_cli",
]

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

#: Environment variable -> dotted config key it overrides.
ENV_OVERRIDES: Final[Mapping[str, str]] = {
    "KEFU_ADMIN_TOKEN": "admin_token",
    "KEFU_API_KEY": "api_key",
    "KEFU_IDENTITY_SECRET": "identity.secret",
    "KEFU_LLM_API_KEY": "bot.llm.api_key",
    "KEFU_DATA_DIR": "data_dir",
    "KEFU_REDIS_URL": "cluster.redis_url",
}

# Keys whose values are never repeated in an error message.
_SECRET_KEYS: Final = frozenset({"admin_token", "api_key", "token", "secret", "redis_url"})
# Addresses that listen on every interface, so they overlap any other host.
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", "*", ""})

Port: TypeAlias = Annotated[int, Meta(ge=0, le=65535)]
Host: TypeAlias = Annotated[str, Meta(min_length=1, max_length=255)]
FilePath: TypeAlias = Annotated[str, Meta(min_length=1, max_length=4096)]
Secret: TypeAlias = Annotated[str, Meta(min_length=1, max_length=4096)]
Seconds: TypeAlias = Annotated[float, Meta(gt=0, le=3600)]
WsUrl: TypeAlias = Annotated[
    str, Meta(pattern="^wss?://\\S+" + PATTERN_END, description="a ws:// or wss:// URL")
]
HttpUrl: TypeAlias = Annotated[
    str, Meta(pattern="^https?://\\S+" + PATTERN_END, description="an http:// or https:// URL")
]
RedisUrl: TypeAlias = Annotated[
    str,
    Meta(
        pattern="^(redis|rediss|unix)://\\S+" + PATTERN_END,
        description="a redis://, rediss:// or unix:// URL",
    ),
]
Origin: TypeAlias = Annotated[
    str,
    Meta(
        pattern="^https?://[^/\\s]+" + PATTERN_END,
        description="an origin such as https://shop.example.com (scheme and host, no path)",
    ),
]
UrlPath: TypeAlias = Annotated[
    str, Meta(pattern="^/[A-Za-z0-9._~/-]*" + PATTERN_END, description="a URL path starting with /")
]
Threshold: TypeAlias = Annotated[float, Meta(ge=0, le=1)]


class HttpConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    host: Host = "127.0.0.1"
    port: Port = 8080
    max_body_bytes: Annotated[int, Meta(ge=KiB, le=64 * MiB)] = MiB


class RateConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Per-connection token bucket: ``burst`` commands at once, refilled at ``per_second``."""

    per_second: Annotated[float, Meta(gt=0, le=100_000)] = 20.0
    burst: Annotated[int, Meta(ge=1, le=100_000)] = 60


_Cidr: TypeAlias = Annotated[
    str,
    Meta(
        min_length=2,
        max_length=64,
        pattern="^[0-9A-Fa-f.:]+(/[0-9]{1,3})?" + PATTERN_END,
        description="an IP network such as 10.0.0.0/8 or ::1/128 (or one address)",
    ),
]
_ConnCap: TypeAlias = Annotated[int, Meta(ge=1, le=1_000_000)]


def _rate(per_second: float, burst: int) -> Callable[[], RateConfig]:
    return lambda: RateConfig(per_second=per_second, burst=burst)


class LimitsConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Rate limits and connection caps beyond the per-connection ``ws.rate``
    (``kefu.web.ratelimit``; every key in ``kefu.example.yaml``)."""

    exempt: Annotated[list[_Cidr], Meta(max_length=1_000)] = field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"]
    )
    trusted_proxies: Annotated[list[_Cidr], Meta(max_length=1_000)] = field(default_factory=list)
    max_tracked: Annotated[int, Meta(ge=1_000, le=10_000_000)] = 100_000
    per_ip: RateConfig = field(default_factory=_rate(200.0, 1_000))
    per_visitor: RateConfig | None = None
    create_per_ip: RateConfig = field(default_factory=_rate(0.5, 20))
    ws_connections_per_ip: _ConnCap = 256
    ws_connections_per_visitor: _ConnCap = 8
    ws_connections_per_agent: _ConnCap = 16

    def __post_init__(self) -> None:
        for name in ("exempt", "trusted_proxies"):
            for i, cidr in enumerate(getattr(self, name)):
                try:
                    ipaddress.ip_network(cidr, strict=True)
                except ValueError as exc:
                    raise _CrossFieldError(
                        f"`limits.{name}[{i}]` is not an IP network ({exc})",
                        f"limits.{name}[{i}]",
                    ) from None


class WsConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    host: Host = "127.0.0.1"
    port: Port = 8081
    public_url: WsUrl | None = None
    path: UrlPath = "/ws"
    hello_timeout_s: Seconds = 10.0
    max_msg_bytes: Annotated[int, Meta(ge=KiB, le=16 * MiB)] = 64 * KiB
    ping_interval_s: Seconds = 20.0
    pong_timeout_s: Seconds = 10.0
    rate: RateConfig = field(default_factory=RateConfig)
    rate_close_after: Annotated[int, Meta(ge=1, le=100_000)] = 20
    outbound_limit_bytes: Annotated[int, Meta(ge=64 * KiB, le=GiB)] = MiB
    max_connections: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    read_buffer_bytes: Annotated[int, Meta(ge=256, le=MiB)] = 2 * KiB
    # After a write, keep polling the sockets without sleeping this long (microseconds; 0:
    # off): a node with a core of its own then does not halt between messages (kefu.web.ws,
    # "Busy polling").
    busy_poll_us: Annotated[int, Meta(ge=0, le=100_000)] = 0
    # A conformance-test aid: on this path the WebSocket front echoes every message instead of
    # speaking the chat protocol (the Autobahn test suite drives an echo server). None: off.
    echo_path: UrlPath | None = None


class GrpcConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The gRPC front (``kefu.grpc``, installed with the ``grpc`` extra): off while ``port`` is
    null. TLS follows ``tls``; the limits are those of REST and the WebSocket."""

    host: Host | None = None  # null: http.host (so `kefu serve --host` moves it too)
    port: Port | None = None
    # Open Subscribe streams at once; one more is refused with RESOURCE_EXHAUSTED.
    max_subscribers: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000


class AgentConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    id: AgentId
    name: Name
    token: Token
    weight: Weight = 1
    max_chats: MaxChats = 5
    groups: Groups = field(default_factory=list)


class QuickReplyConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A canned answer an agent inserts from the workbench (searchable by title and text)."""

    title: Annotated[str, Meta(min_length=1, max_length=80)]
    text: Annotated[str, Meta(min_length=1, max_length=4_000)]


def _default_quick_replies() -> list[QuickReplyConfig]:
    return [
        QuickReplyConfig(title="问候 / Greeting", text="您好，请问有什么可以帮您？"),
        QuickReplyConfig(title="Greeting (en)", text="Hello! How can I help you today?"),
        QuickReplyConfig(title="稍等 / One moment", text="请稍等，我帮您查询一下。"),
        QuickReplyConfig(title="One moment (en)", text="One moment please, let me check that."),
        QuickReplyConfig(title="结束 / Closing", text="感谢您的咨询，祝您生活愉快！"),
        QuickReplyConfig(title="Closing (en)", text="Thanks for reaching out. Have a nice day!"),
    ]


class LlmEndpointConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A fallback endpoint, tried in order when the primary fails or its breaker is open."""

    base_url: HttpUrl
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    api_key: Secret | None = None


_Timeout: TypeAlias = Annotated[float, Meta(gt=0, le=600)]


class LlmConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    base_url: HttpUrl | None = None
    api_key: Secret | None = None
    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    system_prompt: Annotated[str, Meta(min_length=1, max_length=16_000)] | None = None
    timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    connect_timeout_s: _Timeout = 3.0
    first_token_timeout_s: _Timeout = 8.0
    chunk_timeout_s: _Timeout = 5.0
    max_retries: Annotated[int, Meta(ge=0, le=10)] = 2
    backoff_base_s: Annotated[float, Meta(ge=0, le=60)] = 0.25
    backoff_max_s: Annotated[float, Meta(ge=0, le=600)] = 4.0
    retry_after_max_s: Annotated[float, Meta(ge=0, le=600)] = 8.0
    breaker_failures: Annotated[int, Meta(ge=1, le=1_000)] = 5
    breaker_cooldown_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    max_tokens: Annotated[int, Meta(ge=1, le=32_768)] = 512
    temperature: Annotated[float, Meta(ge=0, le=2)] = 0.3
    context_messages: Annotated[int, Meta(ge=0, le=100)] = 10
    context_token_budget: Annotated[int, Meta(ge=64, le=1_000_000)] = 3_000
    max_concurrency: Annotated[int, Meta(ge=1, le=1_024)] = 16
    max_waiting: Annotated[int, Meta(ge=0, le=1_000_000)] = 256
    queue_timeout_s: Annotated[float, Meta(ge=0, le=600)] = 2.0
    fallbacks: Annotated[list[LlmEndpointConfig], Meta(max_length=8)] = field(default_factory=list)


class CacheConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The bot's response cache: LRU bounded in entries and bytes, entries live ``ttl_s``."""

    max_entries: Annotated[int, Meta(ge=0, le=10_000_000)] = 1_024
    max_bytes: Annotated[int, Meta(ge=4 * KiB, le=64 * GiB)] = 4 * MiB
    ttl_s: Annotated[float, Meta(gt=0, le=30 * 86_400)] = 3_600.0


_DEFAULT_HANDOFF_WORDS: Final = (
    "转人工",
    "人工",
    "客服",
    "真人",
    "human",
    "agent",
    "real person",
    "representative",
    "operator",
)


class BotConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    enabled: bool = True
    name: Name = "Assistant"
    kb: Annotated[list[FilePath], Meta(max_length=1_000)] | None = None
    answer_threshold: Threshold = 0.6
    handoff_threshold: Threshold = 0.3
    handoff_keywords: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=1_000)
    ] = field(default_factory=lambda: list(_DEFAULT_HANDOFF_WORDS))
    top_k: Annotated[int, Meta(ge=1, le=20)] = 3
    kb_reload_interval_s: Annotated[float, Meta(ge=0.1, le=60)] = 0.5
    max_concurrency: Annotated[int, Meta(ge=1, le=100_000)] = 256
    llm: LlmConfig = field(default_factory=LlmConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # How knowledge-base text becomes tokens, at the index build and at every query alike:
    # "default" (words, CJK characters and character pairs: no dictionary, nothing to install)
    # or "jieba" (CJK segmented into words by jieba, the optional extra `kefu[jieba]`).
    # See kefu.text; jieba without the package is refused here, at load, not at first use.
    tokenizer: Literal["default", "jieba"] = "default"

    def __post_init__(self) -> None:
        if self.tokenizer == "jieba" and not jieba_available():
            raise _CrossFieldError(
                '`bot.tokenizer` is "jieba" but the jieba package is not installed '
                "(pip install 'kefu[jieba]', or set it to \"default\")",
                "bot.tokenizer",
            )


class SessionConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    idle_ttl_minutes: Annotated[int, Meta(ge=30, le=120)] = 60
    visitor_token_ttl_hours: Annotated[int, Meta(ge=1, le=24 * 30)] = 24


class TlsConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    cert: FilePath | None = None
    key: FilePath | None = None


NodeId: TypeAlias = Annotated[
    str, Meta(pattern="^[A-Za-z0-9_-]{1,64}" + PATTERN_END, description="letters, digits, - and _")
]
KeyPrefix: TypeAlias = Annotated[
    str, Meta(pattern="^[A-Za-z0-9_:.-]{1,32}" + PATTERN_END, description="a Redis key prefix")
]


class ClusterConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    redis_url: RedisUrl | None = None
    node_id: NodeId | None = None
    key_prefix: KeyPrefix = "kefu:"
    heartbeat_s: Annotated[float, Meta(ge=0.05, le=60)] = 1.0
    node_timeout_s: Annotated[float, Meta(ge=0.2, le=600)] = 5.0
    request_timeout_s: Annotated[float, Meta(ge=0.05, le=60)] = 2.0


class RoutingConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    agent_grace_s: Annotated[float, Meta(ge=0, le=3600)] = 60.0
    max_queue: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000


class StoreConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Group commit and RocksDB sizes: the keyword arguments of ``kefu.store.Store.open``."""

    max_pending: Annotated[int, Meta(ge=1, le=10_000_000)] = 16_384
    max_pending_bytes: Annotated[int, Meta(ge=MiB, le=16 * GiB)] = 32 * MiB
    batch_max_entries: Annotated[int, Meta(ge=1, le=1_000_000)] = 1_024
    batch_max_bytes: Annotated[int, Meta(ge=64 * KiB, le=GiB)] = 4 * MiB
    block_cache_bytes: Annotated[int, Meta(ge=MiB, le=1024 * GiB)] = 64 * MiB
    write_buffer_bytes: Annotated[int, Meta(ge=MiB, le=16 * GiB)] = 4 * MiB
    #: Dedup keys the store's in-memory filter holds (10 bits each; 0: none); past it every
    #: dedup check reads RocksDB (kefu.store, "Dedup filter").
    dedup_filter_keys: Annotated[int, Meta(ge=0, le=1 << 32)] = 4_000_000
    #: The nice value of RocksDB's flush and compaction threads (0: left as they are): they
    #: yield the CPU to the event loop (kefu.store, "Background work").
    background_nice: Annotated[int, Meta(ge=0, le=19)] = 10


class IdentityConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    secret: Secret | None = None
    required: bool = False


class _CrossFieldError(ValueError):
    """A rule over several keys is broken; ``keys`` are the dotted keys involved."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


class Config(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The whole configuration. ``Config()`` is the configuration of a run with no file."""

    data_dir: FilePath = "./kefu-data"
    http: HttpConfig = field(default_factory=HttpConfig)
    ws: WsConfig = field(default_factory=WsConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    admin_token: Secret | None = None
    api_key: Secret | None = None
    agents: Annotated[list[AgentConfig], Meta(max_length=10_000)] = field(default_factory=list)
    bot: BotConfig = field(default_factory=BotConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    durability: Literal["process", "fsync"] = "process"
    allowed_origins: Annotated[list[Origin], Meta(max_length=1_000)] = field(default_factory=list)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    quick_replies: Annotated[list[QuickReplyConfig], Meta(max_length=500)] = field(
        default_factory=_default_quick_replies
    )

    def __post_init__(self) -> None:
        # msgspec calls this after every field passed its own limits, also when converting.
        bot = self.bot
        if bot.handoff_threshold > bot.answer_threshold:
            raise _CrossFieldError(
                f"`bot.handoff_threshold` ({bot.handoff_threshold}) must not be above "
                f"`bot.answer_threshold` ({bot.answer_threshold})",
                "bot.handoff_threshold",
                "bot.answer_threshold",
            )
        if bot.llm.base_url is not None and bot.llm.model is None:
            raise _CrossFieldError(
                "`bot.llm.model` is required when `bot.llm.base_url` is set",
                "bot.llm.model",
                "bot.llm.base_url",
            )
        cluster = self.cluster
        if cluster.heartbeat_s >= cluster.node_timeout_s:
            raise _CrossFieldError(
                f"`cluster.heartbeat_s` ({cluster.heartbeat_s}) must be below "
                f"`cluster.node_timeout_s` ({cluster.node_timeout_s})",
                "cluster.heartbeat_s",
                "cluster.node_timeout_s",
            )
        if (self.tls.cert is None) != (self.tls.key is None):
            raise _CrossFieldError(
                "`tls.cert` and `tls.key` must be set together (or neither)",
                "tls.cert" if self.tls.cert is None else "tls.key",
            )
        if self.identity.required and self.identity.secret is None:
            raise _CrossFieldError(
                "`identity.required` is true but `identity.secret` is not set "
                "(or KEFU_IDENTITY_SECRET)",
                "identity.secret",
                "identity.required",
            )
        if self.http.port == self.ws.port != 0 and _hosts_overlap(self.http.host, self.ws.host):
            raise _CrossFieldError(
                f"`http.port` and `ws.port` are both {self.ws.port} on overlapping hosts: "
                "HTTP and WebSocket listen on separate ports",
                "ws.port",
                "http.port",
            )
        grpc = self.grpc
        for other, port, host in (
            ("http", self.http.port, self.http.host),
            ("ws", self.ws.port, self.ws.host),
        ):
            if grpc.port == port != 0 and _hosts_overlap(grpc.host or self.http.host, host):
                raise _CrossFieldError(
                    f"`grpc.port` and `{other}.port` are both {port} on overlapping hosts: "
                    "gRPC listens on a port of its own",
                    "grpc.port",
                    f"{other}.port",
                )
        if self.ws.outbound_limit_bytes < self.ws.max_msg_bytes:
            raise _CrossFieldError(
                f"`ws.outbound_limit_bytes` ({self.ws.outbound_limit_bytes}) must be at least "
                f"`ws.max_msg_bytes` ({self.ws.max_msg_bytes}): the outbound queue must hold "
                "one frame of the largest size",
                "ws.outbound_limit_bytes",
                "ws.max_msg_bytes",
            )
        if self.ws.echo_path == self.ws.path:
            raise _CrossFieldError(
                f"`ws.echo_path` is the chat path `ws.path` ({self.ws.path}): the echo path "
                "must be another one",
                "ws.echo_path",
                "ws.path",
            )
        # Two agents with one id or one token could not be told apart at login.
        ids: dict[str, int] = {}
        tokens: dict[str, int] = {}
        for i, agent in enumerate(self.agents):
            if agent.id in ids:
                raise _CrossFieldError(
                    f"`agents[{i}].id`: agent id {agent.id!r} is already used by "
                    f"`agents[{ids[agent.id]}]`",
                    f"agents[{i}].id",
                )
            if agent.token in tokens:
                raise _CrossFieldError(
                    f"`agents[{i}].token` is the same as `agents[{tokens[agent.token]}].token`: "
                    "each agent needs its own token",
                    f"agents[{i}].token",
                )
            ids[agent.id] = i
            tokens[agent.token] = i


def _hosts_overlap(a: str, b: str) -> bool:
    return a == b or a in _WILDCARD_HOSTS or b in _WILDCARD_HOSTS


class ConfigError(ValueError):
    """The configuration is refused. ``str()`` is the whole message, for the operator.

    ``key`` is the dotted key at fault when one is known; ``source`` is where its value came
    from (a file name, ``environment variable KEFU_...``, ``command line``, ``defaults``).
    """

    def __init__(self, source: str, detail: str, key: str | None = None) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail
        self.key = key


# ---------------------------------------------------------------------------------------------
# Loading


def overrides_from_cli(
    *,
    data_dir: str | None = None,
    host: str | None = None,
    http_port: int | None = None,
    ws_port: int | None = None,
    grpc_port: int | None = None,
) -> dict[str, Any]:
    """The ``overrides`` for :func:`load_config` from ``kefu serve``'s options (None: not given).

    ``--host`` binds every server (HTTP, WebSocket, and gRPC through its default
    ``grpc.host``), which is what one host flag can mean.
    """
    out: dict[str, Any] = {}
    if data_dir is not None:
        out["data_dir"] = data_dir
    if host is not None:
        out["http.host"] = host
        out["ws.host"] = host
    if http_port is not None:
        out["http.port"] = http_port
    if ws_port is not None:
        out["ws.port"] = ws_port
    if grpc_port is not None:
        out["grpc.port"] = grpc_port
    return out


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] = os.environ,
) -> Config:
    """Read, merge and validate the configuration (see the module doc for the order).

    ``path`` None means no file. Raises :class:`ConfigError` on anything refused.
    """
    file_label = os.fspath(path) if path is not None else None
    raw: dict[str, Any] = {} if path is None else _read_yaml(os.fspath(path))
    # Where each value that did not come from the file came from, by dotted key.
    origins: dict[str, str] = {}
    for var, key in ENV_OVERRIDES.items():
        value = env.get(var)
        if value:
            _set_dotted(raw, key, value)
            origins[key] = f"environment variable {var}"
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
        origins[key] = "command line"

    try:
        return msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        cause = exc.__cause__
        if isinstance(cause, _CrossFieldError):
            source = _source_of(cause.keys, origins, file_label)
            raise ConfigError(source, str(cause), cause.keys[0]) from None
        bad_key, detail = _describe(str(exc), raw)
        source = _source_of((bad_key,) if bad_key else (), origins, file_label)
        raise ConfigError(source, detail, bad_key) from None


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = yaml.load(f, Loader=_Loader)
    except OSError as exc:
        raise ConfigError(path, f"cannot read the file: {exc.strerror or exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise ConfigError(where, f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"invalid YAML: {exc}") from None
    if data is None:  # an empty file (or only comments): all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"the top level must be a mapping of keys, got {_yaml_kind(data)}")
    return data


def _construct_mapping(loader: Any, node: Any) -> dict[Any, Any]:
    """PyYAML keeps the last of two equal keys silently; a config file refuses them."""
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping reports it below
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"found the key {key!r} twice (first on line {first.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=True)  # type: ignore[no-any-return]


# mypy sees PyYAML as Any (no stubs), so the loader is made without a class statement.
_Loader: Any = type("_Loader", (yaml.SafeLoader,), {})
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return f"a value of type {type(value).__name__}"


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts, creating the missing levels.

    A level that holds something other than a mapping is left alone: its own error (wrong
    type) is the one to report.
    """
    *parents, last = key.split(".")
    node: Any = raw
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            return
        node = child
    node[last] = value


def _source_of(keys: tuple[str, ...], origins: Mapping[str, str], file_label: str | None) -> str:
    """Where the value of the first of ``keys`` (or of a key above it) came from."""
    for key in keys:
        probe = key
        while probe:
            if probe in origins:
                return origins[probe]
            probe = probe.rpartition(".")[0]
    return file_label if file_label is not None else "defaults"


# ---------------------------------------------------------------------------------------------
# Error messages

# msgspec names the place of an error as `$.a.b[0].c`, or "`key` in `$.a`" for a mapping key.
_AT: Final = re.compile(r"^(?P<msg>.*?) - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`$", re.S)
_TOKEN: Final = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_TYPE_WORDS: Final = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def _path_tokens(path: str) -> list[str | int]:
    """``.a.b[0]`` -> ``["a", "b", 0]`` (``[...]``, a mapping value, becomes ``"..."``)."""
    out: list[str | int] = []
    for name, index in _TOKEN.findall(path):
        if name:
            out.append(name)
        else:
            out.append(int(index) if index.isdigit() else index)
    return out


def _dotted(tokens: list[str | int]) -> str:
    out = ""
    for t in tokens:
        out += f"[{t}]" if isinstance(t, int) else (f".{t}" if out else t)
    return out


def _raw_at(raw: Any, tokens: list[str | int]) -> tuple[bool, Any]:
    node = raw
    for t in tokens:
        if isinstance(t, int):
            found = isinstance(node, list) and t < len(node)
        else:
            found = isinstance(node, dict) and t in node
        if not found:
            return False, None
        node = node[t]
    return True, node


def _type_at(tokens: list[str | int]) -> msgspec.inspect.Type | None:
    """The msgspec type (with its constraints) of the config value at ``tokens``."""
    node: msgspec.inspect.Type = _CONFIG_TYPE
    for t in tokens:
        node = _strip_none(node)
        if isinstance(t, int) and isinstance(node, msgspec.inspect.ListType):
            node = node.item_type
        elif isinstance(t, str) and isinstance(node, msgspec.inspect.StructType):
            fields = {f.encode_name: f.type for f in node.fields}
            if t not in fields:
                return None
            node = fields[t]
        else:
            return None
    return _strip_none(node)


def _strip_none(t: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """``X | None`` -> ``X``, and ``X`` out of the wrapper a ``description`` puts around it."""
    if isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    if isinstance(t, msgspec.inspect.UnionType):
        rest = [u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)]
        if len(rest) == 1:
            t = rest[0]
    if isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    return t


def _field_names(tokens: list[str | int]) -> list[str]:
    t = _type_at(tokens)
    if isinstance(t, msgspec.inspect.StructType):
        return [f.encode_name for f in t.fields]
    return []


def _bounds(lo: Any, lo_strict: bool, hi: Any, hi_strict: bool) -> str:
    if lo is not None and hi is not None and not lo_strict and not hi_strict:
        return f"between {lo} and {hi}"
    parts = []
    if lo is not None:
        parts.append(f"greater than {lo}" if lo_strict else f"at least {lo}")
    if hi is not None:
        parts.append(f"less than {hi}" if hi_strict else f"at most {hi}")
    return " and ".join(parts)


def _shown(value: Any, secret: bool) -> str:
    if secret:
        return f"a value of type {type(value).__name__} (not shown: a secret)"
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:80] + "...")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a value of type {type(value).__name__}"


def _describe(message: str, raw: Mapping[str, Any]) -> tuple[str | None, str]:
    """(dotted key, operator-facing message) for one of msgspec's validation messages."""
    m = _AT.match(message)
    msg, path, in_key = (message, "", False) if m is None else (m["msg"], m["path"], bool(m["key"]))
    tokens = _path_tokens(path)
    key = _dotted(tokens)

    if in_key:
        where = f"in `{key}`" if key else "at the top level"
        return key or None, f"keys {where} must be strings"
    if (u := re.fullmatch(r"Object contains unknown field `(.+)`", msg)) is not None:
        name = u[1]
        full = f"{key}.{name}" if key else name
        close = difflib.get_close_matches(name, _field_names(tokens), n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return full, f"unknown key `{full}`{hint}"
    if (u := re.fullmatch(r"Object missing required field `(.+)`", msg)) is not None:
        full = f"{key}.{u[1]}" if key else u[1]
        return full, f"missing required key `{full}`"

    found, value = _raw_at(raw, tokens)
    secret = bool(tokens) and tokens[-1] in _SECRET_KEYS
    got = f", got {_shown(value, secret)}" if found else ""
    t = _type_at(tokens)
    name = f"`{key}`" if key else "the configuration"

    if isinstance(t, msgspec.inspect.LiteralType):
        choices = ", ".join(repr(v) for v in t.values)
        return key or None, f"{name} must be one of {choices}{got}"
    if (u := re.fullmatch(r"Expected `(.+?)`, got `(.+?)`", msg)) is not None:
        want = " or ".join(_TYPE_WORDS.get(w, f"`{w}`") for w in u[1].split(" | "))
        hint = ""
        if u[2] == "str" and "str" not in u[1]:
            hint = "; write it without quotes"
        elif u[1].startswith("str") and u[2] in ("int", "float", "bool"):
            hint = "; put it in quotes"
        return key or None, f"{name} must be {want}{got}{hint}"
    if isinstance(t, (msgspec.inspect.IntType, msgspec.inspect.FloatType)) and (
        "Expected `int`" in msg or "Expected `float`" in msg
    ):
        lo, lo_strict = (t.gt, True) if t.gt is not None else (t.ge, False)
        hi, hi_strict = (t.lt, True) if t.lt is not None else (t.le, False)
        return key or None, f"{name} must be {_bounds(lo, lo_strict, hi, hi_strict)}{got}"
    if isinstance(t, msgspec.inspect.StrType):
        if "matching regex" in msg:
            want = _descriptions.get(t.pattern or "", f"matching the pattern {t.pattern!r}")
            return key or None, f"{name} must be {want}{got}"
        if "of length" in msg:
            size = _bounds(t.min_length, False, t.max_length, False)
            n = f", got {len(value)}" if found and isinstance(value, str) else ""
            return key or None, f"{name} must be {size} characters long{n}"
    if isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.DictType)) and "of length" in msg:
        size = _bounds(t.min_length, False, t.max_length, False)
        n = f", got {len(value)}" if found and isinstance(value, (list, dict)) else ""
        return key or None, f"{name} must have {size} entries{n}"
    return key or None, f"{name}: {msg}" if key else msg


def _collect_descriptions() -> dict[str, str]:
    """Pattern -> what it means in words, from the ``description`` of each constrained str."""
    out: dict[str, str] = {}
    for alias in (WsUrl, HttpUrl, RedisUrl, Origin, UrlPath, AgentId, _Cidr, Name):
        for meta in getattr(alias, "__metadata__", ()):
            if isinstance(meta, Meta) and meta.pattern is not None:
                out[meta.pattern] = meta.description or f"matching {meta.pattern!r}"
    return out


_CONFIG_TYPE: Final = msgspec.inspect.type_info(Config)
_descriptions: Final = _collect_descriptions()
