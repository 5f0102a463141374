"""`cpworker action-type register|list|delete`: manage custom action types from the shell.

A definition file (TOML or JSON, chosen by the suffix) has the shape of CodePipeline's
CreateCustomActionType input with the camelCase keys of the AWS CLI's `--cli-input-json`::

    category = "Build"
    provider = "MyBuild"
    version = "1"

    [settings]
    entityUrlTemplate = "https://build.example.com/projects/{Config:ProjectName}"

    [[configurationProperties]]
    name = "ProjectName"
    required = true
    key = true
    secret = false
    queryable = true
    type = "String"

    [inputArtifactDetails]
    minimumCount = 1
    maximumCount = 1

    [outputArtifactDetails]
    minimumCount = 0
    maximumCount = 1

It is decoded into `models.CreateCustomActionTypeInput` (unknown keys and wrong types are
refused, not ignored) and checked against botocore's service model (lengths, patterns,
enums) before anything is sent. Errors name the file, the key and what is allowed, and
are raised as `DefinitionError` (a `ConfigError`: exit code 2). The calls go through
`ControlPlane` with the standard AWS credential chain; what the service refuses is a
`ServiceError` (exit code 1).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec
import msgspec.inspect as mi

from cpworker import models as m
from cpworker.config import ConfigError, load_config
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.emulator.validation import RequestValidator

__all__ = [
    "DefinitionError",
    "check_delete_args",
    "control_plane_settings",
    "delete",
    "format_action_type",
    "list_types",
    "load_definition",
    "model_errors",
    "register",
    "run",
]

_OPERATION: Final = "CreateCustomActionType"
_SUFFIXES: Final = (".toml", ".json")


class DefinitionError(ConfigError):
    """An action type definition (file or command-line arguments) is invalid."""


# --- reading a definition --------------------------------------------------------------


def load_definition(path: str | os.PathLike[str]) -> m.CreateCustomActionTypeInput:
    """Read, decode and validate a definition file; `DefinitionError` names what is wrong."""
    file = Path(path)
    raw = _read(file)
    if not isinstance(raw, dict):
        raise DefinitionError(
            f"{file}: the top level is a {type(raw).__name__}; it must be an object/table "
            "with category, provider, version, inputArtifactDetails and outputArtifactDetails"
        )
    problems = _unknown_keys(raw, mi.type_info(m.CreateCustomActionTypeInput), "")
    if problems:
        raise DefinitionError(f"{file}: " + f"\n{file}: ".join(problems))
    try:
        definition = msgspec.convert(raw, m.CreateCustomActionTypeInput, strict=True)
    except msgspec.ValidationError as exc:
        raise DefinitionError(f"{file}: {_explain_decode(exc, raw)}") from None
    problems = model_errors(_OPERATION, json.loads(m.encode(definition)))
    if problems:
        raise DefinitionError(f"{file}: " + f"\n{file}: ".join(problems))
    return definition


def _read(file: Path) -> Any:
    if file.suffix.lower() not in _SUFFIXES:
        raise DefinitionError(
            f"{file}: unknown definition format {file.suffix or '(no suffix)'!r}; "
            "name the file *.toml or *.json"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DefinitionError(f"{file}: no such file; pass the definition's path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"{file}: cannot read it ({type(exc).__name__}: {exc})") from None
    try:
        return tomllib.loads(text) if file.suffix.lower() == ".toml" else json.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DefinitionError(f"{file}: not valid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DefinitionError(f"{file}: not valid JSON: {exc}") from None


def _unknown_keys(value: Any, info: mi.Type, path: str) -> list[str]:
    """Keys the shape does not have, anywhere in `value` (msgspec would drop them)."""
    if isinstance(info, mi.UnionType):
        return [p for t in info.types for p in _unknown_keys(value, t, path)]
    if isinstance(info, mi.VarTupleType | mi.ListType) and isinstance(value, list):
        return [
            p for i, v in enumerate(value) for p in _unknown_keys(v, info.item_type, f"{path}[{i}]")
        ]
    if not isinstance(info, mi.StructType) or not isinstance(value, dict):
        return []
    fields = {f.encode_name: f.type for f in info.fields}
    problems: list[str] = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            allowed = ", ".join(fields)
            problems.append(f"{where}: unknown key {key!r}; allowed keys here: {allowed}")
        else:
            problems.extend(_unknown_keys(item, fields[key], where))
    return problems


_MSGSPEC_PATH: Final = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _explain_decode(exc: msgspec.ValidationError, raw: dict[str, Any]) -> str:
    """msgspec's message with the key spelled out (no `$`) and the bad value shown."""
    text = str(exc)
    match = _MSGSPEC_PATH.search(text)
    path = match.group("path").lstrip(".") if match else ""
    problem = text[: match.start()] if match else text
    missing = re.fullmatch(r"Object missing required field `(\w+)`", problem)
    if missing:
        key = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return f"{key}: required key is missing; add it"
    value = _lookup(raw, path)
    shown = "" if value is _MISSING else f" = {value!r}"
    return f"{path or '(top level)'}{shown}: {problem}"


_MISSING: Final = object()


def _lookup(raw: Any, path: str) -> Any:
    for name, index in re.findall(r"(\w+)|\[(\d+)\]", path):
        try:
            raw = raw[name] if name else raw[int(index)]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return raw


# --- the service model's constraints ---------------------------------------------------

_AWS_ERROR: Final = re.compile(
    r"Value (?P<value>.*) at '(?P<path>[^']*)' failed to satisfy constraint: (?P<must>.*)"
)


def model_errors(operation: str, body: dict[str, Any]) -> list[str]:
    """Violations of botocore's model for `operation`, each as `key = value: constraint`."""
    return [_explain_model_error(e) for e in _validator(operation).errors(operation, body)]


@functools.cache
def _validator(operation: str) -> RequestValidator:
    # The emulator's validator: botocore's model compiled into checks, in AWS's wording.
    return RequestValidator([operation])


def _explain_model_error(error: str) -> str:
    match = _AWS_ERROR.fullmatch(error)
    if match is None:
        return error
    # AWS paths count list members from 1: `configurationProperties.1.member.name`.
    path = re.sub(r"\.(\d+)\.member", lambda g: f"[{int(g.group(1)) - 1}]", match.group("path"))
    must = match.group("must").replace("Member must", "must")
    return f"{path} = {match.group('value')}: {must}"


# --- talking to CodePipeline -----------------------------------------------------------


def control_plane_settings(
    config: str | None, region: str | None, endpoint_url: str | None
) -> ControlPlaneSettings:
    """Region and endpoint from the flags, else the worker config, else the environment."""
    if config is not None:
        worker = load_config(config)
        return ControlPlaneSettings(
            region=region or worker.region,
            endpoint_url=endpoint_url or worker.codepipeline_endpoint_url,
            max_attempts=worker.api_max_attempts,
        )
    env_region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return ControlPlaneSettings(
        region=region or env_region or "us-east-1", endpoint_url=endpoint_url
    )


async def register(
    settings: ControlPlaneSettings, definition: m.CreateCustomActionTypeInput
) -> m.ActionType:
    """Create the custom action type; returns it as CodePipeline stored it."""
    async with ControlPlane.open(settings) as cp:
        return await cp.create_custom_action_type(definition)


async def list_types(settings: ControlPlaneSettings, owner: str | None) -> list[m.ActionType]:
    """Every action type (of `owner`, if given), sorted by category/owner/provider/version."""
    async with ControlPlane.open(settings) as cp:
        types = await cp.list_action_types(owner)
    return sorted(types, key=lambda t: (t.id.category, t.id.owner, t.id.provider, t.id.version))


def check_delete_args(category: str, provider: str, version: str) -> None:
    """`DefinitionError` unless the arguments fit the model (category enum, lengths, ...)."""
    body = {"category": category, "provider": provider, "version": version}
    problems = model_errors("DeleteCustomActionType", body)
    if problems:
        raise DefinitionError("delete: " + "; ".join(problems))


async def delete(
    settings: ControlPlaneSettings, category: str, provider: str, version: str
) -> None:
    """Mark a custom action type as deleted (after checking the arguments locally)."""
    check_delete_args(category, provider, version)
    async with ControlPlane.open(settings) as cp:
        await cp.delete_custom_action_type(category, provider, version)


def format_action_type(action_type: m.ActionType) -> str:
    """One line: `category/owner/provider/version` and its configuration properties."""
    i = action_type.id
    names = []
    for prop in action_type.action_configuration_properties:
        marks = [
            mark for mark, on in (("secret", prop.secret), ("queryable", prop.queryable)) if on
        ]
        names.append(prop.name + (f" [{', '.join(marks)}]" if marks else ""))
    properties = ", ".join(names) if names else "-"
    return f"{i.category}/{i.owner}/{i.provider}/{i.version}  properties: {properties}"


# --- the command -----------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run `cpworker action-type <register|list|delete>` (parsed by `cpworker.cli`).

    Local checks come first: a bad definition or argument never reaches the service.
    """

    def settings() -> ControlPlaneSettings:
        return control_plane_settings(args.config, args.region, args.endpoint_url)

    if args.action == "register":
        definition = load_definition(args.definition)
        action_type = anyio.run(register, settings(), definition)
        print(json.dumps(m.to_builtins(action_type), indent=2))
    elif args.action == "list":
        for action_type in anyio.run(list_types, settings(), args.owner):
            print(format_action_type(action_type))
    else:
        check_delete_args(args.category, args.provider, args.version)
        anyio.run(delete, settings(), args.category, args.provider, args.version)
        print(f"deleted {args.category}/Custom/{args.provider}/{args.version}")
    return 0
