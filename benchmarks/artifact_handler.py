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
"""

from __future__ import annotations

import cProfile
import json
import os
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

from cpworker import JobContext, Succeeded

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
    Path(str(job.options["results_file"])).write_text(json.dumps(timings), encoding="utf-8")
    return Succeeded("artifact benchmark done")


async def _phases(job: JobContext, writer_mib: int) -> dict[str, Any]:
    timings: dict[str, Any] = {}
    started = time.perf_counter()
    unpacked = await job.inputs["In"].path()
    timings["download_unpack_s"] = time.perf_counter() - started

    started = time.perf_counter()
    streamed = 0
    async with aclosing(job.inputs["In"].stream()) as chunks:
        async for chunk in chunks:
            streamed += len(chunk)
    timings["stream_s"] = time.perf_counter() - started
    timings["stream_bytes"] = streamed

    started = time.perf_counter()
    out = job.outputs["Out"].path
    for entry in os.listdir(unpacked):
        os.rename(unpacked / entry, out / entry)
    timings["pack_upload_bytes"] = await job.outputs["Out"].upload()
    timings["pack_upload_s"] = time.perf_counter() - started

    block = os.urandom(_CHUNK)
    started = time.perf_counter()
    async with job.outputs["Raw"].writer() as writer:
        for _ in range(writer_mib * MIB // _CHUNK):
            await writer.write(block)
        if rest := writer_mib * MIB % _CHUNK:
            await writer.write(block[:rest])
    timings["writer_s"] = time.perf_counter() - started
    timings["writer_bytes"] = writer_mib * MIB
    return timings
