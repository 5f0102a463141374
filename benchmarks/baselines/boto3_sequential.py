"""Baseline: the tutorial worker, one job at a time on one thread, with boto3.

This is the loop of the CodePipeline custom action tutorials and of most workers people
write first: PollForJobs with `maxBatchSize=1`, a one-second sleep when the queue is
empty (`--empty-sleep-s`), otherwise AcknowledgeJob, the work, PutJobSuccessResult (or
PutJobFailureResult with the error). It is the fair floor for cpworker: plain boto3 with
the standard retry mode, nothing slowed down on purpose, and no tricks of cpworker's
(no batching, no concurrency, no shared S3 clients). SIGTERM or SIGINT stops it after the
job in hand, exit code 0.

Run: `python benchmarks/baselines/boto3_sequential.py --endpoint-url URL --provider NAME
[--category Build] [--version 1] [--handler noop|sleep|artifacts|artifacts-cli]
[--s3-endpoint-url URL] [--sleep-s 1] [--empty-sleep-s 1] [--max-jobs N]` (or
`python -m benchmarks.baselines.boto3_sequential ...` from the repository root). Worker
credentials come from the environment, as boto3 finds them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:
    # Run by path: import `common` as part of the package, from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.baselines"

from .common import (
    Shutdown,
    codepipeline_client,
    configure_logging,
    log,
    parse_args,
    work_loop,
)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv, __doc__ or "", threaded=False)
    configure_logging()
    shutdown = Shutdown(options.max_jobs, threaded=False)
    shutdown.install()
    client = codepipeline_client(options.endpoint_url)
    log.info("boto3_sequential: polling %s, handler %s", options.action_type, options.handler)
    try:
        work_loop(client, options, shutdown)
    finally:
        client.close()
    log.info("boto3_sequential: stopped after %d jobs", shutdown.handled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
