"""Request validation against botocore's CodePipeline service model, as AWS does it.

Each operation's input shape is compiled once into a tree of small check functions; a
request is then checked in one walk. Violations are reported the way AWS's front end
reports them (``1 validation error detected: Value 'x' at 'actionTypeId.provider' failed to
satisfy constraint: Member must have length less than or equal to 35``); a value of the
wrong JSON type is a ``SerializationException``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import botocore.session
from botocore.model import ListShape, MapShape, Shape, StructureShape

Check = Callable[[Any, str, list[str]], None]

_SERVICE = "codepipeline"


class SerializationError(Exception):
    """A member has the wrong JSON type."""


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):  # Java's map syntax, as AWS prints it
        text = "{" + ", ".join(f"{k}={v}" for k, v in value.items()) + "}"
    else:
        text = str(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"'{text}'"


_CONSTRAINT = "failed to satisfy constraint: "


# Shapes whose values are never echoed: the model's `sensitive` ones, and client tokens.
_SECRET_SHAPES = frozenset({"ClientToken"})


def _fail(errors: list[str], value: Any, path: str, constraint: str, secret: bool = False) -> None:
    shown = "'***'" if secret else _describe(value)
    errors.append(f"Value {shown} at '{path}' {_CONSTRAINT}{constraint}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_secret(shape: Shape) -> bool:
    return bool(shape.metadata.get("sensitive")) or shape.name in _SECRET_SHAPES


def _bounds_check(shape: Shape, noun: str) -> Check | None:
    """The model's min/max: on the length (`noun` "length") or the value ("value")."""
    lo, hi = shape.metadata.get("min"), shape.metadata.get("max")
    if lo is None and hi is None:
        return None
    measure: Callable[[Any], Any] = len if noun == "length" else (lambda v: v)
    secret = _is_secret(shape)

    def check(value: Any, path: str, errors: list[str]) -> None:
        n = measure(value)
        if lo is not None and n < lo:
            must = f"Member must have {noun} greater than or equal to {lo}"
            _fail(errors, value, path, must, secret)
        if hi is not None and n > hi:
            must = f"Member must have {noun} less than or equal to {hi}"
            _fail(errors, value, path, must, secret)

    return check


def _string(shape: Shape) -> Check:
    length = _bounds_check(shape, "length")
    values: list[str] = getattr(shape, "enum", None) or []
    enum = frozenset(values) if values else None
    pattern = shape.metadata.get("pattern")
    regex = re.compile(pattern) if pattern else None
    secret = _is_secret(shape)

    def check(value: Any, path: str, errors: list[str]) -> None:
        if not isinstance(value, str):
            raise SerializationError(f"Expected a string at '{path}'")
        if length is not None:
            length(value, path, errors)
        if enum is not None and value not in enum:
            allowed = ", ".join(values)
            _fail(errors, value, path, f"Member must satisfy enum value set: [{allowed}]")
        if regex is not None and regex.fullmatch(value) is None:
            must = f"Member must satisfy regular expression pattern: {pattern}"
            _fail(errors, value, path, must, secret)

    return check


def _number(shape: Shape) -> Check:
    bounds = _bounds_check(shape, "value")
    kinds: tuple[type, ...] = (int,) if shape.type_name in ("integer", "long") else (int, float)

    def check(value: Any, path: str, errors: list[str]) -> None:
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise SerializationError(f"Expected a number at '{path}'")
        if bounds is not None:
            bounds(value, path, errors)

    return check


def _boolean(shape: Shape) -> Check:
    def check(value: Any, path: str, errors: list[str]) -> None:
        if not isinstance(value, bool):
            raise SerializationError(f"Expected a boolean at '{path}'")

    return check


def _timestamp(shape: Shape) -> Check:
    def check(value: Any, path: str, errors: list[str]) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise SerializationError(f"Expected a timestamp at '{path}'")

    return check


def _structure(shape: StructureShape) -> Check:
    members = {name: compile_shape(member) for name, member in shape.members.items()}
    required = tuple(shape.required_members)

    def check(value: Any, path: str, errors: list[str]) -> None:
        if not isinstance(value, dict):
            raise SerializationError(f"Expected a structure at '{path or 'request'}'")
        for name in required:
            if value.get(name) is None:
                _fail(errors, None, _join(path, name), "Member must not be null")
        for name, item in value.items():
            member = members.get(name)
            if member is not None and item is not None:
                member(item, _join(path, name), errors)

    return check


def _list(shape: ListShape) -> Check:
    length = _bounds_check(shape, "length")
    member = compile_shape(shape.member)

    def check(value: Any, path: str, errors: list[str]) -> None:
        if not isinstance(value, list):
            raise SerializationError(f"Expected a list at '{path}'")
        if length is not None:
            length(value, path, errors)
        for index, item in enumerate(value):
            member(item, f"{path}.{index + 1}.member", errors)

    return check


def _map(shape: MapShape) -> Check:
    length = _bounds_check(shape, "length")
    key, val = compile_shape(shape.key), compile_shape(shape.value)

    def check(value: Any, path: str, errors: list[str]) -> None:
        if not isinstance(value, dict):
            raise SerializationError(f"Expected a map at '{path}'")
        if length is not None:
            length(value, path, errors)
        key_errors: list[str] = []
        value_errors: list[str] = []
        for k, v in value.items():
            key(k, path, key_errors)
            val(v, path, value_errors)
        # AWS reports a bad entry at the map itself: "Map value must satisfy constraint: [...]"
        for kind, found in (("keys", key_errors), ("value", value_errors)):
            if found:
                inner = "; ".join(sorted({e.split(_CONSTRAINT, 1)[1] for e in found}))
                _fail(errors, value, path, f"Map {kind} must satisfy constraint: [{inner}]")

    return check


def compile_shape(shape: Shape) -> Check:
    """A check function for one shape of the service model."""
    kind = shape.type_name
    if isinstance(shape, StructureShape):
        return _structure(shape)
    if isinstance(shape, ListShape):
        return _list(shape)
    if isinstance(shape, MapShape):
        return _map(shape)
    if kind == "string":
        return _string(shape)
    if kind in ("integer", "long", "float", "double"):
        return _number(shape)
    if kind == "boolean":
        return _boolean(shape)
    if kind == "timestamp":
        return _timestamp(shape)
    raise ValueError(f"unsupported shape type {kind!r} in the service model")


class RequestValidator:
    """Validates request bodies of CodePipeline operations against botocore's model."""

    def __init__(self, operations: list[str]) -> None:
        model = botocore.session.get_session().get_service_model(_SERVICE)
        self._checks: dict[str, Check] = {}
        for name in operations:
            input_shape = model.operation_model(name).input_shape
            assert input_shape is not None
            self._checks[name] = compile_shape(input_shape)

    def errors(self, operation: str, body: Any) -> list[str]:
        """The validation errors of `body` for `operation` (empty when valid).

        Raises `SerializationError` when a member has the wrong JSON type.
        """
        errors: list[str] = []
        self._checks[operation](body, "", errors)
        return errors


def validation_message(errors: list[str]) -> str:
    """AWS's wording for a list of validation errors."""
    noun = "error" if len(errors) == 1 else "errors"
    return f"{len(errors)} validation {noun} detected: " + "; ".join(errors)
