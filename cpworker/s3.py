"""S3 for artifacts: one shared client, every request signed with its own job's credentials.

The only worker module that imports aiobotocore/botocore for S3. One `SharedS3` per worker
process holds one aiobotocore client, so every job's transfers reuse one HTTP connection
pool and no job pays for creating a client (about 7.5 ms of CPU each). Each request names
its job's `JobCredentials` and is signed (SigV4) with them, never with the worker's own
identity::

    async with SharedS3.open(S3Settings(region="eu-west-1")) as s3:
        credentials = JobCredentials(job.data.artifact_credentials, fetch=get_job_details)
        info = await s3.head(credentials, ref)

`JobCredentials` are aiobotocore refreshable credentials whose refresh fetches the job's
details again (GetJobDetails / GetThirdPartyJobDetails): on a schedule, and at once when
S3 answers `ExpiredToken`, `InvalidAccessKeyId`, `InvalidToken` or `TokenRefreshRequired`
(the request is then sent again). One refresh is in flight per job; concurrent requests
of the job wait for it.

Every botocore error is mapped here, at the boundary, into an `ArtifactError` whose
`failure_type` is the CodePipeline failure type to report. Messages name the artifact,
the bucket and key, S3's error code and what to do. They never contain the credentials:
S3's own message text is quoted only after anything that looks like a key, secret or
token is redacted, and mapped errors are raised outside the handler of the botocore error,
so no exception chain leads back to the request.
"""

from __future__ import annotations

import datetime
import functools
import io
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import IO, Any, Final, TypeVar

import aiohttp
import msgspec
from aiobotocore.config import AioConfig
from aiobotocore.credentials import AnyioRefreshableCredentials  # type: ignore[attr-defined]
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
    "RENEW_ON",
    "TRANSPORT_CODE",
    "JobCredentials",
    "ObjectInfo",
    "ObjectRef",
    "S3Settings",
    "SharedS3",
]

T = TypeVar("T")

# The AWS-managed S3 key, used for SSE-KMS when the job carries no encryption key.
DEFAULT_KMS_KEY: Final = "alias/aws/s3"
# S3's answers that mean "these credentials are no longer (or not yet) good": renew, resend.
# A HEAD answer has no body to name the error, so its bare 400 or 403 may mean the same.
RENEW_ON: Final = frozenset(
    {"ExpiredToken", "InvalidAccessKeyId", "InvalidToken", "TokenRefreshRequired", "400", "403"}
)
# `ArtifactError.code` of a connection that could not be made or broke mid-answer.
TRANSPORT_CODE: Final = "ConnectionError"
# How many times one request is sent again with renewed credentials before giving up; also
# how many renewals for refused credentials a job makes in a row (no request accepted
# since) before every request refused gives up.
_RENEWALS_PER_REQUEST = 3
# The parameter that carries a request's JobCredentials to the signer (never sent).
_CREDENTIALS_PARAM = "CpworkerJobCredentials"
_CONTEXT_KEY = "cpworker_job_credentials"

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED = RENEW_ON | {"AccessDenied", "SignatureDoesNotMatch", "Forbidden", "403"}
_CHANGED = frozenset({"PreconditionFailed", "412"})
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
    # The shared connection pool: at least the process's transfer concurrency.
    max_pool_connections: int = 64

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_pool_connections < 1:
            raise CpWorkerError(
                f"max_attempts={self.max_attempts}, max_pool_connections="
                f"{self.max_pool_connections}: must be 1 or more"
            )
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
            # Bodies are not hashed into the signature (botocore would read each one on the
            # event loop to do it); uploads carry a checksum computed off the loop instead.
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            max_pool_connections=self.max_pool_connections,
            request_checksum_calculation="when_required",
        )


class ObjectRef(msgspec.Struct, frozen=True, kw_only=True):
    """One S3 object and what it is, for messages (e.g. "input artifact 'Src'")."""

    what: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{self.what} (s3://{self.bucket}/{self.key})"


class ObjectInfo(msgspec.Struct, frozen=True, kw_only=True):
    size: int
    etag: str


# --- credentials -----------------------------------------------------------------------


class _Refreshable(AnyioRefreshableCredentials):  # type: ignore[misc]
    forced = False
    generation = 0  # how many times they were refreshed
    refused_in_a_row = 0  # forced refreshes since a request was last accepted

    async def renew_if_current(self, used_generation: int) -> bool:
        """Refresh now unless they were refreshed since `used_generation` was signed with.

        aiobotocore refreshes only by time; this forces one under its own refresh lock,
        so concurrent callers refused with the same credentials cause one refresh together.
        False: renewing is given up (`_RENEWALS_PER_REQUEST` in a row were refused too).
        """
        async with self._refresh_lock:
            if self.generation != used_generation:
                return True  # renewed since: send again with the new ones
            if self.refused_in_a_row >= _RENEWALS_PER_REQUEST:
                return False
            self.refused_in_a_row += 1
            self.forced = True
            try:
                await self._protected_refresh(is_mandatory=True)
            finally:
                self.forced = False
            return True


class JobCredentials:
    """One job's artifact credentials, renewed through `fetch` (GetJobDetails).

    Renewed on the first request after `refresh_s` seconds; should that renewal fail, the
    current credentials are kept, and renewing becomes mandatory (a failure fails the
    request) after 1.5 times `refresh_s`. Renewed at once when S3 refuses them.
    `on_renewal(reason, credentials)` is called after each renewal, with reason
    ``scheduled`` or ``refused``, e.g. to count it and to teach the log redactor the new
    secrets.
    """

    def __init__(
        self,
        initial: models.ArtifactCredentials,
        fetch: Callable[[], Awaitable[models.ArtifactCredentials]],
        *,
        refresh_s: float = 600.0,
        on_renewal: Callable[[str, models.ArtifactCredentials], None] = lambda *_: None,
    ) -> None:
        if refresh_s <= 0:
            raise CpWorkerError(f"refresh_s={refresh_s}: must be more than 0 seconds")
        self._fetch = fetch
        self._refresh_s = refresh_s
        self._on_renewal = on_renewal
        self.renewals = 0
        self._initial = initial
        self._received = datetime.datetime.now(datetime.UTC)  # their lifetime starts here
        self._made: _Refreshable | None = None

    @property
    def _credentials(self) -> _Refreshable:
        # Made on first use: most jobs never touch S3, and making them parses a timestamp.
        if self._made is None:
            self._made = _Refreshable.create_from_metadata(
                metadata=self._metadata(self._initial, self._received),
                refresh_using=self._refresh,
                method="codepipeline-job",
                advisory_timeout=self._refresh_s / 2,
                mandatory_timeout=0,
            )
        return self._made

    def _metadata(
        self, credentials: models.ArtifactCredentials, received: datetime.datetime | None = None
    ) -> dict[str, str]:
        received = received or datetime.datetime.now(datetime.UTC)
        lifetime = datetime.timedelta(seconds=self._refresh_s * 1.5)
        return {
            "access_key": credentials.access_key_id,
            "secret_key": credentials.secret_access_key,
            "token": credentials.session_token,
            "expiry_time": (received + lifetime).isoformat(),
        }

    async def _refresh(self) -> dict[str, str]:
        reason = "refused" if self._credentials.forced else "scheduled"
        fresh = await self._fetch()
        self.renewals += 1
        self._credentials.generation += 1
        self._on_renewal(reason, fresh)
        return self._metadata(fresh)

    async def current(self) -> int:
        """Renew first when due; the generation of the credentials requests use now."""
        await self._credentials.get_frozen_credentials()
        return int(self._credentials.generation)

    async def access_key(self) -> str:
        """The access key id requests are signed with now (renewed first when due)."""
        frozen = await self._credentials.get_frozen_credentials()
        return str(frozen.access_key)

    async def renew(self, refused_generation: int) -> bool:
        """S3 refused that generation: renew now, unless another request already did.

        False when renewing is given up: the job's credentials were renewed for refusals
        `_RENEWALS_PER_REQUEST` times in a row, and no request was accepted since.
        """
        renewed: bool = await self._credentials.renew_if_current(refused_generation)
        return renewed

    def accepted(self) -> None:
        """A request signed with them was accepted: refusals in a row start again from 0."""
        self._credentials.refused_in_a_row = 0

    @property
    def botocore(self) -> Any:
        """The aiobotocore credentials object requests are signed with."""
        return self._credentials

    def __repr__(self) -> str:
        return f"JobCredentials(renewals={self.renewals})"


# --- the shared client -----------------------------------------------------------------


@functools.cache
def _shared_session() -> AioSession:
    """One session per process: it caches the service models every client loads."""
    return get_session()


def _take_credentials(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """provide-client-params: move the request's JobCredentials out of its parameters."""
    credentials = params.pop(_CREDENTIALS_PARAM, None)
    if credentials is not None:
        context[_CONTEXT_KEY] = credentials


def _no_region_redirect(context: dict[str, Any], **_: Any) -> None:
    """before-parameter-build: mark the request as redirected already.

    botocore answers some errors (a HEAD's bare 400, say) by asking the bucket's region
    with a request of its own; artifacts are in the configured region, and that request
    would carry no job credentials.
    """
    context.setdefault("s3_redirect", {})["redirected"] = True


def _sign_with_job_credentials(request: Any, **_: Any) -> None:
    """before-sign: sign with the request's job credentials, never the client's own."""
    credentials = request.context.get(_CONTEXT_KEY)
    if credentials is None:
        raise CpWorkerError("an S3 request without job credentials; this is a cpworker bug")
    request.context.setdefault("signing", {})["request_credentials"] = credentials


class SharedS3:
    """One aiobotocore S3 client (one connection pool) for every job of the process."""

    def __init__(self, client: Any) -> None:
        self._client = client

    @classmethod
    @asynccontextmanager
    async def open(
        cls, settings: S3Settings, session: AioSession | None = None
    ) -> AsyncIterator[SharedS3]:
        session = session or _shared_session()
        async with session.create_client(
            "s3",
            endpoint_url=settings.endpoint_url,
            config=settings.client_config(),
            # Never used to sign (every request carries its job's credentials); static, so
            # creating the client does not look for the worker's own identity.
            aws_access_key_id="cpworker-job-credentials-only",
            aws_secret_access_key="cpworker-job-credentials-only",  # noqa: S106
        ) as client:
            client.meta.events.register("provide-client-params.s3", _take_credentials)
            client.meta.events.register("before-parameter-build.s3", _no_region_redirect)
            client.meta.events.register("before-sign.s3", _sign_with_job_credentials)
            yield cls(client)

    async def call(
        self, credentials: JobCredentials, ref: ObjectRef, verb: str, operation: str, **params: Any
    ) -> dict[str, Any]:
        """One S3 operation (a client method name), renewing refused credentials and resending.

        A body in `params` is bytes or a seekable file object (rewound before a resend).
        """
        method = getattr(self._client, operation)
        for attempt in range(_RENEWALS_PER_REQUEST + 1):
            used = await _guarded(ref, verb, credentials.current())
            try:
                answer: dict[str, Any] = await _guarded(
                    ref, verb, method(**params, **{_CREDENTIALS_PARAM: credentials.botocore})
                )
                credentials.accepted()
                return answer
            except ArtifactError as exc:
                # A HEAD's bare 400/403 may be anything: renewing once is enough to tell.
                limit = 1 if exc.code in ("400", "403") else _RENEWALS_PER_REQUEST
                if exc.code not in RENEW_ON or attempt >= limit:
                    raise
                refused = exc
            if not await _guarded(ref, verb, credentials.renew(used)):
                raise refused
            body: Any = params.get("Body")
            if hasattr(body, "seek"):
                body.seek(0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def head(self, credentials: JobCredentials, ref: ObjectRef) -> ObjectInfo:
        answer = await self.call(credentials, ref, "download", "head_object", **_where(ref))
        return ObjectInfo(size=int(answer["ContentLength"]), etag=str(answer["ETag"]))

    async def iter_range(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        first: int | None,
        last: int,
        etag: str | None,
        chunk_size: int = 1 << 20,
    ) -> AsyncGenerator[bytes, None]:
        """Bytes `first`..`last` (inclusive) of the object, streamed; `first=None`: all of it.

        With `etag`, S3 refuses (412, reported as a changed artifact) when the object is no
        longer that version. Close it with `contextlib.aclosing`.
        """
        params = _where(ref)
        if first is not None:
            params["Range"] = f"bytes={first}-{last}"
        if etag is not None:
            params["IfMatch"] = etag
        answer = await self.call(credentials, ref, "download", "get_object", **params)
        async with answer["Body"] as body:
            while chunk := await _guarded(ref, "download", body.read(chunk_size)):
                yield chunk

    async def put_file(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        body: bytes | IO[bytes] | io.RawIOBase,
        *,
        kms_key_id: str,
        checksum_sha256: str,
    ) -> None:
        """One PutObject of an open file, with SSE-KMS under `kms_key_id`."""
        await self.call(
            credentials,
            ref,
            "upload",
            "put_object",
            **_where(ref),
            Body=body,
            ServerSideEncryption="aws:kms",
            SSEKMSKeyId=kms_key_id,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum_sha256,
        )

    async def create_multipart(
        self, credentials: JobCredentials, ref: ObjectRef, *, kms_key_id: str
    ) -> str:
        answer = await self.call(
            credentials,
            ref,
            "upload",
            "create_multipart_upload",
            **_where(ref),
            ServerSideEncryption="aws:kms",
            SSEKMSKeyId=kms_key_id,
            ChecksumAlgorithm="CRC32",
        )
        return str(answer["UploadId"])

    async def upload_part(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        upload_id: str,
        number: int,
        body: bytes | IO[bytes] | io.RawIOBase,
        *,
        length: int,
        checksum_crc32: str,
    ) -> dict[str, Any]:
        """Upload one part; returns its entry for `complete_multipart`."""
        answer = await self.call(
            credentials,
            ref,
            "upload",
            "upload_part",
            **_where(ref),
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            ContentLength=length,
            ChecksumAlgorithm="CRC32",
            ChecksumCRC32=checksum_crc32,
        )
        return {"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32": checksum_crc32}

    async def complete_multipart(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        upload_id: str,
        parts: list[dict[str, Any]],
    ) -> None:
        await self.call(
            credentials,
            ref,
            "upload",
            "complete_multipart_upload",
            **_where(ref),
            UploadId=upload_id,
            MultipartUpload={"Parts": sorted(parts, key=lambda p: int(p["PartNumber"]))},
        )

    async def abort_multipart(
        self, credentials: JobCredentials, ref: ObjectRef, upload_id: str
    ) -> None:
        await self.call(
            credentials, ref, "upload", "abort_multipart_upload", **_where(ref), UploadId=upload_id
        )


def _where(ref: ObjectRef) -> dict[str, str]:
    return {"Bucket": ref.bucket, "Key": ref.key}


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
            f"({detail}); {_HINTS['JobFailed']}",
            code=TRANSPORT_CODE,
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
    except ArtifactError:
        raise
    except CpWorkerError as exc:  # renewing the credentials (GetJobDetails) failed
        # cpworker's own errors never hold credentials (and the runner redacts again).
        error = ArtifactError(
            f"{ref}: {verb} failed, the job's artifact credentials could not be renewed "
            f"({exc}); retry the job",
            failure_type="PermissionError",
            code="RenewalFailed",
        )
    # Raised here, outside the except clauses, so that it has no __context__ either.
    raise error


def _client_error(ref: ObjectRef, verb: str, exc: ClientError) -> ArtifactError:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    code = str(error.get("Code") or "Unknown")
    status = meta.get("HTTPStatusCode")
    details = [f"HTTP {status}"] if status else []
    if request_id := meta.get("RequestId"):
        details.append(f"request id {request_id}")
    where = f" ({', '.join(details)})" if details else ""
    text = _redact(str(error.get("Message") or "")).strip()
    said = f"S3 answered {code}{where}" + (f": {text}" if text else "")
    if code in _CHANGED or status == 412:
        return ArtifactError(
            f"{ref}: {verb} failed, the object changed while it was being downloaded "
            f"({said}); run the pipeline again",
            failure_type="RevisionUnavailable",
            code=code,
        )
    if code in _NOT_FOUND or status == 404:
        failure_type = "RevisionUnavailable"
    elif code in _DENIED:
        failure_type = "PermissionError"
    else:
        failure_type = "JobFailed"
    return ArtifactError(
        f"{ref}: {verb} failed, {said}; {_HINTS[failure_type]}",
        failure_type=failure_type,
        code=code,
    )


def _redact(text: str) -> str:
    return _SECRET_LIKE.sub("<redacted>", text)
