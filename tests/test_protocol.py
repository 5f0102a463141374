"""The emulator's job protocol over real HTTP, driven by boto3 and by cpworker's client.

Each test runs twice: once through a plain boto3 client, once through `ControlPlane`.
Both see the same state machine and the same error codes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError

from cpworker import models as m
from cpworker.control_plane import ControlPlane
from cpworker.emulator.client import AdminClient, EmulatorError
from cpworker.errors import ServiceError
from tests.conftest import JobFactory, status_of, wait_for

pytestmark = pytest.mark.both_paths


class Driver:
    """The job operations, as (id, nonce) tuples and plain dicts, for either client."""

    name = "base"

    async def poll(self, at: m.ActionTypeId, n: int, q: dict[str, str] | None = None) -> list[Any]:
        raise NotImplementedError

    async def ack(self, job_id: str, nonce: str) -> str | None:
        raise NotImplementedError

    async def details(self, job_id: str) -> dict[str, Any]:
        raise NotImplementedError

    async def success(self, job_id: str, **kw: Any) -> None:
        raise NotImplementedError

    async def failure(self, job_id: str, kind: str, message: str) -> None:
        raise NotImplementedError

    async def error_code(self, call: Callable[[], Awaitable[Any]]) -> str:
        """The AWS error code `call` fails with."""
        try:
            await call()
        except ServiceError as exc:
            return exc.code
        except ClientError as exc:
            return str(exc.response["Error"]["Code"])
        raise AssertionError("the call succeeded; an error was expected")


class BotoDriver(Driver):
    name = "boto3"

    def __init__(self, client: Any) -> None:
        self.c = client

    async def _run(self, fn: Callable[..., Any], **kw: Any) -> Any:
        return await anyio.to_thread.run_sync(lambda: fn(**kw))

    async def poll(self, at: m.ActionTypeId, n: int, q: dict[str, str] | None = None) -> list[Any]:
        kw: dict[str, Any] = {"actionTypeId": m.to_builtins(at), "maxBatchSize": n}
        if q:
            kw["queryParam"] = q
        answer = await self._run(self.c.poll_for_jobs, **kw)
        return [(j["id"], j["nonce"], j["data"]) for j in answer["jobs"]]

    async def ack(self, job_id: str, nonce: str) -> str | None:
        answer = await self._run(self.c.acknowledge_job, jobId=job_id, nonce=nonce)
        status: str = answer["status"]
        return status

    async def details(self, job_id: str) -> dict[str, Any]:
        answer = await self._run(self.c.get_job_details, jobId=job_id)
        data: dict[str, Any] = answer["jobDetails"]["data"]
        return data

    async def success(self, job_id: str, **kw: Any) -> None:
        wire = {"jobId": job_id}
        if "token" in kw:
            wire["continuationToken"] = kw["token"]
        if "variables" in kw:
            wire["outputVariables"] = kw["variables"]
        await self._run(self.c.put_job_success_result, **wire)

    async def failure(self, job_id: str, kind: str, message: str) -> None:
        details = {"type": kind, "message": message}
        await self._run(self.c.put_job_failure_result, jobId=job_id, failureDetails=details)


class AsyncDriver(Driver):
    name = "cpworker"

    def __init__(self, client: ControlPlane) -> None:
        self.c = client

    async def poll(self, at: m.ActionTypeId, n: int, q: dict[str, str] | None = None) -> list[Any]:
        jobs = await self.c.poll_for_jobs(at, n, q)
        return [(j.id, j.nonce, m.to_builtins(j.data)) for j in jobs]

    async def ack(self, job_id: str, nonce: str) -> str | None:
        return await self.c.acknowledge_job(job_id, nonce)

    async def details(self, job_id: str) -> dict[str, Any]:
        return m.to_builtins((await self.c.get_job_details(job_id)).data)

    async def success(self, job_id: str, **kw: Any) -> None:
        await self.c.put_job_success_result(
            job_id, continuation_token=kw.get("token"), output_variables=kw.get("variables")
        )

    async def failure(self, job_id: str, kind: str, message: str) -> None:
        await self.c.put_job_failure_result(job_id, m.FailureDetails(type=kind, message=message))


async def _started(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId
) -> tuple[str, str]:
    """One new job, polled and acknowledged: its id and nonce."""
    [job_id] = await make_jobs(1)
    [(polled, nonce, _)] = await drv.poll(action_type, 1)
    assert polled == job_id
    assert await drv.ack(job_id, nonce) == "InProgress"
    return job_id, nonce


@pytest.fixture(params=["boto3", "cpworker"])
def drv(request: pytest.FixtureRequest, boto: Any, cp_no_retry: ControlPlane) -> Driver:
    return BotoDriver(boto) if request.param == "boto3" else AsyncDriver(cp_no_retry)


async def test_full_cycle_success(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    [job_id] = await make_jobs(1, outputArtifacts=["out"])
    assert await status_of(admin, job_id) == "Queued"
    [(polled_id, nonce, data)] = await drv.poll(action_type, 5)
    assert polled_id == job_id
    assert data["outputArtifacts"][0]["name"] == "out"
    assert await status_of(admin, job_id) == "Dispatched"
    assert await drv.ack(job_id, nonce) == "InProgress"
    assert await status_of(admin, job_id) == "InProgress"
    await drv.success(job_id, variables={"Version": "1.2.3"})
    history = await admin.job(job_id)
    assert history["status"] == "Succeeded"
    assert [n["nonce"] for n in history["noncesIssued"]] == [nonce]
    [result] = history["results"]
    assert result["outcome"] == "accepted"
    assert result["payload"]["outputVariables"] == {"Version": "1.2.3"}


async def test_failure_result(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    job_id, _ = await _started(drv, make_jobs, action_type)
    await drv.failure(job_id, "ConfigurationError", "bad config")
    history = await admin.job(job_id)
    assert history["status"] == "Failed"
    assert history["results"][0]["payload"]["failureDetails"]["type"] == "ConfigurationError"


async def test_second_result_is_invalid_job_state(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    job_id, _ = await _started(drv, make_jobs, action_type)
    await drv.success(job_id)
    code = await drv.error_code(lambda: drv.failure(job_id, "JobFailed", "late"))
    assert code == "InvalidJobStateException"
    history = await admin.job(job_id)
    assert history["status"] == "Succeeded"
    assert [r["outcome"] for r in history["results"]] == ["accepted", "InvalidJobStateException"]


async def test_result_before_acknowledge_is_invalid_job_state(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    [job_id] = await make_jobs(1)
    await drv.poll(action_type, 1)
    assert await drv.error_code(lambda: drv.success(job_id)) == "InvalidJobStateException"
    assert await status_of(admin, job_id) == "Dispatched"


async def test_stale_nonce_and_unknown_job(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId
) -> None:
    [job_id] = await make_jobs(1)
    [(_, nonce, _)] = await drv.poll(action_type, 1)
    assert await drv.error_code(lambda: drv.ack(job_id, nonce + "0")) == "InvalidNonceException"
    unknown = "00000000-0000-4000-8000-000000000000"
    assert await drv.error_code(lambda: drv.ack(unknown, "1")) == "JobNotFoundException"
    assert await drv.error_code(lambda: drv.details(unknown)) == "JobNotFoundException"
    assert await drv.error_code(lambda: drv.success(unknown)) == "JobNotFoundException"


async def test_unregistered_action_type(drv: Driver, action_type: m.ActionTypeId) -> None:
    code = await drv.error_code(lambda: drv.poll(action_type, 1))
    assert code == "ActionTypeNotFoundException"


async def test_max_batch_size_and_queue_order(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId
) -> None:
    ids = await make_jobs(5)
    first = await drv.poll(action_type, 2)
    second = await drv.poll(action_type, 10)
    assert [j[0] for j in first] == ids[:2]
    assert [j[0] for j in second] == ids[2:]
    assert await drv.poll(action_type, 10) == []


async def test_query_param_matching(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId
) -> None:
    mine = await make_jobs(2, configuration={"ProjectName": "alpha"})
    theirs = await make_jobs(2, configuration={"ProjectName": "beta"})
    got = await drv.poll(action_type, 10, {"ProjectName": "alpha"})
    assert sorted(j[0] for j in got) == sorted(mine)
    got = await drv.poll(action_type, 10, {"ProjectName": "beta"})
    assert sorted(j[0] for j in got) == sorted(theirs)


async def test_dispatch_timeout_requeues_with_new_nonce(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    [job_id] = await make_jobs(1, dispatchTimeoutS=0.2)
    [(_, old_nonce, _)] = await drv.poll(action_type, 1)

    async def requeued() -> bool:
        return await status_of(admin, job_id) == "Queued"

    await wait_for(requeued, what="the unacknowledged job to go back to Queued")
    assert await drv.error_code(lambda: drv.ack(job_id, old_nonce)) == "InvalidNonceException"
    [(_, new_nonce, _)] = await drv.poll(action_type, 1)
    assert new_nonce != old_nonce
    assert await drv.ack(job_id, new_nonce) == "InProgress"


async def test_job_timeout(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    [job_id] = await make_jobs(1, jobTimeoutS=0.2)
    [(_, nonce, _)] = await drv.poll(action_type, 1)
    await drv.ack(job_id, nonce)

    async def timed_out() -> bool:
        return await status_of(admin, job_id) == "TimedOut"

    await wait_for(timed_out, what="the in-progress job to time out")
    assert await drv.error_code(lambda: drv.success(job_id)) == "InvalidJobStateException"


async def test_continuation_queues_a_new_job_with_the_token(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    [job_id] = await make_jobs(1, continuationDelayS=0.1)
    [(_, nonce, data)] = await drv.poll(action_type, 1)
    assert "continuationToken" not in data
    await drv.ack(job_id, nonce)
    await drv.success(job_id, token="step-2")
    first = await admin.job(job_id)
    assert first["status"] == "Succeeded"
    next_id = first["nextJobId"]
    assert next_id and next_id != job_id

    async def queued() -> bool:
        return await status_of(admin, next_id) == "Queued"

    await wait_for(queued, what="the continuation job to be queued")
    [(polled, nonce2, data2)] = await drv.poll(action_type, 1)
    assert polled == next_id
    assert data2["continuationToken"] == "step-2"
    assert (await admin.job(next_id))["previousJobId"] == job_id
    await drv.ack(next_id, nonce2)
    await drv.success(next_id, variables={"Done": "yes"})
    assert await status_of(admin, next_id) == "Succeeded"


async def test_output_variables_rules(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    job_id, _ = await _started(drv, make_jobs, action_type)
    too_big = {f"v{i}": "x" * 1000 for i in range(123)}
    code = await drv.error_code(lambda: drv.success(job_id, variables=too_big))
    assert code == "OutputVariablesSizeExceededException"
    code = await drv.error_code(lambda: drv.success(job_id, token="t", variables={"a": "b"}))
    assert code == "ValidationException"
    assert await status_of(admin, job_id) == "InProgress"  # rejected results change nothing
    await drv.success(job_id, variables={"a": "b"})
    assert await status_of(admin, job_id) == "Succeeded"


@pytest.mark.parametrize(
    ("field", "value", "constraint"),
    [
        ("provider", "p" * 36, "length less than or equal to 35"),
        ("category", "Cooking", "enum value set"),
        ("version", "1.0", "regular expression pattern"),
    ],
)
async def test_validation_errors_name_the_member(
    boto: Any, action_type: m.ActionTypeId, field: str, value: str, constraint: str
) -> None:
    bad = dict(m.to_builtins(action_type), **{field: value})
    with pytest.raises(ClientError) as info:
        boto.poll_for_jobs(actionTypeId=bad)
    error = info.value.response["Error"]
    assert error["Code"] == "ValidationException"
    assert f"at 'actionTypeId.{field}'" in error["Message"]
    assert constraint in error["Message"]


async def test_validation_of_result_payloads(boto: Any) -> None:
    job_id = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(ClientError) as info:
        boto.put_job_success_result(jobId=job_id, executionDetails={"percentComplete": 101})
    assert info.value.response["Error"]["Code"] == "ValidationException"
    assert "executionDetails.percentComplete" in info.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as info:
        boto.put_job_failure_result(
            jobId=job_id, failureDetails={"type": "Oops", "message": "m" * 5001}
        )
    message = info.value.response["Error"]["Message"]
    assert message.startswith("2 validation errors detected")
    with pytest.raises(ClientError) as info:
        boto.acknowledge_job(jobId="not-a-uuid", nonce="1")
    assert "at 'jobId'" in info.value.response["Error"]["Message"]


async def test_credentials_are_fresh_on_each_get_job_details(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId
) -> None:
    [job_id] = await make_jobs(1)
    [(_, nonce, data)] = await drv.poll(action_type, 1)
    await drv.ack(job_id, nonce)
    first = (await drv.details(job_id))["artifactCredentials"]
    second = (await drv.details(job_id))["artifactCredentials"]
    polled = data["artifactCredentials"]
    keys = {polled["accessKeyId"], first["accessKeyId"], second["accessKeyId"]}
    assert len(keys) == 3


async def test_a_finished_jobs_nonce_is_spent(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    job_id, nonce = await _started(drv, make_jobs, action_type)
    await drv.success(job_id)
    assert await drv.error_code(lambda: drv.ack(job_id, nonce)) == "InvalidNonceException"
    outcomes = [a["outcome"] for a in (await admin.job(job_id))["acknowledgements"]]
    assert outcomes == ["accepted", "InvalidNonceException"]


async def test_any_text_as_a_nonce_is_an_invalid_nonce_not_a_crash(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId
) -> None:
    [job_id] = await make_jobs(1)
    await drv.poll(action_type, 1)
    assert await drv.error_code(lambda: drv.ack(job_id, "nönce-✓")) == "InvalidNonceException"


async def test_admin_refuses_a_negative_job_timeout(
    admin: AdminClient, action_type: m.ActionTypeId
) -> None:
    with pytest.raises(EmulatorError, match="answered 400: bad CreateJobs body: job_timeout_s"):
        await admin.create_jobs({"actionTypeId": m.to_builtins(action_type), "jobTimeoutS": -1})
    assert await admin.jobs(provider=action_type.provider) == []


async def test_admin_lists_jobs_by_provider_and_status(
    drv: Driver, make_jobs: JobFactory, action_type: m.ActionTypeId, admin: AdminClient
) -> None:
    ids = await make_jobs(3)
    [(first, _, _)] = await drv.poll(action_type, 1)
    listed = await admin.jobs(provider=action_type.provider)
    assert {j["id"]: j["status"] for j in listed} == {
        ids[0]: "Dispatched",
        ids[1]: "Queued",
        ids[2]: "Queued",
    }
    queued = await admin.jobs(status="Queued", provider=action_type.provider)
    assert sorted(j["id"] for j in queued) == sorted(ids[1:])
    assert first == ids[0]
