"""Artifacts through a real `Worker` against the emulator: credentials that expire in the
middle of a job, SSE-KMS on every upload, streams, formats, the disk budget, failures
reported with the right CodePipeline type, and no temp directory left behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from cpworker import models as m
from cpworker.context import JobContext
from cpworker.control_plane import ControlPlane
from cpworker.emulator.client import AdminClient, EmulatorProcess
from cpworker.outcomes import Outcome, Succeeded
from cpworker.transfers import MIB
from tests.conftest import JobFactory, action_table, plain_s3, run_burst, worker_config

KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0000aaaa-11bb-22cc-33dd-444444eeeeee"


def _config(
    emulator: EmulatorProcess,
    action_type: m.ActionTypeId,
    tmp_path: Path,
    table: dict[str, Any] | None = None,
    **settings: Any,
) -> Any:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    types = {"art": action_table(action_type, "echo", **(table or {}))}
    return worker_config(emulator, types, work_dir=str(work), **settings)


async def _run(config: Any, handler: Any) -> Any:
    worker = await run_burst(config, handlers={"art": handler})
    work = Path(config.work_dir)
    assert os.listdir(work) == []  # every job's temp directory is gone
    return worker


async def _accepted(admin: AdminClient, job_id: str) -> dict[str, Any]:
    history = await admin.job(job_id)
    [result] = [r for r in history["results"] if r["outcome"] == "accepted"]
    return {"status": history["status"], **result["payload"]}


async def _output(emulator: EmulatorProcess, cp: ControlPlane, job_id: str, name: str) -> bytes:
    """An output artifact's bytes, read with the job's fresh credentials."""
    details = await cp.get_job_details(job_id)
    [output] = [o for o in details.data.output_artifacts if o.name == name]
    assert output.location is not None and output.location.s3_location is not None
    assert details.data.artifact_credentials is not None
    location = output.location.s3_location
    async with plain_s3(emulator, details.data.artifact_credentials) as s3:
        answer = await s3.get_object(Bucket=location.bucket_name, Key=location.object_key)
        async with answer["Body"] as body:
            data: bytes = await body.read()
    return data


# --- credentials that expire mid-job --------------------------------------------------


@pytest.mark.parametrize("refresh", ["when refused", "on schedule"])
async def test_an_upload_outliving_three_credential_lifetimes_completes(
    emulator: EmulatorProcess,
    admin: AdminClient,
    cp: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
    refresh: str,
) -> None:
    ttl_s, step_s, parts = 1.0, 1.2, 4

    async def build(job: JobContext) -> Outcome:
        await job.inputs["Src"].path()
        async with job.outputs["Out"].writer() as out:
            for i in range(parts):
                await anyio.sleep(step_s)  # a long build step: the credentials expire meanwhile
                await out.write(bytes([i]) * (5 * MIB))
        return Succeeded("built")

    [job_id] = await make_jobs(
        inputArtifacts=[{"name": "Src", "files": {"a.txt": "a"}}],
        outputArtifacts=["Out"],
        credentialTtlS=ttl_s,
    )
    refused_before = (await admin.s3_log())["refused"].get("ExpiredToken", 0)
    # Renewal every 0.4 s keeps ahead of the 1 s lifetime; 600 s waits for S3 to refuse.
    refresh_s = 0.4 if refresh == "on schedule" else 600.0
    config = _config(
        emulator,
        action_type,
        tmp_path,
        artifact_credentials_refresh_s=refresh_s,
        transfer_part_size_mib=5,  # each write below is one part, sent as it is written
    )
    worker = await _run(config, build)

    assert (await _accepted(admin, job_id))["status"] == "Succeeded"
    assert await _output(emulator, cp, job_id, "Out") == b"".join(
        bytes([i]) * (5 * MIB) for i in range(parts)
    )
    refused = (await admin.s3_log())["refused"].get("ExpiredToken", 0) - refused_before
    renewals = worker.metrics.value(
        "cpworker_credential_renewals_total",
        reason="refused" if refresh == "when refused" else "scheduled",
    )
    assert renewals >= parts  # one new set of credentials per expired lifetime at least
    if refresh == "when refused":
        assert refused >= parts  # S3 really said ExpiredToken, and the job still succeeded
    else:
        assert refused == 0
    assert worker.metrics.value("cpworker_credential_renewal_failures_total") == 0


async def test_a_third_party_job_renews_through_get_third_party_job_details(
    emulator: EmulatorProcess,
    admin: AdminClient,
    third_party_action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    answer = await admin.create_jobs(
        {
            "actionTypeId": m.to_builtins(third_party_action_type),
            "thirdParty": True,
            "clientId": "client-1",
            "clientToken": "partner-token-1",
            "outputArtifacts": ["Out"],
            "credentialTtlS": 0.5,
        }
    )
    [job_id] = answer["jobIds"]
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"client-1": "partner-token-1"}))

    async def deploy(job: JobContext) -> Outcome:
        await anyio.sleep(0.7)  # the deployment outlasts the credentials
        async with job.outputs["Out"].writer() as out:
            await out.write(b"deployed")
        return Succeeded("deployed")

    async def details_calls() -> int:
        counts = (await admin.stats())["requests"].get("GetThirdPartyJobDetails", {})
        return sum(counts.values())

    refused_before = (await admin.s3_log())["refused"].get("ExpiredToken", 0)
    calls_before = await details_calls()
    table = {"client_tokens_file": str(tokens)}
    config = _config(emulator, third_party_action_type, tmp_path, table)
    worker = await _run(config, deploy)

    assert (await admin.job(job_id))["status"] == "Succeeded"
    assert (await admin.s3_log())["refused"].get("ExpiredToken", 0) > refused_before
    assert worker.metrics.value("cpworker_credential_renewals_total", reason="refused") >= 1
    # Once for the job's details before it was acknowledged, then for the renewal.
    assert await details_calls() >= calls_before + 2


# --- uploads: SSE-KMS, formats, streams -----------------------------------------------


@pytest.mark.parametrize("key", [KEY_ARN, None])
async def test_every_upload_carries_sse_kms_with_the_jobs_key(
    emulator: EmulatorProcess,
    admin: AdminClient,
    cp: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
    key: str | None,
) -> None:
    async def build(job: JobContext) -> Outcome:
        (job.outputs["Dir"].path / "f.txt").write_text("dir")
        async with job.outputs["Raw"].writer() as out:
            await out.write(b"raw bytes")
        return Succeeded("built")

    spec: dict[str, Any] = {"outputArtifacts": ["Dir", "Raw"]}
    if key is not None:
        spec["encryptionKeyId"] = key
    [job_id] = await make_jobs(**spec)
    worker = await _run(_config(emulator, action_type, tmp_path), build)

    assert (await _accepted(admin, job_id))["status"] == "Succeeded"
    uploads = [u for u in (await admin.s3_log())["uploads"] if u["jobId"] == job_id]
    assert len(uploads) == 2
    for upload in uploads:
        assert upload["sse"] == "aws:kms"
        assert upload["kmsKeyId"] == (key or "alias/aws/s3")
        assert upload["kmsKeyOk"] is True
    assert await _output(emulator, cp, job_id, "Raw") == b"raw bytes"
    assert worker.metrics.value("cpworker_artifact_bytes_total", direction="upload") > 9


async def test_jobs_stream_inputs_into_outputs_through_one_connection(
    emulator: EmulatorProcess,
    admin: AdminClient,
    cp: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    # Two jobs at once, each streaming its own 12 MiB input into an output, while the
    # process may move one part at a time over one connection: no job may starve the
    # other, and every request must be signed with its own job's credentials.
    bodies = {}
    for name in ("one", "two"):
        bodies[name] = os.urandom(12 * MIB + 3)
        await admin.put_object(f"tests/{action_type.provider}/{name}", bodies[name])

    async def copy(job: JobContext) -> Outcome:
        digest = hashlib.sha256()
        async with job.outputs["Copy"].writer() as out:
            async for chunk in job.inputs["Blob"].stream():
                digest.update(chunk)
                await out.write(chunk)
        return Succeeded(digest.hexdigest()[:16])

    ids = {}
    for name in ("one", "two"):
        [ids[name]] = await make_jobs(
            inputArtifacts=[{"name": "Blob", "objectKey": f"tests/{action_type.provider}/{name}"}],
            outputArtifacts=["Copy"],
        )
    config = _config(emulator, action_type, tmp_path, transfer_concurrency=1)
    worker = await _run(config, copy)

    uploads = (await admin.s3_log())["uploads"]
    for name, job_id in ids.items():
        result = await _accepted(admin, job_id)
        assert result["status"] == "Succeeded"
        assert (
            result["executionDetails"]["summary"] == hashlib.sha256(bodies[name]).hexdigest()[:16]
        )
        assert await _output(emulator, cp, job_id, "Copy") == bodies[name]
        [upload] = [u for u in uploads if u["jobId"] == job_id]  # signed as that job
        assert upload["operation"] == "CreateMultipartUpload"
    total = sum(len(b) for b in bodies.values())
    assert worker.metrics.value("cpworker_artifact_bytes_total", direction="download") == total
    assert worker.metrics.value("cpworker_artifact_bytes_total", direction="upload") == total


async def test_output_format_tar_is_configured_per_action_type(
    emulator: EmulatorProcess,
    admin: AdminClient,
    cp: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    async def build(job: JobContext) -> Outcome:
        source = await job.inputs["Src"].path()
        target = job.outputs["Out"].path
        (target / "bin").mkdir()
        (target / "bin" / "run.sh").write_text((source / "a.txt").read_text())
        (target / "bin" / "run.sh").chmod(0o755)
        return Succeeded("built")

    [job_id] = await make_jobs(
        inputArtifacts=[{"name": "Src", "files": {"a.txt": "#!/bin/sh\n"}}],
        outputArtifacts=["Out"],
    )
    config = _config(emulator, action_type, tmp_path, {"output_format": "tar"})
    await _run(config, build)

    assert (await _accepted(admin, job_id))["status"] == "Succeeded"
    data = await _output(emulator, cp, job_id, "Out")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        member = tar.getmember("bin/run.sh")
        assert member.mode & 0o777 == 0o755
        file = tar.extractfile(member)
        assert file is not None and file.read() == b"#!/bin/sh\n"


# --- failures -------------------------------------------------------------------------


async def test_a_missing_input_is_revision_unavailable(
    emulator: EmulatorProcess,
    admin: AdminClient,
    cp: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    key = f"tests/{action_type.provider}/soon-gone"
    await admin.put_object(key, b"PK\x05\x06" + b"\0" * 18)  # an empty zip
    [job_id] = await make_jobs(inputArtifacts=[{"name": "Src", "objectKey": key}])
    details = await cp.get_job_details(job_id)
    assert details.data.artifact_credentials is not None
    async with plain_s3(emulator, details.data.artifact_credentials) as s3:
        # A lifecycle rule removed the revision before the job ran.
        await s3.delete_object(Bucket="codepipeline-us-east-1-emulator", Key=key)

    async def build(job: JobContext) -> Outcome:
        await job.inputs["Src"].path()
        return Succeeded("unreachable")

    await _run(_config(emulator, action_type, tmp_path), build)
    result = await _accepted(admin, job_id)
    assert result["status"] == "Failed"
    assert result["failureDetails"]["type"] == "RevisionUnavailable"
    assert "'Src'" in result["failureDetails"]["message"]
    assert key in result["failureDetails"]["message"]


async def test_an_input_over_the_disk_budget_fails_before_downloading(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    key = f"tests/{action_type.provider}/big"
    await admin.put_object(key, os.urandom(2 * MIB))
    [job_id] = await make_jobs(inputArtifacts=[{"name": "Src", "objectKey": key}])

    async def build(job: JobContext) -> Outcome:
        await job.inputs["Src"].path()
        return Succeeded("unreachable")

    config = _config(emulator, action_type, tmp_path, disk_budget_mib=1)
    await _run(config, build)
    result = await _accepted(admin, job_id)
    assert result["status"] == "Failed"
    assert result["failureDetails"]["type"] == "JobFailed"
    assert "disk_budget_mib" in result["failureDetails"]["message"]
    assert (await admin.s3_log())["gets"].get(key, 0) == 0
