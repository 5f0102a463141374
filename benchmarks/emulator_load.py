"""How many CodePipeline API calls per second one emulator process serves on one core.

Starts `cpworker emulator` pinned to CPU 0 (when `taskset` exists), creates jobs through
the admin API, then drives full job cycles (PollForJobs with batches, AcknowledgeJob,
PutJobSuccessResult) plus empty polls from load-generator processes pinned to the other
CPU, over keep-alive HTTP connections on 127.0.0.1. Reports API calls/s and the emulator's
CPU use over the measured window (100% = one core busy) and the calls it served per
CPU-second it used: its capacity on one core, even when the generators saturate first.
Requests carry a well-formed SigV4 Authorization header, which the emulator checks for
form only; with `--verify-sigv4` the generators sign every request for real and the
emulator verifies it.

    python benchmarks/emulator_load.py [--jobs 20000] [--concurrency 64] [--generators 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import uuid
from typing import Any

import aiohttp
import anyio
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACTION = {"category": "Build", "owner": "Custom", "provider": "LoadTest", "version": "1"}
EMPTY_ACTION = {"category": "Build", "owner": "Custom", "provider": "LoadTestEmpty", "version": "1"}
HEADERS = {
    "Content-Type": "application/x-amz-json-1.1",
    "X-Amz-Date": "20261123T000000Z",
    "Authorization": (
        "AWS4-HMAC-SHA256 Credential=AKIDLOAD/20261123/us-east-1/codepipeline/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=" + "0" * 64
    ),
}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


KEY_ID, SECRET = "AKIDLOAD", "load-secret"
SIGN = False  # set in each generator process from --verify-sigv4


def _signed(url: str, data: bytes, headers: dict[str, str]) -> dict[str, str]:
    """Real SigV4 headers for this request (botocore's signer, in the generator)."""
    request = AWSRequest(method="POST", url=url, data=data, headers=headers)
    SigV4Auth(Credentials(KEY_ID, SECRET), "codepipeline", "us-east-1").add_auth(request)
    return dict(request.headers.items())


async def _call(http: aiohttp.ClientSession, url: str, op: str, body: dict[str, Any]) -> Any:
    data = json.dumps(body).encode()
    headers = dict(HEADERS, **{"X-Amz-Target": f"CodePipeline_20150709.{op}"})
    if SIGN:
        del headers["Authorization"], headers["X-Amz-Date"]
        headers = _signed(url, data, headers)
    async with http.post(url, data=data, headers=headers) as resp:
        answer = await resp.json(content_type=None)
        if resp.status != 200:
            raise RuntimeError(f"{op}: {resp.status} {answer}")
        return answer


async def _worker(http: aiohttp.ClientSession, url: str, counts: dict[str, int]) -> None:
    while True:
        answer = await _call(http, url, "PollForJobs", {"actionTypeId": ACTION, "maxBatchSize": 10})
        counts["calls"] += 1
        jobs = answer["jobs"]
        if not jobs:
            return
        for job in jobs:
            await _call(http, url, "AcknowledgeJob", {"jobId": job["id"], "nonce": job["nonce"]})
            await _call(http, url, "PutJobSuccessResult", {"jobId": job["id"]})
            counts["calls"] += 2
            counts["jobs"] += 1
        await _call(http, url, "PollForJobs", {"actionTypeId": EMPTY_ACTION, "maxBatchSize": 10})
        counts["calls"] += 1


async def _generate(url: str, concurrency: int) -> dict[str, int]:
    counts = {"calls": 0, "jobs": 0}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http, anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(_worker, http, url, counts)
    return counts


def _generator_main(url: str, concurrency: int, cpu: int | None, sign: bool, out: Any) -> None:
    global SIGN
    SIGN = sign
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    out.put(anyio.run(_generate, url, concurrency))


async def _create_jobs(admin: str, count: int) -> None:
    async with aiohttp.ClientSession() as http:
        for action in (ACTION, EMPTY_ACTION):
            spec = {"actionTypeId": action, "count": 1, "shareCredentials": True}
            async with http.post(f"{admin}jobs", json=spec) as resp:
                resp.raise_for_status()
        remaining = count - 1
        while remaining > 0:
            n = min(remaining, 5000)
            spec = {"actionTypeId": ACTION, "count": n, "shareCredentials": True}
            async with http.post(f"{admin}jobs", json=spec) as resp:
                resp.raise_for_status()
            remaining -= n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32, help="connections per generator")
    parser.add_argument("--generators", type=int, default=2, help="load-generator processes")
    parser.add_argument("--verify-sigv4", action="store_true", help="emulator verifies signatures")
    args = parser.parse_args()
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and os.cpu_count() != 1 else []
    cmd = [*pin, sys.executable, "-m", "cpworker", "emulator", "--port", "0", "--s3-port", "0"]
    env = dict(os.environ)
    if args.verify_sigv4:
        cmd.append("--verify-sigv4")
        env["CPWORKER_EMULATOR_SIGV4_KEYS"] = f"{KEY_ID}={SECRET}"
    emulator = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert emulator.stdout is not None
        endpoints = json.loads(emulator.stdout.readline())
        anyio.run(_create_jobs, endpoints["admin"], args.jobs)
        queue: Any = multiprocessing.Queue()
        cpu = 1 if pin else None
        procs = [
            multiprocessing.Process(
                target=_generator_main,
                args=(endpoints["codepipeline"], args.concurrency, cpu, args.verify_sigv4, queue),
            )
            for _ in range(args.generators)
        ]
        cpu_before, started = _cpu_seconds(emulator.pid), time.perf_counter()
        for p in procs:
            p.start()
        # A generator that died would never report: bound the wait.
        results = [queue.get(timeout=600) for _ in procs]
        elapsed = time.perf_counter() - started
        cpu_used = _cpu_seconds(emulator.pid) - cpu_before
        for p in procs:
            p.join()
    finally:
        emulator.terminate()
        try:
            emulator.wait(10)
        except subprocess.TimeoutExpired:
            emulator.kill()
            emulator.wait()
    calls = sum(r["calls"] for r in results)
    jobs = sum(r["jobs"] for r in results)
    report = {
        "run": str(uuid.uuid4())[:8],
        "jobs": jobs,
        "api_calls": calls,
        "seconds": round(elapsed, 2),
        "calls_per_s": round(calls / elapsed),
        "jobs_per_s": round(jobs / elapsed),
        "emulator_cpu_percent": round(100 * cpu_used / elapsed),
        # capacity of one emulator core: calls served per CPU-second it used
        "calls_per_emulator_cpu_second": round(calls / cpu_used),
        "emulator_pinned_to_one_core": bool(pin),
        "sigv4_verification": "verified" if args.verify_sigv4 else "form only",
    }
    print(json.dumps(report, indent=2))
    return 0 if jobs == args.jobs else 1


if __name__ == "__main__":
    raise SystemExit(main())
