"""Fault and latency injection for the emulator's CodePipeline API.

Settings apply globally or per operation (an operation's settings replace the global ones
for that operation). Each request draws once from the injected random source and gets at
most one fault; latency is added to every request it applies to.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Literal

import msgspec

Fault = Literal["throttle", "error_500", "error_503", "drop", "drop_response"]

_REQUEST_FAULTS: tuple[Fault, ...] = ("throttle", "error_500", "error_503", "drop", "drop_response")


class FaultSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Injection settings for one scope. Rates are probabilities in [0, 1].

    `drop` closes the connection before the request is applied, `drop_response` after it
    was applied (the caller cannot know it took effect); `wrong_nonce` hands out a polled
    job with a nonce that will not acknowledge (as if another worker won the race).
    """

    latency_s: float = 0.0
    jitter_s: float = 0.0
    throttle_rate: float = 0.0
    error_500_rate: float = 0.0
    error_503_rate: float = 0.0
    drop_rate: float = 0.0
    drop_response_rate: float = 0.0
    wrong_nonce_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if value < 0 or (name.endswith("_rate") and value > 1):
                allowed = "between 0 and 1" if name.endswith("_rate") else "0 or more"
                raise ValueError(f"fault setting {name}={value!r}: must be {allowed}")
        total = sum(getattr(self, f"{f}_rate") for f in _REQUEST_FAULTS)
        if total > 1:
            raise ValueError(f"fault rates add up to {total:g}; their sum must be at most 1")


class FaultsUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of `POST /_emulator/faults`."""

    global_: FaultSettings | None = msgspec.field(default=None, name="global")
    operations: dict[str, FaultSettings | None] | None = None
    seed: int | None = None


class Faults:
    """Current injection settings, the decision per request, and what was injected."""

    def __init__(self, settings: FaultSettings | None = None, rng: random.Random | None = None):
        self.global_settings = settings or FaultSettings()
        self.per_operation: dict[str, FaultSettings] = {}
        self.injected: Counter[tuple[str, str]] = Counter()
        self._rng = rng or random.Random()

    def update(self, update: FaultsUpdate) -> None:
        if update.global_ is not None:
            self.global_settings = update.global_
        for op, settings in (update.operations or {}).items():
            if settings is None:
                self.per_operation.pop(op, None)
            else:
                self.per_operation[op] = settings
        if update.seed is not None:
            self._rng.seed(update.seed)

    def settings_for(self, operation: str) -> FaultSettings:
        return self.per_operation.get(operation, self.global_settings)

    def latency(self, operation: str) -> float:
        s = self.settings_for(operation)
        if s.latency_s == 0 and s.jitter_s == 0:
            return 0.0
        self.injected[(operation, "latency")] += 1
        return s.latency_s + self._rng.uniform(0, s.jitter_s)

    def draw(self, operation: str) -> Fault | None:
        """At most one fault for this request, counted when injected."""
        s = self.settings_for(operation)
        x = self._rng.random()
        for fault in _REQUEST_FAULTS:
            rate: float = getattr(s, f"{fault}_rate")
            if x < rate:
                self.injected[(operation, fault)] += 1
                return fault
            x -= rate
        return None

    def wrong_nonce(self, operation: str) -> bool:
        """Whether to hand out this polled job with a nonce that will not acknowledge."""
        rate = self.settings_for(operation).wrong_nonce_rate
        if rate and self._rng.random() < rate:
            self.injected[(operation, "wrong_nonce")] += 1
            return True
        return False

    def describe(self) -> dict[str, Any]:
        return {
            "global": msgspec.to_builtins(self.global_settings),
            "operations": {op: msgspec.to_builtins(s) for op, s in self.per_operation.items()},
        }

    def injected_stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (op, fault), n in sorted(self.injected.items()):
            out.setdefault(op, {})[fault] = n
        return out
