"""One exception hierarchy for cpworker, rooted at `CpWorkerError`.

Service errors keep the AWS error code and request id of the answer that caused them.
Messages name what was wrong and what to do; they never contain credentials.
"""

from __future__ import annotations

from typing import Literal, get_args

# CodePipeline's failure types (FailureDetails.type), used by outcomes and artifact errors.
FailureType = Literal[
    "JobFailed",
    "ConfigurationError",
    "PermissionError",
    "RevisionOutOfSync",
    "RevisionUnavailable",
    "SystemUnavailable",
]
FAILURE_TYPES: tuple[str, ...] = get_args(FailureType)


class CpWorkerError(Exception):
    """Root of every error cpworker raises on purpose."""


class ModelError(CpWorkerError):
    """A body could not be decoded into the documented shape of an operation."""


class ServiceError(CpWorkerError):
    """CodePipeline answered with an error.

    `code` is the AWS error code (`__type` without its namespace), `request_id` the
    `x-amzn-RequestId` of the answer, `operation` the API operation that failed.
    """

    code: str = "ServiceError"
    retryable: bool = False
    # How many times botocore had already retried the call (its RetryAttempts): after a
    # retry, an earlier attempt may have taken effect although its answer was lost.
    retry_attempts: int = 0

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        code: str | None = None,
        request_id: str | None = None,
        status: int | None = None,
    ) -> None:
        self.operation = operation
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.status = status
        self.message = message
        rid = f", request id {request_id}" if request_id else ""
        super().__init__(f"{operation} failed with {self.code}{rid}: {message}")


class JobNotFoundError(ServiceError):
    """The job id is unknown (or the job is gone)."""

    code = "JobNotFoundException"


class InvalidNonceError(ServiceError):
    """The nonce is wrong or stale: another worker acknowledged the job first."""

    code = "InvalidNonceException"


class InvalidJobStateError(ServiceError):
    """The job is not in a state that accepts this call (e.g. a second result)."""

    code = "InvalidJobStateException"


class InvalidClientTokenError(ServiceError):
    """The client token of a third-party job is wrong."""

    code = "InvalidClientTokenException"


class InvalidJobError(ServiceError):
    """The third-party job is not valid for this call."""

    code = "InvalidJobException"


class ThrottledError(ServiceError):
    """CodePipeline throttled the call after botocore's retries; back off and retry."""

    code = "ThrottlingException"
    retryable = True


class ValidationError(ServiceError):
    """The request broke a constraint of the service model."""

    code = "ValidationException"


class ActionTypeNotFoundError(ServiceError):
    """The action type is not registered in this account and region."""

    code = "ActionTypeNotFoundException"


class OutputVariablesSizeExceededError(ServiceError):
    """The output variables of the action together exceed 122,880 bytes."""

    code = "OutputVariablesSizeExceededException"


class LimitExceededError(ServiceError):
    """An account limit was reached."""

    code = "LimitExceededException"


class ConcurrentModificationError(ServiceError):
    """Another call changed the resource at the same time."""

    code = "ConcurrentModificationException"


class ServiceUnavailableError(ServiceError):
    """CodePipeline answered 5xx after botocore's retries; retry later."""

    code = "ServiceUnavailable"
    retryable = True


class TransportError(CpWorkerError):
    """The endpoint could not be reached or the connection broke; retry later."""

    retryable = True


class ArtifactError(CpWorkerError):
    """An input or output artifact could not be moved or (un)packed.

    `failure_type` is the CodePipeline failure type to report the job with, one of
    `FAILURE_TYPES`. S3 errors map to `RevisionUnavailable` (the object or bucket is
    gone), `PermissionError` (the job's artifact credentials were refused) or `JobFailed`
    (anything else, including an archive that is corrupt or breaks the unpack rules).
    `code` is S3's error code when S3 answered with one (e.g. `ExpiredToken`, which calls
    for fresh credentials).
    """

    FAILURE_TYPES = frozenset(FAILURE_TYPES)

    def __init__(
        self, message: str, *, failure_type: str = "JobFailed", code: str | None = None
    ) -> None:
        if failure_type not in self.FAILURE_TYPES:
            raise ValueError(
                f"failure_type={failure_type!r}: must be one of {sorted(self.FAILURE_TYPES)}"
            )
        self.failure_type = failure_type
        self.code = code
        self.message = message
        super().__init__(message)


ERRORS_BY_CODE: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        JobNotFoundError,
        InvalidNonceError,
        InvalidJobStateError,
        InvalidClientTokenError,
        InvalidJobError,
        ThrottledError,
        ValidationError,
        ActionTypeNotFoundError,
        OutputVariablesSizeExceededError,
        LimitExceededError,
        ConcurrentModificationError,
    )
}
# Other throttling codes botocore knows (botocore.retries.standard) mean the same to us.
for _code in ("Throttling", "ThrottledException", "RequestLimitExceeded", "TooManyRequests"):
    ERRORS_BY_CODE[_code] = ThrottledError


def first_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of an exception group (what one failed task of a task group raised)."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def error_for(
    code: str, message: str, *, operation: str, request_id: str | None, status: int | None
) -> ServiceError:
    """The `ServiceError` subclass for an AWS error code (5xx → `ServiceUnavailableError`)."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        cls = ServiceUnavailableError if status is not None and status >= 500 else ServiceError
    return cls(message, operation=operation, code=code, request_id=request_id, status=status)
