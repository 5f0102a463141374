"""SigV4 checks for the emulator's CodePipeline API.

By default a request only needs a well-formed ``AWS4-HMAC-SHA256`` Authorization header
(any identity is accepted, as a local emulator should). With verification on, the
emulator knows a set of access keys and their secrets, recomputes each request's signature
with botocore's own signer over the headers the client signed, and refuses unknown keys
(``UnrecognizedClientException``) and wrong signatures (``InvalidSignatureException``), as
AWS does.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from cpworker.emulator.jobs import ApiError

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request,\s*SignedHeaders=(?P<headers>[^,]+),\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})"
)


def parse_keys(text: str) -> dict[str, str]:
    """Parse ``KEY_ID=SECRET[,KEY_ID=SECRET...]``; the error never shows a secret."""
    keys: dict[str, str] = {}
    for n, item in enumerate(filter(None, (p.strip() for p in text.split(","))), start=1):
        key_id, sep, secret = item.partition("=")
        if not sep or not key_id or not secret:
            raise ValueError(
                f"entry {n} of the SigV4 key list is not KEY_ID=SECRET "
                "(entries are separated by commas)"
            )
        keys[key_id] = secret
    if not keys:
        raise ValueError("the SigV4 key list is empty; give at least one KEY_ID=SECRET")
    return keys


class SigV4Checker:
    """Checks the Authorization header of a request; verifies it when keys are known."""

    def __init__(self, keys: dict[str, str] | None = None) -> None:
        self._keys = keys

    @property
    def verifying(self) -> bool:
        return self._keys is not None

    def check(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> None:
        """Raise the `ApiError` AWS would answer; `headers` must be case-insensitive."""
        match = _AUTH.fullmatch(headers.get("Authorization", ""))
        if match is None:
            raise ApiError(
                "MissingAuthenticationTokenException",
                "Request is missing a SigV4 Authorization header (AWS4-HMAC-SHA256)",
                403,
            )
        if self._keys is None:
            return
        secret = self._keys.get(match["key"])
        if secret is None:
            raise ApiError(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        expected = _signature(match, secret, method, url, headers, body)
        if not hmac.compare_digest(expected, match["signature"]):
            raise ApiError(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you "
                "provided. Check your AWS Secret Access Key and signing method.",
            )


def _signature(
    match: re.Match[str],
    secret: str,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
) -> str:
    signed = match["headers"].split(";")
    request = AWSRequest(
        method=method, url=url, data=body, headers={h: headers.get(h, "") for h in signed}
    )
    request.context["timestamp"] = headers.get("X-Amz-Date", "")
    signer = SigV4Auth(Credentials(match["key"], secret), match["service"], match["region"])
    canonical = signer.canonical_request(request)
    return signer.signature(signer.string_to_sign(request, canonical), request)
