"""The `cpworker` command line as real subprocesses: check-config, run, action-type.

Subprocess tests are few (each costs a Python start-up); the definition checks of
`cpworker action-type register` are also tested in-process, where they are cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from cpworker import models as m
from cpworker.action_types import (
    DefinitionError,
    check_delete_args,
    control_plane_settings,
    load_definition,
)
from cpworker.config import ConfigError
from cpworker.control_plane import ControlPlane
from cpworker.emulator.client import EmulatorProcess
from tests.conftest import TEST_KEY_ID, TEST_SECRET

CLI_TIMEOUT_S = 30.0
TOKEN = "tok-5e1d-NOT-FOR-OUTPUT"
PASSWORD = "pw-c0de-NOT-FOR-OUTPUT"


class Cli:
    """Runs `python -m cpworker ...` with a clean environment: no CPWORKER_*, dummy keys."""

    def __init__(self, tmp_path: Path) -> None:
        self.cwd = tmp_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CPWORKER_"))}
        self.env.update(
            AWS_ACCESS_KEY_ID=TEST_KEY_ID,
            AWS_SECRET_ACCESS_KEY=TEST_SECRET,
            AWS_CONFIG_FILE=str(tmp_path / "no-such-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-such-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
        )

    async def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cpworker", *args]
        with anyio.fail_after(CLI_TIMEOUT_S):
            done = await anyio.run_process(
                command,
                env={**self.env, **env},
                cwd=self.cwd,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        return subprocess.CompletedProcess(
            command, done.returncode, done.stdout.decode(), done.stderr.decode()
        )

    async def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = await self.run(*args)
        assert done.returncode == 0, done.stderr
        return done


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _worker_toml(handler: str = "echo", extra: str = "", top: str = "") -> str:
    return (
        f'{top}\n[action_types.build]\ncategory = "Build"\nprovider = "MyBuild"\n'
        f'handler = "{handler}"\n{extra}\n'
        f'[action_types.build.handler_options]\napi_token = "{TOKEN}"\ngreeting = "hi"\n'
    )


# --- check-config and run --------------------------------------------------------------


async def test_check_config_prints_the_effective_config_with_secrets_masked(
    cli: Cli, tmp_path: Path
) -> None:
    path = _write(tmp_path / "cpworker.toml", _worker_toml())
    done = await cli.run(
        "check-config",
        str(path),
        CPWORKER_ACTION_TYPES__BUILD__SLOTS="7",
        CPWORKER_ACTION_TYPES__BUILD__HANDLER_OPTIONS__PASSWORD=PASSWORD,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    build = shown["action_types"]["build"]
    assert build["slots"] == 7  # the environment override
    assert (build["owner"], build["max_batch_size"], shown["max_concurrency"]) == (
        "Custom",
        10,
        200,
    )
    assert build["handler_options"] == {"api_token": "***", "greeting": "hi", "password": "***"}
    for secret in (TOKEN, PASSWORD):
        assert secret not in done.stdout + done.stderr


CONFIG_ERRORS = {
    "bad value in file": (
        {"extra": "slots = 0"},
        {},
        ("cpworker.toml: action_types.build.slots", "1 or more"),
    ),
    "bad env override": (
        {},
        {"CPWORKER_ACTION_TYPES__BUILD__MAX_BATCH_SIZE": "lots"},
        ("CPWORKER_ACTION_TYPES__BUILD__MAX_BATCH_SIZE", "max_batch_size = 'lots'"),
    ),
    "handler cannot be imported": (
        {"handler": "no_such_package_cpw.handlers:build"},
        {},
        ("action_types.build.handler", "cannot import 'no_such_package_cpw.handlers'"),
    ),
    "handler is not async": (
        {"handler": "os.path:join"},
        {},
        ("action_types.build.handler", "'join' is not an async function"),
    ),
}


@pytest.mark.parametrize(("toml", "env", "expect"), CONFIG_ERRORS.values(), ids=CONFIG_ERRORS)
async def test_check_config_error_exits_2_naming_the_key(
    cli: Cli, tmp_path: Path, toml: dict[str, str], env: dict[str, str], expect: tuple[str, ...]
) -> None:
    path = _write(tmp_path / "cpworker.toml", _worker_toml(**toml))
    done = await cli.run("check-config", str(path), **env)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("cpworker check-config: ")
    for fragment in expect:
        assert fragment in done.stderr
    assert "Traceback" not in done.stderr
    assert TOKEN not in done.stderr


async def test_run_with_a_config_error_exits_2(cli: Cli, tmp_path: Path) -> None:
    path = _write(tmp_path / "cpworker.toml", _worker_toml(top='log_level = "LOUD"'))
    done = await cli.run("run", "-c", str(path))
    assert done.returncode == 2, done.stderr
    assert f"cpworker run: {path}: log_level = 'LOUD'" in done.stderr
    assert "allowed: DEBUG, INFO, WARNING, ERROR" in done.stderr
    assert "Traceback" not in done.stderr


# --- action-type definitions (in-process) ----------------------------------------------


def _definition(provider: str) -> dict[str, Any]:
    return {
        "category": "Test",
        "provider": provider,
        "version": "1",
        "settings": {"entityUrlTemplate": "https://ci.example.com/{Config:ProjectName}"},
        "configurationProperties": [
            {"name": "ProjectName", "required": True, "key": True, "secret": False}
            | {"queryable": True, "type": "String", "description": "the project"},
            {"name": "ApiToken", "required": False, "key": False, "secret": True},
        ],
        "inputArtifactDetails": {"minimumCount": 1, "maximumCount": 1},
        "outputArtifactDetails": {"minimumCount": 0, "maximumCount": 1},
        "tags": [{"key": "team", "value": "platform"}],
    }


def _definition_toml(provider: str) -> str:
    """`_definition(provider)` written by hand as TOML (as a user would write it)."""
    return f"""\
category = "Test"
provider = "{provider}"
version = "1"
tags = [{{ key = "team", value = "platform" }}]

[settings]
entityUrlTemplate = "https://ci.example.com/{{Config:ProjectName}}"

[[configurationProperties]]
name = "ProjectName"
required = true
key = true
secret = false
queryable = true
type = "String"
description = "the project"

[[configurationProperties]]
name = "ApiToken"
required = false
key = false
secret = true

[inputArtifactDetails]
minimumCount = 1
maximumCount = 1

[outputArtifactDetails]
minimumCount = 0
maximumCount = 1
"""


def test_toml_and_json_definitions_decode_to_the_same_input(tmp_path: Path) -> None:
    toml = load_definition(_write(tmp_path / "d.toml", _definition_toml("MyBuild")))
    from_json = load_definition(_write(tmp_path / "d.json", json.dumps(_definition("MyBuild"))))
    assert toml == from_json
    assert json.loads(m.encode(toml)) == _definition("MyBuild")
    assert toml.configuration_properties is not None
    assert [p.secret for p in toml.configuration_properties] == [False, True]


def _with(change: dict[str, Any], prop: dict[str, Any] | None = None) -> dict[str, Any]:
    definition = {**_definition("MyBuild"), **change}
    first = definition["configurationProperties"][0]
    definition["configurationProperties"] = [{**first, **(prop or {})}]
    return {k: v for k, v in definition.items() if v is not None}


BAD_DEFINITIONS = {
    "unknown key": (
        _with({}, {"secrett": True}),
        ("configurationProperties[0].secrett", "allowed keys here:", "secret, queryable"),
    ),
    "unknown top-level key": (
        _with({"configurationProperty": []}),
        ("configurationProperty: unknown key", "configurationProperties, tags"),
    ),
    "wrong type": (
        _with({}, {"secret": "yes"}),
        ("configurationProperties[0].secret = 'yes'", "Expected `bool`, got `str`"),
    ),
    "missing key": (_with({"provider": None}), ("provider: required key is missing",)),
    "missing nested key": (
        _with({"inputArtifactDetails": {"minimumCount": 0}}),
        ("inputArtifactDetails.maximumCount: required key is missing",),
    ),
    "category enum": (
        _with({"category": "Built"}),
        ("category = 'Built'", "[Source, Build, Deploy, Test, Invoke, Approval, Compute]"),
    ),
    "provider too long": (
        _with({"provider": "P" * 36}),
        ("provider = 'PPPP", "length less than or equal to 35"),
    ),
    "artifact count too high": (
        _with({"outputArtifactDetails": {"minimumCount": 0, "maximumCount": 6}}),
        ("outputArtifactDetails.maximumCount = '6'", "less than or equal to 5"),
    ),
    "property type enum": (
        _with({}, {"type": "Text"}),
        ("configurationProperties[0].type = 'Text'", "[String, Number, Boolean]"),
    ),
    "top level not an object": ([_definition("MyBuild")], ("top level is a list",)),
}


@pytest.mark.parametrize(("body", "expect"), BAD_DEFINITIONS.values(), ids=BAD_DEFINITIONS)
def test_bad_definitions_name_the_file_and_the_key(
    tmp_path: Path, body: Any, expect: tuple[str, ...]
) -> None:
    path = _write(tmp_path / "bad.json", json.dumps(body))
    with pytest.raises(DefinitionError) as info:
        load_definition(path)
    assert isinstance(info.value, ConfigError)  # exit code 2
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in expect:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("name", "text", "expect"),
    [
        ("d.yaml", "category: Test", "unknown definition format '.yaml'"),
        ("d.toml", 'category = "Test', "not valid TOML"),
        ("d.json", '{"category": ', "not valid JSON"),
    ],
)
def test_unreadable_definitions(tmp_path: Path, name: str, text: str, expect: str) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(DefinitionError, match=expect) as info:
        load_definition(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_missing_definition_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(DefinitionError, match=f"^{path}: no such file"):
        load_definition(path)


def test_delete_arguments_are_checked_against_the_model() -> None:
    check_delete_args("Build", "MyBuild", "1")
    with pytest.raises(DefinitionError) as info:
        check_delete_args("Built", "MyBuild", "1234567890")
    assert "category = 'Built'" in str(info.value)
    assert "version = '1234567890': must have length less than or equal to 9" in str(info.value)


def test_flags_override_the_worker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith(("CPWORKER_", "AWS_"))]:
        monkeypatch.delenv(var)
    top = 'region = "eu-west-1"\ncodepipeline_endpoint_url = "http://127.0.0.1:1"'
    path = str(_write(tmp_path / "w.toml", _worker_toml(top=top)))
    from_file = control_plane_settings(path, None, None)
    assert (from_file.region, from_file.endpoint_url) == ("eu-west-1", "http://127.0.0.1:1")
    flags = control_plane_settings(path, "ap-south-1", "http://127.0.0.1:2")
    assert (flags.region, flags.endpoint_url) == ("ap-south-1", "http://127.0.0.1:2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "sa-east-1")
    assert control_plane_settings(None, None, None).region == "sa-east-1"
    assert control_plane_settings(None, None, None).endpoint_url is None


# --- action-type against the emulator ---------------------------------------------------


async def _registered(cp: ControlPlane) -> list[m.ActionTypeId]:
    return [t.id for t in await cp.list_action_types("Custom")]


@pytest.mark.parametrize("suffix", [".toml", ".json"])
async def test_register_list_and_delete_an_action_type(
    cli: Cli,
    tmp_path: Path,
    suffix: str,
    emulator: EmulatorProcess,
    cp: ControlPlane,
    action_type: m.ActionTypeId,
) -> None:
    provider = action_type.provider
    if suffix == ".toml":
        definition = _write(tmp_path / "type.toml", _definition_toml(provider))
        where = ["--endpoint-url", emulator.codepipeline]
    else:
        definition = _write(tmp_path / "type.json", json.dumps(_definition(provider)))
        top = f'codepipeline_endpoint_url = "{emulator.codepipeline}"'
        where = ["-c", str(_write(tmp_path / "w.toml", _worker_toml(top=top)))]

    registered = json.loads(
        (await cli.ok("action-type", "register", str(definition), *where)).stdout
    )
    assert registered["id"] == m.to_builtins(action_type)
    names = [p["name"] for p in registered["actionConfigurationProperties"]]
    assert names == ["ProjectName", "ApiToken"]
    assert action_type in await _registered(cp)

    listed = (await cli.ok("action-type", "list", "--owner", "Custom", *where)).stdout
    line = f"Test/Custom/{provider}/1  properties: ProjectName [queryable], ApiToken [secret]"
    assert line in listed.splitlines()
    if suffix == ".json":  # the owner filter reaches the service
        others = (await cli.ok("action-type", "list", "--owner", "ThirdParty", *where)).stdout
        assert provider not in others
        assert all("/ThirdParty/" in line for line in others.splitlines())

    deleted = await cli.ok("action-type", "delete", "Test", provider, "1", *where)
    assert deleted.stdout.strip() == f"deleted Test/Custom/{provider}/1"
    assert action_type not in await _registered(cp)


async def test_register_a_malformed_definition_exits_2(
    cli: Cli,
    tmp_path: Path,
    emulator: EmulatorProcess,
    cp: ControlPlane,
    action_type: m.ActionTypeId,
) -> None:
    text = _definition_toml(action_type.provider).replace("secret = true", "secrett = true")
    path = _write(tmp_path / "type.toml", text)
    done = await cli.run(
        "action-type", "register", str(path), "--endpoint-url", emulator.codepipeline
    )
    assert done.returncode == 2, done.stderr
    assert f"{path}: configurationProperties[1].secrett: unknown key" in done.stderr
    assert "allowed keys here: name, required, key, secret" in done.stderr
    assert done.stdout == ""
    assert action_type not in await _registered(cp)


async def test_register_refused_by_the_service_exits_1(
    cli: Cli,
    tmp_path: Path,
    emulator: EmulatorProcess,
    cp: ControlPlane,
    action_type: m.ActionTypeId,
) -> None:
    definition = _definition(action_type.provider)
    definition["configurationProperties"][1]["queryable"] = True  # two queryable properties
    path = _write(tmp_path / "type.json", json.dumps(definition))
    done = await cli.run(
        "action-type", "register", str(path), "--endpoint-url", emulator.codepipeline
    )
    assert done.returncode == 1, done.stderr
    assert "CreateCustomActionType failed with ValidationException" in done.stderr
    assert "at most one queryable property" in done.stderr
    assert action_type not in await _registered(cp)
