"""cpworker.emulator.jobs.JobStore: the emulator's job state machine, driven by a fake clock.

Calls follow the emulator's API handlers: `get()` (which applies passed deadlines) before
`acknowledge()` or `put_result()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cpworker.emulator.jobs import (
    OUTPUT_VARIABLES_LIMIT_BYTES,
    ActionKey,
    ApiError,
    JobRecord,
    JobStore,
    Timeouts,
)

CUSTOM: ActionKey = ("Test", "Custom", "MyProvider", "1")
PARTNER: ActionKey = ("Deploy", "ThirdParty", "Partner", "1")
TIMEOUTS = Timeouts(dispatch_timeout_s=30.0, job_timeout_s=600.0, continuation_delay_s=5.0)
CREDENTIALS = {"accessKeyId": "AKID1", "secretAccessKey": "secret1", "sessionToken": "token1"}
SUCCESS = "PutJobSuccessResult"
FAILURE = "PutJobFailureResult"


class FakeClock:
    """Monotonic and wall time in one: tests move `now` by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def definition(key: ActionKey, queryable: bool) -> dict[str, Any]:
    prop = {"name": "Branch", "required": True, "key": True, "secret": False}
    ids = dict(zip(("category", "owner", "provider", "version"), key, strict=True))
    return {"id": ids, "actionConfigurationProperties": [{**prop, "queryable": queryable}]}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> JobStore:
    store = JobStore(clock, TIMEOUTS, wall_clock=clock)
    store.register_action_type(definition(CUSTOM, queryable=True))
    store.register_action_type(definition(PARTNER, queryable=False))
    return store


def new_job(store: JobStore, branch: str = "main", *, third_party: bool = False) -> JobRecord:
    config = {"ProjectName": "proj", "Branch": branch}
    job = store.create_job(
        PARTNER if third_party else CUSTOM,
        {"actionConfiguration": {"configuration": config}},
        third_party=third_party,
    )
    job.credentials = dict(CREDENTIALS)
    return job


def poll(store: JobStore, n: int = 10, query: dict[str, str] | None = None) -> list[JobRecord]:
    return store.poll(CUSTOM, n, query or {}, third_party=False)


def ack(store: JobStore, job: JobRecord, nonce: str) -> str:
    return store.acknowledge(store.get(job.id, third_party=False), nonce)


def put(store: JobStore, job: JobRecord, operation: str = SUCCESS, **payload: Any) -> None:
    store.put_result(store.get(job.id, third_party=False), operation, {"jobId": job.id, **payload})


def failure(kind: str = "JobFailed") -> dict[str, Any]:
    return {"failureDetails": {"type": kind, "message": "it broke"}}


def started(store: JobStore) -> JobRecord:
    """A job that has been polled and acknowledged."""
    job = new_job(store)
    assert poll(store) == [job]
    assert ack(store, job, "1") == "InProgress"
    return job


def code_of(call: Callable[[], object]) -> str:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value.code


# --- dispatch and acknowledge --------------------------------------------------------


def test_created_job_is_queued_without_a_nonce(store: JobStore) -> None:
    job = new_job(store)
    assert job.status == "Queued"
    assert job.nonce is None
    assert store.stats() == {"Queued": 1}
    assert [e["status"] for e in job.events] == ["Created", "Queued"]
    assert code_of(lambda: ack(store, job, "1")) == "InvalidNonceException"  # never dispatched
    assert job.status == "Queued"


def test_poll_dispatches_with_a_fresh_nonce_each_time(store: JobStore, clock: FakeClock) -> None:
    job = new_job(store)
    assert poll(store) == [job]
    assert (job.status, job.nonce) == ("Dispatched", "1")
    assert poll(store) == []  # a dispatched job is not handed out twice
    clock.now += 29.9
    assert store.get(job.id, third_party=False).status == "Dispatched"
    clock.now += 0.1
    assert poll(store) == [job]
    assert (job.status, job.nonce) == ("Dispatched", "2")
    assert [e["nonce"] for e in job.history()["noncesIssued"]] == ["1", "2"]


def test_dispatch_timeout_requeues_and_the_old_nonce_stops_working(
    store: JobStore, clock: FakeClock
) -> None:
    job = new_job(store)
    poll(store)
    clock.now += TIMEOUTS.dispatch_timeout_s
    assert store.get(job.id, third_party=False).status == "Queued"
    assert job.nonce is None
    assert code_of(lambda: ack(store, job, "1")) == "InvalidNonceException"
    assert poll(store) == [job]
    assert code_of(lambda: ack(store, job, "1")) == "InvalidNonceException"
    assert ack(store, job, "2") == "InProgress"
    outcomes = [(a["nonce"], a["outcome"]) for a in job.history()["acknowledgements"]]
    assert outcomes == [
        ("1", "InvalidNonceException"),
        ("1", "InvalidNonceException"),
        ("2", "accepted"),
    ]


def test_acknowledge_is_idempotent_for_the_same_nonce(store: JobStore, clock: FakeClock) -> None:
    job = started(store)
    clock.now += 1
    assert ack(store, job, "1") == "InProgress"
    assert code_of(lambda: ack(store, job, "2")) == "InvalidNonceException"
    assert job.status == "InProgress"
    acks = job.history()["acknowledgements"]
    assert [(a["outcome"], a["status"]) for a in acks] == [
        ("accepted", "Dispatched"),
        ("repeated", "InProgress"),
        ("InvalidNonceException", "InProgress"),
    ]
    assert acks[1]["time"] == clock.now
    clock.now += TIMEOUTS.dispatch_timeout_s  # the dispatch deadline died with the ack
    assert store.get(job.id, third_party=False).status == "InProgress"
    assert poll(store) == []


def test_job_timeout_then_a_result_is_an_invalid_state(store: JobStore, clock: FakeClock) -> None:
    job = started(store)
    clock.now += TIMEOUTS.job_timeout_s - 0.001
    assert store.get(job.id, third_party=False).status == "InProgress"
    clock.now += 0.001
    assert store.get(job.id, third_party=False).status == "TimedOut"
    assert code_of(lambda: put(store, job)) == "InvalidJobStateException"
    assert job.status == "TimedOut"
    assert job.history()["results"][0]["outcome"] == "InvalidJobStateException"
    assert store.stats() == {"TimedOut": 1}


def test_deadlines_apply_even_without_a_prior_get(store: JobStore, clock: FakeClock) -> None:
    """`acknowledge` and `put_result` are entry points too: a passed deadline counts."""
    dispatched = new_job(store)
    poll(store)
    clock.now += TIMEOUTS.dispatch_timeout_s
    assert code_of(lambda: store.acknowledge(dispatched, "1")) == "InvalidNonceException"
    assert dispatched.status == "Queued"
    assert poll(store) == [dispatched]
    assert store.acknowledge(dispatched, "2") == "InProgress"
    clock.now += TIMEOUTS.job_timeout_s
    payload = {"jobId": dispatched.id}
    assert code_of(lambda: store.put_result(dispatched, SUCCESS, payload)) == (
        "InvalidJobStateException"
    )
    assert dispatched.status == "TimedOut"


# --- results -------------------------------------------------------------------------


@pytest.mark.parametrize("before", ["Queued", "Dispatched"])
@pytest.mark.parametrize("operation", [SUCCESS, FAILURE])
def test_a_result_before_acknowledge_is_an_invalid_state(
    store: JobStore, before: str, operation: str
) -> None:
    job = new_job(store)
    if before == "Dispatched":
        poll(store)
    payload = failure() if operation == FAILURE else {}
    assert code_of(lambda: put(store, job, operation, **payload)) == "InvalidJobStateException"
    assert job.status == before


@pytest.mark.parametrize(
    ("operation", "payload", "status"),
    [
        (SUCCESS, {}, "Succeeded"),
        (SUCCESS, {"executionDetails": {"summary": "ok", "percentComplete": 100}}, "Succeeded"),
        (SUCCESS, {"outputVariables": {"commit": "abc"}}, "Succeeded"),
        (FAILURE, failure(), "Failed"),
        (FAILURE, failure("ConfigurationError"), "Failed"),
    ],
)
@pytest.mark.parametrize("second", [SUCCESS, FAILURE])
def test_a_result_finishes_the_job_and_a_second_result_is_refused(
    store: JobStore,
    clock: FakeClock,
    operation: str,
    payload: dict[str, Any],
    status: str,
    second: str,
) -> None:
    job = started(store)
    put(store, job, operation, **payload)
    assert job.status == status
    assert job.next_job_id is None
    assert code_of(lambda: put(store, job, second)) == "InvalidJobStateException"
    clock.now += TIMEOUTS.job_timeout_s  # the job deadline is void once finished
    assert store.get(job.id, third_party=False).status == status
    assert [r["outcome"] for r in job.history()["results"]] == [
        "accepted",
        "InvalidJobStateException",
    ]
    assert store.stats() == {status: 1}


def test_success_with_a_continuation_token_creates_a_follow_up_job(
    store: JobStore, clock: FakeClock
) -> None:
    job = started(store)
    put(store, job, continuationToken="check-again")
    assert job.status == "Succeeded"
    assert job.next_job_id is not None
    follow_up = store.get(job.next_job_id, third_party=False)
    assert follow_up.id != job.id
    assert follow_up.previous_job_id == job.id
    assert follow_up.status == "Created"
    assert follow_up.data["continuationToken"] == "check-again"
    assert follow_up.configuration == job.configuration
    assert follow_up.credentials == CREDENTIALS
    assert store.stats() == {"Succeeded": 1, "Created": 1}
    assert poll(store) == []
    clock.now += TIMEOUTS.continuation_delay_s - 0.001
    assert poll(store) == []
    clock.now += 0.001
    assert store.get(follow_up.id, third_party=False).status == "Queued"
    assert poll(store) == [follow_up]
    assert (follow_up.status, follow_up.nonce) == ("Dispatched", "1")
    history = follow_up.history()
    assert history["continuationToken"] == "check-again"
    assert history["previousJobId"] == job.id
    assert job.history()["nextJobId"] == follow_up.id
    assert "continuationToken" not in job.data
    assert ack(store, follow_up, "1") == "InProgress"
    put(store, follow_up)
    assert follow_up.next_job_id is None
    assert store.stats() == {"Succeeded": 2}


def test_output_variables_with_a_continuation_token_are_refused(store: JobStore) -> None:
    job = started(store)
    code = code_of(lambda: put(store, job, continuationToken="t", outputVariables={"a": "b"}))
    assert code == "ValidationException"
    assert job.status == "InProgress"
    assert job.next_job_id is None
    put(store, job, outputVariables={"a": "b"})  # the job still takes a valid result
    assert job.status == "Succeeded"


@pytest.mark.parametrize(
    ("variables", "accepted"),
    [
        ({"k": "v" * (OUTPUT_VARIABLES_LIMIT_BYTES - 1)}, True),
        ({"k": "v" * OUTPUT_VARIABLES_LIMIT_BYTES}, False),
        ({f"v{i:03d}": "x" * 956 for i in range(128)}, True),  # 128 * 960 = 122,880
        ({f"v{i:03d}": "x" * 957 for i in range(128)}, False),
        ({"k": "é" * 61_440}, False),  # 61,440 characters but 122,881 bytes
    ],
)
def test_output_variables_size_limit(
    store: JobStore, variables: dict[str, str], accepted: bool
) -> None:
    assert OUTPUT_VARIABLES_LIMIT_BYTES == 122_880
    job = started(store)
    if accepted:
        put(store, job, outputVariables=variables)
        assert job.status == "Succeeded"
    else:
        code = code_of(lambda: put(store, job, outputVariables=variables))
        assert code == "OutputVariablesSizeExceededException"
        assert job.status == "InProgress"


# --- polling -------------------------------------------------------------------------


def test_max_batch_size_is_honoured_in_creation_order(store: JobStore) -> None:
    jobs = [new_job(store) for _ in range(5)]
    assert poll(store, 2) == jobs[:2]
    assert poll(store, 1) == jobs[2:3]
    assert poll(store, 10) == jobs[3:]
    assert poll(store, 10) == []
    assert store.stats() == {"Dispatched": 5}


def test_query_param_returns_only_matching_jobs(store: JobStore) -> None:
    main1, dev, main2 = new_job(store, "main"), new_job(store, "dev"), new_job(store, "main")
    assert poll(store, 10, {"Branch": "main"}) == [main1, main2]
    assert poll(store, 10, {"Branch": "release"}) == []
    assert dev.status == "Queued"
    assert poll(store, 10, {"Branch": "dev"}) == [dev]


def test_query_param_key_must_be_the_queryable_property(store: JobStore) -> None:
    job = new_job(store)
    assert code_of(lambda: poll(store, 10, {"ProjectName": "proj"})) == "ValidationException"
    assert job.status == "Queued"


def test_unregistered_action_type_is_not_found(store: JobStore) -> None:
    unknown: ActionKey = ("Test", "Custom", "Nobody", "1")
    assert code_of(lambda: store.poll(unknown, 1, {}, False)) == "ActionTypeNotFoundException"
    new_job(store)
    store.delete_action_type(CUSTOM)
    assert code_of(lambda: poll(store)) == "ActionTypeNotFoundException"


def test_unknown_job_id_is_not_found(store: JobStore) -> None:
    missing = "0123abcd-0123-4567-89ab-0123456789ab"
    assert code_of(lambda: store.get(missing, third_party=False)) == "JobNotFoundException"
    assert code_of(lambda: store.get(missing, True, "token")) == "JobNotFoundException"


# --- third-party jobs ----------------------------------------------------------------


def test_third_party_and_custom_jobs_are_separate_flows(store: JobStore) -> None:
    partner_job = new_job(store, third_party=True)
    custom_job = new_job(store)
    token = partner_job.client_token
    assert token is not None
    assert partner_job.client_id is not None
    assert custom_job.client_token is None
    assert store.poll(PARTNER, 10, {}, third_party=False) == []
    assert store.poll(CUSTOM, 10, {}, third_party=True) == []
    assert code_of(lambda: store.get(partner_job.id, third_party=False)) == "JobNotFoundException"
    assert code_of(lambda: store.get(custom_job.id, True, "any")) == "JobNotFoundException"
    assert store.poll(PARTNER, 10, {}, third_party=True) == [partner_job]


@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_wrong_client_token_is_refused(store: JobStore, token: str | None) -> None:
    job = new_job(store, third_party=True)
    assert code_of(lambda: store.get(job.id, True, token)) == "InvalidClientTokenException"


def test_third_party_flow_keeps_the_client_token_out_of_the_log(store: JobStore) -> None:
    job = new_job(store, third_party=True)
    token = job.client_token
    assert store.poll(PARTNER, 1, {}, third_party=True) == [job]
    assert store.acknowledge(store.get(job.id, True, token), "1") == "InProgress"
    payload = {"jobId": job.id, "clientToken": token, "executionDetails": {"summary": "done"}}
    store.put_result(store.get(job.id, True, token), "PutThirdPartyJobSuccessResult", payload)
    assert job.status == "Succeeded"
    (result,) = job.history()["results"]
    assert result["payload"] == {"jobId": job.id, "executionDetails": {"summary": "done"}}
    assert payload["clientToken"] == token  # the caller's payload is left alone
    assert token is not None
    assert token not in repr(job.history())


# --- stats and history ---------------------------------------------------------------


def test_stats_count_jobs_by_status(store: JobStore, clock: FakeClock) -> None:
    assert store.stats() == {}
    succeeded, failed, timed_out = started(store), started(store), started(store)
    put(store, succeeded)
    put(store, failed, FAILURE, **failure())
    dispatched = new_job(store)
    poll(store)
    queued = new_job(store)
    clock.now += TIMEOUTS.job_timeout_s
    store.advance()
    assert store.stats() == {"Succeeded": 1, "Failed": 1, "TimedOut": 1, "Queued": 2}
    assert dispatched.status == queued.status == "Queued"
    assert timed_out.status == "TimedOut"


def test_history_records_nonces_acknowledgements_and_results(
    store: JobStore, clock: FakeClock
) -> None:
    job = new_job(store, "dev")
    poll(store)
    clock.now += 2
    ack(store, job, "1")
    clock.now += 3
    payload: dict[str, Any] = {"outputVariables": {"a": "b"}, "executionDetails": {"summary": "s"}}
    put(store, job, **payload)
    history = job.history()
    assert history["id"] == job.id
    assert history["status"] == "Succeeded"
    assert history["thirdParty"] is False
    assert tuple(history["actionTypeId"].values()) == CUSTOM
    assert history["configuration"] == {"ProjectName": "proj", "Branch": "dev"}
    assert [history[k] for k in ("continuationToken", "previousJobId", "nextJobId")] == [None] * 3
    assert history["noncesIssued"] == [{"event": "nonce", "time": 1_000.0, "nonce": "1"}]
    (acknowledgement,) = history["acknowledgements"]
    assert acknowledgement == {
        "event": "acknowledge", "time": 1_002.0, "nonce": "1", "outcome": "accepted",
        "status": "Dispatched",
    }  # fmt: skip
    (result,) = history["results"]
    assert result == {
        "event": "result", "time": 1_005.0, "operation": SUCCESS,
        "payload": {"jobId": job.id, **payload}, "outcome": "accepted",
    }  # fmt: skip
    statuses = [e["status"] for e in history["events"] if e["event"] == "status"]
    assert statuses == ["Created", "Queued", "Dispatched", "InProgress", "Succeeded"]
