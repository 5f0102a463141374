"""The CodePipeline JSON 1.1 API of the emulator: one handler per operation.

`POST /` with ``X-Amz-Target: CodePipeline_20150709.<Operation>``. Every request must be
SigV4-signed (see `cpworker.emulator.sigv4`); its body is validated against
botocore's service model before the job state machine sees it. Errors are HTTP 400 (500 or
503 for injected server faults) with ``{"__type": ..., "message": ...}``, as AWS answers,
so botocore raises the right exception class.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import msgspec
from aiohttp import web

from cpworker.emulator.faults import Fault, Faults
from cpworker.emulator.jobs import ApiError, JobRecord, JobStore, action_key
from cpworker.emulator.s3 import ACCOUNT_ID, S3Side
from cpworker.emulator.sigv4 import SigV4Checker
from cpworker.emulator.validation import RequestValidator, SerializationError, validation_message

TARGET_PREFIX = "CodePipeline_20150709."
CONTENT_TYPE = "application/x-amz-json-1.1"

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

logger = logging.getLogger(__name__)

_FAULT_ANSWERS = {
    "throttle": (400, "ThrottlingException", "Rate exceeded"),
    "error_500": (500, "InternalFailure", "The request processing has failed"),
    "error_503": (503, "ServiceUnavailable", "The service is unavailable; try again"),
}


class CodePipelineApi:
    """Handlers of the job operations over one `JobStore`."""

    def __init__(
        self,
        store: JobStore,
        faults: Faults,
        s3: S3Side,
        sigv4: SigV4Checker | None = None,
        credential_ttl_s: float | None = None,
    ) -> None:
        self.store = store
        self.sigv4 = sigv4 or SigV4Checker()
        self.faults = faults
        self.s3 = s3
        self.credential_ttl_s = credential_ttl_s
        self._ttl_overrides: dict[str, float] = {}
        self.requests: Counter[tuple[str, str]] = Counter()
        # polls answered with no job (a worker's calls at saturation leave these out)
        self.empty_polls: Counter[str] = Counter()
        self._handlers: dict[str, Handler] = {
            "PollForJobs": self.poll_for_jobs,
            "AcknowledgeJob": self.acknowledge_job,
            "GetJobDetails": self.get_job_details,
            "PutJobSuccessResult": partial(self.put_result, "PutJobSuccessResult"),
            "PutJobFailureResult": partial(self.put_result, "PutJobFailureResult"),
            "PollForThirdPartyJobs": self.poll_for_third_party_jobs,
            "AcknowledgeThirdPartyJob": self.acknowledge_third_party_job,
            "GetThirdPartyJobDetails": self.get_third_party_job_details,
            "PutThirdPartyJobSuccessResult": partial(
                self.put_result, "PutThirdPartyJobSuccessResult"
            ),
            "PutThirdPartyJobFailureResult": partial(
                self.put_result, "PutThirdPartyJobFailureResult"
            ),
            "CreateCustomActionType": self.create_custom_action_type,
            "ListActionTypes": self.list_action_types,
            "DeleteCustomActionType": self.delete_custom_action_type,
        }
        self._validator = RequestValidator(list(self._handlers))
        self.operations = frozenset(self._handlers)

    # --- HTTP ----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one JSON 1.1 request, with fault injection and request accounting."""
        target = request.headers.get("X-Amz-Target", "")
        operation = target.removeprefix(TARGET_PREFIX)
        body = await request.read()
        fault: Fault | None = None
        try:
            self.sigv4.check(request.method, str(request.url), request.headers, body)
            if operation not in self._handlers or not target.startswith(TARGET_PREFIX):
                raise ApiError("UnknownOperationException", f"Unknown operation {target!r}")
            delay = self.faults.latency(operation)
            if delay:
                await anyio.sleep(delay)
            fault = self.faults.draw(operation)
            if fault == "drop":
                return self._drop(request, operation)
            if fault in _FAULT_ANSWERS:
                status, code, message = _FAULT_ANSWERS[fault]
                raise ApiError(code, message, status)
            response = _json(await self._handlers[operation](self._parse(operation, body)))
            outcome = "ok"
        except ApiError as exc:
            response, outcome = _error(exc), exc.code
        except Exception:
            # A bug of the emulator: answer as AWS does, count it, keep the traceback.
            logger.exception("%s failed inside the emulator", operation)
            response = _error(ApiError("InternalFailure", "The emulator failed; see its log", 500))
            outcome = "InternalFailure"
        if fault == "drop_response":
            return self._drop(request, operation, "dropped_response")
        self.requests[(operation or "?", outcome)] += 1
        return response

    def _parse(self, operation: str, body: bytes) -> dict[str, Any]:
        try:
            params = msgspec.json.decode(body or b"{}")
            errors = self._validator.errors(operation, params)
        except (msgspec.DecodeError, SerializationError) as exc:
            raise ApiError("SerializationException", str(exc)) from None
        if errors:
            raise ApiError("ValidationException", validation_message(errors))
        assert isinstance(params, dict)
        return params

    def _drop(
        self, request: web.Request, operation: str, outcome: str = "dropped"
    ) -> web.StreamResponse:
        """Close the connection without an answer (`dropped_response`: after applying)."""
        self.requests[(operation, outcome)] += 1
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=499)

    # --- custom action jobs --------------------------------------------------------

    def _job_wire(self, job: JobRecord, nonce: str | None) -> dict[str, Any]:
        data = dict(job.data, artifactCredentials=job.credentials) if job.credentials else job.data
        wire: dict[str, Any] = {"id": job.id, "data": data, "accountId": ACCOUNT_ID}
        if nonce is not None:
            wire["nonce"] = nonce
        return wire

    def _issued_nonce(self, job: JobRecord, operation: str) -> str | None:
        if job.nonce is not None and self.faults.wrong_nonce(operation):
            return f"{job.nonce}-stale"
        return job.nonce

    async def poll_for_jobs(self, p: dict[str, Any]) -> dict[str, Any]:
        jobs = self.store.poll(
            action_key(p["actionTypeId"]),
            p.get("maxBatchSize", 1),
            p.get("queryParam") or {},
            third_party=False,
        )
        await self._refresh_at_dispatch(jobs)
        if not jobs:
            self.empty_polls["PollForJobs"] += 1
        return {"jobs": [self._job_wire(j, self._issued_nonce(j, "PollForJobs")) for j in jobs]}

    async def acknowledge_job(self, p: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(p["jobId"], third_party=False)
        return {"status": self.store.acknowledge(job, p["nonce"])}

    # --- artifact credentials ------------------------------------------------------

    def set_credential_ttl(self, job_id: str, ttl_s: float) -> None:
        """Credentials minted for this job (and its continuations) expire after `ttl_s`."""
        self._ttl_overrides[job_id] = ttl_s

    def credential_ttl(self, job: JobRecord) -> float | None:
        """The lifetime of credentials minted for `job` (None: they never expire).

        The job's own override, else its continuation chain's first job's, else the
        emulator's `credential_ttl_s`.
        """
        if not self._ttl_overrides:
            return self.credential_ttl_s
        current: JobRecord | None = job
        while current is not None:
            ttl = self._ttl_overrides.get(current.id)
            if ttl is not None:
                self._ttl_overrides[job.id] = ttl
                return ttl
            previous = current.previous_job_id
            current = self.store.jobs.get(previous) if previous is not None else None
        return self.credential_ttl_s

    def give_credentials(self, jobs: list[JobRecord], credentials: dict[str, str]) -> None:
        """Hand freshly minted `credentials` to `jobs`; register them with the first's TTL."""
        ttl_s = self.credential_ttl(jobs[0])
        self.s3.registry.register(credentials["accessKeyId"], [j.id for j in jobs], ttl_s)
        for job in jobs:
            job.credentials = credentials

    async def _refresh_credentials(self, job: JobRecord) -> None:
        self.give_credentials([job], await self.s3.mint_credentials())

    async def _refresh_at_dispatch(self, jobs: list[JobRecord]) -> None:
        """Jobs whose credentials expire leave a poll with credentials valid from now.

        Without a TTL nothing is minted here (minting costs a few ms through moto's STS).
        """
        due = [job for job in jobs if self.credential_ttl(job) is not None]
        if len(due) == 1:
            await self._refresh_credentials(due[0])
        elif due:
            async with anyio.create_task_group() as tg:
                for job in due:
                    tg.start_soon(self._refresh_credentials, job)

    async def get_job_details(self, p: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(p["jobId"], third_party=False)
        await self._refresh_credentials(job)
        wire = self._job_wire(job, None)
        return {"jobDetails": wire}

    async def put_result(self, operation: str, p: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(p["jobId"], "ThirdParty" in operation, p.get("clientToken"))
        self.store.put_result(job, operation, p)
        return {}

    # --- third-party jobs ----------------------------------------------------------

    async def poll_for_third_party_jobs(self, p: dict[str, Any]) -> dict[str, Any]:
        jobs = self.store.poll(
            action_key(p["actionTypeId"]), p.get("maxBatchSize", 1), {}, third_party=True
        )
        await self._refresh_at_dispatch(jobs)
        if not jobs:
            self.empty_polls["PollForThirdPartyJobs"] += 1
        return {"jobs": [{"clientId": j.client_id, "jobId": j.id} for j in jobs]}

    async def acknowledge_third_party_job(self, p: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(p["jobId"], True, p["clientToken"])
        return {"status": self.store.acknowledge(job, p["nonce"])}

    async def get_third_party_job_details(self, p: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(p["jobId"], True, p["clientToken"])
        await self._refresh_credentials(job)
        wire = self._job_wire(job, self._issued_nonce(job, "GetThirdPartyJobDetails"))
        del wire["accountId"]
        return {"jobDetails": wire}

    # --- action types --------------------------------------------------------------

    async def create_custom_action_type(self, p: dict[str, Any]) -> dict[str, Any]:
        definition = {
            "id": {
                "category": p["category"],
                "owner": "Custom",
                "provider": p["provider"],
                "version": p["version"],
            },
            "settings": p.get("settings", {}),
            "actionConfigurationProperties": p.get("configurationProperties", []),
            "inputArtifactDetails": p["inputArtifactDetails"],
            "outputArtifactDetails": p["outputArtifactDetails"],
        }
        queryable = [c for c in definition["actionConfigurationProperties"] if c.get("queryable")]
        if len(queryable) > 1:
            raise ApiError(
                "ValidationException", "An action type can have at most one queryable property"
            )
        key = action_key(definition["id"])
        record = self.store.action_types.get(key) or self.store.register_action_type(definition)
        return {"actionType": record.definition, "tags": p.get("tags", [])}

    async def list_action_types(self, p: dict[str, Any]) -> dict[str, Any]:
        owner = p.get("actionOwnerFilter")
        types = [
            r.definition for r in self.store.action_types.values() if owner in (None, r.key[1])
        ]
        return {"actionTypes": types}

    async def delete_custom_action_type(self, p: dict[str, Any]) -> dict[str, Any]:
        self.store.delete_action_type((p["category"], "Custom", p["provider"], p["version"]))
        return {}

    # --- helpers -------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (op, outcome), n in sorted(self.requests.items()):
            out.setdefault(op, {})[outcome] = n
        return out


def _json(answer: dict[str, Any]) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(answer),
        headers={"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": str(uuid.uuid4())},
    )


def _error(exc: ApiError) -> web.Response:
    body = {"__type": exc.code, "message": exc.message}
    return web.Response(
        status=exc.status,
        body=msgspec.json.encode(body),
        headers={
            "Content-Type": CONTENT_TYPE,
            "x-amzn-RequestId": str(uuid.uuid4()),
            "x-amzn-ErrorType": exc.code,
        },
    )
