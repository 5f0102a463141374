"""Baseline: the usual upgrade of the tutorial worker, the same loop on 32 threads.

Each of `--threads` threads (default 32) runs the tutorial loop of `boto3_sequential`
(PollForJobs with `maxBatchSize=1`, sleep when empty, acknowledge, work, report), all
sharing ONE boto3 CodePipeline client whose connection pool has a connection per thread
(`max_pool_connections`). That is the shape of AWS's official Java sample job worker (a
thread pool of pollers around one client) and what a competent user builds when one job
at a time is too slow: the fair baseline for cpworker's concurrency. Standard retry mode,
nothing slowed down on purpose. SIGTERM or SIGINT stops every thread after its job in
hand, exit code 0 (1 if a thread died of an unexpected error).

Run: `python benchmarks/baselines/boto3_threads.py --endpoint-url URL --provider NAME
[--threads 32] [--category Build] [--version 1] [--handler noop|sleep|artifacts|
artifacts-cli] [--s3-endpoint-url URL] [--sleep-s 1] [--empty-sleep-s 1] [--max-jobs N]`
(or `python -m benchmarks.baselines.boto3_threads ...` from the repository root). Worker
credentials come from the environment, as boto3 finds them.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if not __package__:
    # Run by path: import `common` as part of the package, from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.baselines"

from .common import (
    Options,
    Shutdown,
    codepipeline_client,
    configure_logging,
    log,
    parse_args,
    work_loop,
)

if TYPE_CHECKING:
    from mypy_boto3_codepipeline import CodePipelineClient


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv, __doc__ or "", threaded=True)
    configure_logging()
    shutdown = Shutdown(options.max_jobs, threaded=True)
    shutdown.install()
    client = codepipeline_client(options.endpoint_url, max_pool_connections=options.threads)
    log.info(
        "boto3_threads: %d threads polling %s, handler %s",
        options.threads,
        options.action_type,
        options.handler,
    )
    crashed: list[BaseException] = []
    threads = [
        threading.Thread(
            target=_worker, args=(client, options, shutdown, crashed), name=f"worker-{n}"
        )
        for n in range(options.threads)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()  # the signal handler runs in this (the main) thread meanwhile
    finally:
        client.close()
    log.info("boto3_threads: stopped after %d jobs", shutdown.handled)
    return 1 if crashed else 0


def _worker(
    client: CodePipelineClient,
    options: Options,
    shutdown: Shutdown,
    crashed: list[BaseException],
) -> None:
    """One thread's loop; an unexpected error stops the others too (exit code 1)."""
    try:
        work_loop(client, options, shutdown)
    except BaseException as exc:
        crashed.append(exc)
        shutdown.request()
        raise


if __name__ == "__main__":
    sys.exit(main())
