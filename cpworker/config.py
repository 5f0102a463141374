"""The worker's configuration: `cpworker.toml` plus `CPWORKER_*` environment overrides.

::

    region = "eu-west-1"
    max_concurrency = 200

    [action_types.build]
    category = "Build"
    provider = "MyBuild"
    handler = "mybuild.handlers:build"
    slots = 100

Every key can be overridden from the environment: `CPWORKER_<KEY>` for a global key and
`CPWORKER_ACTION_TYPES__<NAME>__<KEY>` for a key of one action type (a table value such
as `query_param` is given as JSON). Errors name the key, the bad value (unless the key
is secret), where it came from and what is allowed; they are raised as `ConfigError`.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from cpworker import models as m
from cpworker.errors import CpWorkerError

__all__ = [
    "ENV_PREFIX",
    "ActionTypeConfig",
    "ConfigError",
    "WorkerConfig",
    "is_secret_key",
    "load_config",
    "masked",
    "parse_config",
    "secret_values",
]

ENV_PREFIX: Final = "CPWORKER_"
_MASK: Final = "***"
# handler_options keys whose values are masked wherever the configuration is shown.
_SECRET_KEY = re.compile(
    r"secret|token|password|passwd|credential|private|api[_-]?key|auth|bearer|cookie|session",
    re.I,
)
# Environment variables of other cpworker commands, not configuration keys.
_NOT_CONFIG = {"CPWORKER_EMULATOR_SIGV4_KEYS"}


class ConfigError(CpWorkerError):
    """The configuration is invalid; the message names the key and what is allowed."""


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name}={value!r}: must be greater than 0")


class ActionTypeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One action type the worker runs jobs of (a table under `[action_types.<name>]`)."""

    category: Literal["Source", "Build", "Deploy", "Test", "Invoke", "Approval", "Compute"]
    provider: str
    version: str = "1"
    owner: Literal["Custom", "ThirdParty"] = "Custom"
    handler: str
    handler_options: dict[str, Any] = {}
    slots: int = 10
    poll_loops: int = 1
    max_batch_size: int = 10
    query_param: dict[str, str] = {}
    idle_backoff_floor_s: float = 0.2
    idle_backoff_ceiling_s: float = 5.0
    handler_timeout_s: float = 3600.0
    client_tokens_file: str | None = None
    output_format: Literal["zip", "tar", "tar.gz", "input"] = "zip"

    def __post_init__(self) -> None:
        if not 1 <= len(self.provider) <= 35:
            raise ValueError(f"provider={self.provider!r}: must be 1 to 35 characters")
        if not 1 <= len(self.version) <= 9:
            raise ValueError(f"version={self.version!r}: must be 1 to 9 characters")
        for name in ("slots", "poll_loops", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be 1 or more")
        if len(self.query_param) > 1:
            raise ValueError(
                f"query_param has {len(self.query_param)} keys: CodePipeline takes at most one "
                "(the action type's queryable property)"
            )
        for name in ("idle_backoff_floor_s", "idle_backoff_ceiling_s", "handler_timeout_s"):
            _positive(name, getattr(self, name))
        if self.idle_backoff_ceiling_s < self.idle_backoff_floor_s:
            raise ValueError(
                f"idle_backoff_ceiling_s={self.idle_backoff_ceiling_s!r} is below "
                f"idle_backoff_floor_s={self.idle_backoff_floor_s!r}: make the ceiling larger"
            )
        if self.owner == "ThirdParty" and (self.query_param or not self.client_tokens_file):
            raise ValueError(
                "owner='ThirdParty' needs client_tokens_file (a JSON object of client id → "
                "client token) and takes no query_param"
            )

    @property
    def action_type_id(self) -> m.ActionTypeId:
        return m.ActionTypeId(
            category=self.category, owner=self.owner, provider=self.provider, version=self.version
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in masked(msgspec.to_builtins(self)).items())
        return f"ActionTypeConfig({fields})"

    def __str__(self) -> str:
        return repr(self)


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration of one worker process."""

    action_types: dict[str, ActionTypeConfig]
    region: str = "us-east-1"
    codepipeline_endpoint_url: str | None = None
    s3_endpoint_url: str | None = None
    max_concurrency: int = 200
    shutdown_grace_s: float = 30.0
    result_deadline_s: float = 120.0
    api_max_attempts: int = 5
    api_lean_job_calls: bool = True
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    bind: str = "0.0.0.0:9464"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    work_dir: str | None = None
    # Artifacts (sizes in MiB, fractions allowed).
    artifact_credentials_refresh_s: float = 600.0
    transfer_part_size_mib: float = 8.0
    multipart_threshold_mib: float = 16.0
    transfer_concurrency_per_job: int = 8
    transfer_concurrency: int = 32
    disk_budget_mib: float = 0.0
    unpack_max_files: int = 100_000
    unpack_max_mib: float = 10_240.0
    unpack_max_ratio: float = 200.0

    def backend_options(self) -> dict[str, Any]:
        """anyio's asyncio backend options for `event_loop` (``auto``: uvloop when installed)."""
        try:
            import uvloop  # noqa: F401
        except ImportError:
            if self.event_loop == "uvloop":
                raise ConfigError(
                    "event_loop = 'uvloop', but uvloop is not installed (it does not run on "
                    "Windows); install it (`pip install uvloop`) or set event_loop = 'auto'"
                ) from None
            return {"use_uvloop": False}
        return {"use_uvloop": self.event_loop != "asyncio"}

    def __post_init__(self) -> None:
        if not self.action_types:
            raise ValueError(
                "no action types: add at least one [action_types.<name>] table with "
                "category, provider and handler"
            )
        for name in (
            "max_concurrency",
            "api_max_attempts",
            "transfer_concurrency_per_job",
            "transfer_concurrency",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be 1 or more")
        for name in (
            "result_deadline_s",
            "artifact_credentials_refresh_s",
            "transfer_part_size_mib",
            "multipart_threshold_mib",
            "unpack_max_mib",
            "unpack_max_ratio",
        ):
            _positive(name, getattr(self, name))
        for name in ("disk_budget_mib", "unpack_max_files"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be 0 or more")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s={self.shutdown_grace_s!r}: must be 0 or more")
        if self.bind:
            parse_bind(self.bind)
        seen: dict[Any, str] = {}
        for name, t in self.action_types.items():
            route = (t.action_type_id, tuple(t.query_param.items()))
            if route in seen:
                raise ValueError(
                    f"action_types.{seen[route]} and action_types.{name} both poll "
                    f"{t.category}/{t.owner}/{t.provider}/{t.version} with the same "
                    "query_param; merge them into one table"
                )
            seen[route] = name


def parse_bind(bind: str) -> tuple[str, int]:
    """``host:port`` (``[::]:9464`` for IPv6) as a pair; ValueError naming the fix."""
    host, sep, port = bind.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            f"bind={bind!r}: must be host:port with a port from 0 to 65535, e.g. "
            "'0.0.0.0:9464' or '[::]:9464' (or '' to serve no endpoints)"
        )
    return host, int(port)


def secret_values(value: Any) -> list[str]:
    """Every string under a secret-looking key of a configuration table (for the redactor)."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if _is_secret((k,)):
                found += [v] if isinstance(v, str) else [str(x) for x in _leaves(v)]
            else:
                found += secret_values(v)
    elif isinstance(value, list):
        for v in value:
            found += secret_values(v)
    return found


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def is_secret_key(key: str) -> bool:
    """Whether a key's name looks like it holds a secret (`api_token`, `password`, ...)."""
    return _is_secret((key,))


def masked(value: Any) -> Any:
    """A copy of a configuration dict with the values of secret-looking keys masked."""
    if isinstance(value, dict):
        return {k: _MASK if _is_secret((k,)) else masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> WorkerConfig:
    """Read `path` (TOML), apply `CPWORKER_*` overrides from `env` (default: os.environ)."""
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file; pass the worker's TOML file with -c") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read it ({type(exc).__name__}: {exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse_config(raw, os.environ if env is None else env, source=str(file))


def parse_config(
    raw: dict[str, Any], env: Mapping[str, str] | None = None, *, source: str = "configuration"
) -> WorkerConfig:
    """Validate a configuration dict (as read from TOML) plus environment overrides."""
    origins: dict[tuple[str, ...], str] = {}
    merged = _apply_env(raw, env or {}, origins)
    # msgspec elides dict keys from error paths (`action_types[...]`), so each action type
    # is checked on its own first: its errors then name the table.
    tables = merged.get("action_types")
    for name, table in tables.items() if isinstance(tables, dict) else ():
        try:
            msgspec.convert(table, ActionTypeConfig, strict=False)
        except msgspec.ValidationError as exc:
            prefix = ("action_types", name)
            problem = _explain(exc, ActionTypeConfig, prefix, merged, origins, source)
            raise ConfigError(problem) from None
    try:
        return msgspec.convert(merged, WorkerConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, WorkerConfig, (), merged, origins, source)) from None


def _apply_env(
    raw: dict[str, Any], env: Mapping[str, str], origins: dict[tuple[str, ...], str]
) -> dict[str, Any]:
    merged: dict[str, Any] = json.loads(json.dumps(raw, default=str))  # a copy to change
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in _NOT_CONFIG:
            continue
        parts = var[len(ENV_PREFIX) :].lower().split("__")
        table: dict[str, Any] = merged
        path: list[str] = []
        for part in parts[:-1]:
            key = _match_key(table, part)
            path.append(key)
            if key not in table:
                origins[tuple(path)] = var
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{var}: {'.'.join(path)} is not a table; remove {var}")
        key = _match_key(table, parts[-1])
        table[key] = _env_value(var, env[var])
        origins[(*path, key)] = var
    return merged


def _match_key(table: dict[str, Any], lowered: str) -> str:
    """Environment names are upper case; find the table's key that matches, if any."""
    return next((k for k in table if k.lower() == lowered), lowered)


def _env_value(var: str, text: str) -> Any:
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{var}: looks like JSON but is not valid JSON ({exc})") from None
    return text


_PATH = re.compile(r" - at `\$((?:\.\w+|\[[^\]]*\])*)`$")


def _explain(
    exc: msgspec.ValidationError,
    cls: type[msgspec.Struct],
    prefix: tuple[str, ...],
    merged: dict[str, Any],
    origins: dict[tuple[str, ...], str],
    source: str,
) -> str:
    """msgspec's error with the key spelled out, its value, its origin and what is allowed."""
    text = str(exc)
    match = _PATH.search(text)
    inner = tuple(re.findall(r"\.(\w+)", match.group(1))) if match else ()
    problem = (text[: match.start()] if match else text).replace(
        "Object contains unknown field", "unknown key"
    )
    if problem.startswith("unknown key"):
        problem += "; allowed keys: " + ", ".join(_fields(cls, inner))
    elif problem.startswith(("Invalid enum value", "Expected `str`")) and inner:
        allowed = _literal_values(cls, inner[0]) if len(inner) == 1 else ()
        if allowed:
            problem += "; allowed: " + ", ".join(allowed)
    path = prefix + inner
    value = _lookup(merged, path)
    # Handler options are free-form and may hold secrets anywhere: their values never show.
    hidden = _is_secret(path) or "handler_options" in path
    shown = "" if value is _MISSING else f" = {_MASK if hidden else masked(value)!r}"
    # A check of one key (`slots=0: ...`) or an unknown key: name the key itself.
    named = re.match(r"unknown key `(\w+)`|(\w+)=", problem)
    if named and not inner:
        path, shown = (*path, named.group(1) or named.group(2)), ""
    key = ".".join(path) or "(top level)"
    return f"{origins.get(path, source)}: {key}{shown}: {problem}"


def _fields(cls: type[msgspec.Struct], inner: tuple[str, ...]) -> tuple[str, ...]:
    if inner == () or cls is not WorkerConfig:
        return cls.__struct_fields__
    return ()


def _literal_values(cls: type[msgspec.Struct], name: str) -> tuple[str, ...]:
    hint = typing.get_type_hints(cls).get(name)
    return tuple(map(str, typing.get_args(hint))) if typing.get_origin(hint) is Literal else ()


_MISSING: Final = object()


def _lookup(raw: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        key = part.strip('"')
        if not isinstance(raw, dict) or key not in raw:
            return _MISSING
        raw = raw[key]
    return raw if not isinstance(raw, dict) else _MISSING


def _is_secret(path: tuple[str, ...]) -> bool:
    """Keys that look like secrets (`api_token`, `password`, ...), but not file names."""
    return any(_SECRET_KEY.search(p) and not p.endswith(("_file", "_path")) for p in path)
