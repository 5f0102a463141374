"""What a handler returns: `Succeeded`, `Failed` or `Continue`, and their checks.

A handler ends with exactly one outcome; the runner turns it into exactly one result
call. Outcomes are checked against CodePipeline's limits *before* anything is sent, so a
bad outcome becomes a clear job failure instead of a rejected API call::

    return Succeeded("built 3 images", output_variables={"ImageTag": tag})
    return Failed("unit tests failed: 3 of 120", type="JobFailed")
    return Continue("poll-build-42", percent_complete=40, summary="still building")
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

from cpworker import models as m
from cpworker.errors import CpWorkerError, FailureType

__all__ = [
    "Continue",
    "Failed",
    "FailureType",
    "Outcome",
    "OutcomeError",
    "Succeeded",
    "check_outcome",
]


# Limits from botocore's CodePipeline model (service-2.json).
SUMMARY_MAX: Final = 2048
MESSAGE_MAX: Final = 5000
TOKEN_MAX: Final = 2048
EXTERNAL_ID_MAX: Final = 1500
OUTPUT_VARIABLES_MAX_BYTES: Final = 122_880
_VARIABLE_NAME = re.compile(r"[A-Za-z0-9@\-_]+")


class OutcomeError(CpWorkerError):
    """A handler's outcome breaks one of CodePipeline's rules; the job fails with this text."""


class Succeeded(msgspec.Struct, frozen=True, kw_only=False):
    """The job is done. `output_variables` are only allowed here (not with `Continue`)."""

    summary: str | None = None
    external_execution_id: str | None = None
    output_variables: dict[str, str] | None = None
    current_revision: m.CurrentRevision | None = None


class Failed(msgspec.Struct, frozen=True, kw_only=False):
    """The job failed; `message` is shown in the pipeline's console (≤ 5000 chars)."""

    message: str
    type: FailureType = "JobFailed"
    external_execution_id: str | None = None


class Continue(msgspec.Struct, frozen=True, kw_only=False):
    """Not done yet: CodePipeline dispatches a new job for this action later, carrying
    `token` as its `continuation_token`, so long work is checked on without holding a slot.
    """

    token: str
    percent_complete: int | None = None
    summary: str | None = None
    external_execution_id: str | None = None


Outcome = Succeeded | Failed | Continue


def check_outcome(outcome: object, *, third_party: bool = False) -> Outcome:
    """Return `outcome` if CodePipeline would accept it; raise `OutcomeError` naming the rule.

    Messages quote lengths and names, never values (they could hold secrets).
    """
    if not isinstance(outcome, Succeeded | Failed | Continue):
        raise OutcomeError(
            f"the handler returned {type(outcome).__name__}, not an outcome; "
            "return Succeeded(...), Failed(...) or Continue(...) from cpworker"
        )
    _check_text("summary", getattr(outcome, "summary", None), SUMMARY_MAX)
    _check_text("external_execution_id", outcome.external_execution_id, EXTERNAL_ID_MAX)
    if isinstance(outcome, Failed):
        _check_failed(outcome)
    elif isinstance(outcome, Continue):
        _check_continue(outcome)
    else:
        _check_variables(outcome.output_variables, third_party)
        revision = outcome.current_revision
        if revision is not None and not isinstance(revision, m.CurrentRevision):
            raise OutcomeError(
                f"current_revision is a {type(revision).__name__}; "
                "give a cpworker.models.CurrentRevision"
            )
    return outcome


def _check_text(name: str, value: str | None, limit: int) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise OutcomeError(f"{name} is a {type(value).__name__}; it must be a str")
    if len(value) > limit:
        raise OutcomeError(
            f"{name} is {len(value)} characters long; CodePipeline allows at most {limit}"
        )


def _check_failed(outcome: Failed) -> None:
    if outcome.type not in m.FAILURE_TYPES:
        raise OutcomeError(
            f"Failed.type {outcome.type!r} is not a failure type; use one of "
            + ", ".join(m.FAILURE_TYPES)
        )
    _check_text("Failed.message", outcome.message, MESSAGE_MAX)
    if not outcome.message:
        raise OutcomeError("Failed.message is empty; say what went wrong")


def _check_continue(outcome: Continue) -> None:
    _check_text("Continue.token", outcome.token, TOKEN_MAX)
    if not outcome.token:
        raise OutcomeError("Continue.token is empty; give the next job something to resume")
    pct = outcome.percent_complete
    if pct is not None and (
        isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100
    ):
        raise OutcomeError(f"Continue.percent_complete={pct!r}: must be an int from 0 to 100")


def _check_variables(variables: dict[str, str] | None, third_party: bool) -> None:
    if not variables:
        return
    if third_party:
        raise OutcomeError(
            "output_variables are not supported for third-party jobs; return Succeeded without them"
        )
    size = 0
    for name, value in variables.items():
        if not isinstance(name, str) or not _VARIABLE_NAME.fullmatch(name):
            raise OutcomeError(
                f"output variable name {name!r} is not allowed; names match [A-Za-z0-9@\\-_]+"
            )
        if not isinstance(value, str):
            raise OutcomeError(
                f"output variable {name!r} is a {type(value).__name__}; values must be str"
            )
        size += len(name.encode()) + len(value.encode())
    if size > OUTPUT_VARIABLES_MAX_BYTES:
        raise OutcomeError(
            f"output variables total {size} bytes; CodePipeline allows at most "
            f"{OUTPUT_VARIABLES_MAX_BYTES} bytes of names and values together"
        )
