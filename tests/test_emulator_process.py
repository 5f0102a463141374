"""`cpworker emulator` as a process: its endpoint line, serving, signals, flags, raw HTTP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import boto3
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from cpworker.emulator.client import AdminClient, EmulatorProcess
from tests.conftest import TEST_KEY_ID, TEST_SECRET, boto_codepipeline, wait_for

EMULATOR = [sys.executable, "-m", "cpworker", "emulator"]
STARTUP_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 15.0
ACTION_TYPE = {"category": "Test", "owner": "Custom", "provider": "ProcessTest", "version": "1"}


@dataclass
class Started:
    process: Process
    endpoints: dict[str, str]
    rest_of_stdout: str  # what came after the first line, so far
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@asynccontextmanager
async def emulator_process(tmp_path: Path, *args: str) -> AsyncIterator[Started]:
    """`python -m cpworker emulator --port 0 --s3-port 0 ARGS`, killed on exit if still up."""
    stderr_path = tmp_path / "emulator.stderr"
    with stderr_path.open("wb") as stderr:
        process = await anyio.open_process(
            [*EMULATOR, "--port", "0", "--s3-port", "0", *args],
            stdin=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        assert process.stdout is not None
        text = ""
        with anyio.fail_after(STARTUP_TIMEOUT_S):
            async for chunk in TextReceiveStream(process.stdout):
                text += chunk
                if "\n" in text:
                    break
        first, _, rest = text.partition("\n")
        assert first, f"no endpoint line; stderr: {stderr_path.read_text()}"
        yield Started(process, json.loads(first), rest, stderr_path)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


async def _read_to_end(process: Process) -> str:
    assert process.stdout is not None
    return "".join([chunk async for chunk in TextReceiveStream(process.stdout)])


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


async def _check_dispatch_timeout(endpoints: dict[str, str], boto: Any) -> None:
    """A polled, never acknowledged job is back in the queue after the 0.3 s flag value."""
    async with aiohttp.ClientSession() as http:
        admin = AdminClient(endpoints["admin"], http)
        [job_id] = (await admin.create_jobs({"actionTypeId": ACTION_TYPE}))["jobIds"]
        [job] = boto.poll_for_jobs(actionTypeId=ACTION_TYPE, maxBatchSize=1)["jobs"]
        assert job["id"] == job_id

        async def requeued() -> bool:
            status: str = (await admin.job(job_id))["status"]
            return status == "Queued"

        # The default dispatch timeout is 30 s: only the flag gets the job back this soon.
        await wait_for(requeued, 5.0, "the job to return to Queued after --dispatch-timeout-s")
        history = await admin.job(job_id)
        changes = [(e["status"], e["reason"]) for e in history["events"] if e["event"] == "status"]
        assert changes[-2:] == [("Dispatched", "polled"), ("Queued", "dispatch timeout")]
        with pytest.raises(ClientError) as stale:
            boto.acknowledge_job(jobId=job_id, nonce=job["nonce"])
        assert stale.value.response["Error"]["Code"] == "InvalidNonceException"


def _check_s3_serves(endpoint: str) -> None:
    """moto's S3 answers signed requests, with authentication on: an unknown key is refused."""
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIDUNKNOWN",
        aws_secret_access_key="unknown",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )
    try:
        with pytest.raises(ClientError) as refused:
            s3.list_objects_v2(Bucket="codepipeline-us-east-1-emulator")
    finally:
        s3.close()
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert refused.value.response["Error"]["Code"] == "InvalidAccessKeyId"


def _check_endpoints(endpoints: dict[str, str]) -> None:
    assert set(endpoints) == {"codepipeline", "s3", "admin"}
    for name in ("codepipeline", "s3"):
        assert endpoints[name].startswith("http://127.0.0.1:")
        assert _port(endpoints[name]) > 0
    assert endpoints["admin"] == endpoints["codepipeline"] + "/_emulator/"
    assert _port(endpoints["s3"]) != _port(endpoints["codepipeline"])


async def _stop_with(started: Started, signum: signal.Signals) -> None:
    """Send `signum`: the emulator exits 0, printed nothing more, and its ports are closed."""
    started.process.send_signal(signum)
    with anyio.fail_after(EXIT_TIMEOUT_S):
        returncode = await started.process.wait()
        rest = started.rest_of_stdout + await _read_to_end(started.process)
    assert returncode == 0, started.stderr()
    assert rest == "", "the emulator printed more than its one endpoint line"
    for name in ("codepipeline", "s3"):
        with pytest.raises(OSError, match="All connection attempts failed") as refused:
            await anyio.connect_tcp("127.0.0.1", _port(started.endpoints[name]))
        assert isinstance(refused.value.__cause__, ConnectionRefusedError)


async def test_prints_its_endpoints_serves_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    async with emulator_process(tmp_path, "--dispatch-timeout-s", "0.3") as started:
        _check_endpoints(started.endpoints)
        boto = boto_codepipeline(started.endpoints["codepipeline"])
        try:
            unknown = dict(ACTION_TYPE, provider="NeverRegistered")
            with pytest.raises(boto.exceptions.ActionTypeNotFoundException):
                boto.poll_for_jobs(actionTypeId=unknown, maxBatchSize=1)
            await _check_dispatch_timeout(started.endpoints, boto)
        finally:
            boto.close()
        _check_s3_serves(started.endpoints["s3"])
        await _stop_with(started, signal.SIGTERM)


async def test_exits_0_on_sigint(tmp_path: Path) -> None:
    async with emulator_process(tmp_path) as started:
        _check_endpoints(started.endpoints)
        await _stop_with(started, signal.SIGINT)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--throttle-rate", "2"],
            "cpworker emulator: fault setting throttle_rate=2.0: must be between 0 and 1",
            id="rate-above-1",
        ),
        pytest.param(
            ["--drop-rate", "0.6", "--error-503-rate", "0.6"],
            "fault rates add up to 1.2; their sum must be at most 1",
            id="rates-sum-above-1",
        ),
        pytest.param(["--port", "eighty"], "argument --port: invalid int value", id="bad-int"),
    ],
)
async def test_invalid_flags_exit_2_with_a_message(args: list[str], message: str) -> None:
    with anyio.fail_after(STARTUP_TIMEOUT_S):
        done = await anyio.run_process([*EMULATOR, *args], check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert message in done.stderr.decode()
    assert done.stdout == b""  # no endpoint line: nothing was started


@pytest.mark.parametrize(("flag", "fix"), [("--port", "--port"), ("--s3-port", "--s3-port")])
async def test_a_busy_port_exits_1_with_the_fix(flag: str, fix: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with anyio.fail_after(STARTUP_TIMEOUT_S):
            done = await anyio.run_process(
                [*EMULATOR, flag, str(port)], check=False, stdin=subprocess.DEVNULL
            )
    assert done.returncode == 1
    stderr = done.stderr.decode()
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
    assert f"choose another {fix}, or 0 for a free one" in stderr
    assert "Traceback" not in stderr
    assert done.stdout == b""


# --- raw HTTP against the session's emulator ---------------------------------------


def _signed_headers(url: str, target: str, body: bytes) -> dict[str, str]:
    request = AWSRequest(
        method="POST",
        url=url,
        data=body,
        headers={"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.1"},
    )
    SigV4Auth(Credentials(TEST_KEY_ID, TEST_SECRET), "codepipeline", "us-east-1").add_auth(request)
    return dict(request.headers.items())


async def _raw_post(
    emulator: EmulatorProcess, target: str, body: bytes, *, signed: bool = True
) -> tuple[int, dict[str, Any], str | None]:
    url = emulator.codepipeline + "/"
    if signed:
        headers = _signed_headers(url, target, body)
    else:
        headers = {"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.1"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=body, headers=headers) as resp,
    ):
        answer: dict[str, Any] = json.loads(await resp.read())
        return resp.status, answer, resp.headers.get("x-amzn-ErrorType")


_POLL_BODY = json.dumps({"actionTypeId": ACTION_TYPE, "maxBatchSize": 1}).encode()


async def test_unsigned_request_is_refused(emulator: EmulatorProcess, admin: AdminClient) -> None:
    before = await admin.stats()
    status, answer, error_type = await _raw_post(
        emulator, "CodePipeline_20150709.PollForJobs", _POLL_BODY, signed=False
    )
    assert status == 403
    assert answer["__type"] == "MissingAuthenticationTokenException"
    assert "SigV4" in answer["message"]
    assert error_type == "MissingAuthenticationTokenException"
    after = await admin.stats()
    key = "MissingAuthenticationTokenException"
    old = before["requests"].get("PollForJobs", {}).get(key, 0)
    assert after["requests"]["PollForJobs"][key] == old + 1


async def test_signed_request_reaches_the_operation(emulator: EmulatorProcess) -> None:
    # The control case for the raw requests below: signed right, the operation answers.
    status, answer, _ = await _raw_post(emulator, "CodePipeline_20150709.PollForJobs", _POLL_BODY)
    assert (status, answer["__type"]) == (400, "ActionTypeNotFoundException")


@pytest.mark.parametrize(
    "target",
    [
        "CodePipeline_20150709.NoSuchOperation",
        "CodeBuild_20161006.PollForJobs",
        "PollForJobs",
        "",
    ],
)
async def test_unknown_target_is_an_unknown_operation(
    target: str, emulator: EmulatorProcess
) -> None:
    status, answer, error_type = await _raw_post(emulator, target, _POLL_BODY)
    assert status == 400
    assert answer["__type"] == "UnknownOperationException"
    assert error_type == "UnknownOperationException"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="malformed"),
        pytest.param(b'{"actionTypeId": ', id="truncated"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b'{"actionTypeId": "Test/Custom/x/1"}', id="wrong-member-type"),
    ],
)
async def test_bad_json_is_a_serialization_exception(
    body: bytes, emulator: EmulatorProcess
) -> None:
    status, answer, _ = await _raw_post(emulator, "CodePipeline_20150709.PollForJobs", body)
    assert status == 400
    assert answer["__type"] == "SerializationException"
