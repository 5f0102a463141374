"""The async CodePipeline client: typed job operations over one long-lived aiobotocore client.

Create it once per process (client creation is expensive) and share it::

    async with ControlPlane.open(ControlPlaneSettings(region="eu-west-1")) as cp:
        jobs = await cp.poll_for_jobs(action_type_id, max_batch_size=10)

The worker's own AWS identity comes from the standard credential chain (environment,
profile, web identity / IRSA, container or instance metadata), or from the `session`
given to `open`. Throttling and 5xx answers are retried by botocore's retry mode
(`standard` by default); what is left after `max_attempts` is raised as a `ServiceError`
subclass (`ThrottledError`, `ServiceUnavailableError`, ...) with the AWS error code and
request id. Connection failures are raised as `TransportError`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import msgspec
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore import xform_name
from botocore.exceptions import BotoCoreError, ClientError

from cpworker import models as m
from cpworker.errors import CpWorkerError
from cpworker.lean_calls import (
    LEAN_OPERATIONS,
    TRANSPORT_ERRORS,
    LeanCalls,
    RequestObserver,
    service_error,
    transport_error,
)

__all__ = ["ControlPlane", "ControlPlaneSettings"]


class ControlPlaneSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach CodePipeline. Durations are float seconds."""

    region: str = "us-east-1"
    endpoint_url: str | None = None
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    max_attempts: int = 5
    pool_size: int = 64
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    #: Poll, acknowledge and report on the lean path (`cpworker.lean_calls`) rather than
    #: through botocore's request pipeline; used with ``retry_mode="standard"`` only.
    lean_job_calls: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise CpWorkerError(f"max_attempts={self.max_attempts}: must be 1 or more")
        if self.pool_size < 1:
            raise CpWorkerError(f"pool_size={self.pool_size}: must be 1 or more")

    def client_config(self) -> AioConfig:
        return AioConfig(
            region_name=self.region,
            retries={"mode": self.retry_mode, "total_max_attempts": self.max_attempts},
            max_pool_connections=self.pool_size,
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
        )


def _observe_requests(client: Any, observe: RequestObserver) -> None:
    """Report each HTTP request the aiobotocore client sends (botocore's event hooks)."""

    def created(request: Any, **_: Any) -> None:
        request.context["cpworker_sent"] = time.perf_counter()

    def answered(
        request_dict: Any, response: Any, caught_exception: Any, operation: Any, **_: Any
    ) -> None:
        sent = request_dict["context"].get("cpworker_sent")
        if sent is None:
            return
        status: int | None = None
        code: str | None = None
        if caught_exception is None and response is not None:
            http, parsed = response
            status = http.status_code
            if status >= 300:
                code = parsed.get("Error", {}).get("Code")
        observe(operation.name, status, code, time.perf_counter() - sent)

    client.meta.events.register("request-created.codepipeline", created)
    client.meta.events.register("needs-retry.codepipeline", answered)


class ControlPlane:
    """Typed CodePipeline job operations. Build it with `ControlPlane.open(settings)`."""

    def __init__(self, client: Any, lean: LeanCalls | None = None) -> None:
        self._client = client
        self._lean = lean
        self._closed = False
        self._methods: dict[str, Any] = {op: getattr(client, xform_name(op)) for op in m.OPERATIONS}

    @property
    def lean(self) -> bool:
        """Whether the job loop's calls go on the lean path."""
        return self._lean is not None

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: ControlPlaneSettings,
        session: AioSession | None = None,
        observe: RequestObserver | None = None,
    ) -> AsyncIterator[ControlPlane]:
        """One long-lived client for the lifetime of the `async with` block.

        `observe(operation, status, error_code, seconds)` is called after every HTTP
        request on either path (each retry is one request; status None: no answer).
        """
        session = session or get_session()
        async with session.create_client(
            "codepipeline",
            endpoint_url=settings.endpoint_url,
            config=settings.client_config(),
        ) as client:
            if observe is not None:
                _observe_requests(client, observe)
            lean = None
            credentials = await session.get_credentials()  # the ones the client signs with
            if settings.lean_job_calls and settings.retry_mode == "standard" and credentials:
                lean = LeanCalls(client, credentials, settings.max_attempts, observe)
            plane = cls(client, lean)
            try:
                yield plane
            finally:
                plane._closed = True

    async def _call(self, operation: str, request: m.Model) -> Any:
        """Send one operation; map errors at this boundary; decode the answer."""
        if self._closed:
            raise CpWorkerError(
                f"{operation}: this ControlPlane is closed; call it inside "
                "`async with ControlPlane.open(settings) as cp:`"
            )
        if self._lean is not None and operation in LEAN_OPERATIONS:
            return await self._lean.call(operation, request)
        try:
            answer = await self._methods[operation](**m.to_builtins(request))
        except ClientError as exc:
            raise service_error(operation, dict(exc.response)) from None
        except TRANSPORT_ERRORS as exc:
            raise transport_error(operation, exc) from None
        except BotoCoreError as exc:
            # e.g. botocore's own parameter checks; their text can quote argument values,
            # which may be secrets, so only the kind of error is named.
            raise CpWorkerError(
                f"{operation}: botocore refused the call ({type(exc).__name__}); check the "
                "arguments' types and the client settings"
            ) from None
        return m.from_builtins(m.OPERATIONS[operation][1], answer)

    # --- custom action jobs --------------------------------------------------------

    async def poll_for_jobs(
        self,
        action_type_id: m.ActionTypeId,
        max_batch_size: int = 1,
        query_param: dict[str, str] | None = None,
    ) -> tuple[m.Job, ...]:
        """Jobs of this action type, at most `max_batch_size`; an empty tuple if none."""
        request = m.PollForJobsInput(
            action_type_id=action_type_id,
            max_batch_size=max_batch_size,
            query_param=query_param or None,
        )
        answer: m.PollForJobsOutput = await self._call("PollForJobs", request)
        return answer.jobs

    async def acknowledge_job(self, job_id: str, nonce: str) -> str | None:
        """Claim a polled job; returns its status (`InProgress`).

        Raises `InvalidNonceError` when another worker won the job.
        """
        request = m.AcknowledgeJobInput(job_id=job_id, nonce=nonce)
        answer: m.AcknowledgeJobOutput = await self._call("AcknowledgeJob", request)
        return answer.status

    async def get_job_details(self, job_id: str) -> m.JobDetails:
        """The job again, with fresh artifact credentials."""
        answer: m.GetJobDetailsOutput = await self._call(
            "GetJobDetails", m.GetJobDetailsInput(job_id=job_id)
        )
        if answer.job_details is None:
            raise CpWorkerError(f"GetJobDetails for job {job_id} answered without jobDetails")
        return answer.job_details

    async def put_job_success_result(
        self,
        job_id: str,
        *,
        execution_details: m.ExecutionDetails | None = None,
        current_revision: m.CurrentRevision | None = None,
        continuation_token: str | None = None,
        output_variables: dict[str, str] | None = None,
    ) -> None:
        """Report success (or, with `continuation_token`, progress to be continued)."""
        request = m.PutJobSuccessResultInput(
            job_id=job_id,
            execution_details=execution_details,
            current_revision=current_revision,
            continuation_token=continuation_token,
            output_variables=output_variables,
        )
        await self._call("PutJobSuccessResult", request)

    async def put_job_failure_result(self, job_id: str, failure_details: m.FailureDetails) -> None:
        """Report failure of the job."""
        request = m.PutJobFailureResultInput(job_id=job_id, failure_details=failure_details)
        await self._call("PutJobFailureResult", request)

    # --- third-party jobs ----------------------------------------------------------

    async def poll_for_third_party_jobs(
        self, action_type_id: m.ActionTypeId, max_batch_size: int = 1
    ) -> tuple[m.ThirdPartyJob, ...]:
        """Third-party jobs of this action type (client id and job id only)."""
        request = m.PollForThirdPartyJobsInput(
            action_type_id=action_type_id, max_batch_size=max_batch_size
        )
        answer: m.PollForThirdPartyJobsOutput = await self._call("PollForThirdPartyJobs", request)
        return answer.jobs

    async def get_third_party_job_details(
        self, job_id: str, client_token: str
    ) -> m.ThirdPartyJobDetails:
        """A third-party job's data, nonce and fresh artifact credentials."""
        request = m.GetThirdPartyJobDetailsInput(job_id=job_id, client_token=client_token)
        answer: m.GetThirdPartyJobDetailsOutput = await self._call(
            "GetThirdPartyJobDetails", request
        )
        if answer.job_details is None:
            raise CpWorkerError(
                f"GetThirdPartyJobDetails for job {job_id} answered without jobDetails"
            )
        return answer.job_details

    async def acknowledge_third_party_job(
        self, job_id: str, nonce: str, client_token: str
    ) -> str | None:
        """Claim a third-party job; returns its status."""
        request = m.AcknowledgeThirdPartyJobInput(
            job_id=job_id, nonce=nonce, client_token=client_token
        )
        answer: m.AcknowledgeJobOutput = await self._call("AcknowledgeThirdPartyJob", request)
        return answer.status

    async def put_third_party_job_success_result(
        self,
        job_id: str,
        client_token: str,
        *,
        execution_details: m.ExecutionDetails | None = None,
        current_revision: m.CurrentRevision | None = None,
        continuation_token: str | None = None,
    ) -> None:
        """Report success of a third-party job (or progress, with `continuation_token`)."""
        request = m.PutThirdPartyJobSuccessResultInput(
            job_id=job_id,
            client_token=client_token,
            execution_details=execution_details,
            current_revision=current_revision,
            continuation_token=continuation_token,
        )
        await self._call("PutThirdPartyJobSuccessResult", request)

    async def put_third_party_job_failure_result(
        self, job_id: str, client_token: str, failure_details: m.FailureDetails
    ) -> None:
        """Report failure of a third-party job."""
        request = m.PutThirdPartyJobFailureResultInput(
            job_id=job_id, client_token=client_token, failure_details=failure_details
        )
        await self._call("PutThirdPartyJobFailureResult", request)

    # --- action types --------------------------------------------------------------

    async def create_custom_action_type(
        self, request: m.CreateCustomActionTypeInput
    ) -> m.ActionType:
        """Register a custom action type; returns it as CodePipeline stored it."""
        answer: m.CreateCustomActionTypeOutput = await self._call("CreateCustomActionType", request)
        return answer.action_type

    async def list_action_types(self, owner: str | None = None) -> list[m.ActionType]:
        """Every action type (all pages), optionally only those of one owner."""
        types: list[m.ActionType] = []
        token: str | None = None
        while True:
            request = m.ListActionTypesInput(action_owner_filter=owner, next_token=token)
            answer: m.ListActionTypesOutput = await self._call("ListActionTypes", request)
            types.extend(answer.action_types)
            token = answer.next_token
            if not token:
                return types

    async def delete_custom_action_type(self, category: str, provider: str, version: str) -> None:
        """Mark a custom action type as deleted."""
        request = m.DeleteCustomActionTypeInput(
            category=category, provider=provider, version=version
        )
        await self._call("DeleteCustomActionType", request)
