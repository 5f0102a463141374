"""Slots: how many jobs may run at once, per action type and for the whole process.

A poller *reserves* slots before it polls and asks CodePipeline for at most that many
jobs; every job it gets keeps one slot until it finishes, and the rest go back at once.
Both caps (the action type's and the process's) hold at every instant, because a slot
is taken from both before a poll and returned to both after the job.
"""

from __future__ import annotations

import anyio

__all__ = ["Pool", "Reservation", "first_of"]


class Pool:
    """A counter of free slots with a peak gauge; `wait_for_free` wakes on release."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self._changed = anyio.Event()

    @property
    def free(self) -> int:
        return self.capacity - self.in_use

    def take(self, count: int) -> None:
        if count > self.free:
            raise RuntimeError(f"slot pool {self.name}: taking {count} with {self.free} free")
        self.in_use += count
        self.peak = max(self.peak, self.in_use)

    def give_back(self, count: int) -> None:
        if count > self.in_use:
            raise RuntimeError(f"slot pool {self.name}: returning {count} of {self.in_use}")
        self.in_use -= count
        self.wake()

    def wake(self) -> None:
        """Wake every waiter (a slot came back, or the worker is stopping)."""
        self._changed.set()
        self._changed = anyio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


class Reservation:
    """Slots held in an action type's pool and the process's pool at the same time."""

    def __init__(self, pools: tuple[Pool, ...], count: int) -> None:
        self._pools = pools
        self.count = count
        for pool in pools:
            pool.take(count)

    @classmethod
    async def take(cls, pools: tuple[Pool, ...], wanted: int, stopping: anyio.Event) -> Reservation:
        """Wait until every pool has a free slot, then hold as many as all allow (≤ wanted).

        Returns an empty reservation once `stopping` is set.
        """
        while not stopping.is_set():
            count = min(wanted, *(pool.free for pool in pools))
            if count > 0:
                return cls(pools, count)
            # Wait for any pool to change; the last pool is the process's, shared by all.
            async with anyio.create_task_group() as tg:

                async def wait(pool: Pool) -> None:
                    await pool.changed()
                    tg.cancel_scope.cancel()

                for pool in pools:
                    tg.start_soon(wait, pool)
        return cls(pools, 0)

    def release(self, count: int = 1) -> None:
        """Give back `count` slots (a finished job, or jobs a poll did not return)."""
        if count > self.count:
            raise RuntimeError(f"releasing {count} slots of a reservation of {self.count}")
        self.count -= count
        for pool in self._pools:
            pool.give_back(count)


async def first_of(*events: anyio.Event) -> None:
    """Wait until one of `events` is set."""
    async with anyio.create_task_group() as race:

        async def first(event: anyio.Event) -> None:
            await event.wait()
            race.cancel_scope.cancel()

        for event in events:
            race.start_soon(first, event)
