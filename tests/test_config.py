"""kefu.config: defaults, the example file, validation messages, and override precedence."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kefu import config as config_module
from kefu.config import (
    ENV_OVERRIDES,
    AgentConfig,
    Config,
    ConfigError,
    load_config,
    overrides_from_cli,
)
from kefu.store import Store

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "kefu.example.yaml"

# The block "Configuration keys that outside tools rely on" of PROTOCOL.md, verbatim.
PROTOCOL_KEYS_YAML = """\
data_dir: ./kefu-data
http: {host: 127.0.0.1, port: 8080}
ws: {host: 127.0.0.1, port: 8081, public_url: null}   # public_url: what /v1/config tells clients
admin_token: "..."        # or KEFU_ADMIN_TOKEN
api_key: "..."            # or KEFU_API_KEY
agents:
  - {id: alice, name: Alice, token: "...", weight: 3, max_chats: 5, groups: [sales]}
bot:
  enabled: true
  kb: [path/to/kb.yaml]   # knowledge-base files, hot-reloaded
  answer_threshold: 0.6
  handoff_threshold: 0.3
  llm: {base_url: null, api_key: null, model: null}   # no base_url: knowledge base only
session: {idle_ttl_minutes: 60}
tls: {cert: null, key: null}   # both set: HTTP and WS speak TLS 1.3 only
cluster: {redis_url: null}      # set: this node joins the cluster through Redis
"""


def _load(tmp_path: Path, text: str, **kwargs: Any) -> Config:
    path = tmp_path / "kefu.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    kwargs.setdefault("env", {})
    return load_config(path, **kwargs)


def _refused(tmp_path: Path, text: str, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text, **kwargs)
    return info.value


def _structs(cls: type[msgspec.Struct]) -> list[type[msgspec.Struct]]:
    """``cls`` and every Struct type reachable from its fields."""
    seen: list[type[msgspec.Struct]] = []

    def walk(t: msgspec.inspect.Type) -> None:
        if isinstance(t, msgspec.inspect.Metadata):
            walk(t.type)
        elif isinstance(t, msgspec.inspect.StructType):
            if t.cls not in seen:
                seen.append(t.cls)
                for f in t.fields:
                    walk(f.type)
        elif isinstance(t, msgspec.inspect.UnionType):
            for u in t.types:
                walk(u)
        elif isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.DictType)):
            walk(t.item_type if isinstance(t, msgspec.inspect.ListType) else t.value_type)

    walk(msgspec.inspect.type_info(cls))
    return seen


# ---------------------------------------------------------------------------------------------
# Defaults and the example file


def test_defaults_run_with_no_file() -> None:
    cfg = load_config(None, env={})
    assert cfg == Config()
    assert cfg.data_dir == "./kefu-data"
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8080)
    assert (cfg.ws.host, cfg.ws.port, cfg.ws.path, cfg.ws.public_url) == (
        "127.0.0.1",
        8081,
        "/ws",
        None,
    )
    assert cfg.admin_token is None and cfg.api_key is None and cfg.agents == []
    assert cfg.bot.enabled and cfg.bot.kb is None  # the shipped sample knowledge base
    assert (cfg.bot.answer_threshold, cfg.bot.handoff_threshold) == (0.6, 0.3)
    assert cfg.bot.llm.base_url is None
    assert cfg.session.idle_ttl_minutes == 60
    assert cfg.tls.cert is None and cfg.tls.key is None
    assert cfg.cluster.redis_url is None
    assert cfg.durability == "process"
    assert cfg.allowed_origins == []
    assert cfg.identity.required is False
    assert cfg.log_level == "info"


def test_defaults_match_the_protocol_limits() -> None:
    ws = Config().ws
    assert ws.hello_timeout_s == 10
    assert ws.max_msg_bytes == 64 * 1024
    assert ws.outbound_limit_bytes == 1024 * 1024
    assert Config().routing.agent_grace_s == 60


def test_protocol_md_key_block_loads(tmp_path: Path) -> None:
    cfg = _load(tmp_path, PROTOCOL_KEYS_YAML)
    assert cfg.admin_token == "..." and cfg.api_key == "..."
    assert cfg.agents == [
        AgentConfig(id="alice", name="Alice", token="...", weight=3, max_chats=5, groups=["sales"])
    ]
    assert cfg.bot.kb == ["path/to/kb.yaml"]
    assert (cfg.http.port, cfg.ws.port, cfg.session.idle_ttl_minutes) == (8080, 8081, 60)


def test_every_struct_refuses_unknown_keys_and_is_frozen() -> None:
    structs = _structs(Config)
    defined = {
        v
        for v in vars(config_module).values()
        if isinstance(v, type) and issubclass(v, msgspec.Struct) and v.__module__ == "kefu.config"
    }
    assert set(structs) == defined  # every section is reachable from Config
    for cls in structs:
        conf = cls.__struct_config__
        assert conf.forbid_unknown_fields, cls
        assert conf.frozen, cls
        with pytest.raises(TypeError):
            cls(*[object()] * len(cls.__struct_fields__))  # kw_only: no positional arguments


def test_example_file_loads_to_the_defaults() -> None:
    assert load_config(EXAMPLE, env={}) == Config()


def test_example_file_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    # A key counts as documented where it appears as `key:` in a line, active or commented
    # out (agents are shown commented out: the default has none).
    keys_in_file = set(re.findall(r"(?:^|[\s{,#-])([a-z_]+):", text, flags=re.M))
    missing = []
    for cls in _structs(Config):
        for name in cls.__struct_fields__:
            if name not in keys_in_file:
                missing.append(f"{cls.__name__}.{name}")
    assert not missing, f"not in kefu.example.yaml: {missing}"
    for var in ENV_OVERRIDES:
        assert var in text


def test_example_file_shows_valid_agents(tmp_path: Path) -> None:
    """The commented-out agents of the example load when uncommented."""
    text = EXAMPLE.read_text(encoding="utf-8")
    lines = text.splitlines()
    start = lines.index("# agents:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:])
    cfg = _load(tmp_path, "\n".join(block))
    assert [a.id for a in cfg.agents] == ["alice", "bob"]


# ---------------------------------------------------------------------------------------------
# File handling


def test_empty_and_comment_only_files_are_the_defaults(tmp_path: Path) -> None:
    assert _load(tmp_path, "") == Config()
    assert _load(tmp_path, "# nothing here\n\n") == Config()
    assert _load(tmp_path, "---\n") == Config()


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "a list"), ("just text\n", "a string"), ("5\n", "int")]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    err = _refused(tmp_path, text)
    assert "top level must be a mapping" in str(err) and kind in str(err)
    assert err.source.endswith("kefu.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    err = _refused(tmp_path, "http:\n  port: 8080\n bad indent: [\n")
    assert re.match(r".*kefu\.yaml:\d+:\d+: invalid YAML: ", str(err))
    line = int(str(err).split("kefu.yaml:")[1].split(":")[0])
    assert line in (3, 4)
    err = _refused(tmp_path, "ws: {port: 1\n")
    assert "kefu.yaml:2:1: invalid YAML" in str(err)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path) -> None:
    err = _refused(tmp_path, "http:\n  port: 1\n  port: 2\n")
    assert "kefu.yaml:3:3: invalid YAML: found the key 'port' twice (first on line 2)" in str(err)
    err = _refused(tmp_path, "log_level: info\nlog_level: debug\n")
    assert "found the key 'log_level' twice" in str(err)


def test_python_tags_are_not_constructed(tmp_path: Path) -> None:
    err = _refused(tmp_path, "bot: !!python/object/apply:os.system ['true']\n")
    assert "invalid YAML" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", env={})
    assert "nope.yaml: cannot read the file" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Unknown keys and wrong types


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot: 1\n", "unknown key `prot`"),
        ("htp: {port: 1}\n", "unknown key `htp` (did you mean `http`?)"),
        ("http: {prot: 1}\n", "unknown key `http.prot` (did you mean `port`?)"),
        ("ws: {rate: {burts: 5}}\n", "unknown key `ws.rate.burts` (did you mean `burst`?)"),
        ("bot: {llm: {modle: x}}\n", "unknown key `bot.llm.modle` (did you mean `model`?)"),
        (
            "agents: [{id: a, name: A, token: t}, {id: b, name: B, tokn: u}]\n",
            "unknown key `agents[1].tokn` (did you mean `token`?)",
        ),
    ],
)
def test_unknown_keys_are_named_with_their_path(tmp_path: Path, text: str, message: str) -> None:
    err = _refused(tmp_path, text)
    assert str(err) == f"{tmp_path / 'kefu.yaml'}: {message}"
    assert err.key == message.split("`")[1]


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            "http: {port: '8080'}",
            "http.port",
            "must be an integer, got '8080'; write it without quotes",
        ),
        ("http: {port: 8080.0}", "http.port", "must be an integer, got 8080.0"),
        ("http: {port: true}", "http.port", "must be an integer, got true"),
        ("http: {port: null}", "http.port", "must be an integer, got null"),
        ("http: 8080", "http", "must be a mapping, got 8080"),
        ("agents: {alice: 1}", "agents", "must be a list, got a mapping"),
        ("bot: {enabled: 'yes'}", "bot.enabled", "must be true or false, got 'yes'"),
        ("bot: {kb: [a.yaml, 5]}", "bot.kb[1]", "must be a string, got 5; put it in quotes"),
        ("ws: {hello_timeout_s: '10'}", "ws.hello_timeout_s", "must be a number, got '10'"),
        ("ws: {public_url: 5}", "ws.public_url", "must be a string or null, got 5"),
        ("durability: fsyncc", "durability", "must be one of 'fsync', 'process', got 'fsyncc'"),
        ("log_level: 5", "log_level", "must be one of"),
        ("data_dir: ''", "data_dir", "must be between 1 and 4096 characters long, got 0"),
    ],
)
def test_wrong_types_and_values_name_the_key(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    err = _refused(tmp_path, text)
    assert err.key == key
    assert str(err).startswith(f"{tmp_path / 'kefu.yaml'}: `{key}` {message}")


def test_ints_are_accepted_where_numbers_are_expected(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path, "ws: {hello_timeout_s: 5, rate: {per_second: 2}}\nbot: {answer_threshold: 1}"
    )
    assert cfg.ws.hello_timeout_s == 5.0 and isinstance(cfg.ws.hello_timeout_s, float)
    assert cfg.bot.answer_threshold == 1.0


def test_missing_required_key_of_an_agent(tmp_path: Path) -> None:
    err = _refused(tmp_path, "agents: [{id: alice, name: Alice}]")
    assert str(err).endswith("missing required key `agents[0].token`")
    assert err.key == "agents[0].token"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "ws: {public_url: 'http://chat.example.com/ws'}",
            "`ws.public_url` must be a ws:// or wss:// URL, got 'http://chat.example.com/ws'",
        ),
        (
            "allowed_origins: ['https://shop.example.com/']",
            "`allowed_origins[0]` must be an origin such as",
        ),
        ("ws: {path: ws}", "`ws.path` must be a URL path starting with /, got 'ws'"),
        (
            "agents: [{id: 'a b', name: A, token: t}]",
            "`agents[0].id` must be 1 to 64 characters of",
        ),
        (
            "bot: {llm: {base_url: 'ftp://x', model: m}}",
            "`bot.llm.base_url` must be an http:// or https:// URL",
        ),
    ],
)
def test_patterns_are_explained_in_words(tmp_path: Path, text: str, message: str) -> None:
    assert message in str(_refused(tmp_path, text))


def test_trailing_newline_does_not_pass_a_pattern(tmp_path: Path) -> None:
    err = _refused(tmp_path, 'agents: [{id: "alice\\n", name: A, token: t}]')
    assert err.key == "agents[0].id"


@pytest.mark.parametrize(
    ("value", "ok"), [(29, False), (30, True), (60, True), (120, True), (121, False), (5, False)]
)
def test_idle_ttl_range(tmp_path: Path, value: int, ok: bool) -> None:
    text = f"session: {{idle_ttl_minutes: {value}}}"
    if ok:
        assert _load(tmp_path, text).session.idle_ttl_minutes == value
    else:
        err = _refused(tmp_path, text)
        assert str(err) == (
            f"{tmp_path / 'kefu.yaml'}: `session.idle_ttl_minutes` must be between 30 and 120, "
            f"got {value}"
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http: {port: 65536}", "`http.port` must be between 0 and 65535, got 65536"),
        ("http: {port: -1}", "`http.port` must be between 0 and 65535, got -1"),
        (
            "ws: {rate: {per_second: 0}}",
            "`ws.rate.per_second` must be greater than 0 and at most 100000, got 0",
        ),
        (
            "ws: {max_msg_bytes: 100}",
            "`ws.max_msg_bytes` must be between 1024 and 16777216, got 100",
        ),
        ("bot: {answer_threshold: 1.5}", "`bot.answer_threshold` must be between 0 and 1, got 1.5"),
        (
            "bot: {handoff_threshold: -0.1}",
            "`bot.handoff_threshold` must be between 0 and 1, got -0.1",
        ),
        (
            "agents: [{id: a, name: A, token: t, weight: 0}]",
            "`agents[0].weight` must be between 1 and 1000, got 0",
        ),
        (
            "bot: {kb: []}\nagents: [{id: a, name: '', token: t}]",
            "`agents[0].name` must be between 1 and 64 characters long, got 0",
        ),
    ],
)
def test_ranges_name_key_bounds_and_value(tmp_path: Path, text: str, message: str) -> None:
    assert str(_refused(tmp_path, text)).endswith(message)


def test_secrets_are_never_echoed(tmp_path: Path) -> None:
    err = _refused(tmp_path, "admin_token: 123456789")
    assert err.key == "admin_token" and "123456789" not in str(err)
    assert "put it in quotes" in str(err)
    err = _refused(tmp_path, "", env={"KEFU_REDIS_URL": "http://user:hunter2@redis"})
    assert err.key == "cluster.redis_url" and "hunter2" not in str(err)
    err = _refused(tmp_path, "agents: [{id: a, name: A, token: 918273645}]")
    assert err.key == "agents[0].token" and "918273645" not in str(err)


# ---------------------------------------------------------------------------------------------
# Cross-field rules


@pytest.mark.parametrize(
    ("answer", "handoff", "ok"),
    [(0.6, 0.3, True), (0.5, 0.5, True), (0.0, 0.0, True), (1.0, 0.0, True), (0.3, 0.6, False)],
)
def test_thresholds_are_ordered(tmp_path: Path, answer: float, handoff: float, ok: bool) -> None:
    text = f"bot: {{answer_threshold: {answer}, handoff_threshold: {handoff}}}"
    if ok:
        cfg = _load(tmp_path, text)
        assert (cfg.bot.answer_threshold, cfg.bot.handoff_threshold) == (answer, handoff)
    else:
        err = _refused(tmp_path, text)
        assert err.key == "bot.handoff_threshold"
        assert "must not be above `bot.answer_threshold`" in str(err)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("tls: {cert: c.pem, key: k.pem}", True),
        ("tls: {cert: null, key: null}", True),
        ("tls: {cert: c.pem}", False),
        ("tls: {key: k.pem}", False),
    ],
)
def test_tls_needs_both_files_or_neither(tmp_path: Path, text: str, ok: bool) -> None:
    if ok:
        _load(tmp_path, text)
    else:
        err = _refused(tmp_path, text)
        assert "`tls.cert` and `tls.key` must be set together" in str(err)
        assert err.key in ("tls.cert", "tls.key")


def test_agent_ids_and_tokens_are_unique(tmp_path: Path) -> None:
    err = _refused(
        tmp_path,
        """
        agents:
          - {id: alice, name: A, token: t1}
          - {id: bob, name: B, token: t2}
          - {id: alice, name: C, token: t3}
        """,
    )
    assert err.key == "agents[2].id"
    assert "agent id 'alice' is already used by `agents[0]`" in str(err)
    err = _refused(
        tmp_path,
        """
        agents:
          - {id: alice, name: A, token: same}
          - {id: bob, name: B, token: same}
        """,
    )
    assert err.key == "agents[1].token"
    assert "same" not in str(err).replace("the same as", "")


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("http: {port: 9000}\nws: {port: 9000}", False),
        ("http: {port: 9000, host: 0.0.0.0}\nws: {port: 9000, host: 10.0.0.1}", False),
        ("http: {port: 9000, host: 10.0.0.1}\nws: {port: 9000, host: '::'}", False),
        ("http: {port: 9000, host: 10.0.0.1}\nws: {port: 9000, host: 10.0.0.2}", True),
        ("http: {port: 0}\nws: {port: 0}", True),
        ("http: {port: 8081}\nws: {port: 8080}", True),
    ],
)
def test_http_and_ws_ports_differ_on_one_host(tmp_path: Path, text: str, ok: bool) -> None:
    if ok:
        _load(tmp_path, text)
    else:
        err = _refused(tmp_path, text)
        assert "`http.port` and `ws.port` are both 9000" in str(err)


def test_identity_required_needs_a_secret(tmp_path: Path) -> None:
    err = _refused(tmp_path, "identity: {required: true}")
    assert err.key == "identity.secret"
    cfg = _load(tmp_path, "identity: {required: true}", env={"KEFU_IDENTITY_SECRET": "s3cret"})
    assert cfg.identity.secret == "s3cret"


def test_llm_base_url_needs_a_model(tmp_path: Path) -> None:
    err = _refused(tmp_path, "bot: {llm: {base_url: 'http://127.0.0.1:11434/v1'}}")
    assert err.key == "bot.llm.model"
    cfg = _load(tmp_path, "bot: {llm: {base_url: 'http://127.0.0.1:11434/v1', model: qwen2}}")
    assert cfg.bot.llm.model == "qwen2"


def test_outbound_limit_holds_one_largest_frame(tmp_path: Path) -> None:
    err = _refused(tmp_path, "ws: {max_msg_bytes: 2097152}")
    assert err.key == "ws.outbound_limit_bytes"
    _load(tmp_path, "ws: {max_msg_bytes: 2097152, outbound_limit_bytes: 2097152}")


def test_cross_field_rules_also_hold_for_configs_built_in_code() -> None:
    with pytest.raises(ValueError, match=r"tls\.cert"):
        msgspec.structs.replace(Config(), tls=msgspec.convert({"cert": "c"}, type(Config().tls)))


# ---------------------------------------------------------------------------------------------
# Environment and command line


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "KEFU_ADMIN_TOKEN": "env-admin",
        "KEFU_API_KEY": "env-key",
        "KEFU_IDENTITY_SECRET": "env-secret",
        "KEFU_LLM_API_KEY": "env-llm",
        "KEFU_DATA_DIR": "/var/lib/kefu",
        "KEFU_REDIS_URL": "redis://cache:6379/0",
    }
    text = """
        admin_token: file-admin
        api_key: file-key
        data_dir: ./here
        bot: {llm: {api_key: file-llm}}
    """
    cfg = _load(tmp_path, text, env=env)
    assert cfg.admin_token == "env-admin"
    assert cfg.api_key == "env-key"
    assert cfg.identity.secret == "env-secret"
    assert cfg.bot.llm.api_key == "env-llm"
    assert cfg.data_dir == "/var/lib/kefu"
    assert cfg.cluster.redis_url == "redis://cache:6379/0"
    assert set(env) == set(ENV_OVERRIDES)


def test_empty_environment_variables_are_ignored(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "api_key: file-key", env={"KEFU_API_KEY": "", "KEFU_DATA_DIR": ""})
    assert cfg.api_key == "file-key" and cfg.data_dir == "./kefu-data"


def test_environment_without_a_file() -> None:
    cfg = load_config(None, env={"KEFU_ADMIN_TOKEN": "t", "UNRELATED": "x"})
    assert cfg.admin_token == "t"


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    err = _refused(tmp_path, "", env={"KEFU_REDIS_URL": "localhost:6379"})
    assert str(err).startswith("environment variable KEFU_REDIS_URL: `cluster.redis_url`")
    assert err.source == "environment variable KEFU_REDIS_URL"


def test_command_line_overrides_environment_and_file(tmp_path: Path) -> None:
    text = "data_dir: ./file\nhttp: {host: 10.0.0.1, port: 7000}\nws: {port: 7001}"
    overrides = overrides_from_cli(data_dir="./cli", host="0.0.0.0", http_port=9000, ws_port=9001)
    cfg = _load(tmp_path, text, env={"KEFU_DATA_DIR": "./env"}, overrides=overrides)
    assert cfg.data_dir == "./cli"
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 9000)
    assert (cfg.ws.host, cfg.ws.port) == ("0.0.0.0", 9001)


def test_overrides_from_cli_sets_only_what_was_given() -> None:
    assert overrides_from_cli() == {}
    assert overrides_from_cli(host="::") == {"http.host": "::", "ws.host": "::"}
    assert overrides_from_cli(http_port=1, ws_port=2) == {"http.port": 1, "ws.port": 2}
    cfg = load_config(None, overrides=overrides_from_cli(http_port=0, ws_port=0), env={})
    assert (cfg.http.port, cfg.ws.port) == (0, 0)


def test_a_bad_command_line_value_says_so(tmp_path: Path) -> None:
    err = _refused(tmp_path, "http: {port: 8000}", overrides={"http.port": 70000})
    assert str(err) == "command line: `http.port` must be between 0 and 65535, got 70000"
    err = _refused(tmp_path, "", overrides=overrides_from_cli(http_port=9000, ws_port=9000))
    assert err.source == "command line"
    err = _refused(tmp_path, "", overrides={"http.prot": 1})
    assert str(err) == "command line: unknown key `http.prot` (did you mean `port`?)"


def test_an_override_does_not_hide_a_broken_file_section(tmp_path: Path) -> None:
    err = _refused(tmp_path, "http: 5", overrides={"http.port": 9000})
    assert err.key == "http" and err.source.endswith("kefu.yaml")


def test_store_section_is_the_keywords_of_store_open() -> None:
    """``Store.open(path, durability=cfg.durability, **asdict(cfg.store))`` with equal defaults."""
    params = inspect.signature(Store.open).parameters
    cfg = Config()
    for name, value in msgspec.structs.asdict(cfg.store).items():
        assert params[name].default == value, name
    assert params["durability"].default == cfg.durability
