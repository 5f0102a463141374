"""`cpworker local`: the local demo — the real worker against the emulator, end to end.

Starts the emulator (CodePipeline job API + moto's S3) as a child process, registers the
demo action type `Build/Custom/CpworkerLocal/1`, creates `--jobs` demo jobs with a small
input artifact (about 3% fail on purpose, about 3% continue once), and runs the real
`Worker` with the built-in `shell` handler until every job is final, under a live
progress line (done / failed / in flight / jobs/s). Then it prints a summary built from
the emulator's own records: outcomes, p50/p95/p99 job time, jobs/s and API calls per job,
and a check that every job is final with exactly one accepted result and that the
failures are exactly the `Mode=fail` jobs (exit 0; otherwise the problems and exit 1).
Ctrl-C stops the worker gracefully, then the emulator, and exits 130.

`summarize()` and `render()` are pure: job histories and request counts in, a `Summary`
and its text out.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import anyio
import msgspec
from aiobotocore.session import AioSession

from cpworker import models as m
from cpworker.config import WorkerConfig, parse_config
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.emulator.client import AdminClient, EmulatorError, EmulatorProcess
from cpworker.errors import first_exception
from cpworker.logs import configure_logging
from cpworker.worker import Worker

__all__ = ["ACTION", "Summary", "main", "plan_modes", "render", "run_local", "summarize"]

ACTION: Final = m.ActionTypeId(
    category="Build", owner="Custom", provider="CpworkerLocal", version="1"
)
PROJECT: Final = "demo"
FINAL: Final = frozenset({"Succeeded", "Failed", "TimedOut"})
# One job in MODE_PERIOD fails on purpose and one continues once (about 3% each).
MODE_PERIOD: Final = 32
BATCH: Final = 64  # jobs per admin call (the modes of a batch are created together)
HISTORY_FETCHES: Final = 20  # concurrent GET /_emulator/jobs/{id} for the summary
INTERRUPTED: Final = 130

SOURCE_FILES: Final = {
    "build.sh": 'set -- src/*.py src/lib/*.py\necho "compiled $# source files"\n',
    "src/app.py": "print('hello from cpworker local')\n",
    "src/lib/util.py": "def add(a, b):\n    return a + b\n",
}
# The `shell` handler's command: job configuration values come in as environment variables.
SCRIPT: Final = """\
set -eu
case "$CPWORKER_CONFIG_MODE" in
fail)
    echo "demo failure: project $CPWORKER_CONFIG_PROJECTNAME has Mode=fail" >&2
    exit 1 ;;
continue)
    if [ -z "${CPWORKER_CONTINUATION_TOKEN:-}" ]; then
        echo '{"continuation_token": "step-2", "percent_complete": 50}' > "$CPWORKER_RESULT_FILE"
        echo "step 1 of 2 done, continuing"
        exit 0
    fi ;;
esac
cp -R "$CPWORKER_INPUT_SOURCECODE/." "$CPWORKER_OUTPUT_BUILDOUTPUT/"
cd "$CPWORKER_OUTPUT_BUILDOUTPUT"
. ./build.sh > build.log
read -r line < build.log
echo "built $CPWORKER_CONFIG_PROJECTNAME: $line"
"""


def plan_modes(jobs: int) -> list[str]:
    """The `Mode` of each demo job: `fail` and `continue` once in every MODE_PERIOD jobs."""
    modes = []
    for i in range(jobs):
        slot = i % MODE_PERIOD
        modes.append("fail" if slot == 3 else "continue" if slot == 10 else "build")
    return modes


# --- the summary (pure) -------------------------------------------------------------------


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """What a run did, from the emulator's records."""

    jobs: int  # every job, continuation jobs included
    outcomes: dict[str, int]  # accepted results by kind: succeeded / failed / continued
    job_time_s: dict[str, float]  # p50/p95/p99, job created → its accepted result
    run_time_s: dict[str, float]  # p50/p95/p99, acknowledged → accepted result
    elapsed_s: float  # worker start → the last accepted result
    requests: dict[str, int]  # API requests by operation during the run
    delayed_requests: int = 0  # of those, how many the emulator added latency to
    failure_sample: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def api_calls_per_job(self) -> float:
        return sum(self.requests.values()) / self.jobs if self.jobs else 0.0


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile `p` (0-100] of `values`; 0.0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    return {f"p{p}": percentile(values, p) for p in (50, 95, 99)}


def result_kind(result: Mapping[str, Any]) -> str:
    """succeeded / failed / continued, for one result event of a job's history."""
    if "Failure" in result["operation"]:
        return "failed"
    return "continued" if result["payload"].get("continuationToken") else "succeeded"


def expected_kind(history: Mapping[str, Any]) -> str:
    """What the demo script does with this job: its `Mode`, and the token for `continue`."""
    mode = history["configuration"].get("Mode")
    if mode == "fail":
        return "failed"
    if mode == "continue" and not history.get("continuationToken"):
        return "continued"
    return "succeeded"


def _job_problems(history: Mapping[str, Any], known: set[str]) -> list[str]:
    accepted = _accepted(history)
    job = f"job {history['id']} (Mode={history['configuration'].get('Mode')})"
    if history["status"] not in FINAL or len(accepted) != 1:
        return [f"{job}: {history['status']} with {len(accepted)} accepted results, expected 1"]
    problems = []
    kind, expected = result_kind(accepted[0]), expected_kind(history)
    if kind != expected:
        problems.append(f"{job}: {kind}, expected {expected}")
    if kind == "continued" and history.get("nextJobId") not in known:
        problems.append(f"{job}: continued, but its continuation job is missing")
    return problems


def _accepted(history: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for r in history["results"] if r["outcome"] == "accepted"]


@dataclass
class _Tally:
    outcomes: Counter[str] = field(
        default_factory=lambda: Counter({"succeeded": 0, "failed": 0, "continued": 0})
    )
    job_times: list[float] = field(default_factory=list)
    run_times: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, history: Mapping[str, Any]) -> None:
        """Count a job with exactly one accepted result (the others are problems)."""
        accepted = _accepted(history)
        if len(accepted) != 1:
            return
        result, kind = accepted[0], result_kind(accepted[0])
        self.outcomes[kind] += 1
        self.ends.append(result["time"])
        self.job_times.append(result["time"] - history["events"][0]["time"])
        acks = [a for a in history["acknowledgements"] if a["outcome"] == "accepted"]
        if acks:
            self.run_times.append(result["time"] - acks[0]["time"])
        if kind == "failed":
            details = result["payload"].get("failureDetails") or {}
            self.failures.append(str(details.get("message", "")))


def summarize(
    histories: Sequence[Mapping[str, Any]],
    requests: Mapping[str, int],
    *,
    started_at: float,
    expected_jobs: int,
    delayed_requests: int = 0,
) -> Summary:
    """The run's `Summary` from the emulator's job histories and request counts.

    `started_at` is the wall-clock time the worker started; `expected_jobs` the number of
    jobs created (continuation jobs come on top); `delayed_requests` how many requests
    the emulator added latency to.
    """
    known = {h["id"] for h in histories}
    problems = [p for h in histories for p in _job_problems(h, known)]
    originals = sum(1 for h in histories if not h.get("previousJobId"))
    if originals != expected_jobs:
        problems.insert(0, f"the emulator holds {originals} demo jobs; {expected_jobs} were made")
    tally = _Tally()
    for history in histories:
        tally.add(history)
    return Summary(
        jobs=len(histories),
        outcomes=dict(tally.outcomes),
        job_time_s=_percentiles(tally.job_times),
        run_time_s=_percentiles(tally.run_times),
        elapsed_s=max([started_at, *tally.ends]) - started_at,
        requests=dict(requests),
        delayed_requests=delayed_requests,
        failure_sample=tally.failures[0] if tally.failures else None,
        problems=tuple(problems),
    )


def _times(label: str, values: Mapping[str, float]) -> str:
    cells = "   ".join(f"{name} {value * 1000:7.1f} ms" for name, value in values.items())
    return f"  {label:<26}{cells}"


def render(summary: Summary) -> str:
    """The summary table as plain text."""
    o, n = summary.outcomes, summary.jobs
    lines = [
        f"cpworker local: {n} jobs of {'/'.join(m.to_builtins(ACTION).values())}",
        "  outcome                   jobs",
        *(f"  {kind:<26}{o.get(kind, 0):>4}" for kind in ("succeeded", "failed", "continued")),
        _times("job time (created→result)", summary.job_time_s),
        _times("run time (acked→result)", summary.run_time_s),
        f"  {'throughput':<26}{n} jobs in {summary.elapsed_s:.2f} s = "
        f"{summary.jobs_per_s:.1f} jobs/s",
        f"  {'API calls per job':<26}{summary.api_calls_per_job:.2f}",
        *(
            f"    {op:<24}{count / n if n else 0:.2f}  ({count} calls)"
            for op, count in sorted(summary.requests.items())
        ),
        f"  {'API latency added to':<26}{summary.delayed_requests} of "
        f"{sum(summary.requests.values())} calls",
    ]
    if summary.failure_sample is not None:
        lines.append(f"  {'a failure message':<26}{summary.failure_sample.strip()[:200]!r}")
    if summary.problems:
        lines.append(f"  CHECK FAILED: {len(summary.problems)} problems")
        lines += [f"    {p}" for p in summary.problems[:50]]
    else:
        lines.append(
            "  check: OK, every job is final with exactly one accepted result and the "
            f"failures are exactly the {o.get('failed', 0)} Mode=fail jobs"
        )
    return "\n".join(lines)


# --- progress ------------------------------------------------------------------------------


@dataclass
class Progress:
    """The live progress line: rewritten with `\\r` on a TTY, else at most once a second."""

    out: TextIO
    total: int
    started: float = field(default_factory=time.perf_counter)
    _last_print: float = -math.inf
    _width: int = 0

    def show(self, jobs: Mapping[str, int], *, final: bool = False) -> None:
        """Show the emulator's job counts by status (in flight: dispatched or in progress)."""
        done = sum(n for status, n in jobs.items() if status in FINAL)
        failed = jobs.get("Failed", 0) + jobs.get("TimedOut", 0)
        in_flight = jobs.get("Dispatched", 0) + jobs.get("InProgress", 0)
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        line = (
            f"done {done}/{self.total}  failed {failed}  in flight {in_flight}  {rate:.1f} jobs/s"
        )
        if self.out.isatty():
            self.out.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self._width = len(line)
        elif final or elapsed - self._last_print >= 1.0:
            self.out.write(line + "\n")
            self._last_print = elapsed
        self.out.flush()


# --- the run -------------------------------------------------------------------------------


def _session() -> AioSession:
    """The emulator accepts any SigV4 identity; the demo signs as a fixed demo one."""
    session = AioSession()
    session.set_credentials("AKIDCPWORKERLOCAL", "local-demo-secret-not-used-by-aws")
    return session


async def _register(codepipeline_url: str) -> None:
    property_ = m.ActionConfigurationProperty
    settings = ControlPlaneSettings(endpoint_url=codepipeline_url)
    async with ControlPlane.open(settings, _session()) as cp:
        await cp.create_custom_action_type(
            m.CreateCustomActionTypeInput(
                category=ACTION.category,
                provider=ACTION.provider,
                version=ACTION.version,
                configuration_properties=(
                    property_(
                        name="ProjectName", required=True, key=True, secret=False, queryable=True
                    ),
                    property_(name="Mode", required=True, key=False, secret=False),
                ),
                input_artifact_details=m.ArtifactDetails(minimum_count=1, maximum_count=1),
                output_artifact_details=m.ArtifactDetails(minimum_count=1, maximum_count=1),
            )
        )


async def _create_jobs(admin: AdminClient, modes: Sequence[str]) -> None:
    """Create the jobs in batches; each batch's modes are spread over the queue."""
    spec = {
        "actionTypeId": m.to_builtins(ACTION),
        "inputArtifacts": [{"name": "SourceCode", "files": SOURCE_FILES}],
        "outputArtifacts": ["BuildOutput"],
        "shareCredentials": True,  # one STS credential per call, not one per job
    }
    for start in range(0, len(modes), BATCH):
        for mode, count in Counter(modes[start : start + BATCH]).items():
            configuration = {"ProjectName": PROJECT, "Mode": mode}
            await admin.create_jobs({**spec, "count": count, "configuration": configuration})


def worker_config(emulator: EmulatorProcess, concurrency: int) -> WorkerConfig:
    """The demo worker: one action type run by the `shell` handler, at `concurrency`."""
    table = {
        **{k: v for k, v in m.to_builtins(ACTION).items() if k != "owner"},
        "handler": "shell",
        "handler_options": {"command": SCRIPT},
        "slots": concurrency,
        "max_batch_size": min(concurrency, 10),
        "query_param": {"ProjectName": PROJECT},
        # Continuation jobs come back after 0.2 s: keep idle polls frequent.
        "idle_backoff_floor_s": 0.05,
        "idle_backoff_ceiling_s": 0.5,
    }
    raw = {
        "codepipeline_endpoint_url": emulator.codepipeline,
        "s3_endpoint_url": emulator.s3,
        "max_concurrency": concurrency,
        "shutdown_grace_s": 5.0,
        "log_level": "WARNING",
        "log_format": "text",
        "bind": "127.0.0.1:0",
        "action_types": {"local": table},
    }
    return parse_config(raw, {})


def _request_counts(stats: Mapping[str, Any]) -> tuple[Counter[str], int]:
    """API requests by operation, and how many of them had latency added."""
    counts = Counter({op: sum(outcomes.values()) for op, outcomes in stats["requests"].items()})
    injected = stats["faultsInjected"].values()
    return counts, sum(faults.get("latency", 0) for faults in injected)


@dataclass
class _Run:
    worker: Worker
    admin: AdminClient
    progress: Progress
    interrupted: bool = False


async def _watch_progress(run: _Run) -> None:
    """Refresh the progress line; stop the worker once the emulator says all is final."""
    while True:
        try:
            jobs: dict[str, int] = (await run.admin.stats())["jobs"]
        except EmulatorError:
            if not run.interrupted:
                raise
            run.worker.stop()  # the emulator is gone: no result can be reported any more
            return
        run.progress.show(jobs)
        if jobs and all(status in FINAL for status in jobs):
            run.progress.show(jobs, final=True)
            run.worker.stop()
            return
        await anyio.sleep(0.25)


async def _watch_signals(run: _Run) -> None:
    """Ctrl-C / SIGTERM: stop the worker (graceful); a second one skips the grace."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            message = "\ninterrupted: stopping the worker (again to stop now)"
            if not run.interrupted:
                print(message, file=run.progress.out, flush=True)
            run.interrupted = True
            run.worker.stop()


async def _run_worker(run: _Run) -> None:
    """Run the worker until the progress task or a signal stops it."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, run)
            tg.start_soon(_watch_progress, run)
            try:
                await run.worker.run()
            finally:
                tg.cancel_scope.cancel()
    except ExceptionGroup as group:  # only plain exceptions: cancellation passes through
        raise first_exception(group) from None


async def _histories(admin: AdminClient) -> list[dict[str, Any]]:
    """Every demo job's history, fetched concurrently but at most HISTORY_FETCHES at once."""
    limiter = anyio.CapacityLimiter(HISTORY_FETCHES)
    histories: list[dict[str, Any]] = []

    async def fetch(job_id: str) -> None:
        async with limiter:
            histories.append(await admin.job(job_id))

    async with anyio.create_task_group() as tg:
        for entry in await admin.jobs(provider=ACTION.provider):
            tg.start_soon(fetch, entry["id"])
    return histories


async def _report_interrupted(run: _Run, emulator: EmulatorProcess) -> None:
    """Where the jobs were left, if the emulator still runs."""
    if emulator.process.returncode is None:
        with contextlib.suppress(EmulatorError):
            run.progress.show((await emulator.admin.stats())["jobs"], final=True)
    print("interrupted: the worker has stopped", file=run.progress.out, flush=True)


async def _prepare(emulator: EmulatorProcess, jobs: int, out: TextIO) -> list[str]:
    """Register the demo action type and create the jobs; returns their modes."""
    print(f"emulator: CodePipeline {emulator.codepipeline}, S3 {emulator.s3}", file=out)
    await _register(emulator.codepipeline)
    modes = plan_modes(jobs)
    await _create_jobs(emulator.admin, modes)
    latency_s = (await emulator.admin.faults())["global"]["latency_s"]
    print(
        f"{jobs} jobs ({modes.count('fail')} fail on purpose, {modes.count('continue')} "
        f"continue once); emulator latency {latency_s * 1000:g} ms per API call",
        file=out,
        flush=True,
    )
    return modes


async def _summary(
    admin: AdminClient, before: dict[str, Any], started_at: float, jobs: int
) -> Summary:
    """The summary of the run, counting only the API requests made since `before`."""
    counts, delayed = _request_counts(await admin.stats())
    counts_before, delayed_before = _request_counts(before)
    return summarize(
        await _histories(admin),
        counts - counts_before,
        started_at=started_at,
        expected_jobs=jobs,
        delayed_requests=delayed - delayed_before,
    )


async def run_local(
    jobs: int = 200, concurrency: int = 50, latency_ms: float = 0.0, out: TextIO | None = None
) -> int:
    """Run the demo; returns the exit code (0 all well, 1 a check failed, 130 interrupted)."""
    out = out or sys.stdout
    args = ["--continuation-delay-s", "0.2", "--latency-s", str(latency_ms / 1000)]
    async with EmulatorProcess.start(args) as emulator:
        modes = await _prepare(emulator, jobs, out)
        worker = Worker(worker_config(emulator, concurrency), session=_session())
        before = await emulator.admin.stats()
        started_at = time.time()
        run = _Run(worker, emulator.admin, Progress(out, jobs + modes.count("continue")))
        print(f"worker: shell handler, concurrency {concurrency}", file=out, flush=True)
        await _run_worker(run)
        if run.interrupted:
            await _report_interrupted(run, emulator)
            return INTERRUPTED
        summary = await _summary(emulator.admin, before, started_at, jobs)
    print(render(summary), file=out, flush=True)
    return 1 if summary.problems else 0


def main(jobs: int, concurrency: int, latency_ms: float) -> int:
    """`cpworker local`: the worker's warnings go to stderr as text, the rest to stdout."""
    configure_logging("WARNING", "text")
    return anyio.run(run_local, jobs, concurrency, latency_ms)
