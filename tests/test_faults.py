"""Fault injection of the emulator, seen from real clients over HTTP.

The emulator is shared by the whole session, so every test scopes its faults to the
operations it needs where it can, and the `faults` fixture puts everything it touched back
to "no faults" when the test ends, whatever happened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cpworker import errors
from cpworker import models as m
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.emulator.client import AdminClient, EmulatorError, EmulatorProcess
from tests.conftest import JobFactory, aio_session, status_of, wait_for

pytestmark = pytest.mark.both_paths


class FaultControl:
    """Changes the emulator's fault settings and remembers what to reset."""

    def __init__(self, admin: AdminClient) -> None:
        self._admin = admin
        self._operations: set[str] = set()

    async def set(
        self,
        *,
        operations: dict[str, dict[str, Any] | None] | None = None,
        global_: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if operations is not None:
            self._operations.update(operations)
            body["operations"] = operations
        if global_ is not None:
            body["global"] = global_
        if seed is not None:
            body["seed"] = seed
        return await self._admin.set_faults(body)

    def track(self, operation: str) -> None:
        """Reset `operation` at the end even if no `set` call named it."""
        self._operations.add(operation)

    async def reset(self) -> None:
        body: dict[str, Any] = {"global": {}}
        if self._operations:
            body["operations"] = dict.fromkeys(sorted(self._operations))
        answer = await self._admin.set_faults(body)
        assert answer["global"] == _NO_FAULTS
        assert not set(answer["operations"]) & self._operations


_NO_FAULTS = {
    "latency_s": 0.0,
    "jitter_s": 0.0,
    "throttle_rate": 0.0,
    "error_500_rate": 0.0,
    "error_503_rate": 0.0,
    "drop_rate": 0.0,
    "drop_response_rate": 0.0,
    "wrong_nonce_rate": 0.0,
}


@pytest.fixture
async def faults(admin: AdminClient) -> AsyncIterator[FaultControl]:
    control = FaultControl(admin)
    try:
        yield control
    finally:
        await control.reset()


class Stats:
    """A snapshot of `GET /_emulator/stats`, for counting what one test caused."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw

    @classmethod
    async def take(cls, admin: AdminClient) -> Stats:
        return cls(await admin.stats())

    def injected(self, operation: str, kind: str) -> int:
        n: int = self.raw["faultsInjected"].get(operation, {}).get(kind, 0)
        return n

    def requests(self, operation: str, outcome: str) -> int:
        n: int = self.raw["requests"].get(operation, {}).get(outcome, 0)
        return n

    def injected_since(self, before: Stats, operation: str, kind: str) -> int:
        return self.injected(operation, kind) - before.injected(operation, kind)

    def requests_since(self, before: Stats, operation: str, outcome: str) -> int:
        return self.requests(operation, outcome) - before.requests(operation, outcome)


def _status_changes(history: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["status"], e["reason"]) for e in history["events"] if e["event"] == "status"]


def _error_code(exc: ClientError) -> str:
    code: str = exc.response["Error"]["Code"]
    return code


def _http_status(exc: ClientError) -> int:
    status: int = exc.response["ResponseMetadata"]["HTTPStatusCode"]
    return status


async def test_throttling_surfaces_in_boto3_and_after_retries_in_control_plane(
    faults: FaultControl,
    admin: AdminClient,
    boto: Any,
    emulator: EmulatorProcess,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    job_calls: str,
) -> None:
    [job_id] = await make_jobs(1)
    answer = await faults.set(operations={"PollForJobs": {"throttle_rate": 1.0}})
    assert answer["operations"]["PollForJobs"]["throttle_rate"] == 1.0
    assert answer["global"] == _NO_FAULTS

    before = await Stats.take(admin)
    with pytest.raises(ClientError) as boto_error:
        boto.poll_for_jobs(actionTypeId=m.to_builtins(action_type), maxBatchSize=1)
    assert _error_code(boto_error.value) == "ThrottlingException"
    assert _http_status(boto_error.value) == 400
    after_boto = await Stats.take(admin)
    assert after_boto.injected_since(before, "PollForJobs", "throttle") == 1

    # A client of its own: botocore's retry quota is per client, so a shared one could
    # have spent it in earlier tests and retry less.
    settings = ControlPlaneSettings(
        endpoint_url=emulator.codepipeline, max_attempts=3, lean_job_calls=job_calls == "lean"
    )
    async with ControlPlane.open(settings, aio_session()) as cp:
        with pytest.raises(errors.ThrottledError) as cp_error:
            await cp.poll_for_jobs(action_type, 1)
    assert cp_error.value.code == "ThrottlingException"
    assert cp_error.value.operation == "PollForJobs"
    assert cp_error.value.retryable
    assert cp_error.value.request_id
    after_cp = await Stats.take(admin)
    # The control plane has 3 attempts: one call, three throttled requests.
    assert after_cp.injected_since(after_boto, "PollForJobs", "throttle") == 3
    assert after_cp.requests_since(before, "PollForJobs", "ThrottlingException") == 4

    # Throttled polls dispatched nothing: the job is still queued, and once the
    # throttling stops the job is there to be polled.
    assert await status_of(admin, job_id) == "Queued"
    await faults.set(operations={"PollForJobs": None})
    jobs = boto.poll_for_jobs(actionTypeId=m.to_builtins(action_type), maxBatchSize=1)["jobs"]
    assert [j["id"] for j in jobs] == [job_id]


@pytest.mark.parametrize(
    ("setting", "status", "code"),
    [("error_500_rate", 500, "InternalFailure"), ("error_503_rate", 503, "ServiceUnavailable")],
)
async def test_server_errors_keep_their_status(
    setting: str,
    status: int,
    code: str,
    faults: FaultControl,
    admin: AdminClient,
    boto: Any,
    cp_no_retry: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    [job_id] = await make_jobs(1)
    await faults.set(operations={"PollForJobs": {setting: 1.0}})
    kind = setting.removesuffix("_rate")
    before = await Stats.take(admin)

    with pytest.raises(errors.ServiceUnavailableError) as cp_error:
        await cp_no_retry.poll_for_jobs(action_type, 1)
    assert cp_error.value.status == status
    assert cp_error.value.code == code
    assert cp_error.value.retryable

    with pytest.raises(ClientError) as boto_error:
        boto.poll_for_jobs(actionTypeId=m.to_builtins(action_type), maxBatchSize=1)
    assert _http_status(boto_error.value) == status
    assert _error_code(boto_error.value) == code

    after = await Stats.take(admin)
    assert after.injected_since(before, "PollForJobs", kind) == 2
    assert after.requests_since(before, "PollForJobs", code) == 2
    assert await status_of(admin, job_id) == "Queued"


async def test_drop_breaks_the_connection_before_the_request_is_applied(
    faults: FaultControl,
    admin: AdminClient,
    cp_no_retry: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    [job_id] = await make_jobs(1)
    await faults.set(operations={"PollForJobs": {"drop_rate": 1.0}})
    before = await Stats.take(admin)

    with pytest.raises(errors.TransportError):
        await cp_no_retry.poll_for_jobs(action_type, 1)

    after = await Stats.take(admin)
    assert after.injected_since(before, "PollForJobs", "drop") == 1
    assert after.requests_since(before, "PollForJobs", "dropped") == 1
    assert after.requests("PollForJobs", "ok") == before.requests("PollForJobs", "ok")
    job = await admin.job(job_id)
    assert job["status"] == "Queued"
    assert job["noncesIssued"] == []


async def test_drop_response_applies_the_request_and_a_retry_is_idempotent(
    faults: FaultControl,
    admin: AdminClient,
    cp_no_retry: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    [job_id] = await make_jobs(1)
    [job] = await cp_no_retry.poll_for_jobs(action_type, 1)
    assert job.id == job_id and job.nonce is not None
    await faults.set(operations={"AcknowledgeJob": {"drop_response_rate": 1.0}})
    before = await Stats.take(admin)

    with pytest.raises(errors.TransportError):
        await cp_no_retry.acknowledge_job(job.id, job.nonce)

    after = await Stats.take(admin)
    assert after.injected_since(before, "AcknowledgeJob", "drop_response") == 1
    assert after.requests_since(before, "AcknowledgeJob", "dropped_response") == 1
    # Applied but unanswered: counted once, as dropped_response, not also as ok.
    assert after.requests("AcknowledgeJob", "ok") == before.requests("AcknowledgeJob", "ok")
    # The caller saw a broken connection, but the acknowledgement took effect.
    history = await admin.job(job_id)
    assert history["status"] == "InProgress"
    assert [a["outcome"] for a in history["acknowledgements"]] == ["accepted"]

    await faults.set(operations={"AcknowledgeJob": None})
    assert await cp_no_retry.acknowledge_job(job.id, job.nonce) == "InProgress"
    history = await admin.job(job_id)
    assert history["status"] == "InProgress"
    assert [a["outcome"] for a in history["acknowledgements"]] == ["accepted", "repeated"]
    assert len(history["noncesIssued"]) == 1

    await cp_no_retry.put_job_success_result(job.id)
    assert await status_of(admin, job_id) == "Succeeded"


async def test_wrong_nonce_fails_acknowledge_and_the_job_is_requeued(
    faults: FaultControl,
    admin: AdminClient,
    cp_no_retry: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    [job_id] = await make_jobs(1, dispatchTimeoutS=0.3)
    await faults.set(operations={"PollForJobs": {"wrong_nonce_rate": 1.0}})
    before = await Stats.take(admin)

    [job] = await cp_no_retry.poll_for_jobs(action_type, 1)
    assert job.id == job_id and job.nonce is not None
    with pytest.raises(errors.InvalidNonceError) as ack_error:
        await cp_no_retry.acknowledge_job(job.id, job.nonce)
    assert ack_error.value.code == "InvalidNonceException"

    after = await Stats.take(admin)
    assert after.injected_since(before, "PollForJobs", "wrong_nonce") == 1
    history = await admin.job(job_id)
    assert [a["outcome"] for a in history["acknowledgements"]] == ["InvalidNonceException"]
    assert job.nonce not in [n["nonce"] for n in history["noncesIssued"]]

    async def requeued() -> bool:
        return await status_of(admin, job_id) == "Queued"

    await wait_for(requeued, 5.0, "the dispatch timeout to put the job back in the queue")
    history = await admin.job(job_id)
    assert _status_changes(history) == [
        ("Created", "created"),
        ("Queued", "created"),
        ("Dispatched", "polled"),
        ("Queued", "dispatch timeout"),
    ]

    # Without the fault the job is dispatched again, with a nonce that works.
    await faults.set(operations={"PollForJobs": None})
    [again] = await cp_no_retry.poll_for_jobs(action_type, 1)
    assert again.id == job_id and again.nonce is not None
    assert again.nonce != job.nonce
    assert await cp_no_retry.acknowledge_job(again.id, again.nonce) == "InProgress"


async def test_latency_setting_is_reported_applied_and_calls_still_succeed(
    faults: FaultControl,
    emulator: EmulatorProcess,
    admin: AdminClient,
    cp_no_retry: ControlPlane,
    make_jobs: JobFactory,
) -> None:
    [job_id] = await make_jobs(1)
    answer = await faults.set(
        operations={"GetJobDetails": {"latency_s": 0.05, "jitter_s": 0.01}}, seed=7
    )
    expected = dict(_NO_FAULTS, latency_s=0.05, jitter_s=0.01)
    assert answer["operations"]["GetJobDetails"] == expected

    now = await emulator.admin.faults()
    assert now["operations"]["GetJobDetails"] == expected
    assert now["global"] == _NO_FAULTS  # scoped to the one operation

    before = await Stats.take(admin)
    details = await cp_no_retry.get_job_details(job_id)
    assert details.id == job_id
    assert details.data.artifact_credentials is not None
    after = await Stats.take(admin)
    # The emulator counts each call it delayed (wall-clock time is not asserted on).
    delayed = after.injected("GetJobDetails", "latency") - before.injected(
        "GetJobDetails", "latency"
    )
    assert delayed == 1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"operations": {"PollForJobs": {"throttle_rate": 1.5}}}, id="rate-above-1"),
        pytest.param({"operations": {"PollForJobs": {"drop_rate": -0.1}}}, id="negative-rate"),
        pytest.param({"operations": {"PollForJobs": {"latency_s": -1}}}, id="negative-latency"),
        pytest.param(
            {"operations": {"PollForJobs": {"throttle_rate": 0.6, "error_500_rate": 0.6}}},
            id="rates-sum-above-1",
        ),
        pytest.param({"operations": {"PollForJobs": {"throttle": 1.0}}}, id="unknown-field"),
        pytest.param({"global": {"throttle_rate": "often"}}, id="wrong-type"),
        pytest.param({"globals": {}}, id="unknown-top-level-key"),
    ],
)
async def test_invalid_fault_settings_are_refused(
    body: dict[str, Any], faults: FaultControl, admin: AdminClient, emulator: EmulatorProcess
) -> None:
    faults.track("PollForJobs")  # reset it even if a bad body were accepted
    before = await emulator.admin.faults()
    with pytest.raises(EmulatorError, match=r"answered 400: bad FaultsUpdate body"):
        await admin.set_faults(body)
    assert await emulator.admin.faults() == before


async def test_unknown_operation_in_fault_settings_is_refused(
    admin: AdminClient, emulator: EmulatorProcess
) -> None:
    before = await emulator.admin.faults()
    with pytest.raises(EmulatorError, match=r"unknown operations \['pollForJobs'\]; known: "):
        await admin.set_faults({"operations": {"pollForJobs": {"throttle_rate": 1.0}}})
    assert await emulator.admin.faults() == before


async def test_operation_settings_replace_the_global_ones(
    faults: FaultControl,
    admin: AdminClient,
    boto: Any,
    cp_no_retry: ControlPlane,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    [job_id] = await make_jobs(1)
    # Global throttling, but PollForJobs has its own (empty) settings, which win.
    await faults.set(global_={"throttle_rate": 1.0}, operations={"PollForJobs": {}})
    before = await Stats.take(admin)

    [job] = await cp_no_retry.poll_for_jobs(action_type, 1)
    assert job.id == job_id and job.nonce is not None
    with pytest.raises(ClientError) as ack_error:
        boto.acknowledge_job(jobId=job.id, nonce=job.nonce)
    assert _error_code(ack_error.value) == "ThrottlingException"

    # Dropping the operation's settings makes the global ones apply to it again.
    await faults.set(operations={"PollForJobs": None})
    with pytest.raises(errors.ThrottledError):
        await cp_no_retry.poll_for_jobs(action_type, 1)

    after = await Stats.take(admin)
    assert after.injected_since(before, "AcknowledgeJob", "throttle") == 1
    assert after.injected_since(before, "PollForJobs", "throttle") == 1
    assert after.requests_since(before, "PollForJobs", "ok") == 1

    await faults.set(global_={})
    assert await cp_no_retry.acknowledge_job(job.id, job.nonce) == "InProgress"


def _poll_outcomes(boto: Any, action_type: m.ActionTypeId, n: int) -> list[str]:
    outcomes = []
    for _ in range(n):
        try:
            boto.poll_for_jobs(actionTypeId=m.to_builtins(action_type), maxBatchSize=1)
        except ClientError as exc:
            outcomes.append(_error_code(exc))
        else:
            outcomes.append("ok")
    return outcomes


async def test_stats_count_faults_by_operation_and_kind_and_requests_by_outcome(
    faults: FaultControl,
    admin: AdminClient,
    boto: Any,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    await make_jobs(1)  # registers the action type, so an unfaulted poll answers ok
    rates = {"throttle_rate": 0.35, "error_500_rate": 0.15, "error_503_rate": 0.2}
    await faults.set(operations={"PollForJobs": rates}, seed=1234)
    before = await Stats.take(admin)

    outcomes = _poll_outcomes(boto, action_type, 40)

    after = await Stats.take(admin)
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    assert set(counts) == {"ok", "ThrottlingException", "InternalFailure", "ServiceUnavailable"}
    for kind, code in [
        ("throttle", "ThrottlingException"),
        ("error_500", "InternalFailure"),
        ("error_503", "ServiceUnavailable"),
    ]:
        injected = after.injected_since(before, "PollForJobs", kind)
        assert injected == counts[code], kind
        answered = after.requests_since(before, "PollForJobs", code)
        assert answered == counts[code], code
    ok = after.requests_since(before, "PollForJobs", "ok")
    assert ok == counts["ok"]
    # No other operation was charged with these faults.
    for op in ("AcknowledgeJob", "GetJobDetails"):
        for kind in ("throttle", "error_500", "error_503"):
            assert after.injected(op, kind) == before.injected(op, kind)

    # The same seed draws the same faults again.
    await faults.set(seed=1234)
    assert _poll_outcomes(boto, action_type, 40) == outcomes
