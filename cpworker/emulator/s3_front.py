"""A thin WSGI front of moto's S3 app: credential expiry, and a log of what S3 was asked.

It runs in moto's own server threads (no extra network hop) and never reads a request's
body, so streaming uploads pass through untouched. For each request it

- reads the access key id from the SigV4 ``Authorization`` header or a presigned URL's
  ``X-Amz-Credential``; when the emulator minted that key with an expiry that has passed,
  it answers as S3 does (HTTP 400, ``ExpiredToken``) without calling moto;
- records each accepted PutObject and CreateMultipartUpload with its SSE-KMS headers and
  the job its key was minted for, and counts accepted GetObject requests per key.

Only path-style addressing (``/bucket/key``) is understood; ``/moto-api/`` passes through.
`CredentialRegistry` is written from the emulator's event loop and read from moto's
threads; both it and `S3Log` guard their state with a lock.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# Query parameters that do not make a request a sub-resource call (presigning, GET options).
_PLAIN_QUERY_PREFIXES = ("x-amz-", "response-")
_PLAIN_QUERY_NAMES = frozenset({"x-id", "versionid", "partnumber"})
_EXPIRED_MESSAGE = "The provided token has expired."


@dataclass(frozen=True)
class Grant:
    """What the emulator minted one access key for: its jobs and its expiry (monotonic)."""

    job_ids: tuple[str, ...]
    expires_at: float | None


class CredentialRegistry:
    """Access key id → `Grant`, for every credential set the emulator mints."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._grants: dict[str, Grant] = {}
        self._lock = threading.Lock()

    def register(self, access_key_id: str, job_ids: Sequence[str], ttl_s: float | None) -> None:
        """Record a fresh key minted for `job_ids`; it expires `ttl_s` from now (None: never)."""
        expires_at = None if ttl_s is None else self._clock() + ttl_s
        with self._lock:
            self._grants[access_key_id] = Grant(tuple(job_ids), expires_at)

    def get(self, access_key_id: str) -> Grant | None:
        with self._lock:
            return self._grants.get(access_key_id)

    def expired(self, grant: Grant) -> bool:
        return grant.expires_at is not None and self._clock() >= grant.expires_at


class S3Log:
    """What the front saw: uploads with their SSE headers, GETs per key, refusals by code."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uploads: list[dict[str, Any]] = []
        self._gets: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()

    def upload(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._uploads.append(record)

    def get(self, key: str) -> None:
        with self._lock:
            self._gets[key] += 1

    def refused(self, code: str) -> None:
        with self._lock:
            self._refused[code] += 1

    def snapshot(self) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, int]]:
        """Copies of (uploads, gets per key, refusals per code)."""
        with self._lock:
            return [dict(r) for r in self._uploads], dict(self._gets), dict(self._refused)


class S3Front:
    """The WSGI middleware in front of moto's app (see the module docstring)."""

    def __init__(self, app: WSGIApplication, registry: CredentialRegistry, log: S3Log) -> None:
        self._app = app
        self._registry = registry
        self._log = log

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = _text(environ.get("PATH_INFO", ""))
        if path.startswith("/moto-api/"):
            return self._app(environ, start_response)
        key_id = access_key_id(environ)
        grant = self._registry.get(key_id) if key_id else None
        if grant is not None and self._registry.expired(grant):
            self._log.refused("ExpiredToken")
            return _expired_token(environ, start_response)
        operation = classify(environ["REQUEST_METHOD"], environ.get("QUERY_STRING", ""), environ)
        bucket, _, key = path.lstrip("/").partition("/")
        if operation is None or not bucket or not key:
            return self._app(environ, start_response)
        record = self._recorder(operation, bucket, key, environ, grant)

        def recording_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            if status.startswith("2"):
                record()
            return start_response(status, headers, exc_info)

        return self._app(environ, recording_start_response)

    def _recorder(
        self, operation: str, bucket: str, key: str, environ: WSGIEnvironment, grant: Grant | None
    ) -> Callable[[], None]:
        if operation == "GetObject":
            return lambda: self._log.get(key)
        entry = {
            "operation": operation,
            "bucket": bucket,
            "key": key,
            "sse": environ.get("HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION"),
            "kmsKeyId": environ.get("HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION_AWS_KMS_KEY_ID"),
            "jobId": grant.job_ids[0] if grant is not None and grant.job_ids else None,
        }
        return lambda: self._log.upload(entry)


def access_key_id(environ: WSGIEnvironment) -> str | None:
    """The access key id a request is signed with (header or presigned query), if any.

    SigV4 (``Credential=AKID/...``) and SigV2 (``AWS AKID:signature``, ``AWSAccessKeyId``).
    """
    auth: str = environ.get("HTTP_AUTHORIZATION", "")
    if auth:
        start = auth.find("Credential=")
        if start >= 0:
            return auth[start + len("Credential=") :].split("/", 1)[0] or None
        if auth.startswith("AWS "):  # SigV2: "AWS AKID:signature"
            return auth[4:].split(":", 1)[0] or None
        return None
    query: str = environ.get("QUERY_STRING", "")
    if "X-Amz-Credential=" in query or "AWSAccessKeyId=" in query:
        params = parse_qs(query)
        for value in params.get("X-Amz-Credential", []) + params.get("AWSAccessKeyId", []):
            return value.split("/", 1)[0] or None
    return None


def classify(method: str, query: str, environ: WSGIEnvironment) -> str | None:
    """PutObject, CreateMultipartUpload, GetObject, or None for anything else."""
    names = [part.partition("=")[0].lower() for part in query.split("&") if part]
    if method == "POST":
        return "CreateMultipartUpload" if "uploads" in names else None
    if method not in ("PUT", "GET"):
        return None
    plain = all(n.startswith(_PLAIN_QUERY_PREFIXES) or n in _PLAIN_QUERY_NAMES for n in names)
    if method == "GET":
        return "GetObject" if plain else None
    if not plain or "partnumber" in names or "HTTP_X_AMZ_COPY_SOURCE" in environ:
        return None
    return "PutObject"


def _text(wsgi_str: str) -> str:
    """A WSGI "bytes as latin-1" string back to the UTF-8 text the client sent."""
    return wsgi_str.encode("latin-1").decode("utf-8", "replace")


def _expired_token(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """S3's answer to a request signed with expired credentials (the token is not echoed)."""
    request_id = secrets.token_hex(8).upper()
    host_id = base64.b64encode(secrets.token_bytes(48)).decode()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>ExpiredToken</Code><Message>{_EXPIRED_MESSAGE}</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>{host_id}</HostId></Error>"
    ).encode()
    if environ["REQUEST_METHOD"] == "HEAD":
        body = b""  # S3 answers HEAD errors without a body
    start_response(
        "400 Bad Request",
        [
            ("Content-Type", "application/xml"),
            ("Content-Length", str(len(body))),
            ("x-amz-request-id", request_id),
            ("x-amz-id-2", host_id),
        ],
    )
    return [body]
