"""The emulator's S3 side: moto's real server, with authentication on.

At start the emulator runs moto's `ThreadedMotoServer` in its own process, creates (while
moto still accepts anything) an admin IAM user for itself, an artifact role that may use
S3, and the artifact bucket, then turns moto's authentication on (`POST
/moto-api/reset-auth` with body ``0``). From then on S3 checks every request's SigV4
signature against the stored secret and refuses unknown keys and wrong session tokens.
Per-job artifact credentials are STS AssumeRole session credentials of the artifact role.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import zipfile
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import anyio
from aiobotocore.session import get_session

from cpworker.emulator import EmulatorError

ACCOUNT_ID = "123456789012"  # moto's default account
REGION = "us-east-1"
BUCKET = "codepipeline-us-east-1-emulator"
_ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
}


def zip_bytes(files: dict[str, str]) -> bytes:
    """A zip archive holding `files` (path in the archive → text)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return buffer.getvalue()


class S3Side:
    """moto's S3 server and the emulator's own clients for it (admin S3 and STS)."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._server: Any = None
        self._stack = AsyncExitStack()
        self._s3: Any = None
        self._sts: Any = None
        self._role_arn = ""
        self._session_seq = 0
        self.url = ""

    async def start(self) -> None:
        try:
            from moto.moto_server.threaded_moto_server import ThreadedMotoServer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the emulator needs moto's server: pip install 'cpworker[emulator]'"
            ) from exc
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        _check_free(self._host, self._port)
        self._server = ThreadedMotoServer(self._host, self._port, verbose=False)
        # moto waits without a timeout for its server thread; if that thread died (port
        # taken after all) the wait would never end, so it runs in a thread we can abandon.
        try:
            with anyio.fail_after(30):
                await anyio.to_thread.run_sync(self._server.start, abandon_on_cancel=True)
        except TimeoutError:
            self._server = None
            raise EmulatorError(
                f"moto's S3 server did not start on {self._host}:{self._port}; "
                "choose another --s3-port, or 0 for a free one"
            ) from None
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        admin = await self._bootstrap()
        self._s3 = await self._client("s3", admin)
        self._sts = await self._client("sts", admin)
        await self._s3.create_bucket(Bucket=BUCKET)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.url}/moto-api/reset-auth", data=b"0") as resp,
        ):
            resp.raise_for_status()

    async def _bootstrap(self) -> tuple[str, str]:
        """Create the admin user and the artifact role while moto accepts anything."""
        async with get_session().create_client(
            "iam",
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",  # noqa: S106 - moto accepts any key before auth is on
        ) as iam:
            await iam.create_user(UserName="cpworker-emulator")
            await iam.put_user_policy(
                UserName="cpworker-emulator",
                PolicyName="admin",
                PolicyDocument=json.dumps(_ALLOW_ALL),
            )
            key = (await iam.create_access_key(UserName="cpworker-emulator"))["AccessKey"]
            role = await iam.create_role(
                RoleName="cpworker-artifacts", AssumeRolePolicyDocument=json.dumps(_TRUST)
            )
            s3_only = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
            }
            await iam.put_role_policy(
                RoleName="cpworker-artifacts",
                PolicyName="artifacts",
                PolicyDocument=json.dumps(s3_only),
            )
        self._role_arn = role["Role"]["Arn"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    async def _client(self, service: Any, credentials: tuple[str, str]) -> Any:
        client = get_session().create_client(
            service,
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id=credentials[0],
            aws_secret_access_key=credentials[1],
        )
        return await self._stack.enter_async_context(client)

    async def mint_credentials(self, duration_s: int = 3600) -> dict[str, str]:
        """Fresh artifact credentials (wire form: accessKeyId, secretAccessKey, sessionToken)."""
        self._session_seq += 1
        answer = await self._sts.assume_role(
            RoleArn=self._role_arn,
            RoleSessionName=f"cpworker-job-{self._session_seq}",
            DurationSeconds=max(900, duration_s),
        )
        c = answer["Credentials"]
        return {
            "accessKeyId": c["AccessKeyId"],
            "secretAccessKey": c["SecretAccessKey"],
            "sessionToken": c["SessionToken"],
        }

    async def put_object(self, key: str, body: bytes) -> None:
        await self._s3.put_object(Bucket=BUCKET, Key=key, Body=body)

    async def stop(self) -> None:
        await self._stack.aclose()
        if self._server is not None and self.url:
            self._server.stop()


def _check_free(host: str, port: int) -> None:
    """Fail at once, with the fix, when the S3 port is taken."""
    if port == 0:
        return
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise EmulatorError(
                f"cannot listen on {host}:{port} for S3 ({exc.strerror}); "
                "choose another --s3-port, or 0 for a free one"
            ) from None
