"""The worker pool end to end: a real `Worker` against the emulator over HTTP.

Handlers here are plain async functions handed to the worker (`handlers=`); every claim
is checked against the emulator's own job histories, not only the worker's counters.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from cpworker import models as m
from cpworker.config import ConfigError
from cpworker.context import JobContext
from cpworker.emulator.client import AdminClient, EmulatorProcess
from cpworker.errors import CpWorkerError
from cpworker.outcomes import Continue, Failed, Outcome, Succeeded
from cpworker.worker import ClientTokens, Worker
from tests.conftest import (
    JobFactory,
    accepted,
    action_table,
    aio_session,
    histories,
    register,
    run_burst,
    running_worker,
    status_of,
    wait_for,
    worker_config,
)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end before a start at the same time)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def run_interval(history: dict[str, Any]) -> tuple[float, float]:
    """From the emulator's clock: acknowledgement → accepted result."""
    acked = next(e["time"] for e in history["events"] if e.get("status") == "InProgress")
    done = accepted(history)[0]["time"]
    return acked, done


class Tracker:
    """Counts handler calls running at once, per action type."""

    def __init__(self) -> None:
        self.now: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.total_peak = 0

    def handler(self, name: str, work_s: float = 0.02) -> Any:
        async def handle(job: JobContext) -> Outcome:
            self.now[name] += 1
            self.peak[name] = max(self.peak[name], self.now[name])
            self.total_peak = max(self.total_peak, sum(self.now.values()))
            try:
                await anyio.sleep(work_s)  # the job's work, not synchronisation
            finally:
                self.now[name] -= 1
            return Succeeded(f"{name} done")

        return handle


async def test_caps_hold_per_action_type_and_for_the_process(
    emulator: EmulatorProcess, admin: AdminClient, action_type: m.ActionTypeId
) -> None:
    other = m.ActionTypeId(
        category="Test", owner="Custom", provider=action_type.provider + "b", version="1"
    )
    ids: list[str] = []
    for at in (action_type, other):
        answer = await admin.create_jobs(
            {"actionTypeId": m.to_builtins(at), "count": 40, "shareCredentials": True}
        )
        ids += answer["jobIds"]
    config = worker_config(
        emulator,
        {
            "a": action_table(action_type, "echo", slots=3, max_batch_size=10, poll_loops=2),
            "b": action_table(other, "echo", slots=5, max_batch_size=10),
        },
        max_concurrency=6,
    )
    tracker = Tracker()
    worker = await run_burst(
        config, handlers={"a": tracker.handler("a"), "b": tracker.handler("b")}
    )

    found = await histories(admin, ids)
    assert all(h["status"] == "Succeeded" and len(accepted(h)) == 1 for h in found)
    # Every job was dispatched once: no polled job was left waiting for a slot.
    assert all(len(h["noncesIssued"]) == 1 for h in found)
    by_type = {
        p: [run_interval(h) for h in found if h["actionTypeId"]["provider"] == p]
        for p in (action_type.provider, other.provider)
    }
    assert max_overlap(by_type[action_type.provider]) <= 3
    assert max_overlap(by_type[other.provider]) <= 5
    assert max_overlap([i for v in by_type.values() for i in v]) <= 6
    assert tracker.peak["a"] <= 3 and tracker.peak["b"] <= 5 and tracker.total_peak <= 6
    assert tracker.total_peak >= 4  # the caps were reached, not just respected by idling
    # The worker's own view: slot pools (reservations included) and its gauges.
    assert worker.pools["a"].peak <= 3 and worker.pools["b"].peak <= 5
    assert worker.process_pool.peak <= 6
    assert all(p.asked_max <= min(p.config.slots, 6) for p in worker.pollers)
    metrics = worker.metrics
    assert metrics.value("cpworker_jobs_in_flight", action_type="a") == 0
    assert metrics.value("cpworker_slots", action_type="b") == 5
    assert (
        metrics.value("cpworker_jobs_completed_total", action_type="a", outcome="succeeded") == 40
    )
    assert metrics.value("cpworker_jobs_acknowledged_total", action_type="b") == 40
    assert worker.state == "stopped"


async def test_gauge_shows_jobs_in_flight_up_to_the_cap(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    ids = await make_jobs(6, shareCredentials=True)
    gate = anyio.Event()
    entered: list[str] = []

    async def held(job: JobContext) -> Outcome:
        entered.append(job.job_id)
        await gate.wait()
        return Succeeded()

    config = worker_config(emulator, {"a": action_table(action_type, "echo", slots=4)})
    async with running_worker(config, handlers={"a": held}) as worker:
        await wait_for(lambda: _true(len(entered) == 4), what="4 jobs running")
        assert worker.metrics.value("cpworker_jobs_in_flight", action_type="a") == 4
        assert worker.metrics.value("cpworker_slot_utilization_ratio") == 1.0
        # With every slot taken no poll is sent: the other 2 jobs were never dispatched.
        queued = {j["id"] for j in await admin.jobs(status="Queued", provider=action_type.provider)}
        assert len(queued) == 2 and not queued & set(entered)
        gate.set()
        await wait_for(lambda: _true(len(entered) == 6), what="the other 2 jobs")
    assert sorted(entered) == sorted(ids)


async def _true(value: bool) -> bool:
    return value


CASES: dict[str, tuple[str, str]] = {
    # case → (expected failure type, a phrase the message must contain)
    "raise": ("JobFailed", "the handler raised RuntimeError: disk on fire"),
    "hang": ("JobFailed", "did not finish within handler_timeout_s=0.3 s"),
    "long_summary": ("JobFailed", "summary is 3000 characters long; CodePipeline allows at most"),
    "bad_variable": ("JobFailed", "output variable name 'bad name' is not allowed"),
    "dict_outcome": ("JobFailed", "the handler returned dict, not an outcome"),
    "big_variables": ("JobFailed", "output variables total 130520 bytes"),
    "bad_percent": ("JobFailed", "Continue.percent_complete=150: must be an int from 0 to 100"),
    "failed": ("ConfigurationError", "ProjectName is missing"),
    "leak": ("JobFailed", "the handler raised ValueError: cannot log in with ***"),
    "missing_output": ("JobFailed", "without producing output artifact(s) Out"),
    "unknown_input": ("ConfigurationError", "no input artifact named 'Nope'"),
    "option_leak": ("JobFailed", "the handler raised KeyError: '***'"),
    "repeated_outputs": ("JobFailed", "the worker could not run the job CpWorkerError"),
}
OPTION_SECRET = "opt-secret-value-123"
PASSWORD = "hunter2-correct-horse"


async def misbehave(job: JobContext) -> Outcome:
    case = job.configuration["Case"]
    if case == "raise":
        raise RuntimeError("disk on fire")
    if case == "hang":
        await anyio.sleep_forever()
    if case == "long_summary":
        return Succeeded("x" * 3000)
    if case == "bad_variable":
        return Succeeded("ok", output_variables={"bad name": "v"})
    if case == "dict_outcome":
        return {"token": "t"}  # type: ignore[return-value]
    if case == "big_variables":
        return Succeeded(output_variables={f"V{i:03d}": "x" * 1000 for i in range(130)})
    if case == "bad_percent":
        return Continue("t", percent_complete=150)
    if case == "failed":
        return Failed("ProjectName is missing", type="ConfigurationError")
    if case == "leak":
        # What a careless handler does: put a secret configuration value in an error.
        raise ValueError(f"cannot log in with {job.configuration['Password']}")
    if case == "unknown_input":
        await job.inputs["Nope"].path()
    if case == "option_leak":
        raise KeyError(job.options["api_token"])
    return Succeeded("ok")  # missing_output: the declared output is never produced


async def test_bad_handlers_become_failed_jobs_with_clear_messages(
    emulator: EmulatorProcess, admin: AdminClient, action_type: m.ActionTypeId
) -> None:
    await register(emulator, action_type, ("Case", False, False), ("Password", True, False))
    ids: dict[str, str] = {}
    for case in CASES:
        answer = await admin.create_jobs(
            {
                "actionTypeId": m.to_builtins(action_type),
                "configuration": {"Case": case, "Password": PASSWORD},
                "outputArtifacts": {"missing_output": ["Out"], "repeated_outputs": ["O", "O"]}.get(
                    case, []
                ),
            }
        )
        ids[case] = answer["jobIds"][0]
    config = worker_config(
        emulator,
        {
            "a": action_table(
                action_type,
                "echo",
                slots=20,
                handler_timeout_s=0.3,
                handler_options={"api_token": OPTION_SECRET},
            )
        },
    )
    worker = await run_burst(config, handlers={"a": misbehave})
    for case, (failure_type, phrase) in CASES.items():
        history = await admin.job(ids[case])
        results = accepted(history)
        assert history["status"] == "Failed", case
        assert len(results) == 1, case
        details = results[0]["payload"]["failureDetails"]
        assert details["type"] == failure_type, case
        assert phrase in details["message"], (case, details["message"])
        assert PASSWORD not in details["message"] and OPTION_SECRET not in details["message"]
    assert worker.metrics.value(
        "cpworker_jobs_completed_total", action_type="a", outcome="failed"
    ) == len(CASES)


async def test_a_handler_may_ask_whether_an_artifact_exists(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    answers: list[tuple[bool, bool, bool, bool]] = []

    async def ask(job: JobContext) -> Outcome:
        answers.append(
            ("In" in job.inputs, "Nope" in job.inputs, "Out" in job.outputs, "In" in job.outputs)
        )
        assert job.inputs.get("Nope") is None and job.inputs.get("In") is job.inputs["In"]
        (job.outputs["Out"].path / "answer.txt").write_text("asked")
        return Succeeded("asked")

    [job_id] = await make_jobs(
        inputArtifacts=[{"name": "In", "files": {"a.txt": "x"}}], outputArtifacts=["Out"]
    )
    await run_burst(
        worker_config(emulator, {"a": action_table(action_type, "echo")}), handlers={"a": ask}
    )
    assert answers == [(True, False, True, False)]
    assert (await admin.job(job_id))["status"] == "Succeeded"


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
async def test_a_three_step_continuation_chain(
    lean: bool,
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    [first] = await make_jobs(1, continuationDelayS=0.01)
    seen: list[str | None] = []

    async def stepper(job: JobContext) -> Outcome:
        seen.append(job.continuation_token)
        step = int(job.continuation_token or "0")
        if step < 2:
            return Continue(str(step + 1), percent_complete=(step + 1) * 33, summary=f"step {step}")
        return Succeeded("all 3 steps", output_variables={"Steps": "3"})

    config = worker_config(
        emulator, {"a": action_table(action_type, "echo")}, api_lean_job_calls=lean
    )
    async with running_worker(config, handlers={"a": stepper}):
        chain = [first]

        async def chain_done() -> bool:
            history = await admin.job(chain[-1])
            if history["nextJobId"]:
                chain.append(history["nextJobId"])
                return False
            return len(chain) == 3 and history["status"] == "Succeeded"

        await wait_for(chain_done, what="three jobs in the chain")
    assert seen == [None, "1", "2"]
    found = await histories(admin, chain)
    assert [h["continuationToken"] for h in found] == [None, "1", "2"]
    assert [len(accepted(h)) for h in found] == [1, 1, 1]
    payloads = [accepted(h)[0]["payload"] for h in found]
    assert payloads[0]["continuationToken"] == "1"
    assert payloads[0]["executionDetails"]["percentComplete"] == 33
    assert payloads[2]["outputVariables"] == {"Steps": "3"}


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
async def test_third_party_jobs_run_through_the_same_runner(
    lean: bool,
    emulator: EmulatorProcess,
    admin: AdminClient,
    third_party_action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    at = m.to_builtins(third_party_action_type)
    known = await admin.create_jobs(
        {
            "actionTypeId": at,
            "thirdParty": True,
            "count": 3,
            "clientId": "client-1",
            "clientToken": "partner-token-1",
            "configuration": {"Target": "prod"},
        }
    )
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"client-1": "partner-token-1"}))
    targets: list[str] = []

    async def deploy(job: JobContext) -> Outcome:
        assert job.third_party
        targets.append(job.configuration["Target"])
        return Succeeded("deployed", external_execution_id="d-1")

    config = worker_config(
        emulator,
        {"p": action_table(third_party_action_type, "echo", client_tokens_file=str(tokens))},
        api_lean_job_calls=lean,
    )
    worker = await run_burst(config, handlers={"p": deploy})
    assert targets == ["prod"] * 3
    for history in await histories(admin, known["jobIds"]):
        assert history["status"] == "Succeeded"
        [result] = accepted(history)
        assert result["operation"] == "PutThirdPartyJobSuccessResult"
        assert "partner-token-1" not in json.dumps(history)
    assert (
        worker.metrics.value("cpworker_jobs_completed_total", action_type="p", outcome="succeeded")
        == 3
    )


async def test_third_party_job_of_an_unknown_client_is_left_alone(
    emulator: EmulatorProcess,
    admin: AdminClient,
    third_party_action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    answer = await admin.create_jobs(
        {
            "actionTypeId": m.to_builtins(third_party_action_type),
            "thirdParty": True,
            "clientId": "stranger",
            "clientToken": "stranger-token-xyz",
        }
    )
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"client-1": "t"}))
    called: list[str] = []

    async def deploy(job: JobContext) -> Outcome:
        called.append(job.job_id)
        return Succeeded()

    config = worker_config(
        emulator,
        {"p": action_table(third_party_action_type, "echo", client_tokens_file=str(tokens))},
    )
    worker = await run_burst(config, handlers={"p": deploy}, max_jobs=1)
    assert called == []
    history = await admin.job(answer["jobIds"][0])
    assert history["results"] == [] and history["acknowledgements"] == []
    assert (
        worker.metrics.value("cpworker_jobs_completed_total", action_type="p", outcome="abandoned")
        == 1
    )


async def test_query_param_routes_jobs_between_two_workers(
    emulator: EmulatorProcess, admin: AdminClient, action_type: m.ActionTypeId
) -> None:
    await register(emulator, action_type, ("ProjectName", False, True))
    for project in ("alpha", "beta"):
        await admin.create_jobs(
            {
                "actionTypeId": m.to_builtins(action_type),
                "count": 10,
                "configuration": {"ProjectName": project},
                "shareCredentials": True,
            }
        )
    seen: dict[str, list[str]] = {"alpha": [], "beta": []}

    def handler(worker_project: str) -> Any:
        async def handle(job: JobContext) -> Outcome:
            seen[worker_project].append(job.configuration["ProjectName"])
            return Succeeded()

        return handle

    async def run_for(project: str) -> None:
        table = action_table(action_type, "echo", query_param={"ProjectName": project})
        await run_burst(worker_config(emulator, {"a": table}), handlers={"a": handler(project)})

    async with anyio.create_task_group() as tg:
        for project in ("alpha", "beta"):
            tg.start_soon(run_for, project)
    assert seen == {"alpha": ["alpha"] * 10, "beta": ["beta"] * 10}


async def test_max_jobs_stops_after_n_jobs(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    ids = await make_jobs(12, shareCredentials=True)
    table = action_table(action_type, "echo", slots=8, max_batch_size=4, poll_loops=4)
    config = worker_config(emulator, {"a": table})
    worker = Worker(config, session=aio_session(), max_jobs=5)
    with anyio.fail_after(30):
        await worker.run()
    statuses = Counter(h["status"] for h in await histories(admin, ids))
    assert statuses["Succeeded"] == 5
    assert statuses["Queued"] == 7
    assert worker.state == "stopped"


async def test_an_idle_action_type_polls_with_one_loop_until_jobs_wake_them_all(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    table = action_table(
        action_type,
        "echo",
        slots=8,
        max_batch_size=2,
        poll_loops=4,
        idle_backoff_floor_s=0.005,
        idle_backoff_ceiling_s=0.01,
    )
    await register(emulator, action_type)
    worker = Worker(worker_config(emulator, {"a": table}), session=aio_session())

    async def polled(total: int) -> bool:
        return sum(p.polls for p in worker.pollers) >= total

    async def all_polled_again() -> bool:
        return all(p.polls >= 2 for p in others)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await wait_for(lambda: polled(30), what="30 empty polls")
            watch = worker.pollers[0].idle
            watcher = [p for p in worker.pollers if p is watch.watcher]
            others = [p for p in worker.pollers if p is not watch.watcher]
            # One loop kept polling; the other three polled once each, then parked.
            assert len(watcher) == 1 and watcher[0].polls >= 27
            assert [p.polls for p in others] == [1, 1, 1] and watch.parked == 3
            ids = await make_jobs(8, shareCredentials=True)
            # The poll that found jobs woke every parked loop, and each polled again.
            await wait_for(all_polled_again, what="the parked loops to poll again")
            await wait_for(lambda: _all_succeeded(admin, ids), what="the eight jobs to succeed")
            worker.stop()
    assert worker.state == "stopped"


async def _all_succeeded(admin: AdminClient, ids: list[str]) -> bool:
    return all(h["status"] == "Succeeded" for h in await histories(admin, ids))


async def test_max_jobs_lets_the_last_jobs_run_past_the_shutdown_grace(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    # Not asked to stop: the budget ends polling, not the jobs (the grace is for signals).
    ids = await make_jobs(2, shareCredentials=True)
    table = action_table(action_type, "sleep", slots=2, handler_options={"seconds": 0.5})
    config = worker_config(emulator, {"a": table}, shutdown_grace_s=0.05)
    worker = Worker(config, session=aio_session(), max_jobs=2)
    with anyio.fail_after(30):
        await worker.run()
    statuses = Counter(h["status"] for h in await histories(admin, ids))
    assert statuses == Counter({"Succeeded": 2})


@pytest.mark.parametrize("kind", ["missing", "a file"])
async def test_work_dir_is_created_or_refused_at_start(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
    kind: str,
) -> None:
    work = tmp_path / "deep" / "work"
    if kind == "a file":
        work.parent.mkdir()
        work.write_text("not a directory")
    [job_id] = await make_jobs()
    config = worker_config(emulator, {"a": action_table(action_type, "echo")}, work_dir=str(work))
    if kind == "missing":
        await run_burst(config)
        assert work.is_dir()
        assert (await admin.job(job_id))["status"] == "Succeeded"
    else:
        with pytest.raises(ConfigError, match=r"work_dir = .*work.*: cannot create it"):
            await run_burst(config)
        assert (await admin.job(job_id))["status"] == "Queued"  # nothing was taken


async def test_a_jobs_work_dir_is_made_only_when_used_and_removed_after(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    before_use: dict[str, list[Path]] = {}
    made: dict[str, tuple[Path, int, bool]] = {}

    async def handler(job: JobContext) -> Outcome:
        before_use[job.job_id] = list(work.iterdir())
        if job.configuration.get("Use") == "yes":
            path = job.work_dir
            (job.outputs_dir / "x").mkdir()
            made[job.job_id] = (path, path.stat().st_mode & 0o777, path.parent == work)
        return Succeeded("done")

    [idle] = await make_jobs(1, configuration={"Use": "no"})
    [used] = await make_jobs(1, configuration={"Use": "yes"})
    config = worker_config(
        emulator, {"a": action_table(action_type, "echo", slots=1)}, work_dir=str(work)
    )
    await run_burst(config, handlers={"a": handler})
    assert before_use == {idle: [], used: []}  # nothing made before the handler asked
    path, mode, in_work = made[used]
    assert (mode, in_work) == (0o700, True)
    assert not path.exists()  # removed after the job
    assert list(work.iterdir()) == []
    assert [await status_of(admin, j) for j in (idle, used)] == ["Succeeded", "Succeeded"]


async def test_an_unregistered_action_type_stops_the_worker_at_start(
    emulator: EmulatorProcess, action_type: m.ActionTypeId
) -> None:
    config = worker_config(emulator, {"a": action_table(action_type, "echo")})
    with pytest.raises(CpWorkerError, match=r"action_types\.a: .* is not registered"):
        await Worker(config, session=aio_session()).run()


def test_client_tokens_are_read_again_only_when_the_file_changed(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"c1": "token-1"}))
    tokens = ClientTokens("p", path)
    assert tokens.lookup("c1") == "token-1"
    stat = path.stat()
    path.write_text(json.dumps({"c1": "token-1", "c2": "token-2"}))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: not read again
    assert tokens.lookup("c2") is None
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rotated
    assert tokens.lookup("c2") == "token-2"
    path.write_text("not json")
    with pytest.raises(ConfigError, match=r"action_types\.p\.client_tokens_file = .*JSON"):
        tokens.lookup("c3")
