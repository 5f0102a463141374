"""cpworker against the boto3 baselines: every scenario, same emulator, same run.

    python benchmarks/bench.py [--quick | --smoke] [--out PATH] [--only NAME,...]

One emulator process (pinned to CPU 0 when `taskset` exists) serves the whole run; each
system runs as its own process (pinned to CPU 1) on an action type of its own, one after
the other. Systems: `cpworker` (`cpworker run`), `boto3_sequential` and `boto3_threads`
(`benchmarks/baselines/`), and `aws_s3_cp` (the sequential loop moving artifacts with
`aws s3 cp`) in the artifact scenarios.

A run of jobs: the system is started and waits until it has polled once (imports done,
clients made); then its CPU time (the process's and its children's, from /proc) and the
emulator's request counts are read, the jobs are created in one batch, and the run ends
when every job has a result (or at the deadline: the rest are `lost`). Job times come from
the emulator's history of each job (creation → accepted result; `pickup`: creation → first
acknowledgement), never from the system's own clock. `jobs_per_s` is jobs over the time
from their creation to the last result; `api_calls_per_job` counts every CodePipeline call
the emulator served in that window (empty polls too), `api_calls_per_job_saturated` leaves
out the polls that found no job (those once the queue ran dry: the goal's "at
saturation"); `peak_rss_mib` is the process's VmHWM (its children not included).

Scenarios (full / quick job counts in MODES): `control_plane_<L>ms` (no-op jobs, L ms
injected API latency), `handler_bound` (1 s sleep handler; efficiency = jobs/s over the
system's concurrency), `artifacts` (an input zip of incompressible bytes in, the same
files packed and uploaded out), `big_artifact` (the same with one big input), `idle` (no
jobs: polls/s and CPU %), `pickup` (one job a second: creation → acknowledgement).

Writes the JSON (`--out`, default `benchmarks/results/latest.json`) and PNG plots beside
it, and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import boto3

from cpworker.emulator.client import EmulatorProcess

if TYPE_CHECKING:
    from mypy_boto3_codepipeline.type_defs import ArtifactDetailsTypeDef

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.json"
WORKER_IDENTITY = {"AWS_ACCESS_KEY_ID": "AKIDBENCH", "AWS_SECRET_ACCESS_KEY": "x"}
MIB = 1024 * 1024
METRICS = (
    "jobs_per_s", "p50_s", "p95_s", "p99_s", "api_calls_per_job", "cpu_ms_per_job",
    "peak_rss_mib", "mib_per_s", "failed", "lost",
)  # fmt: skip
FINAL = ("Succeeded", "Failed", "TimedOut")
EXTRA = (
    "api_calls_per_job_saturated", "efficiency", "polls_per_s", "cpu_percent",
    "emulator_cpu_percent", "pickup_p50_s", "pickup_p99_s",
)  # fmt: skip
BACKOFF_CEILING_S = 5.0  # cpworker's idle_backoff_ceiling_s default: the pickup goal

# Job counts and durations per mode. Sequential baselines get fewer jobs where the full
# count would take minutes: their rate, not their count, is what is compared.
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "latencies_ms": (0, 20, 50), "cp_jobs": 2000, "cp_seq_jobs": {0: 300, 20: 150, 50: 100},
        "hb_jobs": 2000, "hb_concurrency": 500, "hb_sleep_s": 1.0, "hb_threads_jobs": 320,
        "hb_seq_jobs": 5, "art_jobs": 200, "art_mib": 8, "art_seq_jobs": 40, "art_cli_jobs": 10,
        "big_mib": 1024, "idle_s": 60.0, "idle_baseline_s": 15.0, "pickup_jobs": 30,
    },
    "quick": {
        "latencies_ms": (0, 20, 50), "cp_jobs": 300, "cp_seq_jobs": {0: 60, 20: 30, 50: 20},
        "hb_jobs": 500, "hb_concurrency": 500, "hb_sleep_s": 1.0, "hb_threads_jobs": 64,
        "hb_seq_jobs": 2, "art_jobs": 20, "art_mib": 8, "art_seq_jobs": 5, "art_cli_jobs": 2,
        "big_mib": 64, "idle_s": 8.0, "idle_baseline_s": 3.0, "pickup_jobs": 4,
    },
    # idle_baseline_s: the sequential baseline sleeps 1 s between empty polls, so a
    # shorter window could see none.
    "smoke": {
        "latencies_ms": (0, 20), "cp_jobs": 12, "cp_seq_jobs": {0: 3, 20: 3},
        "hb_jobs": 8, "hb_concurrency": 8, "hb_sleep_s": 0.2, "hb_threads_jobs": 4,
        "hb_seq_jobs": 1, "art_jobs": 2, "art_mib": 1, "art_seq_jobs": 1, "art_cli_jobs": 1,
        "big_mib": 2, "idle_s": 1.0, "idle_baseline_s": 2.5, "pickup_jobs": 2,
    },
}  # fmt: skip
SCENARIOS = ("control_plane", "handler_bound", "artifacts", "big_artifact", "idle", "pickup")


# --- processes ---------------------------------------------------------------------------


def _taskset(cpu: int) -> list[str]:
    """Pin to `cpu` when the machine has `taskset` and more than one CPU."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu)]
    return []


def _cpu_s(pid: int) -> float:
    """CPU seconds of the process, its threads and its waited-for children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int) -> float | None:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


@dataclass
class System:
    """How to start one system for one scenario: its command line and environment."""

    name: str
    concurrency: int
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Running:
    """A started system: its process (CPU time and peak RSS read from /proc) and log."""

    process: anyio.abc.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_s(self) -> float:
        return _cpu_s(self.pid)

    def peak_rss_mib(self) -> float | None:
        return _peak_rss_mib(self.pid)


class Bench:
    """The run's emulator, temp dir and settings; builds each system's command."""

    def __init__(
        self,
        emulator: EmulatorProcess,
        tmp: Path,
        params: dict[str, Any],
        profile_dir: Path | None = None,
    ) -> None:
        self.emulator = emulator
        self.admin = emulator.admin
        self.tmp = tmp
        self.params = params
        self.profile_dir = profile_dir

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """No AWS profile or config file, the worker identity, benchmarks/ importable."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CPWORKER_"))}
        python_path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
        env.update(
            WORKER_IDENTITY,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=str(self.tmp / "no-such-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.tmp / "no-such-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
            PYTHONPATH=python_path,
        )
        return env | (extra or {})

    def cpworker(self, action: dict[str, str], handler: str, slots: int, **opts: Any) -> System:
        """`cpworker run` with one action type: `slots` jobs at once, 4 poll loops."""
        options = "".join(f"{k} = {json.dumps(v)}\n" for k, v in opts.items())
        config = self.tmp / f"cpworker-{action['provider']}.toml"
        config.write_text(
            f"""
codepipeline_endpoint_url = {json.dumps(self.emulator.codepipeline)}
s3_endpoint_url = {json.dumps(self.emulator.s3)}
log_level = "WARNING"
log_format = "text"
work_dir = {json.dumps(str(self.tmp / "work"))}
max_concurrency = {slots}
shutdown_grace_s = 5
[action_types.bench]
category = {json.dumps(action["category"])}
provider = {json.dumps(action["provider"])}
handler = {json.dumps(handler)}
slots = {slots}
poll_loops = 4
max_batch_size = 10
[action_types.bench.handler_options]
{options}""",
            encoding="utf-8",
        )
        command = [sys.executable, "-m", "cpworker", "run", "-c", str(config)]
        return System("cpworker", slots, command, self.env())

    def baseline(self, name: str, action: dict[str, str], handler: str, *args: str) -> System:
        """A baseline of `benchmarks/baselines/` (`aws_s3_cp`: the sequential loop with
        the `artifacts-cli` handler)."""
        script = "boto3_threads" if name == "boto3_threads" else "boto3_sequential"
        command = [
            sys.executable, str(HERE / "baselines" / f"{script}.py"),
            "--endpoint-url", self.emulator.codepipeline,
            "--s3-endpoint-url", self.emulator.s3,
            "--category", action["category"], "--provider", action["provider"],
            "--version", action["version"], "--handler", handler, *args,
        ]  # fmt: skip
        return System(name, 32 if name == "boto3_threads" else 1, command, self.env())

    @asynccontextmanager
    async def started(self, system: System, label: str) -> AsyncIterator[Running]:
        """The system's process, pinned to CPU 1, stopped with SIGTERM at the end."""
        log = self.tmp / f"{label}-{system.name}.log"
        with log.open("wb") as out:
            process = await anyio.open_process(
                [*_taskset(1), *system.command], stdout=out, stderr=out, env=system.env
            )
        running = Running(process, log)
        try:
            yield running
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with anyio.move_on_after(30):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()

    @asynccontextmanager
    async def profiled(self, running: Running, system: System, label: str) -> AsyncIterator[None]:
        """With `--profile DIR`: py-spy samples cpworker (attached, 200 Hz) while the block
        runs, into `DIR/<label>.txt` (collapsed stacks), summarized by `hot_spots`."""
        if self.profile_dir is None or system.name != "cpworker":
            yield
            return
        out = self.profile_dir / f"{label}.txt"
        command = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                   str(running.pid), "--rate", "200", "--format", "raw", "--output", str(out),
                   "--nonblocking"]  # fmt: skip
        with (self.tmp / f"{label}-py-spy.log").open("wb") as log:
            spy = await anyio.open_process(command, stdout=log, stderr=log)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
                with anyio.move_on_after(30):
                    await spy.wait()
                await spy.aclose()

    async def register(self, action: dict[str, str]) -> None:
        """Register the action type (0 to 5 artifacts each way), so that polls for it are
        answered before any job of it exists."""

        def create() -> None:
            client = boto3.client(
                "codepipeline",
                endpoint_url=self.emulator.codepipeline,
                region_name="us-east-1",
                aws_access_key_id=WORKER_IDENTITY["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=WORKER_IDENTITY["AWS_SECRET_ACCESS_KEY"],
            )
            artifacts: ArtifactDetailsTypeDef = {"minimumCount": 0, "maximumCount": 5}
            client.create_custom_action_type(
                category=action["category"],  # type: ignore[arg-type]
                provider=action["provider"],
                version=action["version"],
                inputArtifactDetails=artifacts,
                outputArtifactDetails=artifacts,
            )
            client.close()

        await anyio.to_thread.run_sync(create)

    async def polls(self) -> int:
        return int(sum((await self.admin.stats())["requests"].get("PollForJobs", {}).values()))

    async def calls(self) -> tuple[int, int]:
        """Every CodePipeline call so far, and how many of them were polls that found no job."""
        stats = await self.admin.stats()
        calls = sum(sum(outcomes.values()) for outcomes in stats["requests"].values())
        return int(calls), int(sum(stats["emptyPolls"].values()))

    async def wait_polling(self, running: Running, before: int) -> None:
        """Until the system has polled at least once (it is up), or fail with its log."""
        with anyio.fail_after(120):
            while await self.polls() <= before:
                if running.process.returncode is not None:
                    raise RuntimeError(f"{running.log.name} exited: {_tail(running.log)}")
                await anyio.sleep(0.05)

    async def run_jobs(
        self, system: System, scenario: str, spec: dict[str, Any], count: int, *,
        arrival_s: float = 0.0, timeout_s: float = 900.0,
    ) -> dict[str, Any]:  # fmt: skip
        """Start the system, create `count` jobs (all at once, or one per `arrival_s`),
        wait for their results; the system's metrics for the scenario's row."""
        await self.register(spec["actionTypeId"])
        before = await self.polls()
        async with self.started(system, scenario) as running:
            await self.wait_polling(running, before)
            async with self.profiled(running, system, scenario):  # imports left out
                cpu, calls, started = running.cpu_s(), await self.calls(), time.time()
                emulator_cpu = _cpu_s(self.emulator.process.pid)
                finished_before = await self.finished()
                ids: list[str] = []
                if arrival_s:
                    for _ in range(count):
                        ids += (await self.admin.create_jobs({**spec, "count": 1}))["jobIds"]
                        await anyio.sleep(arrival_s)  # the arrival process, not a wait on state
                else:
                    ids = (await self.admin.create_jobs({**spec, "count": count}))["jobIds"]
                provider = spec["actionTypeId"]["provider"]
                statuses = await self.wait_done(ids, provider, timeout_s, finished_before)
                cpu = running.cpu_s() - cpu
                calls_now = await self.calls()
                calls = (calls_now[0] - calls[0], calls_now[1] - calls[1])
                rss = running.peak_rss_mib()
                wall = time.time() - started
                emulator_cpu = _cpu_s(self.emulator.process.pid) - emulator_cpu
        histories = await self.histories(ids)
        # Is the emulator (one core) what bounds the run? Near 100 %, it is.
        busy = {"emulator_cpu_percent": 100 * emulator_cpu / wall, "count": count}
        return _job_metrics(histories, statuses, cpu, calls, rss, wall) | busy

    async def wait_done(
        self, ids: list[str], provider: str, timeout_s: float, finished_before: int
    ) -> dict[str, str]:
        """Every job's status once none is waiting or running (or at the deadline).

        `finished_before`: `finished()` before the jobs were created.
        While the jobs run, only the emulator's status counts are read (a few bytes): listing
        thousands of jobs ten times a second would take the emulator's CPU from the system
        being measured.
        """
        wanted = set(ids)
        statuses: dict[str, str] = {}
        with anyio.move_on_after(timeout_s):
            while True:
                if await self.finished() - finished_before >= len(ids):
                    jobs = await self.admin.jobs(provider=provider)
                    statuses = {j["id"]: j["status"] for j in jobs if j["id"] in wanted}
                    if all(s in FINAL for s in statuses.values()):
                        return statuses
                await anyio.sleep(0.1)
        jobs = await self.admin.jobs(provider=provider)
        return {j["id"]: j["status"] for j in jobs if j["id"] in wanted}

    async def finished(self) -> int:
        """How many jobs of the whole run have a final status."""
        counts = (await self.admin.stats())["jobs"]
        return int(sum(counts.get(status, 0) for status in FINAL))

    async def histories(self, ids: list[str]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        limiter = anyio.CapacityLimiter(16)

        async def one(job_id: str) -> None:
            async with limiter:
                found.append(await self.admin.job(job_id))

        async with anyio.create_task_group() as tg:
            for job_id in ids:
                tg.start_soon(one, job_id)
        return found


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _job_metrics(
    histories: list[dict[str, Any]],
    statuses: dict[str, str],
    cpu_s: float,
    calls: tuple[int, int],
    rss: float | None,
    wall: float,
) -> dict[str, Any]:
    """jobs/s, job time quantiles (creation → accepted result), pickup quantiles, calls."""
    created, finished, times, pickups = [], [], [], []
    for history in histories:
        events = history["events"]
        start = events[0]["time"]
        created.append(start)
        acks = [e["time"] for e in events if e["event"] == "acknowledge"]
        if acks:
            pickups.append(acks[0] - start)
        done = [e["time"] for e in events if e["event"] == "result" and e["outcome"] == "accepted"]
        if done:
            finished.append(done[0])
            times.append(done[0] - start)
    count = len(histories)
    succeeded = sum(1 for s in statuses.values() if s == "Succeeded")
    failed = sum(1 for s in statuses.values() if s in ("Failed", "TimedOut"))
    window = (max(finished) - min(created)) if finished else None
    return {
        "jobs_per_s": len(finished) / window if window else None,
        "p50_s": _quantile(times, 0.50),
        "p95_s": _quantile(times, 0.95),
        "p99_s": _quantile(times, 0.99),
        "pickup_p50_s": _quantile(pickups, 0.50),
        "pickup_p99_s": _quantile(pickups, 0.99),
        "api_calls_per_job": calls[0] / count if count else None,
        "api_calls_per_job_saturated": (calls[0] - calls[1]) / count if count else None,
        "cpu_ms_per_job": cpu_s * 1000 / count if count else None,
        "peak_rss_mib": rss,
        "mib_per_s": None,
        "failed": failed,
        "lost": count - succeeded - failed,
        "window_s": window,
        "measured_s": wall,
    }


# --- scenarios ---------------------------------------------------------------------------


def _action(scenario: str, system: str) -> dict[str, str]:
    provider = f"{scenario}-{system}".replace("_", "-")[:35]
    return {"category": "Build", "owner": "Custom", "provider": provider, "version": "1"}


async def control_plane(bench: Bench, latency_ms: int) -> dict[str, Any]:
    p = bench.params
    name = f"control_plane_{latency_ms}ms"
    await bench.admin.set_faults({"global": {"latency_s": latency_ms / 1000}})
    systems: dict[str, Any] = {}
    try:
        counts = {
            "cpworker": p["cp_jobs"],
            "boto3_sequential": p["cp_seq_jobs"][latency_ms],
            "boto3_threads": p["cp_jobs"],
        }
        for system_name, count in counts.items():
            action = _action(name, system_name)
            if system_name == "cpworker":
                system = bench.cpworker(action, "echo", 200)
            else:
                system = bench.baseline(system_name, action, "noop")
            spec = {"actionTypeId": action, "shareCredentials": True}
            systems[system_name] = await bench.run_jobs(system, name, spec, count)
    finally:
        await bench.admin.set_faults({"global": {"latency_s": 0.0}})
    return {"params": {"latency_ms": latency_ms, "jobs": counts}, "systems": systems}


async def handler_bound(bench: Bench) -> dict[str, Any]:
    p = bench.params
    sleep_s = p["hb_sleep_s"]
    systems: dict[str, Any] = {}
    counts = {
        "cpworker": p["hb_jobs"],
        "boto3_sequential": p["hb_seq_jobs"],
        "boto3_threads": p["hb_threads_jobs"],
    }
    for system_name, count in counts.items():
        action = _action("handler_bound", system_name)
        if system_name == "cpworker":
            system = bench.cpworker(action, "sleep", p["hb_concurrency"], seconds=sleep_s)
        else:
            system = bench.baseline(system_name, action, "sleep", "--sleep-s", str(sleep_s))
        spec = {"actionTypeId": action, "shareCredentials": True}
        row = await bench.run_jobs(system, "handler_bound", spec, count)
        ideal = system.concurrency / sleep_s
        row["efficiency"] = row["jobs_per_s"] / ideal if row["jobs_per_s"] else None
        systems[system_name] = row
    params = {"sleep_s": sleep_s, "concurrency": p["hb_concurrency"], "jobs": counts}
    return {"params": params, "systems": systems}


def build_input_zip(size_mib: int) -> bytes:
    """A zip (stored) of one file of `size_mib` MiB of incompressible bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("payload.bin", os.urandom(size_mib * MIB))
    return buffer.getvalue()


async def artifact_scenario(
    bench: Bench, name: str, size_mib: int, counts: dict[str, int]
) -> dict[str, Any]:
    """Jobs with one input zip of `size_mib` MiB that each system downloads, unpacks,
    packs again and uploads as the output."""
    key = f"bench/{name}-{uuid.uuid4().hex[:8]}.zip"
    body = await anyio.to_thread.run_sync(build_input_zip, size_mib)
    await bench.admin.put_object(key, body)
    del body
    systems: dict[str, Any] = {}
    for system_name, count in counts.items():
        action = _action(name, system_name)
        if system_name == "cpworker":
            system = bench.cpworker(action, "bench_handlers:copy_input", 8)
        elif system_name == "aws_s3_cp":
            system = bench.baseline("aws_s3_cp", action, "artifacts-cli")
        else:
            system = bench.baseline(system_name, action, "artifacts")
        spec = {
            "actionTypeId": action,
            "inputArtifacts": [{"name": "In", "objectKey": key}],
            "outputArtifacts": ["Out"],
            "shareCredentials": True,
        }
        row = await bench.run_jobs(system, name, spec, count, timeout_s=1800)
        moved = 2 * size_mib * (count - row["lost"])  # in and out, about the same size
        row["mib_per_s"] = moved / row["window_s"] if row["window_s"] else None
        systems[system_name] = row
    return {"params": {"input_mib": size_mib, "jobs": counts}, "systems": systems}


async def idle(bench: Bench) -> dict[str, Any]:
    """No jobs: each system alone, polls per second and CPU %."""
    p = bench.params
    systems: dict[str, Any] = {}
    for system_name in ("cpworker", "boto3_sequential", "boto3_threads"):
        action = _action("idle", system_name)
        if system_name == "cpworker":
            system = bench.cpworker(action, "echo", 10)
            seconds = p["idle_s"]
        else:
            system = bench.baseline(system_name, action, "noop")
            seconds = p["idle_baseline_s"]
        await bench.register(action)
        before = await bench.polls()
        async with bench.started(system, "idle") as running:
            await bench.wait_polling(running, before)
            cpu, polls, started = running.cpu_s(), await bench.polls(), time.monotonic()
            await anyio.sleep(seconds)  # the idle window being measured
            elapsed = time.monotonic() - started
            cpu, polls = running.cpu_s() - cpu, await bench.polls() - polls
            rss = running.peak_rss_mib()
        row: dict[str, Any] = dict.fromkeys(METRICS)
        row |= {"peak_rss_mib": rss, "failed": 0, "lost": 0, "seconds": elapsed}
        row |= {"polls_per_s": polls / elapsed, "cpu_percent": 100 * cpu / elapsed}
        systems[system_name] = row
    params = {"cpworker_s": p["idle_s"], "baseline_s": p["idle_baseline_s"]}
    return {"params": params, "systems": systems}


async def pickup(bench: Bench) -> dict[str, Any]:
    """One job a second: creation → first acknowledgement."""
    count = bench.params["pickup_jobs"]
    systems: dict[str, Any] = {}
    for system_name in ("cpworker", "boto3_sequential", "boto3_threads"):
        action = _action("pickup", system_name)
        if system_name == "cpworker":
            system = bench.cpworker(action, "echo", 10)
        else:
            system = bench.baseline(system_name, action, "noop")
        spec = {"actionTypeId": action, "shareCredentials": True}
        systems[system_name] = await bench.run_jobs(system, "pickup", spec, count, arrival_s=1.0)
    params = {"jobs": count, "arrival_s": 1.0, "backoff_ceiling_s": BACKOFF_CEILING_S}
    return {"params": params, "systems": systems}


def hot_spots(path: Path, top: int = 10) -> dict[str, list[tuple[str, float]]]:
    """A py-spy raw profile's share of samples by the function running (`self`) and by the
    package its file belongs to (`package`: botocore, aiohttp, asyncio, cpworker, ...)."""
    own: dict[str, int] = {}
    packages: dict[str, int] = {}
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        function, _, where = stack.rsplit(";", 1)[-1].partition(" (")
        file = where.rsplit(":", 1)[0]
        samples += count
        name = f"{function} ({file.rsplit('/', 1)[-1]})"
        own[name] = own.get(name, 0) + count
        package = _package(file)
        packages[package] = packages.get(package, 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, count / samples) for name, count in best]

    return {"self": ranked(own), "package": ranked(packages)} if samples else {}


def _package(file: str) -> str:
    """The package of a py-spy frame's file: `botocore/auth.py` → botocore, `uuid.py` →
    stdlib uuid (py-spy shortens paths to their import path)."""
    parts = [p for p in file.split("/") if p]
    for marker in ("site-packages", "dist-packages"):
        if marker in parts[:-1]:
            return parts[parts.index(marker) + 1]
    if len(parts) == 1:
        return f"stdlib {parts[0].removesuffix('.py')}"
    return parts[0] if parts else "?"


async def run_all(
    params: dict[str, Any], only: set[str], profile_dir: Path | None = None
) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cpworker-bench-") as name:
        tmp = Path(name)
        (tmp / "work").mkdir()
        pinned = _taskset(0)
        async with EmulatorProcess.start(wrapper=pinned) as emulator:
            bench = Bench(emulator, tmp, params, profile_dir)
            if "control_plane" in only:
                for latency in params["latencies_ms"]:
                    scenarios[f"control_plane_{latency}ms"] = await control_plane(bench, latency)
                    _progress(scenarios)
            if "handler_bound" in only:
                scenarios["handler_bound"] = await handler_bound(bench)
                _progress(scenarios)
            if "artifacts" in only:
                counts = {
                    "cpworker": params["art_jobs"],
                    "boto3_sequential": params["art_seq_jobs"],
                    "boto3_threads": params["art_jobs"],
                    "aws_s3_cp": params["art_cli_jobs"],
                }
                scenarios["artifacts"] = await artifact_scenario(
                    bench, "artifacts", params["art_mib"], counts
                )
                _progress(scenarios)
            if "big_artifact" in only:
                counts = {"cpworker": 1, "aws_s3_cp": 1}
                scenarios["big_artifact"] = await artifact_scenario(
                    bench, "big_artifact", params["big_mib"], counts
                )
                _progress(scenarios)
            if "idle" in only:
                scenarios["idle"] = await idle(bench)
                _progress(scenarios)
            if "pickup" in only:
                scenarios["pickup"] = await pickup(bench)
                _progress(scenarios)
    return scenarios


def _progress(scenarios: dict[str, Any]) -> None:
    name, scenario = list(scenarios.items())[-1]
    print(f"{name}: done", file=sys.stderr, flush=True)
    for line in _scenario_lines(name, scenario):
        print(line, file=sys.stderr, flush=True)


# --- report ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine and the versions that shape the figures."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions: dict[str, str | None] = {}
    for package in ("aiobotocore", "botocore", "boto3", "aiohttp", "msgspec", "moto", "awscli"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(HERE), "status", "--porcelain", "--", "../cpworker"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "commit": commit or None,
        "cpworker_changed": bool(dirty),
        "pinned": bool(_taskset(0)),
    }


def goals(scenarios: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, from this run's rows (None where the scenario did not run)."""

    def row(scenario: str, system: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = scenarios.get(scenario, {}).get("systems", {}).get(system)
        return found

    found: dict[str, Any] = {}
    cp, seq, threads = (row("control_plane_20ms", s) for s in ("cpworker", "boto3_sequential",
                                                              "boto3_threads"))  # fmt: skip
    if cp and seq and threads and cp["jobs_per_s"] and seq["jobs_per_s"] and threads["jobs_per_s"]:
        found["x_boto3_sequential"] = cp["jobs_per_s"] / seq["jobs_per_s"]
        found["x_boto3_threads"] = cp["jobs_per_s"] / threads["jobs_per_s"]
        found["cpu_share_of_threads"] = cp["cpu_ms_per_job"] / threads["cpu_ms_per_job"]
        found["api_calls_per_job_saturated"] = cp["api_calls_per_job_saturated"]
    if hb := row("handler_bound", "cpworker"):
        found["handler_bound_efficiency"] = hb.get("efficiency")
    if idle_row := row("idle", "cpworker"):
        found["idle_polls_per_s"] = idle_row["polls_per_s"]
        found["idle_cpu_percent"] = idle_row["cpu_percent"]
    if pick := row("pickup", "cpworker"):
        found["pickup_p99_s"] = pick["pickup_p99_s"]
    if big := row("big_artifact", "cpworker"):
        found["big_artifact_peak_rss_mib"] = big["peak_rss_mib"]
    targets = {
        "x_boto3_sequential": (">=", 40.0), "x_boto3_threads": (">=", 3.0),
        "cpu_share_of_threads": ("<=", 1 / 3), "api_calls_per_job_saturated": ("<=", 2.1),
        "handler_bound_efficiency": (">=", 0.9), "idle_polls_per_s": ("<=", 1.0),
        "idle_cpu_percent": ("<=", 1.0), "pickup_p99_s": ("<=", BACKOFF_CEILING_S + 0.1),
        "big_artifact_peak_rss_mib": ("<=", 150.0),
    }  # fmt: skip
    result: dict[str, Any] = {}
    for key, value in found.items():
        op, target = targets[key]
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        result[key] = {"value": value, "goal": f"{op} {target:g}", "met": met}
    return result


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 10_000 else f"{value:.0f}"
    return str(value)


def _scenario_lines(name: str, scenario: dict[str, Any]) -> Iterator[str]:
    yield f"{name}  {json.dumps(scenario['params'])}"
    head = ("system", "jobs/s", "p50 s", "p95 s", "p99 s", "calls/job", "CPU ms/job",
            "RSS MiB", "MiB/s", "failed", "lost", "extra")  # fmt: skip
    yield "  " + "".join(f"{h:>11}" if i else f"{h:<18}" for i, h in enumerate(head))
    for system, r in scenario["systems"].items():
        extra = {k: r[k] for k in EXTRA if r.get(k) is not None}
        cells = [
            _fmt(r["jobs_per_s"]), _fmt(r["p50_s"], 3), _fmt(r["p95_s"], 3), _fmt(r["p99_s"], 3),
            _fmt(r["api_calls_per_job"], 2), _fmt(r["cpu_ms_per_job"], 2),
            _fmt(r["peak_rss_mib"], 0), _fmt(r["mib_per_s"]), _fmt(r["failed"]), _fmt(r["lost"]),
        ]  # fmt: skip
        notes = " ".join(f"{k}={v:.3g}" for k, v in extra.items())
        yield f"  {system:<18}" + "".join(f"{c:>11}" for c in cells) + f"  {notes}"


def report(result: dict[str, Any]) -> Iterator[str]:
    m = result["machine"]
    yield (
        f"cpworker benchmarks ({result['mode']}): {m['cpus']} CPUs {m['cpu_model']}, Python "
        f"{m['python']}, commit {m['commit']}{' (changed)' if m['cpworker_changed'] else ''}"
    )
    for name, scenario in result["scenarios"].items():
        yield from _scenario_lines(name, scenario)
    for key, goal in result["goals"].items():
        state = {True: "met", False: "MISSED", None: "-"}[goal["met"]]
        yield f"goal {key} {goal['goal']}: {_fmt(goal['value'], 3)} {state}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer jobs (about 2 minutes)")
    mode.add_argument("--smoke", action="store_true", help="a few jobs each: the harness works")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file ({RESULTS})")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    parser.add_argument(
        "--profile",
        type=Path,
        help="profile cpworker with py-spy in every job scenario into this folder (its "
        "figures then include py-spy's sampling cost); prints the hot spots",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    if unknown := only - set(SCENARIOS):
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    name = "quick" if args.quick else "smoke" if args.smoke else "full"
    started = time.monotonic()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    scenarios = anyio.run(run_all, MODES[name], only, args.profile)
    result = {
        "machine": machine(),
        "mode": name,
        "params": json.loads(json.dumps(MODES[name])),  # tuples → lists, int keys → text
        "seconds": time.monotonic() - started,
        "scenarios": scenarios,
        "goals": goals(scenarios),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    sys.path.insert(0, str(HERE.parent))  # `benchmarks.plots` as mypy sees it
    from benchmarks.plots import write_plots  # matplotlib loads only here

    pictures = write_plots(result, args.out)
    for line in report(result):
        print(line)
    print(f"written: {args.out} {' '.join(str(p) for p in pictures)} in {result['seconds']:.0f} s")
    for profile in sorted(args.profile.glob("*.txt")) if args.profile else []:
        print(f"profile {profile}:")
        for kind, ranked in hot_spots(profile).items():
            for function, share in ranked:
                print(f"  {kind:<5} {share:6.1%}  {function}")
    lost = sum(r["lost"] or 0 for s in scenarios.values() for r in s["systems"].values())
    failed = sum(r["failed"] or 0 for s in scenarios.values() for r in s["systems"].values())
    if lost or failed:
        print(f"{failed} jobs failed and {lost} were lost", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
