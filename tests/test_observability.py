"""Metrics, endpoints, logs and redaction of a worker running emulator jobs over HTTP."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cpworker import __version__
from cpworker import models as m
from cpworker.config import ConfigError
from cpworker.context import JobContext
from cpworker.emulator.client import AdminClient, EmulatorProcess
from cpworker.errors import CpWorkerError
from cpworker.logs import configure_logging
from cpworker.metrics import request_result
from cpworker.outcomes import Failed, Outcome, Succeeded
from cpworker.worker import Worker
from tests.conftest import (
    JobFactory,
    accepted,
    action_table,
    aio_session,
    histories,
    register,
    wait_for,
    worker_config,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by name and label set."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


async def get(url: str, accept: str = "") -> tuple[int, str, str]:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as answer:
        return answer.status, answer.headers["Content-Type"], await answer.text()


def base_url(worker: Worker) -> str:
    assert worker.address is not None
    host, port = worker.address
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
async def counted() -> AsyncIterator[EmulatorProcess]:
    """An emulator of this module's own, so its request counts are this module's."""
    async with EmulatorProcess.start(["--seed", "11"]) as process:
        yield process


async def pass_or_fail(job: JobContext) -> Outcome:
    if job.configuration.get("Mode") == "fail":
        return Failed("asked to fail", type="JobFailed")
    return Succeeded("ok")


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
async def test_metrics_agree_with_the_emulators_counts(
    counted: EmulatorProcess, lean: bool
) -> None:
    admin = counted.admin
    action_type = m.ActionTypeId(
        category="Test", owner="Custom", provider=f"Counted{lean}", version="1"
    )
    await register(counted, action_type, ("Mode", False, False))
    ids: dict[str, list[str]] = {}
    for mode, count in (("ok", 30), ("fail", 10)):
        spec = {"count": count, "configuration": {"Mode": mode}, "shareCredentials": True}
        answer = await admin.create_jobs({"actionTypeId": m.to_builtins(action_type), **spec})
        ids[mode] = answer["jobIds"]
    table = action_table(action_type, "echo", slots=8, max_batch_size=4)
    config = worker_config(counted, {"a": table}, api_lean_job_calls=lean, result_deadline_s=60)
    worker = Worker(config, session=aio_session(), handlers={"a": pass_or_fail})
    before = (await admin.stats())["requests"]

    async def all_final() -> bool:
        found = await histories(admin, [*ids["ok"], *ids["fail"]])
        return all(h["status"] in ("Succeeded", "Failed") for h in found)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            # Throttle a fifth of the job calls once the worker runs (not its start-up).
            await admin.set_faults({"global": {"throttle_rate": 0.2}})
            try:
                await wait_for(all_final, 50, "every job final")
            finally:
                await admin.set_faults({"global": {}})
            worker.stop()
    after = (await admin.stats())["requests"]
    found = samples(generate_latest(worker.metrics.registry).decode())

    statuses = Counter(h["status"] for h in await histories(admin, [*ids["ok"], *ids["fail"]]))
    assert statuses == Counter(Succeeded=30, Failed=10)
    done = "cpworker_jobs_completed_total"
    assert value(found, done, action_type="a", outcome="succeeded") == 30
    assert value(found, done, action_type="a", outcome="failed") == 10
    assert value(found, "cpworker_jobs_acknowledged_total", action_type="a") == 40
    assert value(found, "cpworker_jobs_polled_total", action_type="a") == 40
    histogram = "cpworker_job_duration_seconds_count"
    assert value(found, histogram, action_type="a", outcome="failed") == 10
    throttled_somewhere = 0.0
    for operation in (
        "ListActionTypes",
        "PollForJobs",
        "AcknowledgeJob",
        "PutJobSuccessResult",
        "PutJobFailureResult",
    ):
        seen = Counter(after.get(operation, {})) - Counter(before.get(operation, {}))
        requests = total(found, "cpworker_api_requests_total", operation=operation)
        assert requests == seen.total() > 0, operation
        ok = value(found, "cpworker_api_requests_total", operation=operation, result="success")
        assert ok == seen["ok"], operation
        throttles = value(found, "cpworker_api_throttles_total", operation=operation)
        assert throttles == seen["ThrottlingException"], operation
        assert throttles == value(
            found, "cpworker_api_requests_total", operation=operation, result="throttled"
        )
        assert value(found, "cpworker_api_request_duration_seconds_count", operation=operation) == (
            requests
        )
        throttled_somewhere += throttles
    assert throttled_somewhere > 5  # the throttling was real, and counted
    assert value(found, "cpworker_worker_state", cpworker_worker_state="stopped") == 1
    assert value(found, "cpworker_jobs_in_flight", action_type="a") == 0


def test_request_results_are_a_fixed_set() -> None:
    assert request_result(None) == "transport_error"
    assert request_result(200) == "success"
    assert request_result(400, "ThrottlingException") == "throttled"
    assert request_result(400, "TooManyRequests") == "throttled"
    assert request_result(400, "InvalidNonceException") == "client_error"
    assert request_result(503, "ServiceUnavailable") == "server_error"


async def test_endpoints_show_a_working_worker_and_readiness_turns_false_on_stop(
    emulator: EmulatorProcess,
    admin: AdminClient,
    make_jobs: JobFactory,
    action_type: m.ActionTypeId,
) -> None:
    gate = anyio.Event()

    async def held(job: JobContext) -> Outcome:
        await gate.wait()
        return Succeeded("released")

    ids = await make_jobs(3, shareCredentials=True)
    table = action_table(action_type, "echo", slots=4, handler_timeout_s=900)
    worker = Worker(
        worker_config(emulator, {"a": table}), session=aio_session(), handlers={"a": held}
    )

    async def three_running() -> bool:
        return len(await admin.jobs(status="InProgress", provider=action_type.provider)) == 3

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            url = base_url(worker)
            assert await get(f"{url}/readyz") == (200, "text/plain; charset=utf-8", "ready\n")
            await wait_for(three_running, what="three jobs running")
            status, content_type, text = await get(f"{url}/metrics")
            assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
            found = samples(text)
            assert value(found, "cpworker_jobs_in_flight", action_type="a") == 3
            assert value(found, "cpworker_slots", action_type="a") == 4
            assert value(found, "cpworker_slot_utilization_ratio") == 0.75
            assert value(found, "cpworker_job_timeout_seconds", action_type="a") == 900
            assert value(found, "cpworker_job_oldest_age_seconds", action_type="a") > 0
            assert value(found, "cpworker_worker_state", cpworker_worker_state="ready") == 1
            build = [k for k in found if k[0] == "cpworker_build_info"]
            assert build and ("version", __version__) in build[0][1]
            assert value(found, "process_resident_memory_bytes") > 10 * 2**20
            assert ("python_info", frozenset()) not in found  # python_info has labels
            # No label value is a job id (labels are action types, outcomes, operations...).
            assert not any(job_id in v for k in found for _, v in k[1] for job_id in ids)
            # Prometheus asks for OpenMetrics; it gets it.
            accept = "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            status, content_type, text = await get(f"{url}/metrics", accept)
            assert content_type.startswith("application/openmetrics-text")
            assert text.endswith("# EOF\n")
            assert (await get(f"{url}/healthz"))[::2] == (200, "ok (ready)\n")

            worker.stop()
            # At once: not ready (draining) while the three jobs still run; still alive.
            assert (await get(f"{url}/readyz"))[::2] == (503, "draining\n")
            assert (await get(f"{url}/healthz"))[::2] == (200, "ok (draining)\n")
            found = samples((await get(f"{url}/metrics"))[2])
            assert value(found, "cpworker_jobs_in_flight", action_type="a") == 3
            assert value(found, "cpworker_worker_state", cpworker_worker_state="draining") == 1
            gate.set()
    assert Counter(h["status"] for h in await histories(admin, ids)) == Counter(Succeeded=3)
    assert worker.state == "stopped"


@pytest.mark.parametrize(
    "bind",
    ["9464", "0.0.0.0:http", ":1", "127.0.0.1:70000"],
)
def test_a_bad_bind_is_refused_naming_the_key(
    emulator: EmulatorProcess, action_type: m.ActionTypeId, bind: str
) -> None:
    with pytest.raises(ConfigError, match=rf"bind={bind!r}: must be host:port with a port from"):
        worker_config(emulator, {"a": action_table(action_type, "echo")}, bind=bind)


async def test_a_taken_port_stops_the_worker_with_the_fix_and_empty_bind_serves_nothing(
    emulator: EmulatorProcess, action_type: m.ActionTypeId
) -> None:
    await register(emulator, action_type)
    table = {"a": action_table(action_type, "echo")}
    first = Worker(worker_config(emulator, table), session=aio_session())
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            assert first.address is not None
            taken = f"127.0.0.1:{first.address[1]}"
            second = Worker(worker_config(emulator, table, bind=taken), session=aio_session())
            with pytest.raises(CpWorkerError, match=rf"bind = '{taken}': cannot listen there"):
                await second.run()
            quiet = Worker(worker_config(emulator, table, bind=""), session=aio_session())
            await tg.start(quiet.run)
            assert quiet.address is None and quiet.state == "ready"
            quiet.stop()
            first.stop()


PASSWORD = "pw-Zq81-distinctive-secret"
API_TOKEN = "tok-Vx42-distinctive-option"


async def test_distinctive_secrets_leave_no_trace(
    emulator: EmulatorProcess,
    admin: AdminClient,
    action_type: m.ActionTypeId,
) -> None:
    """A careless handler spreads every secret it can reach; none of them gets out."""
    await register(emulator, action_type, ("Password", True, False), ("Mode", False, False))
    spec = {
        "configuration": {"Password": PASSWORD, "Mode": "leak"},
        "count": 2,
        "inputArtifacts": [{"name": "In", "files": {"a.txt": "x"}}],
    }
    answer = await admin.create_jobs({"actionTypeId": m.to_builtins(action_type), **spec})
    ids: list[str] = answer["jobIds"]
    leaked: set[str] = {PASSWORD, API_TOKEN}

    async def careless(job: JobContext) -> Outcome:
        # It digs out the artifact credentials the worker holds for the job.
        data = cast(Any, job.inputs["In"]._io)._data
        creds = data.artifact_credentials
        assert creds is not None
        secrets = [creds.access_key_id, creds.secret_access_key, creds.session_token]
        leaked.update(secrets)
        everything = f"{job.configuration} {job.options} {' '.join(secrets)}"
        job.log.info("starting with %s", everything)
        logging.getLogger("cpworker.custom").warning("plain logger: %s", everything)
        try:
            raise RuntimeError(f"inner {everything}")
        except RuntimeError:
            job.log.exception("with a traceback")
        if job.job_id == ids[0]:
            return Failed(f"could not log in: {everything}")
        raise ValueError(f"crashed holding {everything}")

    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream)
    try:
        table = action_table(action_type, "echo", handler_options={"api_token": API_TOKEN})
        config = worker_config(emulator, {"a": table})
        worker = Worker(config, session=aio_session(), handlers={"a": careless})
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                await wait_for(
                    lambda: _all_failed(admin, ids), what="both jobs to fail", timeout_s=20
                )
                metrics_text = (await get(f"{base_url(worker)}/metrics"))[2]
                worker.stop()
    finally:
        configure_logging("INFO", "json")
    logs = stream.getvalue()
    messages = [
        accepted(h)[0]["payload"]["failureDetails"]["message"] for h in await histories(admin, ids)
    ]
    assert len(leaked) == 8  # two secret values, three credential parts for each job
    texts = {"logs": logs, "metrics": metrics_text, "failure messages": "\n".join(messages)}
    texts["config repr"] = f"{worker.config!r} {worker.config.action_types['a']!r}"
    for where, text in texts.items():
        for secret in leaked:
            assert secret not in text, f"a secret reached the {where}"
    # The lines were written, with the masks where the secrets were.
    lines = [json.loads(line) for line in logs.splitlines()]
    starting = [e for e in lines if e["message"].startswith("starting with")]
    assert len(starting) == 2 and all(e["message"].count("***") == 5 for e in starting)
    assert any("Traceback" in e.get("exception", "") for e in lines)
    assert all("***" in message for message in messages)


async def _all_failed(admin: AdminClient, ids: list[str]) -> bool:
    return all(h["status"] == "Failed" for h in await histories(admin, ids))


async def test_a_finished_jobs_log_line_carries_every_field(
    emulator: EmulatorProcess, admin: AdminClient, action_type: m.ActionTypeId
) -> None:
    await register(emulator, action_type, ("Mode", False, False))
    spec = {
        "configuration": {"Mode": "fail"},
        "pipelineName": "logs-pipeline",
        "stageName": "Verify",
        "actionName": "Check",
    }
    [job_id] = (await admin.create_jobs({"actionTypeId": m.to_builtins(action_type), **spec}))[
        "jobIds"
    ]
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    try:
        config = worker_config(emulator, {"a": action_table(action_type, "echo")})
        worker = Worker(config, session=aio_session(), handlers={"a": pass_or_fail})
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                await wait_for(lambda: _all_failed(admin, [job_id]), what="the job to fail")
                worker.stop()
    finally:
        configure_logging("INFO", "json")
    [done] = [
        e for e in map(json.loads, stream.getvalue().splitlines()) if e.get("event") == "job_done"
    ]
    assert done["level"] == "INFO" and done["time"].endswith("Z")
    want: dict[str, Any] = {
        "job_id": job_id,
        "action_type": "a",
        "pipeline": "logs-pipeline",
        "stage": "Verify",
        "action": "Check",
        "outcome": "failed",
        "error_type": "JobFailed",
    }
    assert {k: done.get(k) for k in want} == want
    assert isinstance(done["duration_s"], float) and done["duration_s"] >= 0
    assert len(done["execution_id"]) == 36  # the emulator's uuid4 execution id
