"""The job loop's calls on a lean path: botocore's signer, aiobotocore's HTTP session, msgspec.

A CodePipeline call through a botocore client spends most of its CPU on work the job loop
does not need: the event system's hooks, parameter validation against the service model,
the endpoint ruleset, a user-agent string and a uuid4 invocation id per request, and a
JSON answer parsed into dicts that `cpworker.models` then converts a second time.
`LeanCalls` sends the same request with less: the body is encoded from the request Struct
by msgspec, signed with botocore's `SigV4Auth` and the client's own credentials (renewed
as they expire), sent through the client's own aiobotocore HTTP session (so its
connection pool, timeouts, proxies and TLS settings), and the answer is decoded by
msgspec straight into the output Struct.

Errors and retries match the client's: the error code comes from the JSON body's
``__type`` as botocore's JSON parser reads it, and retries use botocore's standard-mode
classes (the retryable conditions, exponential backoff with jitter, the retry quota).
`ControlPlane` uses this path for the job loop's operations (`LEAN_OPERATIONS`) when
`ControlPlaneSettings.lean_job_calls` is on and the retry mode is ``standard``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import anyio
import msgspec
from aiobotocore.awsrequest import AioAWSResponse
from botocore import __version__ as botocore_version
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError
from botocore.retries import quota, standard

from cpworker import __version__
from cpworker import models as m
from cpworker.errors import ServiceError, TransportError, error_for

__all__ = [
    "LEAN_OPERATIONS",
    "TRANSPORT_ERRORS",
    "LeanCalls",
    "RequestObserver",
    "service_error",
    "transport_error",
]

#: Called after each HTTP request: operation, status (None: no answer), error code, seconds.
RequestObserver = Callable[[str, "int | None", "str | None", float], None]

#: The operations of the job loop: poll, acknowledge and report, for both kinds of job.
LEAN_OPERATIONS: Final = frozenset(
    {
        "PollForJobs",
        "AcknowledgeJob",
        "PutJobSuccessResult",
        "PutJobFailureResult",
        "PollForThirdPartyJobs",
        "AcknowledgeThirdPartyJob",
        "GetThirdPartyJobDetails",
        "PutThirdPartyJobSuccessResult",
        "PutThirdPartyJobFailureResult",
    }
)

# Every failure to reach the endpoint or to read its answer: connection refused or closed,
# timeouts, TLS and proxy errors. aiobotocore's HTTP session raises botocore's classes.
TRANSPORT_ERRORS = (BotoConnectionError, HTTPClientError)


class _ErrorBody(msgspec.Struct):
    """An error answer of the JSON protocol (`{"__type": "...#Code", "message": "..."}`)."""

    type: str | None = msgspec.field(name="__type", default=None)
    message: str | None = None
    Message: str | None = None


_error_decoder = msgspec.json.Decoder(_ErrorBody)


def service_error(operation: str, response: dict[str, Any]) -> ServiceError:
    """The `ServiceError` for a botocore-shaped error answer (``Error``, ``ResponseMetadata``)."""
    error = response.get("Error", {})
    meta = response.get("ResponseMetadata", {})
    found = error_for(
        str(error.get("Code", "Unknown")),
        str(error.get("Message", "")),
        operation=operation,
        request_id=meta.get("RequestId"),
        status=meta.get("HTTPStatusCode"),
    )
    found.retry_attempts = int(meta.get("RetryAttempts") or 0)
    return found


def transport_error(operation: str, exc: Exception) -> TransportError:
    """The `TransportError` for a failure to reach CodePipeline or to read its answer."""
    return TransportError(f"{operation}: cannot reach CodePipeline: {exc}")


def _parsed_error(status: int, headers: Any, body: bytes) -> dict[str, Any]:
    """An error answer as botocore's JSON parser shapes it (the retry classes read this)."""
    try:
        parsed = _error_decoder.decode(body) if body else _ErrorBody()
    except msgspec.DecodeError:
        parsed = _ErrorBody()  # e.g. a proxy's HTML page: the status code is the code
    code = parsed.type or str(status)
    code = code.split(":", 1)[0].rsplit("#", 1)[-1]
    meta: dict[str, Any] = {"HTTPStatusCode": status}
    request_id = headers.get("x-amzn-requestid")
    if request_id is not None:
        meta["RequestId"] = request_id
    message = parsed.message if parsed.message is not None else parsed.Message
    return {"Error": {"Code": code, "Message": message or ""}, "ResponseMetadata": meta}


class LeanCalls:
    """Sends JSON-protocol operations of one aiobotocore client without its request pipeline.

    `client` lends its endpoint, region, service metadata and HTTP session; `credentials`
    are the session's (those the client signs with). Build one per `ControlPlane`.
    """

    def __init__(
        self,
        client: Any,
        credentials: Any,
        max_attempts: int,
        observe: RequestObserver | None = None,
    ) -> None:
        meta = client.meta
        self._observe = observe
        model = meta.service_model
        self._url = meta.endpoint_url.rstrip("/") + "/"
        self._region: str = meta.region_name
        self._signing_name: str = model.signing_name
        self._target = f"{model.metadata['targetPrefix']}."
        self._content_type = f"application/x-amz-json-{model.metadata['jsonVersion']}"
        self._user_agent = f"cpworker/{__version__} lean-calls botocore/{botocore_version}"
        # aiobotocore has no public accessor for a client's HTTP session; sharing it keeps
        # one connection pool and the client's transport settings. Both paths are tested.
        self._http = client._endpoint.http_session
        self._credentials = credentials
        # botocore's retry checks read the operation's model (its modeled retryable errors)
        self._models = {op: model.operation_model(op) for op in LEAN_OPERATIONS}
        # What botocore's `register_retry_handler` builds for standard mode.
        detector = standard.ThrottlingErrorDetector(standard.RetryEventAdapter())
        self._policy = standard.RetryPolicy(
            retry_checker=standard.StandardRetryConditions(max_attempts=max_attempts),
            retry_backoff=standard.ExponentialBackoff(
                service_name=model.service_id.hyphenize(), throttling_detector=detector
            ),
        )
        self._quota = standard.RetryQuotaChecker(quota.RetryQuota(), detector)

    async def _send(self, operation: str, body: bytes) -> AioAWSResponse:
        frozen = await self._credentials.get_frozen_credentials()
        request = AWSRequest(
            method="POST",
            url=self._url,
            data=body,
            headers={
                "Content-Type": self._content_type,
                "X-Amz-Target": self._target + operation,
                "User-Agent": self._user_agent,
            },
        )
        SigV4Auth(frozen, self._signing_name, self._region).add_auth(request)
        response: AioAWSResponse = await self._http.send(request.prepare())
        return response

    async def call(self, operation: str, request: m.Model) -> Any:
        """Send `operation` with `request`; return its decoded output Struct.

        Raises `ServiceError` (by code) or `TransportError` once retries are spent, and
        `ModelError` when the answer does not match the API shape.
        """
        body = m.encode(request)
        context: dict[str, Any] = {}
        attempt = 1
        while True:
            started = time.perf_counter()
            try:
                response = await self._send(operation, body)
                # awaitable in aiobotocore; its stubs type it as bytes
                content: bytes = await response.content  # type: ignore[misc]
            except TRANSPORT_ERRORS as exc:
                if self._observe is not None:
                    self._observe(operation, None, None, time.perf_counter() - started)
                retry = standard.RetryContext(
                    attempt_number=attempt,
                    operation_model=self._models[operation],
                    caught_exception=exc,
                    request_context=context,
                )
                if not self._may_retry(retry):
                    raise transport_error(operation, exc) from None
            else:
                status = response.status_code
                parsed = _parsed_error(status, response.headers, content) if status >= 300 else None
                if self._observe is not None:
                    code = parsed["Error"]["Code"] if parsed else None
                    self._observe(operation, status, code, time.perf_counter() - started)
                if parsed is None:
                    # botocore passes the request context here (its stubs say RetryContext)
                    self._quota.release_retry_quota(context, response)  # type: ignore[arg-type]
                    return m.decode(operation, content)
                retry = standard.RetryContext(
                    attempt_number=attempt,
                    operation_model=self._models[operation],
                    parsed_response=parsed,
                    http_response=response,
                    request_context=context,
                )
                if not self._may_retry(retry):
                    parsed["ResponseMetadata"]["RetryAttempts"] = attempt - 1
                    raise service_error(operation, parsed)
            await anyio.sleep(self._policy.compute_retry_delay(retry))
            attempt += 1

    def _may_retry(self, retry: standard.RetryContext) -> bool:
        """Retryable, attempts left, and the retry quota allows it (botocore's standard mode)."""
        return bool(self._policy.should_retry(retry) and self._quota.acquire_retry_quota(retry))
