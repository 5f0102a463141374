"""`cpworker demo`: the local demo on an embedded default.

Starts the emulator (CodePipeline job API + moto's S3) as a subprocess, registers a demo
custom action type, creates demo jobs (plus two third-party jobs), and drives every one
through a full cycle with the project's `ControlPlane` client: poll, acknowledge, get
details, then success, failure, or a continuation that comes back as a new job. It prints
a summary and exits 0 only when every job reached a final status with exactly one
accepted result.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from aiobotocore.session import AioSession

from cpworker import models as m
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.emulator.client import AdminClient, EmulatorProcess

DEMO_ACTION = m.ActionTypeId(category="Build", owner="Custom", provider="CpworkerDemo", version="1")
THIRD_PARTY_ACTION = m.ActionTypeId(
    category="Deploy", owner="ThirdParty", provider="CpworkerPartner", version="1"
)
FINAL = {"Succeeded", "Failed", "TimedOut"}


def _demo_session() -> AioSession:
    """The emulator accepts any SigV4 identity; the demo signs as a fixed demo one."""
    session = AioSession()
    session.set_credentials("AKIDCPWORKERDEMO", "demo-secret-not-used-by-aws")
    return session


async def _register(cp: ControlPlane) -> None:
    await cp.create_custom_action_type(
        m.CreateCustomActionTypeInput(
            category=DEMO_ACTION.category,
            provider=DEMO_ACTION.provider,
            version=DEMO_ACTION.version,
            configuration_properties=(
                m.ActionConfigurationProperty(
                    name="ProjectName", required=True, key=True, secret=False, queryable=True
                ),
            ),
            input_artifact_details=m.ArtifactDetails(minimum_count=1, maximum_count=1),
            output_artifact_details=m.ArtifactDetails(minimum_count=0, maximum_count=1),
        )
    )


async def _work(cp: ControlPlane, job: m.Job, counters: dict[str, int]) -> None:
    """One custom job: acknowledge, fetch details, report one result."""
    assert job.nonce is not None
    await cp.acknowledge_job(job.id, job.nonce)
    details = await cp.get_job_details(job.id)
    artifact = details.data.input_artifacts[0].name
    counters["jobs"] += 1
    if details.data.continuation_token:
        counters["continued"] += 1
        summary = f"continued from {details.data.continuation_token}; built {artifact}"
        await cp.put_job_success_result(
            job.id,
            execution_details=m.ExecutionDetails(summary=summary, percent_complete=100),
            output_variables={"Resumed": "true"},
        )
    elif counters["jobs"] % 7 == 0:
        await cp.put_job_failure_result(
            job.id, m.FailureDetails(type="JobFailed", message=f"demo failure of {artifact}")
        )
    elif counters["jobs"] % 5 == 0:
        await cp.put_job_success_result(
            job.id,
            execution_details=m.ExecutionDetails(summary="half way", percent_complete=50),
            continuation_token=f"step-2-of-{job.id[:8]}",
        )
    else:
        await cp.put_job_success_result(
            job.id,
            execution_details=m.ExecutionDetails(summary=f"built {artifact}"),
            output_variables={"BuiltArtifact": artifact or ""},
        )


async def _work_third_party(cp: ControlPlane, job: m.ThirdPartyJob, tokens: dict[str, str]) -> None:
    assert job.job_id is not None
    token = tokens[job.job_id]
    details = await cp.get_third_party_job_details(job.job_id, token)
    assert details.nonce is not None
    await cp.acknowledge_third_party_job(job.job_id, details.nonce, token)
    await cp.put_third_party_job_success_result(
        job.job_id, token, execution_details=m.ExecutionDetails(summary="deployed by partner")
    )


async def _unfinished(admin: AdminClient) -> int:
    stats = await admin.stats()
    return sum(n for status, n in stats["jobs"].items() if status not in FINAL)


async def _drive(cp: ControlPlane, admin: AdminClient, tokens: dict[str, str]) -> dict[str, int]:
    counters = {"jobs": 0, "continued": 0, "polls": 0}
    with anyio.fail_after(60):
        while await _unfinished(admin):
            counters["polls"] += 1
            jobs = await cp.poll_for_jobs(DEMO_ACTION, 10, {"ProjectName": "demo"})
            partner = await cp.poll_for_third_party_jobs(THIRD_PARTY_ACTION, 10)
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(_work, cp, job, counters)
                for tp in partner:
                    tg.start_soon(_work_third_party, cp, tp, tokens)
            if not jobs and not partner:
                await anyio.sleep(0.1)  # idle poll: a continuation is due shortly
    return counters


async def _check_histories(admin: AdminClient) -> list[str]:
    problems = []
    for entry in await admin.jobs():
        job = await admin.job(entry["id"])
        accepted = [r for r in job["results"] if r["outcome"] == "accepted"]
        if job["status"] not in FINAL or len(accepted) != 1:
            problems.append(f"job {job['id']}: {job['status']} with {len(accepted)} results")
    return problems


def _print_summary(stats: dict[str, Any], counters: dict[str, int], elapsed: float) -> None:
    print("cpworker demo summary")
    print(f"  jobs by status: {stats['jobs']}")
    print(f"  custom jobs worked: {counters['jobs']} ({counters['continued']} continuations)")
    print(f"  polls: {counters['polls']}")
    for op, outcomes in stats["requests"].items():
        print(f"  {op}: {outcomes}")
    print(f"  elapsed: {elapsed:.2f} s")


async def run_demo(job_count: int = 20) -> int:
    """Run the demo; returns the process exit code (0 when every job finished once)."""
    started = time.perf_counter()
    async with EmulatorProcess.start(["--continuation-delay-s", "0.2"]) as emulator:
        print(f"emulator: CodePipeline {emulator.codepipeline}, S3 {emulator.s3}")
        settings = ControlPlaneSettings(endpoint_url=emulator.codepipeline)
        async with ControlPlane.open(settings, _demo_session()) as cp:
            await _register(cp)
            await emulator.admin.create_jobs(
                {
                    "actionTypeId": m.to_builtins(DEMO_ACTION),
                    "configuration": {"ProjectName": "demo"},
                    "inputArtifacts": [{"name": "SourceCode", "files": {"src/app.py": "print(1)"}}],
                    "outputArtifacts": ["BuildOutput"],
                    "count": job_count,
                }
            )
            partner = await emulator.admin.create_jobs(
                {"actionTypeId": m.to_builtins(THIRD_PARTY_ACTION), "thirdParty": True, "count": 2}
            )
            counters = await _drive(cp, emulator.admin, partner["clientTokens"])
        problems = await _check_histories(emulator.admin)
        _print_summary(await emulator.admin.stats(), counters, time.perf_counter() - started)
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    return 1 if problems else 0
