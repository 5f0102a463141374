"""The `cpworker` command line.

`cpworker run -c FILE` runs the worker; `cpworker check-config FILE` validates a
configuration and prints it with secrets masked; `cpworker emulator` serves the local
CodePipeline + S3 emulator; `cpworker local` runs the worker on demo jobs through it.

Exit codes: 0 done, 1 a runtime error, 2 a configuration or usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import anyio

from cpworker.config import ConfigError
from cpworker.errors import CpWorkerError, first_exception

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
        "--credential-ttl-s",
        type=float,
        default=None,
        help="artifact credentials expire this long after they are minted; S3 then answers "
        "ExpiredToken (default: they never expire)",
    )
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
    if args.credential_ttl_s is not None and not args.credential_ttl_s > 0:
        print("cpworker emulator: --credential-ttl-s must be more than 0", file=sys.stderr)
        return 2
    settings = EmulatorSettings(
        host=args.host,
        port=args.port,
        s3_port=args.s3_port,
        timeouts=timeouts,
        faults=faults,
        seed=args.seed,
        sigv4_keys=keys,
        credential_ttl_s=args.credential_ttl_s,
    )
    anyio.run(serve, settings)
    return 0


def _worker_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="run the worker until SIGTERM/SIGINT (graceful: running jobs finish first)",
        description="Environment variables CPWORKER_<KEY> and "
        "CPWORKER_ACTION_TYPES__<NAME>__<KEY> override the file's keys.",
    )
    run.add_argument("-c", "--config", required=True, help="the worker's TOML file")
    run.add_argument(
        "--burst",
        action="store_true",
        help="exit once every poll loop has seen an empty queue and no job runs",
    )
    run.add_argument("--max-jobs", type=int, default=None, help="exit after taking N jobs")
    check = sub.add_parser(
        "check-config", help="validate a configuration and print it (secrets masked)"
    )
    check.add_argument("config", help="the worker's TOML file")


def _run_worker(args: argparse.Namespace) -> int:
    from cpworker.config import load_config
    from cpworker.logs import configure_logging
    from cpworker.worker import Worker

    if args.max_jobs is not None and args.max_jobs < 1:
        print("cpworker run: --max-jobs must be 1 or more", file=sys.stderr)
        return 2
    config = load_config(args.config)
    configure_logging(config.log_level, config.log_format)
    worker = Worker(config, burst=args.burst, max_jobs=args.max_jobs, handle_signals=True)
    try:
        anyio.run(worker.run, backend_options=config.backend_options())
    except ExceptionGroup as group:  # a crashed poller: report its error, not the group
        raise first_exception(group) from None
    return 0


def _check_config(args: argparse.Namespace) -> int:
    import json

    import msgspec

    from cpworker.config import load_config, masked
    from cpworker.worker import Worker

    config = load_config(args.config)
    Worker(config)  # imports every handler and reads client token files
    print(json.dumps(masked(msgspec.to_builtins(config)), indent=2))
    return 0


def _action_type_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "action-type",
        help="register, list or delete custom action types",
        description="Calls CodePipeline with the standard AWS credential chain. --region and "
        "--endpoint-url override the worker config's region and codepipeline_endpoint_url.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", default=None, help="AWS region (default: from -c or env)")
    common.add_argument("--endpoint-url", default=None, help="CodePipeline endpoint URL")
    common.add_argument("-c", "--config", default=None, help="a worker TOML file to read")
    actions = p.add_subparsers(dest="action", required=True)
    register = actions.add_parser(
        "register",
        parents=[common],
        help="create a custom action type from a definition file; prints it as JSON",
        description="DEFINITION (*.toml or *.json) has the keys of CreateCustomActionType as "
        "in `aws codepipeline create-custom-action-type --cli-input-json`.",
    )
    register.add_argument("definition", help="the definition file (*.toml or *.json)")
    listing = actions.add_parser("list", parents=[common], help="print one line per action type")
    listing.add_argument("--owner", choices=("Custom", "ThirdParty", "AWS"), default=None)
    delete = actions.add_parser("delete", parents=[common], help="delete a custom action type")
    for name in ("category", "provider", "version"):
        delete.add_argument(name)


def _run_action_type(args: argparse.Namespace) -> int:
    from cpworker.action_types import run

    return run(args)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def _milliseconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 60_000:
        raise argparse.ArgumentTypeError(f"{value:g} is not between 0 and 60000")
    return value


def _local_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "local",
        help="the local demo: emulator + S3 + demo jobs run by the real worker",
        description="Runs demo jobs through the emulator with the worker's `shell` handler, "
        "shows progress, prints a summary; exits 0 when every job ended as planned.",
    )
    p.add_argument("--jobs", type=_count, default=200, help="demo jobs (default 200)")
    p.add_argument("--concurrency", type=_count, default=50, help="jobs run at once (default 50)")
    p.add_argument(
        "--latency-ms", type=_milliseconds, default=0.0, help="latency added to each API call"
    )


def _run_local(args: argparse.Namespace) -> int:
    from cpworker.local import main as local_main

    return local_main(args.jobs, args.concurrency, args.latency_ms)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cpworker` console script."""
    parser = argparse.ArgumentParser(prog="cpworker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _emulator_parser(sub)
    _local_parser(sub)
    _worker_parsers(sub)
    _action_type_parser(sub)
    args = parser.parse_args(argv)
    commands = {
        "emulator": _run_emulator,
        "local": _run_local,
        "run": _run_worker,
        "check-config": _check_config,
        "action-type": _run_action_type,
    }
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"cpworker {args.command}: {exc}", file=sys.stderr)
        return 2
    except CpWorkerError as exc:
        print(f"cpworker {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
