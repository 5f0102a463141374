"""Soak (marked slow; `make soak`): many jobs through a faulty emulator, none lost or doubled.

A small concurrent driver built on `ControlPlane` works 400 jobs while the emulator throttles,
answers 5xx, drops connections before and after applying calls, and hands out wrong nonces.
At the end every job must be Succeeded with exactly one accepted result, and the faults
must really have been injected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import anyio
import pytest

from cpworker import models as m
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.emulator.client import EmulatorProcess
from cpworker.errors import (
    CpWorkerError,
    InvalidJobStateError,
    InvalidNonceError,
    ServiceError,
    TransportError,
)
from tests.conftest import aio_session

pytestmark = pytest.mark.slow

JOBS = 400
ACTION = m.ActionTypeId(category="Build", owner="Custom", provider="Soak", version="1")
FAULTS = [
    "--throttle-rate", "0.05",
    "--error-503-rate", "0.03",
    "--drop-rate", "0.02",
    "--drop-response-rate", "0.02",
    "--wrong-nonce-rate", "0.05",
    "--jitter-s", "0.005",
    "--dispatch-timeout-s", "0.5",
    "--seed", "7",
]  # fmt: skip


async def _retrying(call: Callable[[], Awaitable[object]], attempts: int = 20) -> None:
    """Retry transient failures (what the worker pool will do); re-raise the rest."""
    for _ in range(attempts):
        try:
            await call()
            return
        except (TransportError, ServiceError) as exc:
            if not getattr(exc, "retryable", False):
                raise
            await anyio.sleep(0.01)
    raise AssertionError("still failing after retries")


async def _work(cp: ControlPlane, job: m.Job, done: set[str]) -> None:
    assert job.nonce is not None
    try:
        await _retrying(lambda: cp.acknowledge_job(job.id, job.nonce or ""))
    except InvalidNonceError:
        return  # lost the race (wrong nonce): the job is re-queued and polled again
    # InvalidJobState: the first attempt was applied but its answer was dropped.
    with contextlib.suppress(InvalidJobStateError):
        await _retrying(
            lambda: cp.put_job_success_result(
                job.id, execution_details=m.ExecutionDetails(summary="soaked")
            )
        )
    done.add(job.id)


async def _drive(cp: ControlPlane) -> set[str]:
    done: set[str] = set()
    with anyio.fail_after(240):
        while len(done) < JOBS:
            try:
                jobs = await cp.poll_for_jobs(ACTION, 25)
            except CpWorkerError:
                continue
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(_work, cp, job, done)
            if not jobs:
                await anyio.sleep(0.05)  # the rest is waiting for a dispatch timeout
    return done


async def test_no_job_lost_or_reported_twice_under_faults() -> None:
    async with EmulatorProcess.start(FAULTS) as emulator:
        ids = (
            await emulator.admin.create_jobs(
                {"actionTypeId": m.to_builtins(ACTION), "count": JOBS, "shareCredentials": True}
            )
        )["jobIds"]
        settings = ControlPlaneSettings(endpoint_url=emulator.codepipeline, max_attempts=1)
        async with ControlPlane.open(settings, aio_session()) as cp:
            done = await _drive(cp)
        assert done == set(ids)
        for job_id in ids:
            history = await emulator.admin.job(job_id)
            accepted = [r for r in history["results"] if r["outcome"] == "accepted"]
            assert history["status"] == "Succeeded", history
            assert len(accepted) == 1, history
        injected = (await emulator.admin.stats())["faultsInjected"]
        kinds = {kind for per_op in injected.values() for kind in per_op}
        assert kinds == {
            "latency", "throttle", "error_503", "drop", "drop_response", "wrong_nonce"
        }  # fmt: skip
