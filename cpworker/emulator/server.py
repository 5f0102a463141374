"""`cpworker emulator`: the CodePipeline job API and moto's S3, served until a signal.

On start it prints one JSON line to stdout, ``{"codepipeline": URL, "s3": URL, "admin":
URL}``, then serves until SIGTERM or SIGINT and exits 0.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from aiohttp import web

from cpworker.emulator import EmulatorError
from cpworker.emulator.admin import Admin
from cpworker.emulator.api import CodePipelineApi
from cpworker.emulator.faults import Faults, FaultSettings
from cpworker.emulator.jobs import JobStore, Timeouts
from cpworker.emulator.s3 import S3Side
from cpworker.emulator.sigv4 import SigV4Checker


@dataclass(frozen=True)
class EmulatorSettings:
    host: str = "127.0.0.1"
    port: int = 0
    s3_port: int = 0
    timeouts: Timeouts = field(default_factory=Timeouts)
    faults: FaultSettings = field(default_factory=FaultSettings)
    seed: int | None = None
    sigv4_keys: dict[str, str] | None = field(default=None, repr=False)
    # Artifact credentials expire this long after they are minted (None: never).
    credential_ttl_s: float | None = None

    def __post_init__(self) -> None:
        if self.credential_ttl_s is not None and not self.credential_ttl_s > 0:
            raise ValueError(f"credential_ttl_s={self.credential_ttl_s!r}: must be more than 0")


@dataclass(frozen=True)
class Endpoints:
    codepipeline: str
    s3: str
    admin: str

    def json_line(self) -> str:
        return json.dumps({"codepipeline": self.codepipeline, "s3": self.s3, "admin": self.admin})


def build_app(api: CodePipelineApi) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/", api.handle)
    app.router.add_routes(Admin(api).routes())
    return app


@asynccontextmanager
async def running_emulator(settings: EmulatorSettings) -> AsyncIterator[Endpoints]:
    """Start S3 and the API server; yield their URLs; stop both on exit."""
    s3 = S3Side(settings.host, settings.s3_port)
    runner: web.AppRunner | None = None
    try:
        await s3.start()
        store = JobStore(time.monotonic, settings.timeouts)
        faults = Faults(settings.faults, random.Random(settings.seed))
        api = CodePipelineApi(
            store, faults, s3, SigV4Checker(settings.sigv4_keys), settings.credential_ttl_s
        )
        runner = web.AppRunner(build_app(api), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            raise EmulatorError(
                f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}); "
                "choose another --port, or 0 for a free one"
            ) from None
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        yield Endpoints(codepipeline=base, s3=s3.url, admin=f"{base}/_emulator/")
    finally:
        if runner is not None:
            await runner.cleanup()
        await s3.stop()


async def serve(settings: EmulatorSettings) -> None:
    """Run the emulator until SIGTERM or SIGINT."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with running_emulator(settings) as endpoints:
            sys.stdout.write(endpoints.json_line() + "\n")
            sys.stdout.flush()
            async for _ in signals:
                break
