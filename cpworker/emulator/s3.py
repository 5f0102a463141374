"""The emulator's S3 side: moto's real server, with authentication on.

At start the emulator serves moto's WSGI app in its own process (werkzeug's threaded
server in a daemon thread, as moto's `ThreadedMotoServer` does) behind `S3Front`, creates
(while moto still accepts anything) an admin IAM user for itself, an artifact role that may
use S3, and the artifact bucket, then turns moto's authentication on (`POST
/moto-api/reset-auth` with body ``0``). From then on S3 checks every request's SigV4
signature against the stored secret and refuses unknown keys and wrong session tokens, and
the front refuses keys the emulator registered as expired (`ExpiredToken`). Per-job
artifact credentials are STS AssumeRole session credentials of the artifact role.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import zipfile
from contextlib import AsyncExitStack
from typing import IO, TYPE_CHECKING, Any

import aiohttp
import anyio
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from cpworker.emulator import EmulatorError
from cpworker.emulator.s3_front import CredentialRegistry, S3Front, S3Log

if TYPE_CHECKING:
    from werkzeug.serving import BaseWSGIServer

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
    """moto's S3 server behind `S3Front`, and the emulator's own clients (admin S3 and STS)."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._server: BaseWSGIServer | None = None
        self._stack = AsyncExitStack()
        self._s3: Any = None
        self._sts: Any = None
        self._admin_key: tuple[str, str] = ("", "")
        self._role_arn = ""
        self._session_seq = 0
        self.registry = CredentialRegistry()
        self.log = S3Log()
        self.url = ""

    async def start(self) -> None:
        self._serve()
        self._admin_key = await self._bootstrap()
        self._s3 = await self._client("s3", self._admin_key)
        self._sts = await self._client("sts", self._admin_key)
        await self._s3.create_bucket(Bucket=BUCKET)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.url}/moto-api/reset-auth", data=b"0") as resp,
        ):
            resp.raise_for_status()

    def _serve(self) -> None:
        """Bind moto's app behind the front and serve it from a daemon thread."""
        try:
            from moto.moto_server.werkzeug_app import (
                DomainDispatcherApplication,
                MotoRequestHandler,
                create_backend_app,
            )
            from werkzeug.serving import make_server
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the emulator needs moto's server: pip install 'cpworker[emulator]'"
            ) from exc
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        _check_free(self._host, self._port)
        app = S3Front(DomainDispatcherApplication(create_backend_app), self.registry, self.log)
        try:
            server = make_server(
                self._host, self._port, app, True, request_handler=MotoRequestHandler
            )
        except SystemExit:  # werkzeug exits when it cannot bind (the port was taken after all)
            raise EmulatorError(
                f"moto's S3 server could not listen on {self._host}:{self._port}; "
                "choose another --s3-port, or 0 for a free one"
            ) from None
        self._server = server
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="s3", daemon=True
        ).start()
        self.url = f"http://{self._host}:{server.port}"

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

    async def put_raw_object(self, key: str, body: IO[bytes]) -> str:
        """Store `body` (read from its start) as one object; returns its ETag.

        A synchronous boto3 client in a worker thread, so hashing and sending up to
        1 GiB never blocks the event loop.
        """
        import boto3

        def upload() -> str:
            body.seek(0)
            client = boto3.client(
                "s3",
                region_name=REGION,
                endpoint_url=self.url,
                aws_access_key_id=self._admin_key[0],
                aws_secret_access_key=self._admin_key[1],
            )
            try:
                return str(client.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"])
            finally:
                client.close()

        return await anyio.to_thread.run_sync(upload)

    async def object_exists(self, key: str) -> bool:
        """Whether the artifact bucket holds `key`."""
        try:
            await self._s3.head_object(Bucket=BUCKET, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return True

    async def stop(self) -> None:
        await self._stack.aclose()
        server, self._server = self._server, None
        if server is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.shutdown)
            server.server_close()


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
