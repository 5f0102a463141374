"""The supervisor: one `Worker` per process runs every configured action type.

Lifecycle: starting → ready → draining → stopped. `Worker.run()` opens the control-plane
client, checks that each action type is registered (and learns which configuration
properties are secret), starts the poll loops in one anyio task group and reports
readiness through `task_status`. `stop()` (SIGTERM/SIGINT under `cpworker run`) stops
polling; running jobs get `shutdown_grace_s` to finish, then are cancelled and reported
as failed (`SystemUnavailable`, "worker shutting down"). A second `stop()` skips the grace.
With `burst=True` the worker stops once every poll loop has seen an empty queue and
nothing runs; with `max_jobs=N` it stops after taking N jobs.

    async with anyio.create_task_group() as tg:
        worker = Worker(load_config("cpworker.toml"))
        await tg.start(worker.run)
        ...
        worker.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from cpworker.artifacts import ArtifactSettings, DiskBudget, UnpackLimits
from cpworker.config import ConfigError, WorkerConfig, secret_values
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.endpoints import serve
from cpworker.errors import CpWorkerError, ServiceError
from cpworker.logs import redactor
from cpworker.metrics import WorkerMetrics
from cpworker.poller import IdleWatch, JobBudget, Poller
from cpworker.runner import Handler, JobRunner, RunnerSettings, load_handler
from cpworker.s3 import S3Settings, SharedS3
from cpworker.slots import Pool, first_of
from cpworker.transfers import MIB, Transfers, TransferSettings

__all__ = ["Worker"]

log = logging.getLogger("cpworker.worker")

HEARTBEAT_S = 1.0
HEALTH_MAX_LAG_S = 10.0  # /healthz fails once the heartbeat is this late


class Worker:
    """Runs the action types of one `WorkerConfig` until stopped."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        session: Any = None,
        handlers: Mapping[str, Handler] | None = None,
        burst: bool = False,
        max_jobs: int | None = None,
        handle_signals: bool = False,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.config = config
        self.session = session
        self.burst = burst
        self.handle_signals = handle_signals
        self.metrics = metrics or WorkerMetrics()
        self.budget = JobBudget(max_jobs)
        self.handlers = {
            name: (handlers or {}).get(name)
            or load_handler(t.handler, f"action_types.{name}.handler")
            for name, t in config.action_types.items()
        }
        self.client_tokens = {
            name: ClientTokens(name, Path(t.client_tokens_file or ""))
            for name, t in config.action_types.items()
            if t.owner == "ThirdParty"
        }
        self.pools = {name: Pool(name, t.slots) for name, t in config.action_types.items()}
        self.process_pool = Pool("process", config.max_concurrency)
        self.pollers: list[Poller] = []
        self.stopping = anyio.Event()
        self._stop_now = anyio.Event()
        self._asked = anyio.Event()  # stop() was called: running jobs get the grace
        self._jobs_done = anyio.Event()
        self.metrics.prepare({n: t.owner == "ThirdParty" for n, t in config.action_types.items()})
        self.address: tuple[str, int] | None = None
        self._last_beat = 0.0  # monotonic time of the last heartbeat (0: not beating yet)
        self._set_state("starting")
        capacity = min(sum(p.capacity for p in self.pools.values()), config.max_concurrency)
        self.metrics.slot_utilization.set_function(lambda: self.in_flight / capacity)

    # --- control -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop polling and drain; called twice, cancel running jobs without the grace."""
        if self._asked.is_set():
            self._stop_now.set()
            return
        self._asked.set()
        self._stop_polling()

    def _stop_polling(self) -> None:
        """Stop polling (asked to, or the job budget is spent, or burst found nothing)."""
        if self.stopping.is_set():
            return
        self._set_state("draining")
        self.stopping.set()
        for pool in (*self.pools.values(), self.process_pool):
            pool.wake()
        self._check_done()

    @property
    def in_flight(self) -> int:
        return sum(pool.in_use for pool in self.pools.values())

    # --- health ------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """Liveness: the event loop keeps its heartbeat and the poll loops run."""
        late = time.monotonic() - self._last_beat - HEARTBEAT_S
        if self._last_beat and late > HEALTH_MAX_LAG_S:
            return False, f"event loop blocked: heartbeat {late:.1f} s late"
        if self.state == "ready" and not self.budget.spent:
            stopped = sum(1 for poller in self.pollers if not poller.running)
            if stopped:
                return False, f"{stopped} of {len(self.pollers)} poll loops stopped"
        return True, f"ok ({self.state})"

    def readiness(self) -> tuple[bool, str]:
        """Readiness: polling and not draining (false from the moment stop() is called)."""
        return self.state == "ready", self.state

    async def _heartbeat(self) -> None:
        """Tick every `HEARTBEAT_S`; how late a tick runs is the event loop's lag."""
        self._last_beat = time.monotonic()
        while True:
            await anyio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            self.metrics.event_loop_lag.set(max(0.0, now - self._last_beat - HEARTBEAT_S))
            self._last_beat = now

    # --- run ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped; readiness is reported once every poll loop runs.

        The endpoints (`cpworker.endpoints`) serve on `bind` from start to stop; the
        bound address is in `address`.
        """
        loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
        log.info("event loop: %s", loop, extra={"event": "worker_event_loop"})
        async with contextlib.AsyncExitStack() as stack:
            if self.config.bind:
                self.address = await stack.enter_async_context(serve(self, self.config.bind))
            await self._run(task_status)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        settings = ControlPlaneSettings(
            region=self.config.region,
            endpoint_url=self.config.codepipeline_endpoint_url,
            max_attempts=self.config.api_max_attempts,
            lean_job_calls=self.config.api_lean_job_calls,
            pool_size=max(10, min(self.config.max_concurrency, 500)),
        )
        async with (
            ControlPlane.open(settings, self.session, self.metrics.api_request) as cp,
            SharedS3.open(self._s3_settings(), self.session) as s3,
        ):
            runners = await self._runners(cp, s3)
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._heartbeat)
                if self.handle_signals:
                    outer.start_soon(self._watch_signals)
                await self._serve(runners, task_status)
                outer.cancel_scope.cancel()
        self._set_state("stopped")

    async def _serve(self, runners: dict[str, JobRunner], task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as jobs:
            async with anyio.create_task_group() as polls:
                for name, runner in runners.items():
                    pools = (self.pools[name], self.process_pool)
                    watch = IdleWatch()
                    for _ in range(runner.config.poll_loops):
                        poller = Poller(
                            runner, pools, jobs, self.stopping, self.budget, self._check_done, watch
                        )
                        self.pollers.append(poller)
                        await polls.start(poller.run)
                self._set_state("ready")
                task_status.started()
            # Every poll loop has returned: stopping (or the job budget is spent).
            self._stop_polling()
            await self._drain(jobs.cancel_scope)

    async def _drain(self, jobs: anyio.CancelScope) -> None:
        """Let running jobs finish; once stop() is called, within the grace period only.

        Stopped by `max_jobs` or `burst` rather than asked to, jobs run to their end.
        """
        self._check_done()  # nothing may be running any more
        await first_of(self._jobs_done, self._asked)
        with anyio.move_on_after(self.config.shutdown_grace_s):
            await first_of(self._jobs_done, self._stop_now)
        if self.in_flight:
            log.warning(
                "cancelling %d running jobs; they are reported as failed",
                self.in_flight,
                extra={"event": "shutdown_cancel"},
            )
            jobs.cancel()

    def _check_done(self) -> None:
        """Called after each job and each empty poll: is it time to stop?"""
        idle = self.in_flight == 0 and self.process_pool.in_use == 0
        if self.stopping.is_set():
            if idle:
                self._jobs_done.set()
        elif self.burst and idle and self.pollers and all(p.last_poll_empty for p in self.pollers):
            log.info("burst: every queue is empty and nothing runs", extra={"event": "burst_done"})
            self._stop_polling()
        elif self.budget.spent and idle:
            self._stop_polling()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info(
                    "%s: %s",
                    signal.Signals(signum).name,
                    "stopping now" if self.stopping.is_set() else "draining",
                    extra={"event": "signal"},
                )
                self.stop()

    # --- set-up ------------------------------------------------------------------------

    def _s3_settings(self) -> S3Settings:
        return S3Settings(
            region=self.config.region,
            endpoint_url=self.config.s3_endpoint_url,
            max_pool_connections=self.config.transfer_concurrency,
        )

    def _artifact_settings(self) -> ArtifactSettings:
        c = self.config
        return ArtifactSettings(
            transfers=TransferSettings(
                part_size=_mib(c.transfer_part_size_mib),
                multipart_threshold=_mib(c.multipart_threshold_mib),
                job_concurrency=c.transfer_concurrency_per_job,
                process_concurrency=c.transfer_concurrency,
            ),
            limits=UnpackLimits(
                max_files=c.unpack_max_files,
                max_bytes=_mib(c.unpack_max_mib),
                max_ratio=c.unpack_max_ratio,
            ),
            credentials_refresh_s=c.artifact_credentials_refresh_s,
        )

    async def _runners(self, cp: ControlPlane, s3: SharedS3) -> dict[str, JobRunner]:
        secret_properties = await self._discover(cp)
        work_root = _work_root(self.config.work_dir)
        artifacts = self._artifact_settings()
        settings = RunnerSettings(
            result_deadline_s=self.config.result_deadline_s,
            work_root=work_root,
            artifacts=artifacts,
            transfers=Transfers(s3, artifacts.transfers, self.metrics.artifact_bytes_moved),
            disk=DiskBudget(_mib(self.config.disk_budget_mib), work_root),
        )
        runners = {}
        for name, t in self.config.action_types.items():
            redactor.add(*secret_values(t.handler_options))  # for the process's lifetime
            self.metrics.slots.labels(name).set(t.slots)
            runners[name] = JobRunner(
                name=name,
                config=t,
                handler=self.handlers[name],
                cp=cp,
                settings=settings,
                metrics=self.metrics,
                secret_properties=secret_properties.get(name),
                client_tokens=self.client_tokens[name].lookup
                if name in self.client_tokens
                else None,
                on_done=self._check_done,
            )
        return runners

    async def _discover(self, cp: ControlPlane) -> dict[str, frozenset[str]]:
        """Check each action type is registered; learn its secret configuration properties.

        When ListActionTypes is refused (e.g. not allowed by IAM), the check is skipped and
        the values of configuration properties whose names look secret are masked instead.
        """
        secrets: dict[str, frozenset[str]] = {}
        for owner in sorted({t.owner for t in self.config.action_types.values()}):
            try:
                registered = {a.id: a for a in await cp.list_action_types(owner)}
            except ServiceError as exc:
                log.warning(
                    "cannot list action types (%s): not checking that they are registered; "
                    "masking configuration values whose property names look secret",
                    exc.code,
                    extra={"event": "discovery_failed"},
                )
                continue
            for name, t in self.config.action_types.items():
                if t.owner != owner:
                    continue
                found = registered.get(t.action_type_id)
                if found is None:
                    raise CpWorkerError(
                        f"action_types.{name}: {t.category}/{t.owner}/{t.provider}/{t.version} "
                        f"is not registered in {self.config.region}; register it with "
                        "`cpworker action-type register` or fix category/provider/version"
                    )
                secrets[name] = frozenset(
                    p.name for p in found.action_configuration_properties if p.secret
                )
        return secrets

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.worker_state.state(state)
        log.info("worker %s", state, extra={"event": f"worker_{state}"})


class ClientTokens:
    """Third-party client id → client token, from `client_tokens_file`.

    The file is read again when an unknown client id shows up and the file has changed
    since (a rotated Kubernetes Secret), so an unknown id costs one `stat`, not a read.
    """

    def __init__(self, name: str, path: Path) -> None:
        self._name, self._path = name, path
        self._tokens: dict[str, str] = {}
        self._read_at: float | None = None
        self._read()

    def lookup(self, client_id: str) -> str | None:
        if client_id not in self._tokens and self._changed():
            self._read()
        return self._tokens.get(client_id)

    def _changed(self) -> bool:
        try:
            return self._path.stat().st_mtime != self._read_at
        except OSError:
            return True

    def _read(self) -> None:
        where = f"action_types.{self._name}.client_tokens_file = {str(self._path)!r}"
        try:
            mtime = self._path.stat().st_mtime
            loaded = json.loads(self._path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{where}: cannot read it as a JSON object of client id → client token "
                f"({type(exc).__name__})"
            ) from None
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise ConfigError(
                f"{where}: must hold a JSON object of client id → client token, "
                'e.g. {"<client id>": "<token>"}'
            )
        self._tokens, self._read_at = loaded, mtime


def _work_root(work_dir: str | None) -> Path:
    """The directory jobs' temp directories go in: created if missing, writable."""
    root = Path(work_dir or tempfile.gettempdir())
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"work_dir = {work_dir!r}: cannot create it ({exc.strerror}); point work_dir at "
            "a directory the worker may write to"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"work_dir = {work_dir!r}: the worker may not write there")
    return root


def _mib(value: float) -> int:
    return int(value * MIB)
