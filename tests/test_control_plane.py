"""cpworker's async client against the emulator: typed answers, errors, third-party jobs."""

from __future__ import annotations

import contextlib
import io
import socket
import zipfile
from typing import Any

import boto3
import msgspec
import pytest
from aiohttp import web
from botocore.exceptions import ClientError

from cpworker import models as m
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.emulator.client import AdminClient, EmulatorProcess
from cpworker.errors import (
    ActionTypeNotFoundError,
    CpWorkerError,
    InvalidClientTokenError,
    InvalidNonceError,
    JobNotFoundError,
    ServiceUnavailableError,
    TransportError,
    ValidationError,
)
from tests.conftest import JobFactory, aio_session, status_of

pytestmark = pytest.mark.both_paths


async def test_poll_answers_typed_jobs(
    cp: ControlPlane, make_jobs: JobFactory, action_type: m.ActionTypeId
) -> None:
    [job_id] = await make_jobs(
        1,
        configuration={"ProjectName": "typed"},
        inputArtifacts=[{"name": "src", "files": {"a.txt": "a"}}],
        outputArtifacts=["built"],
        encryptionKeyId="arn:aws:kms:us-east-1:123456789012:key/abc",
    )
    [job] = await cp.poll_for_jobs(action_type, 3)
    assert isinstance(job, m.Job)
    assert job.id == job_id
    assert job.account_id == "123456789012"
    data = job.data
    assert data.action_type_id == action_type
    assert data.action_configuration is not None
    assert data.action_configuration.configuration == {"ProjectName": "typed"}
    assert [a.name for a in data.input_artifacts] == ["src"]
    assert [a.name for a in data.output_artifacts] == ["built"]
    assert data.encryption_key == m.EncryptionKey(id="arn:aws:kms:us-east-1:123456789012:key/abc")
    creds = data.artifact_credentials
    assert creds is not None
    assert creds.secret_access_key not in repr(job)
    assert creds.session_token not in repr(job)


async def test_errors_keep_code_request_id_and_operation(
    cp: ControlPlane, make_jobs: JobFactory, action_type: m.ActionTypeId
) -> None:
    [job_id] = await make_jobs(1)
    assert len(await cp.poll_for_jobs(action_type, 1)) == 1
    with pytest.raises(InvalidNonceError) as info:
        await cp.acknowledge_job(job_id, "not-the-nonce")
    exc = info.value
    assert exc.code == "InvalidNonceException"
    assert exc.operation == "AcknowledgeJob"
    assert exc.status == 400
    assert exc.request_id and len(exc.request_id) == 36
    assert exc.request_id in str(exc)
    assert not exc.retryable
    with pytest.raises(JobNotFoundError):
        await cp.get_job_details("00000000-0000-4000-8000-000000000000")
    with pytest.raises(ValidationError, match="at 'jobId'"):
        await cp.get_job_details("not-a-job-id")
    with pytest.raises(ActionTypeNotFoundError):
        await cp.poll_for_jobs(
            m.ActionTypeId(category="Test", owner="Custom", provider="None0", version="9")
        )


async def test_action_types_create_list_delete(
    cp: ControlPlane, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    created = await cp.create_custom_action_type(
        m.CreateCustomActionTypeInput(
            category=action_type.category,
            provider=action_type.provider,
            version=action_type.version,
            configuration_properties=(
                m.ActionConfigurationProperty(
                    name="Project", required=True, key=True, secret=False, queryable=True
                ),
            ),
            input_artifact_details=m.ArtifactDetails(minimum_count=0, maximum_count=1),
            output_artifact_details=m.ArtifactDetails(minimum_count=0, maximum_count=1),
        )
    )
    assert created.id == action_type
    listed = await cp.list_action_types(owner="Custom")
    assert action_type in [t.id for t in listed]
    assert action_type not in [t.id for t in await cp.list_action_types(owner="ThirdParty")]
    assert await cp.poll_for_jobs(action_type, 1, {"Project": "x"}) == ()
    with pytest.raises(ValidationError, match="queryable"):
        await cp.poll_for_jobs(action_type, 1, {"Other": "x"})
    await cp.delete_custom_action_type(
        action_type.category, action_type.provider, action_type.version
    )
    with pytest.raises(ActionTypeNotFoundError):
        await cp.poll_for_jobs(action_type, 1)


async def test_third_party_flow(
    cp: ControlPlane, admin: AdminClient, third_party_action_type: m.ActionTypeId
) -> None:
    answer = await admin.create_jobs(
        {
            "actionTypeId": m.to_builtins(third_party_action_type),
            "thirdParty": True,
            "count": 2,
            "inputArtifacts": [{"name": "in", "files": {"x": "y"}}],
        }
    )
    tokens: dict[str, str] = answer["clientTokens"]
    polled = await cp.poll_for_third_party_jobs(third_party_action_type, 5)
    assert sorted(j.job_id or "" for j in polled) == sorted(answer["jobIds"])
    assert all(j.client_id for j in polled)
    first, second = answer["jobIds"]
    with pytest.raises(InvalidClientTokenError):
        await cp.get_third_party_job_details(first, tokens[second])
    with pytest.raises(JobNotFoundError):
        await cp.acknowledge_job(first, "1")  # not reachable through the custom-action flow
    details = await cp.get_third_party_job_details(first, tokens[first])
    assert details.id == first
    assert details.nonce is not None
    assert details.data.input_artifacts[0].name == "in"
    assert details.data.artifact_credentials is not None
    with pytest.raises(InvalidClientTokenError):
        await cp.acknowledge_third_party_job(first, details.nonce, "wrong-token")
    assert await cp.acknowledge_third_party_job(first, details.nonce, tokens[first]) == "InProgress"
    await cp.put_third_party_job_success_result(
        first, tokens[first], execution_details=m.ExecutionDetails(summary="done")
    )
    details2 = await cp.get_third_party_job_details(second, tokens[second])
    assert details2.nonce is not None
    await cp.acknowledge_third_party_job(second, details2.nonce, tokens[second])
    await cp.put_third_party_job_failure_result(
        second, tokens[second], m.FailureDetails(type="JobFailed", message="partner said no")
    )
    assert await status_of(admin, first) == "Succeeded"
    history = await admin.job(second)
    assert history["status"] == "Failed"
    assert "clientToken" not in history["results"][0]["payload"]


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_unreachable_endpoint_is_a_transport_error(job_calls: str, max_attempts: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ControlPlaneSettings(
        endpoint_url=f"http://127.0.0.1:{port}",
        max_attempts=max_attempts,
        lean_job_calls=job_calls == "lean",
    )
    async with ControlPlane.open(settings, aio_session()) as client:
        with pytest.raises(TransportError, match="PollForJobs: cannot reach CodePipeline"):
            await client.poll_for_jobs(
                m.ActionTypeId(category="Test", owner="Custom", provider="X", version="1")
            )


@pytest.mark.parametrize("field", ["max_attempts", "pool_size"])
def test_settings_refuse_nonsense(field: str) -> None:
    with pytest.raises(CpWorkerError, match=f"{field}=0: must be 1 or more"):
        msgspec.structs.replace(ControlPlaneSettings(), **{field: 0})


def _s3(emulator: EmulatorProcess, creds: m.ArtifactCredentials, token: str | None = None) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=emulator.s3,
        region_name="us-east-1",
        aws_access_key_id=creds.access_key_id,
        aws_secret_access_key=creds.secret_access_key,
        aws_session_token=token or creds.session_token,
    )


async def test_input_artifacts_are_real_zips_behind_job_credentials(
    cp: ControlPlane, make_jobs: JobFactory, action_type: m.ActionTypeId, emulator: EmulatorProcess
) -> None:
    files = {"src/main.py": "print('hi')", "README.md": "# demo"}
    [job_id] = await make_jobs(1, inputArtifacts=[{"name": "Source", "files": files}])
    [job] = await cp.poll_for_jobs(action_type, 1)
    assert job.nonce is not None
    await cp.acknowledge_job(job_id, job.nonce)
    details = await cp.get_job_details(job_id)
    creds = details.data.artifact_credentials
    location = details.data.input_artifacts[0].location
    assert creds is not None and location is not None and location.s3_location is not None
    where = {"Bucket": location.s3_location.bucket_name, "Key": location.s3_location.object_key}
    with contextlib.closing(_s3(emulator, creds)) as s3:
        body = s3.get_object(**where)["Body"].read()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert {n: archive.read(n).decode() for n in archive.namelist()} == files
    bad = _s3(emulator, creds, token="not-the-token")
    with contextlib.closing(bad), pytest.raises(ClientError) as info:
        bad.get_object(**where)
    assert info.value.response["Error"]["Code"] == "InvalidToken"


async def test_a_closed_client_says_so(emulator: EmulatorProcess) -> None:
    settings = ControlPlaneSettings(endpoint_url=emulator.codepipeline)
    async with ControlPlane.open(settings, aio_session()) as client:
        pass
    with pytest.raises(CpWorkerError, match="GetJobDetails: this ControlPlane is closed"):
        await client.get_job_details("00000000-0000-4000-8000-000000000000")


async def test_third_party_continuation_keeps_the_partners_client_token(
    cp: ControlPlane, admin: AdminClient, third_party_action_type: m.ActionTypeId
) -> None:
    spec = {
        "actionTypeId": m.to_builtins(third_party_action_type),
        "thirdParty": True,
        "continuationDelayS": 0,
    }
    answer = await admin.create_jobs(spec)
    [job_id] = answer["jobIds"]
    token = answer["clientTokens"][job_id]
    [polled] = await cp.poll_for_third_party_jobs(third_party_action_type, 1)
    details = await cp.get_third_party_job_details(job_id, token)
    assert details.nonce is not None
    await cp.acknowledge_third_party_job(job_id, details.nonce, token)
    await cp.put_third_party_job_success_result(job_id, token, continuation_token="later")
    next_id = (await admin.job(job_id))["nextJobId"]
    [again] = await cp.poll_for_third_party_jobs(third_party_action_type, 1)
    assert (again.job_id, again.client_id) == (next_id, polled.client_id)
    follow_up = await cp.get_third_party_job_details(next_id, token)
    assert follow_up.data.continuation_token == "later"


async def test_creating_an_existing_action_type_returns_it_unchanged(
    cp: ControlPlane, action_type: m.ActionTypeId
) -> None:
    def request(maximum: int) -> m.CreateCustomActionTypeInput:
        return m.CreateCustomActionTypeInput(
            category=action_type.category,
            provider=action_type.provider,
            version=action_type.version,
            input_artifact_details=m.ArtifactDetails(minimum_count=0, maximum_count=maximum),
            output_artifact_details=m.ArtifactDetails(minimum_count=0, maximum_count=maximum),
        )

    first = await cp.create_custom_action_type(request(1))
    second = await cp.create_custom_action_type(request(5))
    assert second == first
    assert second.input_artifact_details.maximum_count == 1


async def test_the_job_loop_calls_skip_botocores_pipeline_on_the_lean_path(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    job_calls: str,
) -> None:
    lean = job_calls == "lean"
    settings = ControlPlaneSettings(endpoint_url=emulator.codepipeline, lean_job_calls=lean)
    through_botocore: list[str] = []

    def seen(model: Any, **_: Any) -> None:
        through_botocore.append(model.name)

    [first, second] = await make_jobs(2)
    async with ControlPlane.open(settings, aio_session()) as client:
        client._client.meta.events.register("before-call.codepipeline", seen)
        jobs = await client.poll_for_jobs(action_type, 2)
        assert sorted(job.id for job in jobs) == sorted([first, second])
        for job in jobs:
            assert await client.acknowledge_job(job.id, job.nonce or "") == "InProgress"
        await client.get_job_details(first)
        await client.put_job_success_result(first)
        await client.put_job_failure_result(
            second, m.FailureDetails(type="JobFailed", message="no")
        )
    job_loop = ["PollForJobs", "AcknowledgeJob", "AcknowledgeJob"]
    job_loop += ["PutJobSuccessResult", "PutJobFailureResult"]
    if lean:
        assert through_botocore == ["GetJobDetails"]
    else:
        assert sorted(through_botocore) == sorted([*job_loop, "GetJobDetails"])
    assert await status_of(admin, first) == "Succeeded"
    assert await status_of(admin, second) == "Failed"


async def test_an_answer_that_is_not_json_is_an_error_with_its_status(job_calls: str) -> None:
    """A proxy's HTML 502 page: retried as a server error, then raised with code and status."""
    requests: list[str] = []

    async def bad_gateway(request: web.Request) -> web.Response:
        requests.append(request.headers.get("X-Amz-Target", ""))
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/", bad_gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        settings = ControlPlaneSettings(
            endpoint_url=f"http://127.0.0.1:{port}",
            max_attempts=2,
            lean_job_calls=job_calls == "lean",
        )
        async with ControlPlane.open(settings, aio_session()) as client:
            with pytest.raises(ServiceUnavailableError) as info:
                await client.acknowledge_job("00000000-0000-4000-8000-000000000000", "1")
    finally:
        await runner.cleanup()
    assert info.value.code == "502"
    assert info.value.status == 502
    assert info.value.operation == "AcknowledgeJob"
    assert info.value.retry_attempts == 1
    assert requests == ["CodePipeline_20150709.AcknowledgeJob"] * 2


async def test_the_emulator_counts_polls_that_found_no_job(
    cp_no_retry: ControlPlane,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    async def empty_polls() -> int:
        count: int = (await admin.stats())["emptyPolls"].get("PollForJobs", 0)
        return count

    [job_id] = await make_jobs(1)  # registers the action type
    before = await empty_polls()
    [job] = await cp_no_retry.poll_for_jobs(action_type, 5)
    assert job.id == job_id
    assert await empty_polls() == before
    assert await cp_no_retry.poll_for_jobs(action_type, 5) == ()
    assert await empty_polls() == before + 1
    assert await cp_no_retry.acknowledge_job(job.id, job.nonce or "") == "InProgress"
    await cp_no_retry.put_job_success_result(job.id)
