"""The benchmarks' baseline workers (`benchmarks/baselines/`) as real subprocesses.

Each runs by path against the session's emulator with a clean environment (worker keys
only, no AWS config files): jobs are acknowledged once and reported once, artifacts come
back out as zips of the input's files with the job's KMS key, a handler error becomes a
failure result, and SIGTERM stops the worker, idle or busy, after the jobs in hand.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from cpworker import models as m
from cpworker.control_plane import ControlPlane
from cpworker.emulator.client import AdminClient, EmulatorProcess
from tests.conftest import JobFactory, exit_and_stderr, plain_s3, wait_for

BASELINES = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines"
# The emulator checks the form of the signature only; these keys are not secrets.
WORKER_IDENTITY = {"AWS_ACCESS_KEY_ID": "AKIDBENCH", "AWS_SECRET_ACCESS_KEY": "x"}
FILES = {"a.txt": "hello", "d/b.txt": "x"}
INPUT = {"name": "In", "files": FILES}
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
RUN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def baseline_env(tmp_path: Path) -> dict[str, str]:
    """No AWS_* or CPWORKER_* of ours, no config or credentials file: the worker keys only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CPWORKER_"))}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "no-such-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-such-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        **WORKER_IDENTITY,
    )
    return env


def baseline_command(
    baseline: str,
    emulator: EmulatorProcess,
    action_type: m.ActionTypeId,
    handler: str,
    *extra: str,
) -> list[str]:
    """`python benchmarks/baselines/<baseline>.py ...` for this test's action type."""
    return [
        sys.executable,
        str(BASELINES / f"{baseline}.py"),
        "--endpoint-url", emulator.codepipeline,
        "--s3-endpoint-url", emulator.s3,
        "--category", action_type.category,
        "--provider", action_type.provider,
        "--version", action_type.version,
        "--handler", handler,
        *extra,
    ]  # fmt: skip


async def run_baseline(command: list[str], env: dict[str, str]) -> None:
    """Run a baseline to its end (`--max-jobs`); it must exit 0."""
    with anyio.fail_after(RUN_TIMEOUT_S):
        done = await anyio.run_process(
            command, env=env, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
    assert done.returncode == 0, done.stderr.decode(errors="replace")


@asynccontextmanager
async def started(command: list[str], env: dict[str, str]) -> AsyncIterator[Process]:
    """A baseline running in the background; killed if the test leaves it running."""
    process = await anyio.open_process(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()


async def assert_reported_once(
    admin: AdminClient, ids: list[str], operation: str = "PutJobSuccessResult"
) -> list[dict[str, Any]]:
    """Each job acknowledged once and given one result, `operation`; their histories."""
    histories = [await admin.job(job_id) for job_id in ids]
    expected = "Succeeded" if "Success" in operation else "Failed"
    for job in histories:
        assert job["status"] == expected, job["events"]
        assert [a["outcome"] for a in job["acknowledgements"]] == ["accepted"]
        assert [(r["operation"], r["outcome"]) for r in job["results"]] == [(operation, "accepted")]
    return histories


async def output_files(emulator: EmulatorProcess, cp: ControlPlane, job_id: str) -> dict[str, str]:
    """The files of the job's output zip, read with the job's artifact credentials."""
    data = (await cp.get_job_details(job_id)).data
    assert data.artifact_credentials is not None
    [artifact] = data.output_artifacts
    assert artifact.location is not None and artifact.location.s3_location is not None
    location = artifact.location.s3_location
    async with plain_s3(emulator, data.artifact_credentials) as s3:
        answer = await s3.get_object(Bucket=location.bucket_name, Key=location.object_key)
        body = await answer["Body"].read()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        return {
            name: archive.read(name).decode()
            for name in archive.namelist()
            if not name.endswith("/")
        }


async def assert_outputs(
    emulator: EmulatorProcess, cp: ControlPlane, admin: AdminClient, ids: list[str]
) -> None:
    """Every job uploaded its output once, with its KMS key, holding the input's files."""
    for job_id in ids:
        assert await output_files(emulator, cp, job_id) == FILES
    uploads = [u for u in (await admin.s3_log())["uploads"] if u["jobId"] in ids]
    assert Counter(u["jobId"] for u in uploads) == Counter(ids)
    assert all(u["kmsKeyOk"] for u in uploads), uploads


async def register(cp: ControlPlane, action_type: m.ActionTypeId) -> None:
    """Register the action type without creating jobs, so that empty polls succeed."""
    no_artifacts = m.ArtifactDetails(minimum_count=0, maximum_count=0)
    request = m.CreateCustomActionTypeInput(
        category=action_type.category,
        provider=action_type.provider,
        version=action_type.version,
        input_artifact_details=no_artifacts,
        output_artifact_details=no_artifacts,
    )
    await cp.create_custom_action_type(request)


async def poll_count(admin: AdminClient) -> int:
    """PollForJobs requests the emulator has answered without error, all tests together."""
    requests: dict[str, dict[str, int]] = (await admin.stats())["requests"]
    return requests.get("PollForJobs", {}).get("ok", 0)


BASELINE_RUNS = [
    pytest.param("boto3_sequential", [], id="sequential"),
    pytest.param("boto3_threads", ["--threads", "4"], id="threads"),
]


@pytest.mark.parametrize(("baseline", "options"), BASELINE_RUNS)
async def test_noop_jobs_succeed(
    baseline: str,
    options: list[str],
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    ids = await make_jobs(3)
    command = baseline_command(baseline, emulator, action_type, "noop", *options, "--max-jobs", "3")
    await run_baseline(command, baseline_env(tmp_path))
    await assert_reported_once(admin, ids)


@pytest.mark.parametrize(
    ("baseline", "options", "key"),
    [
        pytest.param("boto3_sequential", [], None, id="sequential-default-key"),
        pytest.param("boto3_threads", ["--threads", "4"], KMS_KEY, id="threads-job-key"),
    ],
)
async def test_artifacts_are_unzipped_and_zipped_again(
    baseline: str,
    options: list[str],
    key: str | None,
    emulator: EmulatorProcess,
    admin: AdminClient,
    cp: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    extra = {} if key is None else {"encryptionKeyId": key}
    ids = await make_jobs(3, inputArtifacts=[INPUT], outputArtifacts=["Out"], **extra)
    handler_run = [*options, "--max-jobs", "3"]
    command = baseline_command(baseline, emulator, action_type, "artifacts", *handler_run)
    await run_baseline(command, baseline_env(tmp_path))
    await assert_reported_once(admin, ids)
    await assert_outputs(emulator, cp, admin, ids)


async def test_artifacts_with_aws_s3_cp(
    emulator: EmulatorProcess,
    admin: AdminClient,
    cp: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    ids = await make_jobs(
        3, inputArtifacts=[INPUT], outputArtifacts=["Out"], encryptionKeyId=KMS_KEY
    )
    command = baseline_command(
        "boto3_threads", emulator, action_type, "artifacts-cli", "--threads", "2", "--max-jobs", "3"
    )
    await run_baseline(command, baseline_env(tmp_path))
    await assert_reported_once(admin, ids)
    await assert_outputs(emulator, cp, admin, ids)


async def test_a_handler_error_is_reported_as_a_job_failure(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    stored = await admin.put_object(f"baselines/{action_type.provider}", b"not a zip")
    ids = await make_jobs(
        inputArtifacts=[{"name": "In", "objectKey": stored["key"]}], outputArtifacts=["Out"]
    )
    command = baseline_command("boto3_sequential", emulator, action_type, "artifacts")
    await run_baseline([*command, "--max-jobs", "1"], baseline_env(tmp_path))
    [job] = await assert_reported_once(admin, ids, "PutJobFailureResult")
    details = job["results"][0]["payload"]["failureDetails"]
    assert details == {"type": "JobFailed", "message": "File is not a zip file"}


@pytest.mark.parametrize(
    ("baseline", "options", "threads"),
    [
        pytest.param("boto3_sequential", [], 1, id="sequential"),
        pytest.param("boto3_threads", [], 32, id="threads"),
    ],
)
async def test_sigterm_stops_an_idle_worker_at_once(
    baseline: str,
    options: list[str],
    threads: int,
    emulator: EmulatorProcess,
    admin: AdminClient,
    cp: ControlPlane,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    await register(cp, action_type)
    # The idle sleep (60 s) is far longer than the time allowed to stop: it is cut short.
    command = baseline_command(baseline, emulator, action_type, "noop", "--empty-sleep-s", "60")
    before = await poll_count(admin)
    async with started([*command, *options], baseline_env(tmp_path)) as process:

        async def all_polled() -> bool:
            return await poll_count(admin) >= before + threads

        await wait_for(all_polled, 10.0, f"{threads} empty polls (every thread asleep)")
        process.send_signal(signal.SIGTERM)
        code, stderr = await exit_and_stderr(process, STOP_TIMEOUT_S)
    assert code == 0, stderr
    assert "stopped after 0 jobs" in stderr


@pytest.mark.parametrize(
    ("baseline", "options", "running"),
    [
        pytest.param("boto3_sequential", [], 1, id="sequential"),
        pytest.param("boto3_threads", ["--threads", "2"], 2, id="threads"),
    ],
)
async def test_sigterm_lets_the_jobs_in_hand_finish_and_polls_no_more(
    baseline: str,
    options: list[str],
    running: int,
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    ids = await make_jobs(running + 2)
    command = baseline_command(baseline, emulator, action_type, "sleep", "--sleep-s", "1.5")
    async with started([*command, *options], baseline_env(tmp_path)) as process:

        async def in_hand() -> bool:
            jobs = await admin.jobs(status="InProgress", provider=action_type.provider)
            return len(jobs) == running

        await wait_for(in_hand, 10.0, f"{running} jobs in progress")
        process.send_signal(signal.SIGTERM)
        code, stderr = await exit_and_stderr(process, STOP_TIMEOUT_S)
    assert code == 0, stderr
    found = Counter([(await admin.job(job_id))["status"] for job_id in ids])
    assert found == Counter({"Succeeded": running, "Queued": 2})
