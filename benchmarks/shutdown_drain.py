"""Shutdown figures: SIGTERM to `cpworker run` with jobs in flight.

Starts the emulator, creates jobs, runs `cpworker run` as a subprocess with the `sleep`
handler, sends SIGTERM once `--in-flight` jobs are InProgress, and reports how many were
in flight, how many were reported (succeeded within the grace, or failed with
SystemUnavailable after it), how many stayed InProgress (must be 0), and the time from
SIGTERM to exit. Run: `python benchmarks/shutdown_drain.py [--sleep-s 30 --grace-s 2]`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio

from cpworker.emulator.client import EmulatorProcess

ACTION = {"category": "Build", "owner": "Custom", "provider": "ShutdownBench", "version": "1"}


def _config(emulator: EmulatorProcess, slots: int, sleep_s: float, grace_s: float) -> str:
    return f"""
codepipeline_endpoint_url = "{emulator.codepipeline}"
s3_endpoint_url = "{emulator.s3}"
max_concurrency = {slots}
shutdown_grace_s = {grace_s}
log_level = "WARNING"

[action_types.bench]
category = "Build"
provider = "ShutdownBench"
handler = "sleep"
slots = {slots}
max_batch_size = 100
[action_types.bench.handler_options]
seconds = {sleep_s}
"""


async def measure(jobs: int, in_flight: int, sleep_s: float, grace_s: float) -> None:
    async with EmulatorProcess.start() as emulator:
        admin = emulator.admin
        answer = await admin.create_jobs(
            {"actionTypeId": ACTION, "count": jobs, "shareCredentials": True}
        )
        ids: list[str] = answer["jobIds"]
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp, "worker.toml")
            await anyio.Path(config).write_text(_config(emulator, in_flight, sleep_s, grace_s))
            # The emulator accepts any SigV4 identity; this one is not a secret.
            env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIDBENCH", AWS_SECRET_ACCESS_KEY="x")  # noqa: S106
            command = [sys.executable, "-m", "cpworker", "run", "-c", str(config)]
            async with await anyio.open_process(command, env=env, stderr=subprocess.DEVNULL) as p:
                while len(await admin.jobs(status="InProgress")) < in_flight:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
                running = len(await admin.jobs(status="InProgress"))
                sent = time.perf_counter()
                p.send_signal(signal.SIGTERM)
                code = await p.wait()
                exit_s = time.perf_counter() - sent
        statuses = Counter([(await admin.job(i))["status"] for i in ids])
    print(f"jobs in flight at SIGTERM: {running}")
    print(f"exit code: {code}, time from SIGTERM to exit: {exit_s:.2f} s (grace {grace_s:g} s)")
    print(f"job statuses after exit: {dict(statuses)} (InProgress must be 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--sleep-s", type=float, default=30.0)
    parser.add_argument("--grace-s", type=float, default=2.0)
    args = parser.parse_args()
    anyio.run(measure, args.jobs, args.in_flight, args.sleep_s, args.grace_s)


if __name__ == "__main__":
    main()
