"""S3 for artifacts, signed with a job's own artifact credentials.

The only worker module that imports aiobotocore/botocore for S3. Every botocore error is
mapped here, at the boundary, into an `ArtifactError` whose `failure_type` is the
CodePipeline failure type to report::

    async with job_s3_client(S3Settings(region="eu-west-1"), job.data.artifact_credentials) as s3:
        async with aclosing(iter_object(s3, ref)) as chunks:
            async for chunk in chunks:
                ...

Messages name the artifact, the bucket and key, S3's error code and what to do. They never
contain the credentials: S3's own message text is quoted only after anything that looks
like a key, secret or token is redacted, and mapped errors are raised outside the handler
of the botocore error, so no exception chain leads back to the request.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import aiohttp
import msgspec
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from cpworker import models
from cpworker.errors import ArtifactError, CpWorkerError

__all__ = [
    "DEFAULT_KMS_KEY",
    "ObjectRef",
    "S3Settings",
    "iter_object",
    "job_s3_client",
    "put_object_file",
]

T = TypeVar("T")

# The AWS-managed S3 key, used for SSE-KMS when the job carries no encryption key.
DEFAULT_KMS_KEY = "alias/aws/s3"

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "Forbidden",
        "403",
    }
)
# The endpoint could not be reached, or the connection broke or stalled mid-answer.
_TRANSPORT_ERRORS = (
    BotoConnectionError,
    HTTPClientError,
    ReadTimeoutError,
    ResponseStreamingError,
    IncompleteReadError,
    aiohttp.ClientError,
)
# Long runs of base64/key characters: what access key ids, secrets and tokens look like.
_SECRET_LIKE = re.compile(r"[A-Za-z0-9+/=]{16,}")

_HINTS = {
    "RevisionUnavailable": (
        "the object or its bucket does not exist (a lifecycle rule may have removed an old "
        "revision); run the pipeline again from its source stage"
    ),
    "PermissionError": (
        "S3 refused access with the job's artifact credentials; check that they are current "
        "(GetJobDetails returns fresh ones) and that the pipeline's role may use this bucket "
        "and its KMS key"
    ),
    "JobFailed": "retry the job; if it keeps failing, check the S3 endpoint and the bucket",
}


class S3Settings(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach S3 for artifacts. Durations are float seconds."""

    region: str = "us-east-1"
    endpoint_url: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise CpWorkerError(f"max_attempts={self.max_attempts}: must be 1 or more")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise CpWorkerError(
                f"connect_timeout_s={self.connect_timeout_s}, read_timeout_s="
                f"{self.read_timeout_s}: timeouts must be more than 0 seconds"
            )

    def client_config(self) -> AioConfig:
        return AioConfig(
            region_name=self.region,
            signature_version="s3v4",
            # Path style works with any endpoint (127.0.0.1, custom domains, dotted buckets).
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            # Uploads carry the checksum the caller computed off the event loop; botocore
            # would otherwise read the whole body on the loop to compute one.
            request_checksum_calculation="when_required",
        )


class ObjectRef(msgspec.Struct, frozen=True, kw_only=True):
    """One S3 object and what it is, for messages (e.g. "input artifact 'Src'")."""

    what: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{self.what} (s3://{self.bucket}/{self.key})"


@functools.cache
def _shared_session() -> AioSession:
    """One session per process: it caches the service models every client loads."""
    return get_session()


@asynccontextmanager
async def job_s3_client(
    settings: S3Settings,
    credentials: models.ArtifactCredentials,
    session: AioSession | None = None,
) -> AsyncIterator[Any]:
    """An aiobotocore S3 client signed (SigV4) with the job's artifact credentials."""
    session = session or _shared_session()
    async with session.create_client(
        "s3",
        endpoint_url=settings.endpoint_url,
        config=settings.client_config(),
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        aws_session_token=credentials.session_token,
    ) as client:
        yield client


async def iter_object(
    client: Any, ref: ObjectRef, chunk_size: int = 1 << 20
) -> AsyncGenerator[bytes, None]:
    """The object's bytes in chunks of at most `chunk_size`, streamed (GetObject).

    Close it with `contextlib.aclosing` so that the connection is released early.
    """
    answer = await _guarded(ref, "download", client.get_object(Bucket=ref.bucket, Key=ref.key))
    async with answer["Body"] as body:
        while chunk := await _guarded(ref, "download", body.read(chunk_size)):
            yield chunk


async def put_object_file(
    client: Any, ref: ObjectRef, path: Path, *, kms_key_id: str, checksum_sha256: str
) -> None:
    """Upload the file at `path` in one PutObject, with SSE-KMS under `kms_key_id`.

    `checksum_sha256` is the base64 SHA-256 of the file; S3 refuses a body that differs.
    """
    body = _open_binary(path)
    try:
        request = client.put_object(
            Bucket=ref.bucket,
            Key=ref.key,
            Body=body,
            ServerSideEncryption="aws:kms",
            SSEKMSKeyId=kms_key_id,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum_sha256,
        )
        await _guarded(ref, "upload", request)
    finally:
        body.close()


def _open_binary(path: Path) -> BinaryIO:
    """Open synchronously: a file opened in a worker thread would leak if the task were
    cancelled meanwhile. aiohttp then reads the body in its executor."""
    return path.open("rb")


async def _guarded(ref: ObjectRef, verb: str, call: Awaitable[T]) -> T:
    """Await one S3 call; raise botocore's errors as `ArtifactError`, unchained."""
    try:
        return await call
    except ClientError as exc:
        error = _client_error(ref, verb, exc)
    except _TRANSPORT_ERRORS as exc:
        detail = _redact(f"{type(exc).__name__}: {exc}")
        error = ArtifactError(
            f"{ref}: {verb} failed, S3 could not be reached or the connection broke "
            f"({detail}); {_HINTS['JobFailed']}"
        )
    except FlexibleChecksumError:
        error = ArtifactError(
            f"{ref}: {verb} failed, the bytes received do not match the object's checksum "
            f"(FlexibleChecksumError); {_HINTS['JobFailed']}"
        )
    except BotoCoreError as exc:
        # Other botocore errors can quote request arguments, so only the kind is named.
        error = ArtifactError(
            f"{ref}: {verb} failed, botocore refused ({type(exc).__name__}); {_HINTS['JobFailed']}"
        )
    # Raised here, outside the except clauses, so that it has no __context__ either.
    raise error


def _client_error(ref: ObjectRef, verb: str, exc: ClientError) -> ArtifactError:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    code = str(error.get("Code") or "Unknown")
    status = meta.get("HTTPStatusCode")
    if code in _NOT_FOUND or status == 404:
        failure_type = "RevisionUnavailable"
    elif code in _DENIED:
        failure_type = "PermissionError"
    else:
        failure_type = "JobFailed"
    details = [f"HTTP {status}"] if status else []
    if request_id := meta.get("RequestId"):
        details.append(f"request id {request_id}")
    where = f" ({', '.join(details)})" if details else ""
    text = _redact(str(error.get("Message") or "")).strip()
    said = f": {text}" if text else ""
    return ArtifactError(
        f"{ref}: {verb} failed, S3 answered {code}{where}{said}; {_HINTS[failure_type]}",
        failure_type=failure_type,
        code=code,
    )


def _redact(text: str) -> str:
    return _SECRET_LIKE.sub("<redacted>", text)
