"""A poll loop: reserve free slots, poll for at most that many jobs, start them, back off.

The loop never holds a polled job it cannot start: it reserves slots first, asks for
`maxBatchSize = reserved` and gives back what the poll did not fill. Empty polls back
off exponentially with full jitter between the action type's floor and ceiling and reset
on the first non-empty poll; throttling, 5xx and connection failures back off the same
way and never fail a job (no job is held while polling). Any other error is fatal: a
crashed poller stops the worker, which Kubernetes restarts.

While an action type's queue is empty only one of its poll loops polls (`IdleWatch`):
the others park until a poll of that type finds jobs, so an idle action type costs one
backing-off loop however many `poll_loops` it has.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from cpworker import models as m
from cpworker.errors import ServiceError, TransportError
from cpworker.runner import JobRunner
from cpworker.slots import Pool, Reservation, first_of

__all__ = ["Backoff", "IdleWatch", "JobBudget", "Poller"]

log = logging.getLogger("cpworker.poller")


class Backoff:
    """Exponential backoff with full jitter: uniform(floor, min(ceiling, floor·2ⁿ))."""

    def __init__(self, floor_s: float, ceiling_s: float, rng: random.Random | None = None) -> None:
        self.floor_s, self.ceiling_s = floor_s, ceiling_s
        self._attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        top = min(self.ceiling_s, self.floor_s * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 64)
        return self._rng.uniform(self.floor_s, top)

    def reset(self) -> None:
        self._attempt = 0


class JobBudget:
    """`--max-jobs N`: how many more jobs the worker may take (unlimited when None).

    A poll takes its share before it is sent and gives back what it did not get, so poll
    loops running at once never ask for more than N jobs together.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.taken = 0

    def take(self, wanted: int) -> int:
        granted = wanted if self.limit is None else max(0, min(wanted, self.limit - self.taken))
        self.taken += granted
        return granted

    def give_back(self, count: int) -> None:
        self.taken -= count

    @property
    def spent(self) -> bool:
        return self.limit is not None and self.taken >= self.limit


class IdleWatch:
    """The poll loops of one action type: while its queue is empty, one loop polls.

    A loop whose poll came back empty becomes the watcher when there is none and backs
    off as usual; any other loop parks until a poll of the type finds jobs or the worker
    stops. The watcher hands the watch back when its poll finds jobs, which wakes the
    parked loops at once, so a burst of jobs gets every loop again.
    """

    def __init__(self) -> None:
        self.watcher: object | None = None
        self.parked = 0
        self._found = anyio.Event()

    def watches(self, loop: object) -> bool:
        """After an empty poll: True if `loop` is (now) the watcher, which backs off."""
        if self.watcher is None:
            self.watcher = loop
        return self.watcher is loop

    async def park(self, stopping: anyio.Event) -> None:
        """Wait until a poll of the type finds jobs, the watcher leaves or `stopping`."""
        self.parked += 1
        try:
            await first_of(self._found, stopping)
        finally:
            self.parked -= 1

    def found_jobs(self, loop: object) -> None:
        if self.watcher is loop:
            self.watcher = None
        if self.parked:
            self._wake()

    def leave(self, loop: object) -> None:
        """A loop ends: if it was the watcher, the parked loops poll again."""
        if self.watcher is loop:
            self.watcher = None
            self._wake()

    def _wake(self) -> None:
        self._found.set()
        self._found = anyio.Event()


class Poller:
    """One poll loop of one action type (a worker runs `poll_loops` of them per type)."""

    def __init__(
        self,
        runner: JobRunner,
        pools: tuple[Pool, ...],
        jobs: TaskGroup,
        stopping: anyio.Event,
        budget: JobBudget,
        on_empty: Callable[[], None],
        idle: IdleWatch | None = None,
    ) -> None:
        self.runner = runner
        self.config = runner.config
        self.pools = pools
        self.jobs = jobs
        self.stopping = stopping
        self.budget = budget
        self.on_empty = on_empty
        self.idle = idle or IdleWatch()
        self.last_poll_empty = False
        self.asked_max = 0
        self.polls = 0
        self.running = False
        self._backoff = Backoff(
            self.config.idle_backoff_floor_s, self.config.idle_backoff_ceiling_s
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.running = True
        task_status.started()
        try:
            await self._loop()
        finally:
            self.running = False
            self.idle.leave(self)

    async def _loop(self) -> None:
        while not self.stopping.is_set() and not self.budget.spent:
            reservation = await Reservation.take(
                self.pools, self.config.max_batch_size, self.stopping
            )
            granted = self.budget.take(reservation.count)
            reservation.release(reservation.count - granted)
            if granted == 0:
                return
            started = await self._poll_and_start(reservation)
            if started:
                self._backoff.reset()
                self.idle.found_jobs(self)
            elif started == 0:
                self.last_poll_empty = True
                self.on_empty()
                if self.idle.watches(self):
                    await self._pause(self._backoff.next())
                else:
                    await self.idle.park(self.stopping)
            else:
                await self._pause(self._backoff.next())

    async def _poll_and_start(self, reservation: Reservation) -> int | None:
        """Poll for `reservation.count` jobs and start them; None after a retryable error."""
        asked = reservation.count
        self.asked_max = max(self.asked_max, asked)
        self.polls += 1
        try:
            jobs = await self._poll(asked)
        except (ServiceError, TransportError) as exc:
            reservation.release(asked)
            self.budget.give_back(asked)
            if isinstance(exc, ServiceError) and not exc.retryable:
                raise
            log.warning("poll failed, backing off: %s", exc, extra={"event": "poll_retry"})
            return None
        if len(jobs) > asked:
            log.error(
                "a poll asked for %d jobs and got %d; only %d are started",
                asked,
                len(jobs),
                asked,
                extra={"event": "poll_overflow", "action_type": self.runner.name},
            )
            jobs = jobs[:asked]
        reservation.release(asked - len(jobs))
        self.budget.give_back(asked - len(jobs))
        self._count(asked, len(jobs))
        for job in jobs:
            self.runner.metrics.jobs_in_flight.labels(self.runner.name).inc()
            self.jobs.start_soon(self._start, job, reservation)
        if jobs:
            self.last_poll_empty = False
        return len(jobs)

    def _count(self, asked: int, got: int) -> None:
        metrics = self.runner.metrics
        metrics.jobs_polled.labels(self.runner.name).inc(got)
        metrics.poll_batch_fill.labels(self.runner.name).observe(got / asked)

    @property
    def _operation(self) -> str:
        third = self.config.owner == "ThirdParty"
        return "PollForThirdPartyJobs" if third else "PollForJobs"

    async def _poll(self, count: int) -> tuple[Any, ...]:
        cp, action = self.runner.cp, self.config.action_type_id
        if self.config.owner == "ThirdParty":
            return await cp.poll_for_third_party_jobs(action, count)
        return await cp.poll_for_jobs(action, count, dict(self.config.query_param) or None)

    async def _start(self, job: m.Job | m.ThirdPartyJob, reservation: Reservation) -> None:
        if isinstance(job, m.ThirdPartyJob):
            await self.runner.run_third_party(job, reservation)
        else:
            await self.runner.run_custom(job, reservation)

    async def _pause(self, delay_s: float) -> None:
        """Sleep `delay_s`, or less if the worker starts stopping."""
        with anyio.move_on_after(delay_s):
            await self.stopping.wait()
