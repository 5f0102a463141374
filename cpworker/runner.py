"""The job runner: acknowledge, run the handler, upload outputs, report exactly one result.

A lost acknowledgement race (`InvalidNonceException`: another worker won) is normal and
counted, never reported. A handler that raises, times out or returns a bad outcome
becomes a failed job with a clear, secret-free message. Result calls are retried on
throttling, 5xx and connection failures until `result_deadline_s`, and are sent in a
shielded scope so shutdown cannot interrupt them; a result CodePipeline refuses because
the job timed out or was taken (`InvalidJobState`, `JobNotFound`) is logged and counted.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio

from cpworker import models as m
from cpworker.artifacts import ArtifactSettings, DiskBudget, JobArtifacts
from cpworker.config import ActionTypeConfig, ConfigError, is_secret_key
from cpworker.context import ArtifactIO, JobContext, JobLogger, WorkDir
from cpworker.control_plane import ControlPlane
from cpworker.errors import (
    ArtifactError,
    CpWorkerError,
    InvalidJobStateError,
    InvalidNonceError,
    JobNotFoundError,
    ServiceError,
    TransportError,
    first_exception,
)
from cpworker.logs import redactor
from cpworker.metrics import WorkerMetrics
from cpworker.outcomes import Continue, Failed, Outcome, OutcomeError, Succeeded, check_outcome
from cpworker.reporters import CustomReporter, Reporter, ThirdPartyReporter
from cpworker.s3 import JobCredentials
from cpworker.slots import Reservation
from cpworker.transfers import Transfers

__all__ = ["BUILTIN_HANDLERS", "Handler", "JobRunner", "RunnerSettings", "load_handler"]

log = logging.getLogger("cpworker.runner")
T = TypeVar("T")
Handler = Callable[[JobContext], Awaitable[Outcome]]
CredentialsFetcher = Callable[[], Awaitable[m.ArtifactCredentials]]
BUILTIN_HANDLERS = {
    "shell": "cpworker.builtin:shell",
    "echo": "cpworker.builtin:echo",
    "sleep": "cpworker.builtin:sleep",
}
SHUTDOWN_MESSAGE = "worker shutting down"
# How long a job cancelled at shutdown may spend reporting its failure.
SHUTDOWN_REPORT_S = 10.0
# Answers that mean the job is no longer ours: it timed out, or another worker has it.
_GONE = (InvalidJobStateError, JobNotFoundError, InvalidNonceError)


def load_handler(spec: str, key: str = "handler") -> Handler:
    """Import `package.module:function` (or a built-in name); `ConfigError` if it fails."""
    target = BUILTIN_HANDLERS.get(spec, spec)
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"{key} = {spec!r}: not an import string; write 'package.module:function' "
            f"or one of {', '.join(BUILTIN_HANDLERS)}"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"{key} = {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
            "check the module is installed and on PYTHONPATH"
        ) from None
    handler = getattr(module, attr, None)
    if handler is None:
        raise ConfigError(f"{key} = {spec!r}: module {module_name!r} has no {attr!r}")
    if not inspect.iscoroutinefunction(handler):
        raise ConfigError(
            f"{key} = {spec!r}: {attr!r} is not an async function; "
            "define it as `async def handler(job: JobContext) -> Outcome`"
        )
    return handler  # type: ignore[no-any-return]


@dataclass(frozen=True, kw_only=True)
class RunnerSettings:
    """What every job of one worker shares."""

    transfers: Transfers
    result_deadline_s: float = 120.0
    work_root: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    artifacts: ArtifactSettings = field(default_factory=ArtifactSettings)
    disk: DiskBudget = field(default_factory=lambda: DiskBudget(0, Path(tempfile.gettempdir())))


class JobRunner:
    """Runs the jobs of one action type; one instance per `[action_types.<name>]` table."""

    def __init__(
        self,
        *,
        name: str,
        config: ActionTypeConfig,
        handler: Handler,
        cp: ControlPlane,
        settings: RunnerSettings,
        metrics: WorkerMetrics,
        secret_properties: frozenset[str] | None = frozenset(),
        client_tokens: Callable[[str], str | None] | None = None,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.config = config
        self.handler = handler
        self.cp = cp
        self.settings = settings
        self.metrics = metrics
        self.secret_properties = secret_properties
        self.client_tokens = client_tokens
        self.on_done = on_done
        self.running: dict[str, float] = {}  # job id → monotonic start, oldest first
        metrics.job_timeout.labels(name).set(config.handler_timeout_s)
        metrics.job_oldest_age.labels(name).set_function(self._oldest_age)

    def _oldest_age(self) -> float:
        """Seconds since the oldest running job was acknowledged (0 when none runs)."""
        oldest = next(iter(self.running.values()), None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    # --- the two flows -----------------------------------------------------------------

    async def run_custom(self, job: m.Job, slot: Reservation) -> None:
        """Acknowledge a polled custom job, run it, report it; always frees its slot."""
        try:
            ack = lambda: self.cp.acknowledge_job(job.id, job.nonce or "")  # noqa: E731
            await self._guarded(job.id, self._claim_and_run(job.id, ack, job.data, None))
        finally:
            self._finished(slot)

    async def run_third_party(self, job: m.ThirdPartyJob, slot: Reservation) -> None:
        """Resolve the client token, fetch details, acknowledge, run and report."""
        try:
            try:
                token = self.client_tokens(job.client_id or "") if self.client_tokens else None
            except CpWorkerError as exc:
                log.error("%s", exc, extra={"event": "no_client_token", "job_id": job.job_id})
                token = None
            if not token or not job.job_id:
                log.error(
                    "no client token for client id %s; add it to client_tokens_file",
                    job.client_id,
                    extra={"event": "no_client_token", "job_id": job.job_id},
                )
                self.metrics.completed(self.name, "abandoned", None)
                return
            redactor.add(token)
            try:
                await self._guarded(job.job_id, self._third_party(job.job_id, token))
            finally:
                redactor.discard(token)
        finally:
            self._finished(slot)

    async def _third_party(self, job_id: str, token: str) -> None:
        details = await self._retrying(
            "GetThirdPartyJobDetails", lambda: self.cp.get_third_party_job_details(job_id, token)
        )
        ack = lambda: self.cp.acknowledge_third_party_job(job_id, details.nonce or "", token)  # noqa: E731
        await self._claim_and_run(job_id, ack, details.data, token)

    async def _claim_and_run(
        self,
        job_id: str,
        ack: Callable[[], Awaitable[Any]],
        data: m.JobData,
        token: str | None,
    ) -> None:
        reporter: Reporter = (
            CustomReporter(self.cp, job_id)
            if token is None
            else ThirdPartyReporter(self.cp, job_id, token)
        )
        try:
            ours = await self._acknowledge(job_id, ack)
        except anyio.get_cancelled_exc_class():
            # Stopped while acknowledging: the acknowledgement may have landed, so report a
            # failure (harmless if it did not: CodePipeline answers InvalidJobState).
            failed = Failed(SHUTDOWN_MESSAGE, type="SystemUnavailable")
            await self._report(job_id, reporter, failed, time.monotonic(), None, shutdown=True)
            raise
        if ours:
            await self._execute(job_id, data, reporter, self._details_fetcher(job_id, token))

    async def _guarded(self, job_id: str, work: Awaitable[None]) -> None:
        """Before a job is ours, a failure leaves it to CodePipeline (it is re-dispatched)."""
        try:
            await work
        except _GONE as exc:
            self._lost(job_id, exc)
        except CpWorkerError as exc:
            self.metrics.completed(self.name, "abandoned", None)
            log.error(
                "job %s left unclaimed: %s",
                job_id,
                redactor(str(exc)),
                extra={
                    "event": "job_abandoned",
                    "job_id": job_id,
                    "action_type": self.name,
                    "error_type": type(exc).__name__,
                },
            )

    def _finished(self, slot: Reservation) -> None:
        slot.release()
        self.metrics.jobs_in_flight.labels(self.name).dec()
        self.on_done()

    # --- acknowledge -----------------------------------------------------------------

    async def _acknowledge(self, job_id: str, call: Callable[[], Awaitable[Any]]) -> bool:
        """True when the job is ours; a lost race is counted and logged, not reported."""
        try:
            await self._retrying("AcknowledgeJob", call)
        except _GONE as exc:
            self._lost(job_id, exc)
            return False
        self.metrics.jobs_acknowledged.labels(self.name).inc()
        return True

    def _lost(self, job_id: str, exc: ServiceError) -> None:
        self.metrics.completed(self.name, "lost_race", None)
        log.info(
            "job %s taken by another worker or gone (%s)",
            job_id,
            exc.code,
            extra={"event": "lost_race", "job_id": job_id, "action_type": self.name},
        )

    # --- run -------------------------------------------------------------------------

    async def _execute(
        self, job_id: str, data: m.JobData, reporter: Reporter, fetch: CredentialsFetcher
    ) -> None:
        started = self.running[job_id] = time.monotonic()
        secrets = self._secrets(data)
        redactor.add(*secrets)
        io = self._artifacts(data, fetch, secrets)
        job_log = JobLogger(logging.getLogger("cpworker.job"), _job_fields(job_id, self.name, data))
        work_dir = WorkDir(self.settings.work_root, job_id)
        io.temp_dir = work_dir.path
        try:
            try:
                outcome = await self._outcome(self._context(job_id, data, io, work_dir, job_log))
            except anyio.get_cancelled_exc_class():
                failed = Failed(SHUTDOWN_MESSAGE, type="SystemUnavailable")
                await self._report(job_id, reporter, failed, started, job_log, shutdown=True)
                raise
            except Exception as exc:  # the job is ours: whatever broke, it gets a result
                job_log.exception("cannot run the job", extra={"event": "job_error"})
                message = _describe(exc, "the worker could not run the job")
                outcome = Failed(message, type="JobFailed")
            await self._report(job_id, reporter, outcome, started, job_log)
        finally:  # after every outcome, cancellation included
            with anyio.CancelScope(shield=True):
                await io.aclose()
                if work_dir.made is not None:
                    await anyio.to_thread.run_sync(shutil.rmtree, work_dir.made, True)
            redactor.discard(*secrets)
            self.running.pop(job_id, None)

    def _details_fetcher(self, job_id: str, token: str | None) -> CredentialsFetcher:
        """Fresh artifact credentials from GetJobDetails (or GetThirdPartyJobDetails)."""

        async def fetch_data() -> m.JobData:
            if token is None:
                call = lambda: self.cp.get_job_details(job_id)  # noqa: E731
                return (await self._retrying("GetJobDetails", call)).data
            call3 = lambda: self.cp.get_third_party_job_details(job_id, token)  # noqa: E731
            return (await self._retrying("GetThirdPartyJobDetails", call3)).data

        async def fetch() -> m.ArtifactCredentials:
            try:
                data = await fetch_data()
                if data.artifact_credentials is None:
                    raise CpWorkerError("the job details came without artifact credentials")
            except CpWorkerError as exc:
                self.metrics.credential_renewal_failures.inc()
                log.warning(
                    "job %s: renewing artifact credentials failed: %s",
                    job_id,
                    redactor(str(exc)),
                    extra={"event": "credential_renewal_failed", "job_id": job_id},
                )
                raise
            return data.artifact_credentials

        return fetch

    def _artifacts(
        self, data: m.JobData, fetch: CredentialsFetcher, secrets: list[str]
    ) -> JobArtifacts:
        def renewed(reason: str, fresh: m.ArtifactCredentials) -> None:
            values = [fresh.access_key_id, fresh.secret_access_key, fresh.session_token]
            redactor.add(*values)
            secrets.extend(values)  # discarded with the job's other secrets
            self.metrics.credential_renewals.labels(reason).inc()

        initial = data.artifact_credentials
        credentials = (
            None
            if initial is None
            else JobCredentials(
                initial,
                fetch,
                refresh_s=self.settings.artifacts.credentials_refresh_s,
                on_renewal=renewed,
            )
        )
        s = self.settings
        return JobArtifacts(
            s.transfers, s.artifacts, s.disk, data, credentials, self.config.output_format
        )

    def _context(
        self, job_id: str, data: m.JobData, io: ArtifactIO, work_dir: WorkDir, job_log: JobLogger
    ) -> JobContext:
        return JobContext(
            job_id=job_id,
            data=data,
            io=io,
            work_dir=work_dir,
            options=self.config.handler_options,
            third_party=self.config.owner == "ThirdParty",
            log=job_log,
        )

    def _secrets(self, data: m.JobData) -> list[str]:
        values: list[str] = []
        if data.artifact_credentials is not None:
            c = data.artifact_credentials
            values += [c.access_key_id, c.secret_access_key, c.session_token]
        config = data.action_configuration.configuration if data.action_configuration else {}
        known = self.secret_properties
        # Unknown (ListActionTypes failed): every property whose name looks secret.
        values += [
            v for k, v in config.items() if (is_secret_key(k) if known is None else k in known)
        ]
        return values

    async def _outcome(self, context: JobContext) -> Outcome:
        """The handler's outcome, checked, with outputs uploaded; a failure if anything broke."""
        timeout = self.config.handler_timeout_s
        try:
            with anyio.move_on_after(timeout) as scope:
                returned = await self.handler(context)
            if scope.cancelled_caught:
                return Failed(
                    f"the handler did not finish within handler_timeout_s={timeout:g} s; "
                    "raise the timeout or return Continue(...) and check back later",
                    type="JobFailed",
                )
            outcome = check_outcome(returned, third_party=context.third_party)
            if isinstance(outcome, Succeeded):
                await _upload_outputs(context)
            return outcome
        except OutcomeError as exc:
            return Failed(f"the handler's outcome was refused: {exc}", type="JobFailed")
        except ArtifactError as exc:
            return Failed(redactor(str(exc))[:5000], type=exc.failure_type)  # type: ignore[arg-type]
        except Exception as exc:
            context.log.exception("handler raised", extra={"event": "handler_error"})
            return Failed(_describe(exc), type="JobFailed")

    # --- report ----------------------------------------------------------------------

    async def _report(
        self,
        job_id: str,
        reporter: Reporter,
        outcome: Outcome,
        started: float,
        job_log: logging.LoggerAdapter[logging.Logger] | None,
        *,
        shutdown: bool = False,
    ) -> None:
        """Send the one result, shielded; count what CodePipeline made of it.

        At shutdown the retries are bounded by `SHUTDOWN_REPORT_S`, not `result_deadline_s`.
        """
        label = _label(outcome)
        fields: dict[str, Any] = {"event": "job_done", "outcome": label, "job_id": job_id}
        if isinstance(outcome, Failed):
            fields["error_type"] = outcome.type
        retried: list[bool] = []
        bound = min(SHUTDOWN_REPORT_S, self.settings.result_deadline_s) if shutdown else None
        with anyio.CancelScope(shield=True), anyio.move_on_after(bound or math.inf) as scope:
            try:
                if isinstance(outcome, Failed):
                    call = lambda: reporter.failure(outcome)  # noqa: E731
                    await self._retrying("PutJobFailureResult", call, retried)
                else:
                    call = lambda: reporter.success(outcome)  # noqa: E731
                    await self._retrying("PutJobSuccessResult", call, retried)
            except InvalidJobStateError as exc:
                if retried or exc.retry_attempts:
                    # An earlier attempt most likely took effect and only its answer was lost.
                    fields["result"] = "probably accepted by an earlier attempt"
                else:
                    label = "rejected"
                    fields.update(outcome="rejected", error_type=exc.code)
            except Exception as exc:  # refused, retries exhausted, or a bad value to encode
                label = "rejected"
                fields.update(
                    outcome="rejected", error_type=getattr(exc, "code", type(exc).__name__)
                )
        if scope.cancelled_caught:
            label = "rejected"
            fields.update(outcome="rejected", error_type="ShutdownReportTimeout")
        duration = time.monotonic() - started
        self.metrics.completed(self.name, label, duration)
        fields["duration_s"] = round(duration, 4)
        level = logging.WARNING if label == "rejected" else logging.INFO
        detail = outcome.message if isinstance(outcome, Failed) else ""
        (job_log or log).log(level, "job %s %s %s", job_id, label, detail, extra=fields)

    async def _retrying(
        self, operation: str, call: Callable[[], Awaitable[T]], retried: list[bool] | None = None
    ) -> T:
        """`call()`, again after throttling, 5xx or connection failures, until the deadline.

        Each retry appends to `retried`, for the caller to know an attempt may have landed.
        """
        deadline = time.monotonic() + self.settings.result_deadline_s
        attempt = 0
        while True:
            try:
                return await call()
            except (ServiceError, TransportError) as exc:
                retryable = isinstance(exc, TransportError) or exc.retryable
                attempt += 1
                delay = random.uniform(0, min(5.0, 0.1 * 2**attempt))
                if not retryable or time.monotonic() + delay > deadline:
                    raise
            if retried is not None:
                retried.append(True)
            await anyio.sleep(delay)


def _label(outcome: Outcome) -> str:
    if isinstance(outcome, Failed):
        return "failed"
    return "continued" if isinstance(outcome, Continue) else "succeeded"


def _describe(exc: BaseException, what: str = "the handler raised") -> str:
    """A failure message from an exception: its type and text, secrets masked, bounded."""
    text = redactor(str(exc)).strip()
    message = f"{what} {type(exc).__name__}" + (f": {text}" if text else "")
    return message[:4900]


async def _upload_outputs(context: JobContext) -> None:
    """Upload every output not yet uploaded, concurrently; each one must have been made."""
    missing = [o.name for o in context.outputs.values() if o.pending and not o.used]
    if missing:
        raise ArtifactError(
            f"the handler succeeded without producing output artifact(s) {', '.join(missing)}; "
            "write files into job.outputs[name].path or call job.outputs[name].upload(dir)",
            failure_type="JobFailed",
        )
    try:
        async with anyio.create_task_group() as tg:
            for output in context.outputs.values():
                if output.pending:
                    tg.start_soon(output.upload)
    except ExceptionGroup as group:  # only plain exceptions: cancellation passes through
        raise first_exception(group) from None


def _job_fields(job_id: str, action_type: str, data: m.JobData) -> Mapping[str, Any]:
    p = data.pipeline_context or m.PipelineContext()
    return {
        "job_id": job_id,
        "action_type": action_type,
        "pipeline": p.pipeline_name,
        "stage": p.stage.name if p.stage else None,
        "action": p.action.name if p.action else None,
        "execution_id": p.pipeline_execution_id,
    }
