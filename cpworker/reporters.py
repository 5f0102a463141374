"""How a job's one result is sent: custom jobs and third-party jobs (with client tokens).

Summaries and failure messages pass through the redactor on the way out, so a known
secret never reaches the pipeline's console.
"""

from __future__ import annotations

from typing import Protocol

from cpworker import models as m
from cpworker.control_plane import ControlPlane
from cpworker.logs import redactor
from cpworker.outcomes import Continue, Failed, Succeeded

__all__ = ["CustomReporter", "Reporter", "ThirdPartyReporter"]


class Reporter(Protocol):
    """How one flow (custom or third-party) acknowledges and reports."""

    async def success(self, outcome: Succeeded | Continue) -> None: ...
    async def failure(self, outcome: Failed) -> None: ...


class CustomReporter:
    """Results of a custom action job."""

    def __init__(self, cp: ControlPlane, job_id: str) -> None:
        self.cp, self.job_id = cp, job_id

    async def success(self, outcome: Succeeded | Continue) -> None:
        if isinstance(outcome, Continue):
            await self.cp.put_job_success_result(
                self.job_id,
                execution_details=_details(outcome),
                continuation_token=outcome.token,
            )
        else:
            await self.cp.put_job_success_result(
                self.job_id,
                execution_details=_details(outcome),
                current_revision=outcome.current_revision,
                output_variables=outcome.output_variables or None,
            )

    async def failure(self, outcome: Failed) -> None:
        await self.cp.put_job_failure_result(self.job_id, _failure(outcome))


class ThirdPartyReporter:
    """Results of a third-party job, sent with its client token."""

    def __init__(self, cp: ControlPlane, job_id: str, token: str) -> None:
        self.cp, self.job_id, self._token = cp, job_id, token

    async def success(self, outcome: Succeeded | Continue) -> None:
        await self.cp.put_third_party_job_success_result(
            self.job_id,
            self._token,
            execution_details=_details(outcome),
            current_revision=outcome.current_revision if isinstance(outcome, Succeeded) else None,
            continuation_token=outcome.token if isinstance(outcome, Continue) else None,
        )

    async def failure(self, outcome: Failed) -> None:
        await self.cp.put_third_party_job_failure_result(
            self.job_id, self._token, _failure(outcome)
        )


def _details(outcome: Succeeded | Continue) -> m.ExecutionDetails | None:
    pct = outcome.percent_complete if isinstance(outcome, Continue) else 100
    if outcome.summary is None and outcome.external_execution_id is None and pct is None:
        return None
    return m.ExecutionDetails(
        summary=redactor(outcome.summary) if outcome.summary else outcome.summary,
        external_execution_id=outcome.external_execution_id,
        percent_complete=pct,
    )


def _failure(outcome: Failed) -> m.FailureDetails:
    return m.FailureDetails(
        type=outcome.type,
        message=redactor(outcome.message)[:5000],
        external_execution_id=outcome.external_execution_id,
    )
