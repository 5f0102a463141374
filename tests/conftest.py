"""Shared fixtures: one emulator subprocess for the session, clients that talk to it.

Every test gets its own action type (a unique provider name), so tests sharing the
emulator never see each other's jobs.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import boto3
import pytest
from aiobotocore.session import AioSession
from anyio.abc import Process
from botocore.config import Config

from cpworker import models as m
from cpworker.config import WorkerConfig, parse_config
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.emulator.client import AdminClient, EmulatorProcess
from cpworker.worker import Worker

# The emulator accepts any SigV4 identity; tests sign as this one.
TEST_KEY_ID = "AKIDCPWORKERTESTS"
TEST_SECRET = "test-secret"  # not a secret: the emulator takes any key


@pytest.fixture(scope="session", autouse=True)
def private_temp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The system temp directory of this session, for workers and subprocesses alike.

    Workers without `work_dir` make their job directories there; when the session ends it
    must be empty: no test may leave a job's temp directory or a temp archive behind.
    """
    root = tmp_path_factory.mktemp("system-temp")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(root)
    try:
        yield root
    finally:
        if saved[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[0]
        tempfile.tempdir = saved[1]
    left = sorted(os.listdir(root))
    assert left == [], f"temp files left behind in {root}: {left[:20]}"


@pytest.fixture(scope="session")
async def emulator() -> AsyncIterator[EmulatorProcess]:
    async with EmulatorProcess.start(["--continuation-delay-s", "0.2"]) as process:
        yield process


@pytest.fixture(scope="session")
def admin(emulator: EmulatorProcess) -> AdminClient:
    return emulator.admin


@pytest.fixture
def action_type() -> m.ActionTypeId:
    """A fresh action type id (unique provider), not yet registered."""
    return m.ActionTypeId(
        category="Test", owner="Custom", provider=f"T{uuid.uuid4().hex[:20]}", version="1"
    )


@pytest.fixture
def third_party_action_type() -> m.ActionTypeId:
    return m.ActionTypeId(
        category="Deploy", owner="ThirdParty", provider=f"P{uuid.uuid4().hex[:20]}", version="1"
    )


def aio_session() -> AioSession:
    session = AioSession()
    session.set_credentials(TEST_KEY_ID, TEST_SECRET)
    return session


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_paths` run on the lean path and through botocore's pipeline."""
    if "job_calls" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_paths"
    ):
        metafunc.parametrize("job_calls", ["lean", "botocore"], indirect=True, scope="session")


@pytest.fixture(scope="session")
def job_calls(request: pytest.FixtureRequest) -> str:
    """Which path `cp` and `cp_no_retry` send the job loop's calls on (default: lean)."""
    path: str = getattr(request, "param", "lean")
    return path


@pytest.fixture(scope="session")
async def cp(emulator: EmulatorProcess, job_calls: str) -> AsyncIterator[ControlPlane]:
    """The project's async client, retrying like production (standard mode)."""
    async with _control_plane(emulator, 3, job_calls) as client:
        yield client


@pytest.fixture(scope="session")
async def cp_no_retry(emulator: EmulatorProcess, job_calls: str) -> AsyncIterator[ControlPlane]:
    """The project's async client with retries off: each call is one request."""
    async with _control_plane(emulator, 1, job_calls) as client:
        yield client


@asynccontextmanager
async def _control_plane(
    emulator: EmulatorProcess, max_attempts: int, job_calls: str
) -> AsyncIterator[ControlPlane]:
    lean = job_calls == "lean"
    settings = ControlPlaneSettings(
        endpoint_url=emulator.codepipeline, max_attempts=max_attempts, lean_job_calls=lean
    )
    async with ControlPlane.open(settings, aio_session()) as client:
        assert client.lean is lean
        yield client


def boto_codepipeline(endpoint: str) -> Any:
    """A plain boto3 CodePipeline client (retries off, so every error surfaces)."""
    return boto3.client(
        "codepipeline",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=TEST_KEY_ID,
        aws_secret_access_key=TEST_SECRET,
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )


@pytest.fixture(scope="session")
def boto(emulator: EmulatorProcess) -> Iterator[Any]:
    """A plain boto3 CodePipeline client (retries off, so every error surfaces)."""
    client = boto_codepipeline(emulator.codepipeline)
    yield client
    client.close()


@asynccontextmanager
async def plain_s3(
    emulator: EmulatorProcess, credentials: m.ArtifactCredentials
) -> AsyncIterator[Any]:
    """A plain aiobotocore S3 client signed with `credentials`: to look at what is stored."""
    async with aio_session().create_client(
        "s3",
        endpoint_url=emulator.s3,
        region_name="us-east-1",
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        aws_session_token=credentials.session_token,
    ) as client:
        yield client


JobFactory = Callable[..., Awaitable[list[str]]]


@pytest.fixture
def make_jobs(admin: AdminClient, action_type: m.ActionTypeId) -> JobFactory:
    """Create jobs of this test's action type through the admin API; returns their ids."""

    async def create(count: int = 1, **spec: Any) -> list[str]:
        body = {"actionTypeId": m.to_builtins(action_type), "count": count, **spec}
        answer = await admin.create_jobs(body)
        ids: list[str] = answer["jobIds"]
        return ids

    return create


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, what: str = "condition"
) -> None:
    """Wait until `check()` is true, polling it; fail the test after `timeout_s`."""
    try:
        with anyio.fail_after(timeout_s):
            while not await check():  # noqa: ASYNC110 - the state is in another process
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


async def exit_and_stderr(process: Process, timeout_s: float) -> tuple[int, str]:
    """Wait (at most `timeout_s`) for a subprocess to exit: its exit code and stderr."""
    assert process.stderr is not None
    chunks = []
    with anyio.fail_after(timeout_s):
        async for chunk in process.stderr:
            chunks.append(chunk)
        code = await process.wait()
    return code, b"".join(chunks).decode(errors="replace")


async def histories(admin: AdminClient, ids: list[str]) -> list[dict[str, Any]]:
    return [await admin.job(job_id) for job_id in ids]


def accepted(history: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in history["results"] if r["outcome"] == "accepted"]


async def status_of(admin: AdminClient, job_id: str) -> str:
    job = await admin.job(job_id)
    status: str = job["status"]
    return status


def worker_config(
    emulator: EmulatorProcess, action_types: dict[str, dict[str, Any]], **settings: Any
) -> WorkerConfig:
    """A `WorkerConfig` pointed at the test emulator, with fast idle backoff."""
    types = {
        name: {"idle_backoff_floor_s": 0.01, "idle_backoff_ceiling_s": 0.05, **table}
        for name, table in action_types.items()
    }
    raw = {
        "codepipeline_endpoint_url": emulator.codepipeline,
        "s3_endpoint_url": emulator.s3,
        "api_max_attempts": 3,
        "bind": "127.0.0.1:0",
        "action_types": types,
        **settings,
    }
    return parse_config(raw, {})


async def register(emulator: EmulatorProcess, action_type: m.ActionTypeId, *props: Any) -> None:
    """Register `action_type` with configuration properties (name, secret, queryable)."""
    settings = ControlPlaneSettings(endpoint_url=emulator.codepipeline)
    async with ControlPlane.open(settings, aio_session()) as cp:
        await cp.create_custom_action_type(
            m.CreateCustomActionTypeInput(
                category=action_type.category,
                provider=action_type.provider,
                version=action_type.version,
                configuration_properties=tuple(
                    m.ActionConfigurationProperty(
                        name=name, required=False, key=False, secret=secret, queryable=queryable
                    )
                    for name, secret, queryable in props
                ),
                input_artifact_details=m.ArtifactDetails(minimum_count=0, maximum_count=5),
                output_artifact_details=m.ArtifactDetails(minimum_count=0, maximum_count=5),
            )
        )


def action_table(action_type: m.ActionTypeId, handler: str, **keys: Any) -> dict[str, Any]:
    """One `[action_types.<name>]` table for `action_type`."""
    return {
        "category": action_type.category,
        "owner": action_type.owner,
        "provider": action_type.provider,
        "version": action_type.version,
        "handler": handler,
        **keys,
    }


@asynccontextmanager
async def running_worker(config: WorkerConfig, **options: Any) -> AsyncIterator[Worker]:
    """A `Worker` running in the background (ready on entry), stopped and drained on exit."""
    worker = Worker(config, session=aio_session(), **options)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        yield worker
        worker.stop()


async def run_burst(config: WorkerConfig, timeout_s: float = 60.0, **options: Any) -> Worker:
    """Run a worker in burst mode until every queue is empty and nothing runs."""
    worker = Worker(config, session=aio_session(), burst=True, **options)
    with anyio.fail_after(timeout_s):
        await worker.run()
    return worker
