"""The handler of the dashboard demo (`make dashboard`, `tests/test_prometheus.py`).

Copies its input to its output after a short, varied piece of work, and fails the jobs
whose configuration says ``Mode = fail``: enough variety for every panel to show data.
"""

from __future__ import annotations

import random
import shutil

import anyio

from cpworker import Failed, JobContext, Outcome, Succeeded


async def work(job: JobContext) -> Outcome:
    """Sleep 0.1 to 1.5 s, copy input `In` (if any) to output `Out` (if any), or fail."""
    await anyio.sleep(random.uniform(0.1, 1.5))
    if job.configuration.get("Mode") == "fail":
        return Failed("the demo was asked to fail this job", type="JobFailed")
    if "In" in job.inputs and "Out" in job.outputs:
        source = await job.inputs["In"].path()
        target = job.outputs["Out"].path
        await anyio.to_thread.run_sync(lambda: shutil.copytree(source, target, dirs_exist_ok=True))
    return Succeeded("demo work done")
