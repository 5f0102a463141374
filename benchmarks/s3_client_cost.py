"""What one job's S3 access costs the worker: a client per job, or the shared client.

Against the emulator's S3 (moto's server, in its own process), each of `--jobs` rounds
does what a job with one small input does first: get an S3 client signed with the job's
artifact credentials and ask for the input's size (HeadObject).

- `client_per_job`: create an aiobotocore S3 client with the job's static credentials,
  HeadObject, close it (what cpworker did before the shared client);
- `shared_client`: `JobCredentials` (aiobotocore refreshable credentials) and a HeadObject
  through the process's one `SharedS3` client, signed with them (what it does now).

CPU is this process's (time.process_time), so the emulator's work is not counted.
Run: `python benchmarks/s3_client_cost.py [--jobs 300]`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable

import anyio
from aiobotocore.session import get_session

from cpworker import models as m
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.emulator.client import EmulatorProcess
from cpworker.s3 import JobCredentials, ObjectRef, S3Settings, SharedS3

ACTION = {"category": "Build", "owner": "Custom", "provider": "ClientCost", "version": "1"}


async def _credentials(emulator: EmulatorProcess) -> tuple[m.ArtifactCredentials, ObjectRef]:
    answer = await emulator.admin.create_jobs(
        {"actionTypeId": ACTION, "inputArtifacts": [{"name": "Src", "files": {"a": "a"}}]}
    )
    [job_id] = answer["jobIds"]
    session = get_session()
    session.set_credentials("AKIDBENCH", "x")  # the emulator accepts any identity
    settings = ControlPlaneSettings(endpoint_url=emulator.codepipeline)
    async with ControlPlane.open(settings, session) as cp:
        data = (await cp.get_job_details(job_id)).data
    assert data.artifact_credentials is not None
    location = data.input_artifacts[0].location
    assert location is not None
    assert location.s3_location is not None
    s3 = location.s3_location
    ref = ObjectRef(what="input artifact 'Src'", bucket=s3.bucket_name, key=s3.object_key)
    return data.artifact_credentials, ref


async def _rounds(jobs: int, one: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    await one()  # warm-up: service models loaded, connections made
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(jobs):
        await one()
    return (time.process_time() - cpu) / jobs * 1000, (time.perf_counter() - wall) / jobs * 1000


async def measure(jobs: int) -> None:
    async with EmulatorProcess.start() as emulator:
        credentials, ref = await _credentials(emulator)
        settings = S3Settings(endpoint_url=emulator.s3)
        session = get_session()

        async def client_per_job() -> None:
            async with session.create_client(
                "s3",
                endpoint_url=emulator.s3,
                config=settings.client_config(),
                aws_access_key_id=credentials.access_key_id,
                aws_secret_access_key=credentials.secret_access_key,
                aws_session_token=credentials.session_token,
            ) as client:
                await client.head_object(Bucket=ref.bucket, Key=ref.key)

        async with SharedS3.open(settings, session) as shared:

            async def fetch() -> m.ArtifactCredentials:
                return credentials

            async def shared_client() -> None:
                await shared.head(JobCredentials(credentials, fetch), ref)

            rows = {
                "client_per_job": await _rounds(jobs, client_per_job),
                "shared_client": await _rounds(jobs, shared_client),
            }
    print(f"{'S3 access per job':<18} {'CPU ms':>8} {'wall ms':>8}   ({jobs} jobs, HeadObject)")
    for name, (cpu_ms, wall_ms) in rows.items():
        print(f"{name:<18} {cpu_ms:>8.2f} {wall_ms:>8.2f}")
    ratio = rows["client_per_job"][0] / rows["shared_client"][0]
    print(f"shared client: {ratio:.1f}x less CPU per job")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    anyio.run(measure, parser.parse_args().jobs)


if __name__ == "__main__":
    main()
