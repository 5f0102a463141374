"""The emulator's S3 side: credential expiry (`ExpiredToken`), the upload log, raw objects.

Everything runs against a real emulator over HTTP, with real aiobotocore S3 clients signed
with the artifact credentials CodePipeline hands a job (polled with boto3).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import ClientError

from cpworker import models as m
from cpworker.emulator.client import AdminClient, EmulatorError, EmulatorProcess
from tests.conftest import JobFactory, boto_codepipeline, wait_for

BUCKET = "codepipeline-us-east-1-emulator"
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
MIB = 1024 * 1024
S3_CONFIG = AioConfig(
    retries={"mode": "standard", "total_max_attempts": 1}, s3={"addressing_style": "path"}
)


@asynccontextmanager
async def job_s3(
    endpoint: str, credentials: dict[str, str], config: AioConfig = S3_CONFIG
) -> AsyncIterator[Any]:
    """An S3 client signed with a job's artifact credentials (retries off)."""
    async with AioSession().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=credentials["accessKeyId"],
        aws_secret_access_key=credentials["secretAccessKey"],
        aws_session_token=credentials["sessionToken"],
        config=config,
    ) as client:
        yield client


async def poll(boto: Any, action_type: m.ActionTypeId, n: int = 1) -> list[dict[str, Any]]:
    """Poll `n` jobs (boto3, in a thread); fails unless exactly `n` come back."""
    answer = await anyio.to_thread.run_sync(
        lambda: boto.poll_for_jobs(actionTypeId=m.to_builtins(action_type), maxBatchSize=n)
    )
    jobs: list[dict[str, Any]] = answer["jobs"]
    assert len(jobs) == n
    return jobs


async def details_credentials(boto: Any, job_id: str) -> dict[str, str]:
    answer = await anyio.to_thread.run_sync(lambda: boto.get_job_details(jobId=job_id))
    credentials: dict[str, str] = answer["jobDetails"]["data"]["artifactCredentials"]
    return credentials


def location(artifact: dict[str, Any]) -> str:
    s3_location = artifact["location"]["s3Location"]
    assert s3_location["bucketName"] == BUCKET
    key: str = s3_location["objectKey"]
    return key


async def read(s3: Any, key: str) -> bytes:
    answer = await s3.get_object(Bucket=BUCKET, Key=key)
    async with answer["Body"] as body:
        data: bytes = await body.read()
    return data


async def expired(s3: Any, key: str) -> bool:
    """Whether S3 refuses the client's credentials as expired (any other error fails)."""
    try:
        await s3.head_object(Bucket=BUCKET, Key=key)
    except ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 400:
            return True
        raise
    return False


async def assert_expired_token(s3: Any, key: str) -> None:
    """A GET with expired credentials: S3's `ExpiredToken`, HTTP 400."""
    with pytest.raises(ClientError) as caught:
        await s3.get_object(Bucket=BUCKET, Key=key)
    error = caught.value.response
    assert error["Error"]["Code"] == "ExpiredToken"
    assert error["Error"]["Message"] == "The provided token has expired."
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400


async def refused_count(admin: AdminClient) -> int:
    refused: int = (await admin.s3_log())["refused"].get("ExpiredToken", 0)
    return refused


SOURCE = {"name": "src", "files": {"hello.txt": "hello"}}


async def test_per_job_ttl_expires_credentials_and_details_renews_them(
    emulator: EmulatorProcess,
    admin: AdminClient,
    boto: Any,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    refused_before = await refused_count(admin)
    [job_id] = await make_jobs(inputArtifacts=[SOURCE], credentialTtlS=1.5)
    [job] = await poll(boto, action_type)
    credentials = job["data"]["artifactCredentials"]
    key = location(job["data"]["inputArtifacts"][0])
    v4 = S3_CONFIG.merge(AioConfig(signature_version="s3v4"))
    async with job_s3(emulator.s3, credentials) as s3, job_s3(emulator.s3, credentials, v4) as s3v4:
        assert (await read(s3, key)).startswith(b"PK")  # the zip, while the credentials live
        # Presigned GETs, with the key in the query (SigV2 `AWSAccessKeyId`, SigV4
        # `X-Amz-Credential`): refused too once the credentials expire.
        params = {"Bucket": BUCKET, "Key": key}
        presigned = [
            await client.generate_presigned_url("get_object", Params=params, ExpiresIn=3600)
            for client in (s3, s3v4)
        ]
        await wait_for(lambda: expired(s3, key), 10.0, "S3 to refuse the expired credentials")
        await assert_expired_token(s3, key)
    async with aiohttp.ClientSession() as http:
        for url in presigned:
            async with http.get(url) as resp:
                text = await resp.text()
            assert resp.status == 400
            assert resp.headers["Content-Type"] == "application/xml"
            assert "<Code>ExpiredToken</Code>" in text
            assert credentials["sessionToken"] not in text
    assert await refused_count(admin) >= refused_before + 4
    fresh = await details_credentials(boto, job_id)
    assert fresh["accessKeyId"] != credentials["accessKeyId"]
    async with job_s3(emulator.s3, fresh) as s3:
        assert (await read(s3, key)).startswith(b"PK")


async def test_without_ttl_credentials_never_expire(
    emulator: EmulatorProcess, boto: Any, make_jobs: JobFactory, action_type: m.ActionTypeId
) -> None:
    await make_jobs(inputArtifacts=[SOURCE])
    await make_jobs(inputArtifacts=[SOURCE], credentialTtlS=0.5)
    # Both at once: the job without a TTL keeps the credentials minted when it was created,
    # the other gets credentials minted at dispatch, so later than those.
    plain, short = await poll(boto, action_type, 2)
    async with (
        job_s3(emulator.s3, plain["data"]["artifactCredentials"]) as plain_s3,
        job_s3(emulator.s3, short["data"]["artifactCredentials"]) as short_s3,
    ):
        short_key = location(short["data"]["inputArtifacts"][0])
        await wait_for(lambda: expired(short_s3, short_key), 10.0, "the short TTL to pass")
        plain_key = location(plain["data"]["inputArtifacts"][0])
        assert (await read(plain_s3, plain_key)).startswith(b"PK")


async def test_global_ttl_flag_and_fresh_credentials_at_dispatch(
    action_type: m.ActionTypeId,
) -> None:
    probe_type = m.ActionTypeId(
        category="Test", owner="Custom", provider=f"Probe{uuid.uuid4().hex[:12]}", version="1"
    )
    async with EmulatorProcess.start(["--credential-ttl-s", "1"]) as emulator:
        boto = boto_codepipeline(emulator.codepipeline)
        try:
            spec = {"inputArtifacts": [SOURCE]}
            await emulator.admin.create_jobs({"actionTypeId": m.to_builtins(action_type), **spec})
            await emulator.admin.create_jobs({"actionTypeId": m.to_builtins(probe_type), **spec})
            # The probe's credentials are minted when it is polled, after the first job's
            # were minted at its creation: once the probe's are refused, those have expired.
            [probe] = await poll(boto, probe_type)
            probe_key = location(probe["data"]["inputArtifacts"][0])
            async with job_s3(emulator.s3, probe["data"]["artifactCredentials"]) as s3:
                await wait_for(lambda: expired(s3, probe_key), 10.0, "the global TTL to pass")
                await assert_expired_token(s3, probe_key)
            [job] = await poll(boto, action_type)
            key = location(job["data"]["inputArtifacts"][0])
            async with job_s3(emulator.s3, job["data"]["artifactCredentials"]) as s3:
                assert (await read(s3, key)).startswith(b"PK")  # minted at dispatch
            renewed = await details_credentials(boto, probe["id"])
            async with job_s3(emulator.s3, renewed) as s3:
                assert (await read(s3, probe_key)).startswith(b"PK")
            assert await refused_count(emulator.admin) >= 2
        finally:
            boto.close()


def uploads_of(log: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [u for u in log["uploads"] if u["key"] == key]


async def test_uploads_are_recorded_with_their_sse_kms_headers(
    emulator: EmulatorProcess,
    admin: AdminClient,
    boto: Any,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    [job_id] = await make_jobs(outputArtifacts=["out"], encryptionKeyId=KMS_KEY)
    [job] = await poll(boto, action_type)
    out = location(job["data"]["outputArtifacts"][0])
    kms = {"ServerSideEncryption": "aws:kms"}
    async with job_s3(emulator.s3, job["data"]["artifactCredentials"]) as s3:
        await s3.put_object(Bucket=BUCKET, Key=out, Body=b"zip", **kms, SSEKMSKeyId=KMS_KEY)
        started = await s3.create_multipart_upload(
            Bucket=BUCKET, Key=f"{out}.mpu", **kms, SSEKMSKeyId=KMS_KEY
        )
        await s3.abort_multipart_upload(
            Bucket=BUCKET, Key=f"{out}.mpu", UploadId=started["UploadId"]
        )
        await s3.put_object(Bucket=BUCKET, Key=f"{out}.wrong", Body=b"x", **kms, SSEKMSKeyId="k2")
        await s3.put_object(Bucket=BUCKET, Key=f"{out}.plain", Body=b"x")
    log = await admin.s3_log()
    [put] = uploads_of(log, out)
    assert put == {
        "operation": "PutObject",
        "bucket": BUCKET,
        "key": out,
        "sse": "aws:kms",
        "kmsKeyId": KMS_KEY,
        "jobId": job_id,
        "expectedKmsKeyId": KMS_KEY,
        "kmsKeyOk": True,
    }
    [mpu] = uploads_of(log, f"{out}.mpu")
    assert (mpu["operation"], mpu["jobId"], mpu["kmsKeyOk"]) == (
        "CreateMultipartUpload",
        job_id,
        True,
    )
    [wrong] = uploads_of(log, f"{out}.wrong")
    assert (wrong["kmsKeyId"], wrong["kmsKeyOk"]) == ("k2", False)
    [plain] = uploads_of(log, f"{out}.plain")
    assert (plain["sse"], plain["kmsKeyId"], plain["kmsKeyOk"]) == (None, None, False)


async def test_a_job_without_a_key_expects_the_s3_managed_key(
    emulator: EmulatorProcess,
    admin: AdminClient,
    boto: Any,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    [job_id] = await make_jobs(outputArtifacts=["out"])
    [job] = await poll(boto, action_type)
    out = location(job["data"]["outputArtifacts"][0])
    async with job_s3(emulator.s3, job["data"]["artifactCredentials"]) as s3:
        await s3.put_object(
            Bucket=BUCKET,
            Key=out,
            Body=b"x",
            ServerSideEncryption="aws:kms",
            SSEKMSKeyId="alias/aws/s3",
        )
        await s3.put_object(
            Bucket=BUCKET, Key=f"{out}.aes", Body=b"x", ServerSideEncryption="AES256"
        )
    log = await admin.s3_log()
    [ok] = uploads_of(log, out)
    assert (ok["jobId"], ok["expectedKmsKeyId"], ok["kmsKeyOk"]) == (job_id, "alias/aws/s3", True)
    [aes] = uploads_of(log, f"{out}.aes")
    assert (aes["sse"], aes["kmsKeyOk"]) == ("AES256", False)


async def test_a_20_mib_multipart_upload_streams_through_and_gets_are_counted(
    emulator: EmulatorProcess,
    admin: AdminClient,
    boto: Any,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    await make_jobs(outputArtifacts=["out"])
    [job] = await poll(boto, action_type)
    out = location(job["data"]["outputArtifacts"][0])
    data = os.urandom(20 * MIB)
    async with job_s3(emulator.s3, job["data"]["artifactCredentials"]) as s3:
        upload = await s3.create_multipart_upload(Bucket=BUCKET, Key=out)
        parts = []
        for number, start in enumerate(range(0, len(data), 5 * MIB), start=1):
            answer = await s3.upload_part(
                Bucket=BUCKET,
                Key=out,
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=data[start : start + 5 * MIB],
            )
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        await s3.complete_multipart_upload(
            Bucket=BUCKET, Key=out, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
        assert hashlib.sha256(await read(s3, out)).digest() == hashlib.sha256(data).digest()
    log = await admin.s3_log()
    assert [u["operation"] for u in uploads_of(log, out)] == ["CreateMultipartUpload"]
    assert log["gets"][out] == 1


async def test_raw_objects_become_input_artifacts(
    emulator: EmulatorProcess,
    admin: AdminClient,
    boto: Any,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    key = f"raw/{uuid.uuid4().hex}/my source.tar"
    body = os.urandom(9 * MIB)  # over the 8 MiB the emulator spools in memory
    stored = await admin.put_object(key, body)
    assert stored == {
        "bucket": BUCKET,
        "key": key,
        "size": len(body),
        "etag": f'"{hashlib.md5(body).hexdigest()}"',  # noqa: S324 - S3's ETag
    }
    [job_id] = await make_jobs(inputArtifacts=[{"name": "src", "objectKey": key}])
    [job] = await poll(boto, action_type)
    assert job["id"] == job_id
    [artifact] = job["data"]["inputArtifacts"]
    assert (artifact["name"], location(artifact)) == ("src", key)
    async with job_s3(emulator.s3, job["data"]["artifactCredentials"]) as s3:
        assert await read(s3, key) == body
    log = await admin.s3_log()
    assert log["gets"][key] == 1
    [admin_put] = uploads_of(log, key)
    assert (admin_put["operation"], admin_put["jobId"]) == ("PutObject", None)


@pytest.mark.parametrize(
    ("artifact", "ttl", "message"),
    [
        ({"name": "src", "files": {"a": "b"}, "objectKey": "raw/x"}, None, "not both"),
        ({"name": "src", "objectKey": "raw/no-such-object"}, None, "PUT /_emulator/objects"),
        (SOURCE, 0.0, "credentialTtlS=0.0: must be more than 0"),
    ],
)
async def test_bad_create_jobs_bodies_are_400(
    make_jobs: JobFactory, artifact: dict[str, Any], ttl: float | None, message: str
) -> None:
    extra = {} if ttl is None else {"credentialTtlS": ttl}
    with pytest.raises(EmulatorError, match="answered 400") as caught:
        await make_jobs(inputArtifacts=[artifact], **extra)
    assert message in str(caught.value)


async def test_a_ttl_flag_of_zero_exits_2() -> None:
    result = await anyio.run_process(
        [sys.executable, "-m", "cpworker", "emulator", "--credential-ttl-s", "0"],
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert b"--credential-ttl-s must be more than 0" in result.stderr
