"""`cpworker.config`: defaults, `CPWORKER_*` overrides, error messages and secret masking.

Every error test checks that the message names the key, the bad value (unless secret)
and where the value came from: the file's path or the environment variable's name.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest

from cpworker.config import ConfigError, WorkerConfig, load_config, masked, parse_config
from cpworker.errors import CpWorkerError

MINIMAL = """\
[action_types.build]
category = "Build"
provider = "MyBuild"
handler = "echo"
"""
TOKEN = "tok-9f2c-NOT-FOR-LOGS"  # a handler's API token
PASSWORD = "pw-77ab-NOT-FOR-LOGS"
FILE = "/etc/cpworker.toml"  # the `source` the errors of parse_config name


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpworker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _raw(**build: Any) -> dict[str, Any]:
    """A minimal configuration dict; `build` adds or replaces keys of its one action type."""
    table = {"category": "Build", "provider": "MyBuild", "handler": "echo", **build}
    return {"action_types": {"build": table}}


def _error(raw: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env or {}, source=FILE)
    assert isinstance(info.value, CpWorkerError)
    return str(info.value)


# --- defaults and overrides ------------------------------------------------------------


def test_defaults_of_a_minimal_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL), env={})
    assert (config.region, config.codepipeline_endpoint_url, config.s3_endpoint_url) == (
        "us-east-1",
        None,
        None,
    )
    assert (config.max_concurrency, config.api_max_attempts, config.bind) == (
        200,
        5,
        "0.0.0.0:9464",
    )
    assert (config.shutdown_grace_s, config.result_deadline_s) == (30.0, 120.0)
    assert (config.log_level, config.log_format, config.work_dir) == ("INFO", "json", None)
    build = config.action_types["build"]
    assert (build.version, build.owner, build.slots, build.poll_loops) == ("1", "Custom", 10, 1)
    assert (build.max_batch_size, build.query_param, build.handler_options) == (10, {}, {})
    assert (build.idle_backoff_floor_s, build.idle_backoff_ceiling_s) == (0.2, 5.0)
    assert (build.handler_timeout_s, build.client_tokens_file) == (3600.0, None)
    assert msgspec.to_builtins(build.action_type_id) == {
        "category": "Build",
        "owner": "Custom",
        "provider": "MyBuild",
        "version": "1",
    }


def test_global_overrides_are_converted_to_the_keys_type() -> None:
    env = {
        "CPWORKER_MAX_CONCURRENCY": "7",
        "CPWORKER_SHUTDOWN_GRACE_S": "2.5",
        "CPWORKER_REGION": "eu-west-1",
        "CPWORKER_LOG_LEVEL": "DEBUG",
    }
    config = parse_config(_raw(), env)
    assert (config.max_concurrency, config.shutdown_grace_s) == (7, 2.5)
    assert isinstance(config.max_concurrency, int)
    assert (config.region, config.log_level) == ("eu-west-1", "DEBUG")


@pytest.mark.parametrize(
    ("env", "uvloop", "lean"),
    [
        ({}, True, True),
        ({"CPWORKER_EVENT_LOOP": "asyncio", "CPWORKER_API_LEAN_JOB_CALLS": "false"}, False, False),
        ({"CPWORKER_EVENT_LOOP": "uvloop"}, True, True),
    ],
)
def test_event_loop_and_lean_calls_settings(env: dict[str, str], uvloop: bool, lean: bool) -> None:
    config = parse_config(_raw(), env)
    assert config.backend_options() == {"use_uvloop": uvloop}
    assert config.api_lean_job_calls is lean


def test_file_values_win_over_defaults_and_env_wins_over_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "max_concurrency = 50\napi_max_attempts = 2\n" + MINIMAL)
    config = load_config(path, env={"CPWORKER_API_MAX_ATTEMPTS": "9"})
    assert (config.max_concurrency, config.api_max_attempts) == (50, 9)


def test_load_config_reads_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CPWORKER_ACTION_TYPES__BUILD__POLL_LOOPS", "4")
    assert load_config(_write(tmp_path, MINIMAL)).action_types["build"].poll_loops == 4


def test_action_type_override_changes_only_that_table() -> None:
    raw = _raw()
    raw["action_types"]["deploy"] = {"category": "Deploy", "provider": "Dep", "handler": "echo"}
    config = parse_config(raw, {"CPWORKER_ACTION_TYPES__BUILD__SLOTS": "3"})
    assert config.action_types["build"].slots == 3
    assert config.action_types["deploy"].slots == 10


def test_query_param_override_is_a_json_table() -> None:
    env = {"CPWORKER_ACTION_TYPES__BUILD__QUERY_PARAM": '{"ProjectName": "web"}'}
    config = parse_config(_raw(query_param={"ProjectName": "api"}), env)
    assert config.action_types["build"].query_param == {"ProjectName": "web"}


def test_action_type_names_match_case_insensitively() -> None:
    raw = {"action_types": {"MyBuild": _raw()["action_types"]["build"]}}
    env = {
        "CPWORKER_ACTION_TYPES__MYBUILD__SLOTS": "3",
        "CPWORKER_ACTION_TYPES__MYBUILD__HANDLER_OPTIONS__GREETING": "hi",
    }
    config = parse_config(raw, env)
    assert list(config.action_types) == ["MyBuild"]  # no second table "mybuild"
    assert config.action_types["MyBuild"].slots == 3
    assert config.action_types["MyBuild"].handler_options == {"greeting": "hi"}


def test_other_environment_variables_are_ignored() -> None:
    env = {"CPWORKER_EMULATOR_SIGV4_KEYS": "AKID=secret", "HOME": "/root", "SLOTS": "0"}
    assert parse_config(_raw(), env) == parse_config(_raw(), {})


def test_two_tables_of_one_action_type_with_different_query_params_are_allowed() -> None:
    raw = _raw(query_param={"ProjectName": "web"})
    raw["action_types"]["api"] = {
        **raw["action_types"]["build"],
        "query_param": {"ProjectName": "api"},
    }
    assert len(parse_config(raw, {}).action_types) == 2


# --- errors ----------------------------------------------------------------------------


class Case(NamedTuple):
    """A bad configuration: keys of the top level, of the action type, env overrides."""

    expect: tuple[str, ...]  # fragments the message must contain
    top: dict[str, Any] = {}  # noqa: RUF012 - never mutated
    build: dict[str, Any] = {}  # noqa: RUF012
    env: dict[str, str] = {}  # noqa: RUF012


ERRORS = {
    "unknown global key": Case(
        (FILE, "max_concurency", "allowed keys", "max_concurrency, shutdown_grace_s"),
        top={"max_concurency": 5},
    ),
    "unknown action type key": Case(
        (FILE, "action_types.build.slot", "allowed keys", "slots, poll_loops"),
        build={"slot": 3},
    ),
    "unknown key from env": Case(
        ("CPWORKER_ACTION_TYPES__BUILD__SLOT", "action_types.build.slot", "allowed keys"),
        env={"CPWORKER_ACTION_TYPES__BUILD__SLOT": "3"},
    ),
    "wrong type in file": Case(
        (FILE, "action_types.build.slots", "'many'", "`int`"), build={"slots": "many"}
    ),
    "wrong type from global env": Case(
        ("CPWORKER_MAX_CONCURRENCY", "max_concurrency", "'lots'", "`int`"),
        env={"CPWORKER_MAX_CONCURRENCY": "lots"},
    ),
    "wrong type of a table from env": Case(
        ("CPWORKER_ACTION_TYPES__BUILD__QUERY_PARAM", "query_param", "'Project=web'", "`object`"),
        env={"CPWORKER_ACTION_TYPES__BUILD__QUERY_PARAM": "Project=web"},
    ),
    "invalid JSON from env": Case(
        ("CPWORKER_ACTION_TYPES__BUILD__QUERY_PARAM", "not valid JSON"),
        env={"CPWORKER_ACTION_TYPES__BUILD__QUERY_PARAM": '{"Project": }'},
    ),
    "enum value": Case(
        (FILE, "log_level", "'LOUD'", "allowed: DEBUG, INFO, WARNING, ERROR"),
        top={"log_level": "LOUD"},
    ),
    "action type enum value": Case(
        (FILE, "action_types.build.category", "'Built'", "allowed: Source, Build, Deploy"),
        build={"category": "Built"},
    ),
    "enum value from env": Case(
        ("CPWORKER_ACTION_TYPES__BUILD__OWNER", "'Nobody'", "allowed: Custom, ThirdParty"),
        env={"CPWORKER_ACTION_TYPES__BUILD__OWNER": "Nobody"},
    ),
    "slots 0": Case((FILE, "action_types.build.slots", "slots=0", "1 or more"), build={"slots": 0}),
    "slots 0 from env": Case(
        ("CPWORKER_ACTION_TYPES__BUILD__SLOTS", "action_types.build.slots", "slots=0"),
        env={"CPWORKER_ACTION_TYPES__BUILD__SLOTS": "0"},
    ),
    "max_concurrency 0": Case((FILE, "max_concurrency=0", "1 or more"), top={"max_concurrency": 0}),
    "ceiling below floor": Case(
        (FILE, "action_types.build.idle_backoff_ceiling_s", "=1.0", "idle_backoff_floor_s=2.0"),
        build={"idle_backoff_floor_s": 2.0, "idle_backoff_ceiling_s": 1.0},
    ),
    "two query_param keys": Case(
        (FILE, "action_types.build", "query_param has 2 keys", "at most one"),
        build={"query_param": {"ProjectName": "web", "Branch": "main"}},
    ),
    "ThirdParty without client_tokens_file": Case(
        (FILE, "action_types.build.owner", "owner='ThirdParty'", "client_tokens_file"),
        build={"owner": "ThirdParty"},
    ),
    "missing required key": Case(
        (FILE, "action_types.build", "missing required field `handler`"), build={"handler": None}
    ),
    "output format": Case(
        (FILE, "action_types.build.output_format", "'rar'", "allowed: zip, tar, tar.gz, input"),
        build={"output_format": "rar"},
    ),
    "transfer concurrency 0 from env": Case(
        ("CPWORKER_TRANSFER_CONCURRENCY", "transfer_concurrency=0", "1 or more"),
        env={"CPWORKER_TRANSFER_CONCURRENCY": "0"},
    ),
    "part size 0": Case(
        (FILE, "transfer_part_size_mib=0", "greater than 0"), top={"transfer_part_size_mib": 0}
    ),
    "negative disk budget": Case(
        (FILE, "disk_budget_mib=-1", "0 or more"), top={"disk_budget_mib": -1}
    ),
    "credential refresh 0": Case(
        (FILE, "artifact_credentials_refresh_s=0", "greater than 0"),
        top={"artifact_credentials_refresh_s": 0},
    ),
    "override into a non-table": Case(
        ("CPWORKER_ACTION_TYPES__BUILD__SLOTS__MAX", "action_types.build.slots is not a table"),
        build={"slots": 4},
        env={"CPWORKER_ACTION_TYPES__BUILD__SLOTS__MAX": "9"},
    ),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS)
def test_errors_name_the_key_the_value_and_the_origin(case: Case) -> None:
    raw = _raw(**case.build)
    table = raw["action_types"]["build"]
    raw["action_types"]["build"] = {k: v for k, v in table.items() if v is not None}
    message = _error({**raw, **case.top}, case.env)
    for fragment in case.expect:
        assert fragment in message, message
    origin = next(iter(case.env), FILE)
    assert message.startswith(f"{origin}: "), message


def test_duplicate_action_type_and_query_param_is_refused() -> None:
    raw = _raw(query_param={"ProjectName": "web"})
    raw["action_types"]["web2"] = copy.deepcopy(raw["action_types"]["build"])
    message = _error(raw)
    assert message.startswith(f"{FILE}: ")
    assert "action_types.build and action_types.web2 both poll" in message
    assert "with the same query_param" in message
    assert "merge them" in message


def test_no_action_types_is_refused() -> None:
    message = _error({"action_types": {}})
    assert "no action types" in message
    assert "[action_types.<name>]" in message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such file") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_invalid_toml_names_the_path_and_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + 'slots = "unterminated\n')
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: ")
    assert "line 5" in str(info.value)


def test_file_errors_name_the_file_path(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "slots = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: action_types.build.slots")


# --- secrets ---------------------------------------------------------------------------


def _with_secrets() -> dict[str, Any]:
    options = {"api_token": TOKEN, "password": PASSWORD, "url": "https://ci.example.com"}
    return _raw(handler_options=options, client_tokens_file="/run/tokens.json")


def test_secrets_are_masked_in_repr_str_and_masked() -> None:
    config = parse_config(_with_secrets(), {})
    assert config.action_types["build"].handler_options["api_token"] == TOKEN  # usable
    shown = masked(msgspec.to_builtins(config))
    options = shown["action_types"]["build"]["handler_options"]
    assert options == {"api_token": "***", "password": "***", "url": "https://ci.example.com"}
    assert shown["action_types"]["build"]["client_tokens_file"] == "/run/tokens.json"
    for text in (repr(config), str(config), repr(config.action_types["build"]), str(shown)):
        assert TOKEN not in text
        assert PASSWORD not in text
        assert "https://ci.example.com" in text


def test_secrets_from_the_environment_are_masked_too() -> None:
    env = {"CPWORKER_ACTION_TYPES__BUILD__HANDLER_OPTIONS__DB_PASSWORD": PASSWORD}
    config = parse_config(_raw(), env)
    assert config.action_types["build"].handler_options == {"db_password": PASSWORD}
    assert PASSWORD not in repr(config)
    assert masked(msgspec.to_builtins(config))["action_types"]["build"]["handler_options"] == {
        "db_password": "***"
    }


def test_masked_walks_nested_tables_and_lists() -> None:
    value = {"steps": [{"secret_key": "s1", "name": "a"}], "ApiKey": "k", "token_path": "/t"}
    assert masked(value) == {
        "steps": [{"secret_key": "***", "name": "a"}],
        "ApiKey": "***",
        "token_path": "/t",  # a file name, not the secret itself
    }


SECRET_ERRORS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "error elsewhere": ({"slots": 0}, {}),
    "bad enum elsewhere": ({"category": "Built"}, {}),
    "secret under an unknown key": ({"api_token": TOKEN, "password": PASSWORD}, {}),
    "secret in invalid JSON": (
        {},
        {"CPWORKER_ACTION_TYPES__BUILD__HANDLER_OPTIONS__API_TOKEN": "[" + TOKEN},
    ),
    "secret override into a non-table": (
        {"slots": 4},
        {"CPWORKER_ACTION_TYPES__BUILD__SLOTS__PASSWORD": PASSWORD},
    ),
}


@pytest.mark.parametrize(("build", "env"), SECRET_ERRORS.values(), ids=SECRET_ERRORS)
def test_secret_values_never_appear_in_error_messages(
    build: dict[str, Any], env: dict[str, str]
) -> None:
    raw = _with_secrets()
    raw["action_types"]["build"].update(build)
    message = _error(raw, env)
    assert TOKEN not in message
    assert PASSWORD not in message


def test_config_is_frozen() -> None:
    config = parse_config(_raw(), {})
    with pytest.raises(AttributeError):
        config.region = "eu-west-1"  # type: ignore[misc]
    assert isinstance(config, WorkerConfig)


@pytest.mark.parametrize(
    ("raw", "env"),
    [
        (_raw(handler_options=["x", {"password": "hunter2-secret"}]), {}),
        (_raw(), {"CPWORKER_ACTION_TYPES__BUILD__HANDLER_OPTIONS": '["hunter2-secret"]'}),
        (_raw(), {"CPWORKER_ACTION_TYPES__BUILD__SLOTS": '{"bearer": "hunter2-secret"}'}),
    ],
)
def test_badly_typed_values_never_show_secrets(raw: dict[str, Any], env: dict[str, str]) -> None:
    message = _error(raw, env)
    assert "hunter2-secret" not in message
    assert "action_types.build." in message
