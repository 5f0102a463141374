"""The handler `benchmarks/artifact_transfer.py` runs in a real worker: it times each phase.

Loaded as `artifact_handler:handle` (the benchmark puts `benchmarks/` on the worker's
PYTHONPATH). `handler_options`: `results_file` (where the timings go, as JSON),
`writer_mib` (how many MiB to write through the `Raw` output, default 1024) and
`profile_file` (optional: a cProfile dump of the whole handler, for `pstats`).

The phases, each timed with `time.perf_counter`, in this order:

- `download_unpack_s`: `await job.inputs["In"].path()` (download + unpack);
- `stream_s`: the input's bytes through `job.inputs["In"].stream()`, discarded;
- `pack_upload_s`: the unpacked files moved (renamed, not copied) into
  `job.outputs["Out"].path`, then `await job.outputs["Out"].upload()` (pack + upload);
- `writer_s`: `writer_mib` MiB from one reused random buffer through
  `job.outputs["Raw"].writer()` (upload only).

Each phase also records the worker's CPU seconds in it, all threads (`cpu_<phase>_s`), and
its peak RSS so far after it (`max_rss_after_<phase>_mib`), which shows the phase that
raised it.
"""

from __future__ import annotations

import cProfile
import json
import os
import resource
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypeVar

import anyio

from cpworker import JobContext, Succeeded

T = TypeVar("T")
MIB = 1024 * 1024
_CHUNK = 8 * MIB


async def handle(job: JobContext) -> Succeeded:
    """Run the four phases on inputs `In` and outputs `Out`, `Raw`; write their timings."""
    profile_file = job.options.get("profile_file")
    profiler = cProfile.Profile() if profile_file else None
    if profiler is not None:
        profiler.enable()
    try:
        timings = await _phases(job, int(job.options.get("writer_mib", 1024)))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile_file))
    results = anyio.Path(str(job.options["results_file"]))
    await results.write_text(json.dumps(timings), encoding="utf-8")
    return Succeeded("artifact benchmark done")


async def _phases(job: JobContext, writer_mib: int) -> dict[str, Any]:
    timings: dict[str, Any] = {"max_rss_at_start_mib": _max_rss_mib()}

    async def download_unpack() -> Path:
        return await job.inputs["In"].path()

    async def stream() -> int:
        streamed = 0
        async with aclosing(job.inputs["In"].stream()) as chunks:
            async for chunk in chunks:
                streamed += len(chunk)
        return streamed

    async def pack_upload() -> int:
        out = job.outputs["Out"].path
        for entry in os.listdir(unpacked):
            os.rename(unpacked / entry, out / entry)
        return await job.outputs["Out"].upload()

    async def write() -> int:
        block = os.urandom(_CHUNK)
        async with job.outputs["Raw"].writer() as writer:
            for _ in range(writer_mib * MIB // _CHUNK):
                await writer.write(block)
            if rest := writer_mib * MIB % _CHUNK:
                await writer.write(block[:rest])
        return writer_mib * MIB

    unpacked = await _timed(timings, "download_unpack", download_unpack)
    timings["stream_bytes"] = await _timed(timings, "stream", stream)
    timings["pack_upload_bytes"] = await _timed(timings, "pack_upload", pack_upload)
    timings["writer_bytes"] = await _timed(timings, "writer", write)
    return timings


async def _timed(timings: dict[str, Any], phase: str, run: Callable[[], Awaitable[T]]) -> T:
    """Run one phase: its wall time, the process's CPU time (all threads), peak RSS after."""
    started, cpu = time.perf_counter(), time.process_time()
    result = await run()
    timings[f"{phase}_s"] = time.perf_counter() - started
    timings[f"cpu_{phase}_s"] = time.process_time() - cpu
    timings[f"max_rss_after_{phase}_mib"] = _max_rss_mib()
    return result


def _max_rss_mib() -> float:
    """The worker's peak RSS so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
