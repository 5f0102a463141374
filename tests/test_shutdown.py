"""Graceful shutdown of `cpworker run`, with real signals sent to a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from anyio.abc import Process

from cpworker import models as m
from cpworker.emulator.client import AdminClient, EmulatorProcess
from tests.conftest import (
    TEST_KEY_ID,
    TEST_SECRET,
    JobFactory,
    exit_and_stderr,
    register,
    wait_for,
)


def write_config(
    path: Path, emulator: EmulatorProcess, action_type: m.ActionTypeId, **keys: Any
) -> Path:
    seconds = keys.pop("seconds")
    grace = keys.pop("grace")
    path.write_text(
        f"""
codepipeline_endpoint_url = "{emulator.codepipeline}"
s3_endpoint_url = "{emulator.s3}"
shutdown_grace_s = {grace}
log_format = "json"
bind = "127.0.0.1:0"

[action_types.sleepy]
category = "{action_type.category}"
provider = "{action_type.provider}"
handler = "sleep"
slots = 4
idle_backoff_floor_s = 0.05
idle_backoff_ceiling_s = 0.1

[action_types.sleepy.handler_options]
seconds = {seconds}
"""
    )
    return path


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CPWORKER_"))}
    env.update(AWS_ACCESS_KEY_ID=TEST_KEY_ID, AWS_SECRET_ACCESS_KEY=TEST_SECRET)
    return env


async def start_worker(config: Path) -> Process:
    return await anyio.open_process(
        [sys.executable, "-m", "cpworker", "run", "-c", str(config)],
        env=worker_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def in_progress(admin: AdminClient, provider: str, count: int) -> bool:
    return len(await admin.jobs(status="InProgress", provider=provider)) == count


async def finish(process: Process, timeout_s: float = 30) -> tuple[int, list[dict[str, Any]]]:
    """Wait for the worker to exit; its return code and JSON log lines."""
    code, stderr = await exit_and_stderr(process, timeout_s)
    return code, [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


async def running_worker_process(
    emulator: EmulatorProcess,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
    *,
    jobs: int,
    running: int,
    seconds: float,
    grace: float,
) -> tuple[list[str], Process]:
    """`cpworker run` as a subprocess with `running` sleep jobs in progress (of `jobs`)."""
    ids = await make_jobs(jobs, shareCredentials=True)
    config = write_config(tmp_path / "w.toml", emulator, action_type, seconds=seconds, grace=grace)
    process = await start_worker(config)
    check = lambda: in_progress(emulator.admin, action_type.provider, running)  # noqa: E731
    await wait_for(check, what=f"{running} jobs running")
    return ids, process


async def statuses(admin: AdminClient, ids: list[str]) -> Counter[str]:
    return Counter([(await admin.job(i))["status"] for i in ids])


async def test_sigterm_lets_running_jobs_finish_and_polls_no_more(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    ids, process = await running_worker_process(
        emulator,
        make_jobs,
        action_type,
        tmp_path,
        jobs=7,
        running=4,
        seconds=2.5,
        grace=30,
    )
    process.send_signal(signal.SIGTERM)
    code, logs = await finish(process)
    assert code == 0
    found = await statuses(admin, ids)
    # The 4 running jobs finished within the grace; the other 3 were never polled.
    assert found == Counter({"Succeeded": 4, "Queued": 3})
    events = [entry.get("event") for entry in logs]
    assert events.index("worker_draining") < events.index("worker_stopped")
    done = [e for e in logs if e.get("event") == "job_done"]
    assert [e["outcome"] for e in done] == ["succeeded"] * 4
    # `cpworker run` with event_loop = "auto" runs on uvloop (a dependency off Windows).
    [loop] = [e for e in logs if e.get("event") == "worker_event_loop"]
    assert loop["message"] == "event loop: uvloop"


async def test_jobs_still_running_after_the_grace_are_reported_failed(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    ids, process = await running_worker_process(
        emulator,
        make_jobs,
        action_type,
        tmp_path,
        jobs=4,
        running=4,
        seconds=600,
        grace=0.5,
    )
    process.send_signal(signal.SIGTERM)
    code, _ = await finish(process)
    assert code == 0
    for job_id in ids:
        history = await admin.job(job_id)
        assert history["status"] == "Failed"
        [result] = [r for r in history["results"] if r["outcome"] == "accepted"]
        details = result["payload"]["failureDetails"]
        assert details == {"type": "SystemUnavailable", "message": "worker shutting down"}


async def test_a_second_signal_skips_the_grace(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    ids, process = await running_worker_process(
        emulator,
        make_jobs,
        action_type,
        tmp_path,
        jobs=2,
        running=2,
        seconds=600,
        grace=600,
    )
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    # The first signal was handled (the worker logged that it is draining) before the second.
    seen = b""
    with anyio.fail_after(10):
        while b"worker_draining" not in seen:
            seen += await process.stderr.receive()
    process.send_signal(signal.SIGINT)
    code, logs = await finish(process)
    assert code == 0
    assert await statuses(admin, ids) == Counter({"Failed": 2})
    assert any(e.get("event") == "shutdown_cancel" for e in logs)


async def test_readiness_turns_false_on_sigterm_before_polling_stops(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
    tmp_path: Path,
) -> None:
    """SIGTERM: /readyz 503 at once, alive and draining, no poll after; then a clean exit."""
    await register(emulator, action_type)
    config = write_config(tmp_path / "w.toml", emulator, action_type, seconds=600, grace=600)
    process = await start_worker(config)
    assert process.stderr is not None
    seen = b""
    with anyio.fail_after(20):
        while b"endpoints_listening" not in seen:
            seen += await process.stderr.receive()
    [line] = [
        e for e in map(json.loads, seen.splitlines()) if e.get("event") == "endpoints_listening"
    ]
    url = "http://" + line["message"].rsplit(" on ", 1)[1]

    async def answer(path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(url + path) as got:
            return got.status, await got.text()

    async def ready() -> bool:
        return (await answer("/readyz"))[0] == 200

    await wait_for(ready, what="the worker to be ready")
    ids = await make_jobs(4, shareCredentials=True)  # the 4 slots fill: no poll is in flight
    await wait_for(lambda: in_progress(admin, action_type.provider, 4), what="4 jobs running")
    process.send_signal(signal.SIGTERM)
    await wait_for(lambda: _not_ready(answer), what="readiness to turn false")
    assert await answer("/readyz") == (503, "draining\n")
    assert await answer("/healthz") == (200, "ok (draining)\n")
    metrics = (await answer("/metrics"))[1]
    assert 'cpworker_jobs_in_flight{action_type="sleepy"} 4.0' in metrics
    polls = await poll_count(admin)
    late = await make_jobs(1, shareCredentials=True)
    process.send_signal(signal.SIGINT)  # skip the grace: the 4 jobs are cancelled
    code, _ = await finish(process)
    assert code == 0
    assert await poll_count(admin) == polls  # no poll after readiness turned false
    assert await statuses(admin, late) == Counter({"Queued": 1})
    assert await statuses(admin, ids) == Counter({"Failed": 4})


async def _not_ready(answer: Callable[[str], Awaitable[tuple[int, str]]]) -> bool:
    status, _ = await answer("/readyz")
    return status == 503


async def poll_count(admin: AdminClient) -> int:
    return sum((await admin.stats())["requests"]["PollForJobs"].values())
