"""Handlers `benchmarks/bench.py` gives cpworker (loaded as `bench_handlers:<name>`).

The no-op and sleep scenarios use cpworker's built-in `echo` and `sleep`; this module has
the artifact handler, the same work the baselines' `artifacts` handler does by hand.
"""

from __future__ import annotations

import shutil

import anyio

from cpworker import JobContext, Succeeded


async def copy_input(job: JobContext) -> Succeeded:
    """Download and unpack input `In`, copy its files into output `Out` (packed, uploaded)."""
    source = await job.inputs["In"].path()
    target = job.outputs["Out"].path
    await anyio.to_thread.run_sync(
        lambda: shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    )
    return Succeeded("copied In to Out")
