"""Start the emulator as a subprocess and talk to its admin API.

Used by the demo, the tests and the benchmarks::

    async with EmulatorProcess.start() as emulator:
        ids = await emulator.admin.create_jobs({"actionTypeId": {...}, "count": 3})
        print(await emulator.admin.stats())
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote

import aiohttp
import anyio
from anyio.abc import Process

from cpworker.emulator import EmulatorError

__all__ = ["AdminClient", "EmulatorError", "EmulatorProcess", "stop_process"]


class AdminClient:
    """The emulator's admin API (`/_emulator/`), plain JSON over HTTP."""

    def __init__(self, base_url: str, http: aiohttp.ClientSession) -> None:
        self._base = base_url.rstrip("/")
        self._http = http

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        data: IO[bytes] | None = None,
    ) -> Any:
        url = f"{self._base}/{path}"
        try:
            async with self._http.request(method, url, json=body, params=params, data=data) as resp:
                text = await resp.text()
        except aiohttp.ClientError as exc:
            raise EmulatorError(
                f"{method} {url}: cannot reach the emulator ({type(exc).__name__}); is it running?"
            ) from None
        if resp.status != 200:
            raise EmulatorError(f"{method} {url} answered {resp.status}: {text}")
        return json.loads(text)

    async def create_jobs(self, spec: dict[str, Any]) -> dict[str, Any]:
        """`POST /_emulator/jobs`: returns `{"jobIds": [...]}` (and `clientTokens`)."""
        answer: dict[str, Any] = await self._request("POST", "jobs", spec)
        return answer

    async def job(self, job_id: str) -> dict[str, Any]:
        """`GET /_emulator/jobs/{id}`: the job's status and full history."""
        answer: dict[str, Any] = await self._request("GET", f"jobs/{job_id}")
        return answer

    async def jobs(self, status: str | None = None, provider: str | None = None) -> list[Any]:
        """`GET /_emulator/jobs`: ids and status, optionally filtered."""
        filters = {"status": status, "provider": provider}
        params = {k: v for k, v in filters.items() if v is not None}
        answer = await self._request("GET", "jobs", params=params)
        jobs: list[Any] = answer["jobs"]
        return jobs

    async def stats(self) -> dict[str, Any]:
        """`GET /_emulator/stats`: jobs by status, requests, faults injected."""
        answer: dict[str, Any] = await self._request("GET", "stats")
        return answer

    async def s3_log(self) -> dict[str, Any]:
        """`GET /_emulator/s3`: `{"uploads": [...], "gets": {key: n}, "refused": {code: n}}`.

        Each upload is `{"operation", "bucket", "key", "sse", "kmsKeyId", "jobId",
        "expectedKmsKeyId", "kmsKeyOk"}`.
        """
        answer: dict[str, Any] = await self._request("GET", "s3")
        return answer

    async def put_object(self, key: str, body: bytes) -> dict[str, Any]:
        """`PUT /_emulator/objects/{key}`: store `body` as is in the artifact bucket.

        Returns `{"bucket", "key", "size", "etag"}`; use the key as an input artifact's
        `objectKey` in `create_jobs`.
        """
        path = f"objects/{quote(key, safe='/')}"
        # A stream, not raw bytes: aiohttp would warn that a large body locks the loop.
        answer: dict[str, Any] = await self._request("PUT", path, data=io.BytesIO(body))
        return answer

    async def faults(self) -> dict[str, Any]:
        """`GET /_emulator/faults`: the current fault settings."""
        answer: dict[str, Any] = await self._request("GET", "faults")
        return answer

    async def set_faults(self, update: dict[str, Any]) -> dict[str, Any]:
        """`POST /_emulator/faults`: change fault injection; returns the settings."""
        answer: dict[str, Any] = await self._request("POST", "faults", update)
        return answer


@dataclass
class EmulatorProcess:
    """A running `cpworker emulator` subprocess and its endpoint URLs."""

    process: Process
    codepipeline: str
    s3: str
    admin: AdminClient

    @classmethod
    @asynccontextmanager
    async def start(
        cls,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 60.0,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> AsyncIterator[EmulatorProcess]:
        """Run the emulator on free ports of 127.0.0.1; stop it (SIGTERM) on exit.

        `env` adds variables to the emulator's environment (e.g. its SigV4 keys);
        `wrapper` comes before the command (e.g. `taskset -c 0` to pin it to a CPU).
        """
        command = [
            *wrapper, sys.executable, "-m", "cpworker", "emulator", "--port", "0", "--s3-port", "0",
        ]  # fmt: skip
        # stderr is inherited, so the emulator's own errors show where the caller runs.
        environment = {**os.environ, **(env or {})}
        # A session of its own: a terminal's Ctrl-C (sent to the whole process group) must
        # not stop the emulator before the caller has finished with it; the caller stops it.
        async with await anyio.open_process(
            [*command, *extra_args], stderr=None, env=environment, start_new_session=True
        ) as process:
            try:
                with anyio.fail_after(startup_timeout_s):
                    endpoints = await _read_endpoints(process)
                async with aiohttp.ClientSession() as http:
                    admin = AdminClient(endpoints["admin"], http)
                    yield cls(process, endpoints["codepipeline"], endpoints["s3"], admin)
            finally:
                await stop_process(process)


async def _read_endpoints(process: Process) -> dict[str, str]:
    assert process.stdout is not None
    line = b""
    async for chunk in process.stdout:
        line += chunk
        if b"\n" in line:
            break
    try:
        endpoints: dict[str, str] = json.loads(line.split(b"\n", 1)[0])
    except json.JSONDecodeError:
        raise EmulatorError(
            f"the emulator did not print its endpoints (its errors are on stderr): {line[:500]!r}"
        ) from None
    return endpoints


async def stop_process(process: Process) -> None:
    """SIGTERM, then SIGKILL after 10 s; shielded, so it completes under cancellation."""
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
