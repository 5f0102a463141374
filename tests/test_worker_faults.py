"""The worker under injected faults: throttling storms, lost races, dropped answers.

These tests run their own emulator (faults are process-wide), seeded so a failure can be
reproduced. Every claim is checked on the emulator's histories: each job final, exactly
one accepted result, no failure caused by a fault.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from cpworker import models as m
from cpworker.context import JobContext
from cpworker.emulator.client import AdminClient, EmulatorProcess
from cpworker.outcomes import Outcome, Succeeded
from cpworker.worker import Worker
from tests.conftest import accepted, action_table, aio_session, histories, worker_config


@pytest.fixture(scope="module")
async def faulty() -> AsyncIterator[EmulatorProcess]:
    args = ["--continuation-delay-s", "0.05", "--dispatch-timeout-s", "0.5", "--seed", "7"]
    async with EmulatorProcess.start(args) as process:
        yield process


async def set_faults(admin: AdminClient, **settings: Any) -> dict[str, Any]:
    return await admin.set_faults({"global": settings})


async def work(job: JobContext) -> Outcome:
    await anyio.sleep(0.01)  # a little work, so jobs overlap
    return Succeeded("done")


async def run_until_final(
    emulator: EmulatorProcess, admin: AdminClient, ids: list[str], workers: list[Worker]
) -> None:
    """Run `workers` until every job in `ids` is final, then stop them."""

    async def all_final() -> bool:
        stats = await admin.jobs(provider=None)
        status = {j["id"]: j["status"] for j in stats}
        return all(status[i] in ("Succeeded", "Failed") for i in ids)

    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            for worker in workers:
                await tg.start(worker.run)
            while not await all_final():  # noqa: ASYNC110 - the state is in another process
                await anyio.sleep(0.05)
            for worker in workers:
                worker.stop()


async def test_a_throttling_storm_fails_no_job(faulty: EmulatorProcess) -> None:
    admin = faulty.admin
    action_type = m.ActionTypeId(category="Test", owner="Custom", provider="Storm", version="1")
    answer = await admin.create_jobs(
        {"actionTypeId": m.to_builtins(action_type), "count": 150, "shareCredentials": True}
    )
    ids: list[str] = answer["jobIds"]
    config = worker_config(
        faulty,
        {"a": action_table(action_type, "echo", slots=30)},
        api_max_attempts=2,  # so throttles reach the worker's own backoff too
        result_deadline_s=60,
    )
    worker = Worker(config, session=aio_session(), handlers={"a": work})
    await set_faults(admin, throttle_rate=0.3)
    try:
        await run_until_final(faulty, admin, ids, [worker])
    finally:
        await set_faults(admin)
    found = await histories(admin, ids)
    assert all(h["status"] == "Succeeded" for h in found)
    assert all(len(accepted(h)) == 1 for h in found)
    stats = await admin.stats()
    throttled = sum(n for op in stats["requests"].values() for k, n in op.items() if "Throttl" in k)
    assert throttled > 100  # the storm was real
    assert (
        worker.metrics.value("cpworker_jobs_completed_total", action_type="a", outcome="failed")
        == 0
    )
    assert (
        sum(
            worker.metrics.value("cpworker_api_throttles_total", operation=op)
            for op in ("PollForJobs", "AcknowledgeJob", "PutJobSuccessResult")
        )
        > 0
    )


async def test_two_workers_racing_report_each_job_once(faulty: EmulatorProcess) -> None:
    """Wrong nonces (a lost race), dropped answers and 5xx on top of two competing workers."""
    admin = faulty.admin
    action_type = m.ActionTypeId(category="Test", owner="Custom", provider="Race", version="1")
    answer = await admin.create_jobs(
        {"actionTypeId": m.to_builtins(action_type), "count": 120, "shareCredentials": True}
    )
    ids: list[str] = answer["jobIds"]
    config = worker_config(faulty, {"a": action_table(action_type, "echo", slots=20, poll_loops=2)})
    workers = [Worker(config, session=aio_session(), handlers={"a": work}) for _ in range(2)]
    await set_faults(admin, wrong_nonce_rate=0.1, drop_response_rate=0.05, error_503_rate=0.05)
    try:
        await run_until_final(faulty, admin, ids, workers)
    finally:
        await set_faults(admin)
    found = await histories(admin, ids)
    assert all(h["status"] == "Succeeded" for h in found)
    assert all(len(accepted(h)) == 1 for h in found)
    lost = sum(
        w.metrics.value("cpworker_jobs_completed_total", action_type="a", outcome="lost_race")
        for w in workers
    )
    assert lost > 0  # wrong nonces were seen and counted, never reported
    done = [
        w.metrics.value("cpworker_jobs_completed_total", action_type="a", outcome="succeeded")
        for w in workers
    ]
    assert all(n > 0 for n in done)  # both workers took part
