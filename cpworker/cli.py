"""The `cpworker` command line: `cpworker emulator` and `cpworker demo`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import anyio

from cpworker.errors import CpWorkerError

SIGV4_KEYS_ENV = "CPWORKER_EMULATOR_SIGV4_KEYS"


def _emulator_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "emulator",
        help="serve the local CodePipeline job API and S3 (moto) until SIGTERM/SIGINT",
        description="Prints one JSON line with the endpoint URLs, then serves.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="CodePipeline API port (0: a free one)")
    p.add_argument("--s3-port", type=int, default=0, help="S3 port (0: a free one)")
    p.add_argument("--dispatch-timeout-s", type=float, default=30.0)
    p.add_argument("--job-timeout-s", type=float, default=24 * 3600.0)
    p.add_argument("--continuation-delay-s", type=float, default=1.0)
    p.add_argument("--latency-s", type=float, default=0.0, help="latency added to each call")
    p.add_argument("--jitter-s", type=float, default=0.0, help="random extra latency, 0..N s")
    p.add_argument("--throttle-rate", type=float, default=0.0)
    p.add_argument("--error-500-rate", type=float, default=0.0)
    p.add_argument("--error-503-rate", type=float, default=0.0)
    p.add_argument("--drop-rate", type=float, default=0.0, help="drop before applying")
    p.add_argument("--drop-response-rate", type=float, default=0.0, help="drop after applying")
    p.add_argument("--wrong-nonce-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="seed of the fault injection")
    p.add_argument(
        "--verify-sigv4",
        action="store_true",
        help=f"verify request signatures against the keys in ${SIGV4_KEYS_ENV} "
        "(KEY_ID=SECRET[,KEY_ID=SECRET...]); without it any well-formed signature is accepted",
    )


def _run_emulator(args: argparse.Namespace) -> int:
    from cpworker.emulator.faults import FaultSettings
    from cpworker.emulator.jobs import Timeouts
    from cpworker.emulator.server import EmulatorSettings, serve
    from cpworker.emulator.sigv4 import parse_keys

    fault_fields = FaultSettings.__struct_fields__
    timeout_fields = ("dispatch_timeout_s", "job_timeout_s", "continuation_delay_s")
    try:
        faults = FaultSettings(**{name: getattr(args, name) for name in fault_fields})
        timeouts = Timeouts(**{name: getattr(args, name) for name in timeout_fields})
    except ValueError as exc:
        print(f"cpworker emulator: {exc}; fix the matching --flag", file=sys.stderr)
        return 2
    try:
        keys = parse_keys(os.environ.get(SIGV4_KEYS_ENV, "")) if args.verify_sigv4 else None
    except ValueError as exc:
        print(f"cpworker emulator: ${SIGV4_KEYS_ENV}: {exc}", file=sys.stderr)
        return 2
    settings = EmulatorSettings(
        host=args.host,
        port=args.port,
        s3_port=args.s3_port,
        timeouts=timeouts,
        faults=faults,
        seed=args.seed,
        sigv4_keys=keys,
    )
    anyio.run(serve, settings)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from cpworker.demo import run_demo

    return anyio.run(run_demo, args.jobs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cpworker` console script."""
    parser = argparse.ArgumentParser(prog="cpworker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _emulator_parser(sub)
    demo = sub.add_parser("demo", help="run the local demo: emulator + S3 + demo jobs")
    demo.add_argument("--jobs", type=int, default=20, help="number of demo jobs (default 20)")
    args = parser.parse_args(argv)
    try:
        if args.command == "emulator":
            return _run_emulator(args)
        return _run_demo(args)
    except CpWorkerError as exc:
        print(f"cpworker {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
