"""The real AWS CLI (v1, as a subprocess) against the emulator: job API and S3 interop."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import anyio
import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from cpworker import models as m
from cpworker.control_plane import ControlPlane
from cpworker.emulator.client import AdminClient, EmulatorProcess
from tests.conftest import TEST_KEY_ID, TEST_SECRET, JobFactory

AWS = Path(sys.executable).with_name("aws")
CLI_TIMEOUT_S = 30.0


class Cli:
    """Runs `aws ...` with a clean environment: no profile, no config file, dummy keys."""

    def __init__(self, tmp_path: Path, endpoint: str) -> None:
        self.endpoint = endpoint
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update(
            AWS_ACCESS_KEY_ID=TEST_KEY_ID,
            AWS_SECRET_ACCESS_KEY=TEST_SECRET,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=str(tmp_path / "no-such-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-such-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
        )

    async def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        command = [str(AWS), *args, "--output", "json"]
        with anyio.fail_after(CLI_TIMEOUT_S):
            return await anyio.run_process(
                command, env={**self.env, **(env or {})}, check=False, stdin=subprocess.DEVNULL
            )

    async def codepipeline(self, operation: str, *args: str) -> dict[str, Any]:
        """One `aws codepipeline` call that must succeed; its decoded JSON output."""
        done = await self.run("codepipeline", operation, *args, "--endpoint-url", self.endpoint)
        assert done.returncode == 0, done.stderr.decode()
        out = done.stdout.decode().strip()
        answer: dict[str, Any] = json.loads(out) if out else {}
        return answer


@pytest.fixture
def cli(tmp_path: Path, emulator: EmulatorProcess) -> Cli:
    return Cli(tmp_path, emulator.codepipeline)


def _accepted_results(history: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in history["results"] if r["outcome"] == "accepted"]


async def test_full_job_cycle_with_the_aws_cli(
    cli: Cli,
    tmp_path: Path,
    admin: AdminClient,
    boto: Any,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    wanted = await make_jobs(2, configuration={"ProjectName": "wanted"})
    others = await make_jobs(2, configuration={"ProjectName": "other"})

    # The input shape of the AWS documentation's poll-for-jobs example.
    poll_input = {
        "actionTypeId": {
            "category": "Test",
            "owner": "Custom",
            "provider": action_type.provider,
            "version": "1",
        },
        "maxBatchSize": 5,
        "queryParam": {"ProjectName": "wanted"},
    }
    input_file = tmp_path / "poll.json"
    await anyio.Path(input_file).write_text(json.dumps(poll_input))
    polled = await cli.codepipeline("poll-for-jobs", "--cli-input-json", f"file://{input_file}")

    jobs = {job["id"]: job for job in polled["jobs"]}
    assert set(jobs) == set(wanted)
    for job in jobs.values():
        assert job["nonce"]
        assert job["accountId"]
        assert job["data"]["actionConfiguration"]["configuration"] == {"ProjectName": "wanted"}
        assert job["data"]["actionTypeId"] == poll_input["actionTypeId"]
    for job_id in others:
        assert (await admin.job(job_id))["status"] == "Queued"

    succeed, fail = wanted
    acks: dict[str, dict[str, Any]] = {}

    async def acknowledge(job_id: str) -> None:
        acks[job_id] = await cli.codepipeline(
            "acknowledge-job", "--job-id", job_id, "--nonce", jobs[job_id]["nonce"]
        )

    async with anyio.create_task_group() as tg:
        for job_id in wanted:
            tg.start_soon(acknowledge, job_id)
    assert acks == {succeed: {"status": "InProgress"}, fail: {"status": "InProgress"}}

    details = (await cli.codepipeline("get-job-details", "--job-id", succeed))["jobDetails"]
    assert details["id"] == succeed
    credentials = details["data"]["artifactCredentials"]
    assert credentials["accessKeyId"]
    assert credentials["secretAccessKey"]
    assert credentials["sessionToken"]

    execution_details = {
        "summary": "built by the AWS CLI",
        "externalExecutionId": "cli-run-1",
        "percentComplete": 100,
    }
    variables = {"IMAGE_TAG": "v1.2.3", "COMMIT": "abc123"}
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            cli.codepipeline,
            "put-job-success-result",
            "--job-id",
            succeed,
            "--execution-details",
            json.dumps(execution_details),
            "--output-variables",
            json.dumps(variables),
        )
        tg.start_soon(
            cli.codepipeline,
            "put-job-failure-result",
            "--job-id",
            fail,
            "--failure-details",
            json.dumps(
                {"type": "JobFailed", "message": "tests failed", "externalExecutionId": "x"}
            ),
        )

    # A second result is refused and does not change the outcome.
    with pytest.raises(boto.exceptions.InvalidJobStateException):
        boto.put_job_failure_result(
            jobId=succeed, failureDetails={"type": "JobFailed", "message": "late"}
        )

    history = await admin.job(succeed)
    assert history["status"] == "Succeeded"
    [result] = _accepted_results(history)
    assert result["operation"] == "PutJobSuccessResult"
    assert result["payload"]["executionDetails"] == execution_details
    assert result["payload"]["outputVariables"] == variables
    assert [r["outcome"] for r in history["results"]] == ["accepted", "InvalidJobStateException"]
    assert [a["outcome"] for a in history["acknowledgements"]] == ["accepted"]

    history = await admin.job(fail)
    assert history["status"] == "Failed"
    [result] = _accepted_results(history)
    assert result["operation"] == "PutJobFailureResult"
    assert result["payload"]["failureDetails"] == {
        "type": "JobFailed",
        "message": "tests failed",
        "externalExecutionId": "x",
    }
    assert len(history["results"]) == 1

    for job_id in others:
        history = await admin.job(job_id)
        assert history["status"] == "Queued"
        assert history["noncesIssued"] == []


async def test_acknowledge_with_a_wrong_nonce_fails_in_the_cli(
    cli: Cli,
    admin: AdminClient,
    cp: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    [job_id] = await make_jobs(1)
    [job] = await cp.poll_for_jobs(action_type, 1)
    assert job.id == job_id and job.nonce is not None

    done = await cli.run(
        "codepipeline",
        "acknowledge-job",
        "--job-id",
        job_id,
        "--nonce",
        f"{job.nonce}0",
        "--endpoint-url",
        cli.endpoint,
    )
    assert done.returncode != 0
    assert b"InvalidNonceException" in done.stderr
    assert done.stdout == b""

    history = await admin.job(job_id)
    assert history["status"] == "Dispatched"
    assert [a["outcome"] for a in history["acknowledgements"]] == ["InvalidNonceException"]
    # The refused attempt did not spend the job: the right nonce still claims it.
    assert await cp.acknowledge_job(job_id, job.nonce) == "InProgress"


async def test_aws_s3_cp_downloads_the_input_artifact_with_the_job_credentials(
    cli: Cli,
    tmp_path: Path,
    emulator: EmulatorProcess,
    cp: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    files = {"a/b.txt": "hello", "c.txt": "more"}
    [job_id] = await make_jobs(1, inputArtifacts=[{"name": "src", "files": files}])
    [job] = await cp.poll_for_jobs(action_type, 1)
    assert job.nonce is not None
    await cp.acknowledge_job(job.id, job.nonce)
    details = await cp.get_job_details(job_id)
    credentials = details.data.artifact_credentials
    assert credentials is not None
    [artifact] = details.data.input_artifacts
    assert artifact.name == "src"
    assert artifact.location is not None and artifact.location.s3_location is not None
    location = artifact.location.s3_location
    url = f"s3://{location.bucket_name}/{location.object_key}"
    job_env = {
        "AWS_ACCESS_KEY_ID": credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_access_key,
        "AWS_SESSION_TOKEN": credentials.session_token,
    }
    good, bad = tmp_path / "good.zip", tmp_path / "bad.zip"
    results: dict[Path, subprocess.CompletedProcess[bytes]] = {}

    async def copy(target: Path, env: dict[str, str]) -> None:
        results[target] = await cli.run(
            "s3", "cp", url, str(target), "--endpoint-url", emulator.s3, "--no-progress", env=env
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(copy, good, job_env)
        tg.start_soon(copy, bad, {**job_env, "AWS_SESSION_TOKEN": credentials.session_token + "x"})

    assert results[good].returncode == 0, results[good].stderr.decode()
    with zipfile.ZipFile(io.BytesIO(await anyio.Path(good).read_bytes())) as archive:
        assert sorted(archive.namelist()) == ["a/b.txt", "c.txt"]
        assert archive.read("a/b.txt") == b"hello"

    # S3 answers a wrong session token with 400 InvalidToken (HEAD answers carry no body,
    # so the CLI only shows the status).
    assert results[bad].returncode != 0
    assert b"An error occurred (400) when calling the HeadObject operation" in results[bad].stderr
    assert not await anyio.Path(bad).exists()
    s3 = boto3.client(
        "s3",
        endpoint_url=emulator.s3,
        region_name="us-east-1",
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        aws_session_token=credentials.session_token + "x",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )
    try:
        with pytest.raises(ClientError) as refused:
            s3.get_object(Bucket=location.bucket_name, Key=location.object_key)
        assert refused.value.response["Error"]["Code"] == "InvalidToken"
    finally:
        s3.close()
