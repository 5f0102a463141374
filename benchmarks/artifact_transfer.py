"""Artifact throughput: cpworker against `aws s3 cp`, same emulator, same 1 GiB object.

Builds a zip (stored, not deflated) holding one file of incompressible bytes, starts the
emulator, takes one job's artifact credentials (GetJobDetails with boto3) and times, with
those credentials:

- `aws s3 cp` (the AWS CLI v1 of the venv, default settings: 10 requests at once, 8 MiB
  parts) uploading the zip as `bench/input.zip` and downloading it again; the CLI's fixed
  cost (a 1-byte `aws s3 cp` each way: interpreter start, botocore loading, one request)
  is measured too and subtracted, which makes the baseline faster and the ratios stricter;
- a real `cpworker run --burst` subprocess whose handler (`artifact_handler.py`) takes
  that object as input `In` and times download + unpack, a plain stream of the input,
  pack + upload of the unpacked file as output `Out` (`--output-format`, default `tar`: an
  uncompressed archive, so packing is one copy) and an upload of the same size from memory
  through `writer()` as output `Raw`.

Every client runs under a tiny launcher that reaps it with `wait4`, for its own peak RSS
and CPU seconds (see `LAUNCHER`). Prints a table (seconds, MiB/s, throughput relative to
`aws s3 cp` in the same direction; with `--rounds N` the best of N) and writes it as JSON
to `--out`. Goals: cpworker at least 90 % of `aws s3 cp`'s throughput and a peak RSS of
at most 150 MiB; a miss is reported, not fatal.

moto's absolute figures mean little, only the ratios do: it completes multipart uploads
slowly (6-15 s for 1 GiB, varying from run to run), and it reads the whole object for
every ranged GET, so both clients' ranged downloads of 1 GiB crawl (about 0.8 s per
8 MiB part); `--multipart-threshold-mib 2048` makes both clients' downloads and file
uploads one request (cpworker's `stream()` and `writer()` still go part by part).
Run: `python benchmarks/artifact_transfer.py [--size-mib 256] [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import boto3

from cpworker.emulator.client import EmulatorProcess
from cpworker.emulator.s3 import BUCKET

MIB = 1024 * 1024
HERE = Path(__file__).resolve().parent
AWS = Path(sys.executable).with_name("aws")
SETUP = {"category": "Build", "owner": "Custom", "provider": "ArtifactBenchSetup", "version": "1"}
ACTION = {"category": "Build", "owner": "Custom", "provider": "ArtifactBench", "version": "1"}
INPUT_KEY = "bench/input.zip"
PAYLOAD = "payload.bin"
# The options recorded with the results.
SETTINGS = (
    "size_mib", "rounds", "output_format", "part_size_mib", "job_concurrency",
    "multipart_threshold_mib",
)  # fmt: skip
PHASES = ("download_unpack", "stream", "pack_upload", "writer")  # the handler's, in order
RSS_GOAL_MIB = 150.0
THROUGHPUT_GOAL = 0.9
# The emulator accepts any SigV4 identity for its job API; this one is not a secret.
WORKER_IDENTITY = {"AWS_ACCESS_KEY_ID": "AKIDBENCH", "AWS_SECRET_ACCESS_KEY": "x"}
# (seconds key, CPU seconds key, direction, label, bytes key): the table's rows, in order.
ROWS = [
    ("aws_download_s", "aws_download_cpu_s", "download", "aws s3 cp", "input_bytes"),
    ("download_unpack_s", "cpu_download_unpack_s", "download", "cpworker download+unpack",
     "input_bytes"),
    ("stream_s", "cpu_stream_s", "download", "cpworker stream (transfer only)", "input_bytes"),
    ("aws_upload_s", "aws_upload_cpu_s", "upload", "aws s3 cp", "input_bytes"),
    ("pack_upload_s", "cpu_pack_upload_s", "upload", "cpworker pack+upload", "pack_upload_bytes"),
    ("writer_s", "cpu_writer_s", "upload", "cpworker writer (transfer only)", "writer_bytes"),
]  # fmt: skip


# --- the input ---------------------------------------------------------------------------


def build_input(path: Path, size_mib: int) -> int:
    """A zip (stored) of one `size_mib` MiB file of random bytes; returns the zip's size.

    64 MiB of `os.urandom` is reused block after block, each block starting with its own
    number and fresh random bytes, so no two blocks are alike.
    """
    base = memoryview(os.urandom(64 * MIB))
    left = size_mib * MIB
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive,
        archive.open(PAYLOAD, "w", force_zip64=True) as out,
    ):
        block = 0
        while left > 0:
            prefix = block.to_bytes(8, "big") + os.urandom(24)
            length = min(left, len(base))
            out.write(prefix[:length])
            out.write(base[len(prefix) : length])
            left -= length
            block += 1
    return path.stat().st_size


# --- measured subprocesses ---------------------------------------------------------------


class Measured(NamedTuple):
    """A subprocess that exited: wall time from start, exit code, peak RSS and CPU time."""

    seconds: float
    returncode: int
    peak_rss_mib: float
    cpu_s: float


# Runs argv[2:] as its forked child and writes the child's own peak RSS (KiB) and CPU
# seconds from wait4 to argv[1]. Spawned directly, a child's ru_maxrss would start from
# this benchmark's peak RSS (Linux records the pre-exec memory's high-water mark at
# exec, and Python spawns with vfork), so a small child would show this process's size;
# through the launcher the floor is the launcher's few MiB.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The launcher running `command`, in a session of its own (stopped by `stop`)."""
    launcher = [sys.executable, "-S", "-c", LAUNCHER, str(log.with_suffix(".rusage"))]
    with log.open("wb") as output:
        return subprocess.Popen(
            [*launcher, *command], env=env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=output, start_new_session=True,
        )  # fmt: skip


def reap(process: subprocess.Popen[bytes]) -> int:
    """The exit code of a process that has exited."""
    return process.wait()


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (SIGKILL after 15 s) to the launcher's process group, if it still runs."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def run_measured(
    command: list[str], env: dict[str, str], log: Path, timeout_s: float
) -> Measured:
    """Run `command` (output to `log`) until it exits; stopped on timeout, error or Ctrl-C.

    Its exit is awaited on a pidfd (readable once the process has exited).
    """
    started = time.perf_counter()
    process = spawn(command, env, log)
    try:
        pidfd = os.pidfd_open(process.pid)
        try:
            with anyio.fail_after(timeout_s):
                await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        seconds = time.perf_counter() - started
        returncode = reap(process)
    finally:
        stop(process)
    rss_kib, cpu_s = (await anyio.Path(log.with_suffix(".rusage")).read_text()).split()
    return Measured(seconds, returncode, int(rss_kib) / 1024, float(cpu_s))


# --- aws s3 cp ---------------------------------------------------------------------------


def clean_env(tmp: Path, extra: dict[str, str]) -> dict[str, str]:
    """The environment minus AWS_* and CPWORKER_* (no profile, no config file), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CPWORKER_"))}
    env.update(
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(tmp / "no-such-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-such-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(extra)
    return env


def job_credentials(endpoint: str, job_id: str) -> dict[str, str]:
    """A job's artifact credentials, from GetJobDetails, as AWS_* environment variables."""
    client = boto3.client(
        "codepipeline",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=WORKER_IDENTITY["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=WORKER_IDENTITY["AWS_SECRET_ACCESS_KEY"],
    )
    data = client.get_job_details(jobId=job_id)["jobDetails"]["data"]
    creds = data["artifactCredentials"]
    return {
        "AWS_ACCESS_KEY_ID": creds["accessKeyId"],
        "AWS_SECRET_ACCESS_KEY": creds["secretAccessKey"],
        "AWS_SESSION_TOKEN": creds["sessionToken"],
    }


def aws_config(tmp: Path, args: argparse.Namespace) -> str:
    """The CLI's config file: its defaults, or `--multipart-threshold-mib` (binary MB)."""
    path = tmp / "aws-config"
    text = "[default]\n"
    if args.multipart_threshold_mib is not None:
        text += f"s3 =\n    multipart_threshold = {args.multipart_threshold_mib}MB\n"
    path.write_text(text, encoding="utf-8")
    return str(path)


async def aws_cp(env: dict[str, str], s3_url: str, source: str, target: str, log: Path) -> Measured:
    """One `aws s3 cp` process, start to exit; raises if it fails."""
    command = [str(AWS), "s3", "cp", source, target, "--endpoint-url", s3_url, "--no-progress"]
    done = await run_measured(command, env, log, timeout_s=3600.0)
    if done.returncode != 0:
        tail = (await anyio.Path(log).read_text(errors="replace"))[-2000:]
        raise RuntimeError(f"{' '.join(command[:5])} exited {done.returncode}: {tail}")
    return done


async def aws_round(env: dict[str, str], s3_url: str, tmp: Path, zip_path: Path) -> dict[str, Any]:
    """Upload, download and the CLI's fixed cost each way (a 1-byte object)."""
    remote = f"s3://{BUCKET}/{INPUT_KEY}"
    tiny, tiny_remote, log = tmp / "tiny.bin", f"s3://{BUCKET}/bench/tiny.bin", tmp / "aws.log"
    await anyio.Path(tiny).write_bytes(b"x")
    fixed_up = await aws_cp(env, s3_url, str(tiny), tiny_remote, log)
    fixed_down = await aws_cp(env, s3_url, tiny_remote, str(tmp / "tiny.copy"), log)
    upload = await aws_cp(env, s3_url, str(zip_path), remote, log)
    local = tmp / "local.zip"
    download = await aws_cp(env, s3_url, remote, str(local), log)
    if (await anyio.Path(local).stat()).st_size != (await anyio.Path(zip_path).stat()).st_size:
        raise RuntimeError("aws s3 cp downloaded a file of the wrong size")
    await anyio.Path(local).unlink()
    times: dict[str, Any] = {}
    for d, run, fixed in (("upload", upload, fixed_up), ("download", download, fixed_down)):
        times |= {f"aws_{d}_process_s": run.seconds, f"aws_fixed_{d}_s": fixed.seconds}
        times |= {f"aws_{d}_s": run.seconds - fixed.seconds, f"aws_{d}_process_cpu_s": run.cpu_s}
        times[f"aws_{d}_cpu_s"] = run.cpu_s - fixed.cpu_s
        times[f"aws_{d}_peak_rss_mib"] = run.peak_rss_mib
    return times


# --- the worker --------------------------------------------------------------------------


def worker_config(emulator: EmulatorProcess, tmp: Path, args: argparse.Namespace) -> str:
    """The worker's TOML: one action type running `artifact_handler:handle`."""
    settings = {
        "transfer_part_size_mib": args.part_size_mib,
        "transfer_concurrency_per_job": args.job_concurrency,
        "multipart_threshold_mib": args.multipart_threshold_mib,
    }
    overrides = "".join(f"{k} = {v}\n" for k, v in settings.items() if v is not None)
    options = {"results_file": str(tmp / "timings.json"), "writer_mib": args.size_mib}
    if args.profile:
        options["profile_file"] = str(Path(args.profile).resolve())
    handler_options = "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())
    return f"""
codepipeline_endpoint_url = {json.dumps(emulator.codepipeline)}
s3_endpoint_url = {json.dumps(emulator.s3)}
log_level = "WARNING"
log_format = "text"
work_dir = {json.dumps(str(tmp / "work"))}
shutdown_grace_s = 5
{overrides}
[action_types.bench]
category = "Build"
provider = "ArtifactBench"
handler = "artifact_handler:handle"
slots = 1
output_format = {json.dumps(args.output_format)}
[action_types.bench.handler_options]
{handler_options}"""


async def worker_round(
    emulator: EmulatorProcess, tmp: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One job through a fresh worker: the handler's timings plus the worker's RSS and CPU."""
    answer = await emulator.admin.create_jobs(
        {
            "actionTypeId": ACTION,
            "inputArtifacts": [{"name": "In", "objectKey": INPUT_KEY}],
            "outputArtifacts": ["Out", "Raw"],
        }
    )
    job_id: str = answer["jobIds"][0]
    config, log = tmp / "worker.toml", tmp / "worker.log"
    await anyio.Path(config).write_text(worker_config(emulator, tmp, args), encoding="utf-8")
    await anyio.Path(tmp / "work").mkdir(exist_ok=True)  # the worker does not create it
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = clean_env(tmp, {**WORKER_IDENTITY, "PYTHONPATH": path})
    # --burst, not --max-jobs 1: with --max-jobs the worker drains at once after taking the
    # job, and a job running longer than shutdown_grace_s is cancelled.
    command = [sys.executable, "-m", "cpworker", "run", "-c", str(config), "--burst"]
    done = await run_measured(command, env, log, timeout_s=max(600.0, args.size_mib * 2.0))
    status = (await emulator.admin.job(job_id))["status"]
    if done.returncode != 0 or status != "Succeeded":
        tail = (await anyio.Path(log).read_text(errors="replace"))[-3000:]
        raise RuntimeError(f"worker exited {done.returncode}, job {status}; its log:\n{tail}")
    timings: dict[str, Any] = json.loads(await anyio.Path(tmp / "timings.json").read_text())
    timings["peak_rss_mib"] = done.peak_rss_mib
    timings["cpu_s"] = done.cpu_s
    timings["process_s"] = done.seconds
    return timings


# --- the run -----------------------------------------------------------------------------


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every round against one emulator; the temp dir and the emulator go away at the end."""
    with tempfile.TemporaryDirectory(prefix="cpworker-artifact-bench-") as name:
        tmp = Path(name)
        zip_path = tmp / "input.zip"
        started = time.perf_counter()
        input_bytes = await anyio.to_thread.run_sync(build_input, zip_path, args.size_mib)
        took = time.perf_counter() - started
        print(f"built {zip_path.name}: {input_bytes} bytes in {took:.1f} s")
        rounds = []
        async with EmulatorProcess.start() as emulator:
            setup = await emulator.admin.create_jobs({"actionTypeId": SETUP})
            creds = await anyio.to_thread.run_sync(
                job_credentials, emulator.codepipeline, setup["jobIds"][0]
            )
            aws_env = clean_env(tmp, {**creds, "AWS_CONFIG_FILE": aws_config(tmp, args)})
            for n in range(args.rounds):
                one = await aws_round(aws_env, emulator.s3, tmp, zip_path)
                one.update(await worker_round(emulator, tmp, args))
                one["input_bytes"] = input_bytes
                print(f"round {n + 1}: " + ", ".join(f"{k} {v:.6g}" for k, v in one.items()))
                rounds.append(one)
    return summarize(rounds, args)


def table_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The best time of each row, its MiB/s and its ratio to `aws s3 cp` in that direction."""
    rows = []
    aws_mib_s: dict[str, float] = {}
    for key, cpu_key, direction, label, size_key in ROWS:
        best = min(rounds, key=lambda r: float(r[key]))
        mib_s = best[size_key] / MIB / best[key]
        if label == "aws s3 cp":
            aws_mib_s[direction] = mib_s
        ratio = mib_s / aws_mib_s[direction]
        rows.append(
            {"direction": direction, "path": label, "seconds": best[key], "bytes": best[size_key],
             "mib_s": mib_s, "ratio_to_aws": ratio, "cpu_s": best[cpu_key]}
        )  # fmt: skip
    return rows


def summarize(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The table, the goals, memory and CPU (peaks: highest round; CPU: lowest), the machine."""
    rows = table_rows(rounds)
    peak_rss = max(r["peak_rss_mib"] for r in rounds)
    # The goal is for the big-artifact path: download + unpack, then pack + upload. The
    # writer() phase after them holds its parts in flight in memory by design.
    path_rss = max(r["max_rss_after_pack_upload_mib"] for r in rounds)
    phases = ("at_start", *(f"after_{p}" for p in PHASES))
    both = ("upload", "download")
    return {
        **{k: getattr(args, k) for k in SETTINGS},
        "rows": rows,
        "aws_fixed_cost_s": {d: min(r[f"aws_fixed_{d}_s"] for r in rounds) for d in both},
        "cpworker_peak_rss_mib": peak_rss,
        "cpworker_cpu_s": min(r["cpu_s"] for r in rounds),
        "cpworker_peak_rss_by_phase_mib": {
            p: max(r[f"max_rss_{p}_mib"] for r in rounds) for p in phases
        },
        "aws_peak_rss_mib": {d: max(r[f"aws_{d}_peak_rss_mib"] for r in rounds) for d in both},
        "aws_cpu_s": {d: min(r[f"aws_{d}_process_cpu_s"] for r in rounds) for d in both},
        "goals": {
            "throughput_ratio_min": THROUGHPUT_GOAL,
            "throughput_met": {
                r["path"]: r["ratio_to_aws"] >= THROUGHPUT_GOAL
                for r in rows
                if r["path"] != "aws s3 cp"
            },
            "peak_rss_mib_max": RSS_GOAL_MIB,
            "peak_rss_path_mib": path_rss,
            "peak_rss_met": path_rss <= RSS_GOAL_MIB,
        },
        "machine": machine(),
        "per_round": rounds,
    }


def machine() -> dict[str, Any]:
    """CPU count, Python and the versions of the libraries that move the bytes."""
    versions: dict[str, str | None] = {}
    for package in ("aiobotocore", "botocore", "aiohttp", "awscli", "s3transfer", "moto"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    changed = subprocess.run(
        ["git", "-C", str(HERE), "status", "--porcelain", "--", "../cpworker"],
        capture_output=True,
        text=True,
    )
    return {
        "cpworker_commit": commit.stdout.strip() or None,
        "cpworker_changed_files": [line[3:] for line in changed.stdout.splitlines()],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def report(result: dict[str, Any]) -> Iterator[str]:
    """The table, memory and CPU, the goals and the machine, as lines of text."""
    rounds = result["rounds"]
    best = f"best of {rounds} rounds" if rounds > 1 else "1 round"
    yield (
        f"artifact transfer: {result['size_mib']} MiB input, output_format "
        f"{result['output_format']}, {best}"
    )
    part, parallel = result["part_size_mib"], result["job_concurrency"]
    threshold = result["multipart_threshold_mib"]
    yield (
        f"  cpworker part size {'8 MiB (default)' if part is None else f'{part:g} MiB'}, parts "
        f"at once per job {parallel or '8 (default)'}; multipart threshold "
        + ("aws 8 MiB, cpworker 16 MiB (defaults)" if threshold is None else f"{threshold} MiB")
    )
    yield (
        f"  {'direction':<10}{'path':<34}{'seconds':>9}{'MiB/s':>9}{'vs aws s3 cp':>14}{'CPU s':>8}"
    )
    for row in result["rows"]:
        yield (
            f"  {row['direction']:<10}{row['path']:<34}{row['seconds']:>9.2f}"
            f"{row['mib_s']:>9.1f}{row['ratio_to_aws']:>13.2f}x{row['cpu_s']:>8.1f}"
        )
    fixed = result["aws_fixed_cost_s"]
    yield (
        "  (moto reads the whole object for every ranged GET: both clients' ranged downloads "
        "of a large object pay that)"
    )
    yield (
        f"  (aws s3 cp: its fixed cost, a 1-byte cp, is subtracted from its seconds and CPU: "
        f"upload {fixed['upload']:.2f} s, download {fixed['download']:.2f} s; CPU s: the "
        "client process's, all threads)"
    )
    yield from resources_and_goals(result)


def resources_and_goals(result: dict[str, Any]) -> Iterator[str]:
    """Peak RSS and CPU of both clients, the goals met or missed, the machine."""
    rss, cpu = result["cpworker_peak_rss_mib"], result["cpworker_cpu_s"]
    aws_rss, aws_cpu = result["aws_peak_rss_mib"], result["aws_cpu_s"]
    yield (
        f"peak RSS / CPU: cpworker worker (whole run, all four phases) {rss:.0f} MiB / "
        f"{cpu:.1f} s; aws s3 cp upload {aws_rss['upload']:.0f} MiB / {aws_cpu['upload']:.1f} s, "
        f"download {aws_rss['download']:.0f} MiB / {aws_cpu['download']:.1f} s"
    )
    by_phase = result["cpworker_peak_rss_by_phase_mib"]
    yield "cpworker peak RSS so far: " + ", ".join(f"{k} {v:.0f}" for k, v in by_phase.items())
    goals = result["goals"]
    for path, met in goals["throughput_met"].items():
        yield f"goal >= {THROUGHPUT_GOAL:.0%} of aws s3 cp: {path}: {'met' if met else 'MISSED'}"
    yield (
        f"goal peak RSS <= {RSS_GOAL_MIB:.0f} MiB through download+unpack and pack+upload: "
        f"{goals['peak_rss_path_mib']:.0f} MiB, {'met' if goals['peak_rss_met'] else 'MISSED'} "
        "(the writer() phase after them keeps its parts in flight in memory)"
    )
    m = result["machine"]
    changed = ", ".join(m["cpworker_changed_files"])
    yield (
        f"machine: {m['cpus']} CPUs, Python {m['python']}, aiobotocore {m['aiobotocore']}, "
        f"botocore {m['botocore']}, aiohttp {m['aiohttp']}, awscli {m['awscli']}, "
        f"moto {m['moto']}; cpworker at {m['cpworker_commit']}"
        + (f" with uncommitted changes to {changed}" if changed else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add = parser.add_argument
    add("--size-mib", type=int, default=1024, help="payload size (default 1024)")
    add("--rounds", type=int, default=1, help="report the best of N rounds")
    add("--part-size-mib", type=float, help="cpworker's part size")
    add("--job-concurrency", type=int, help="cpworker's parts at once per job")
    add("--multipart-threshold-mib", type=int, help="both clients' (defaults: aws 8, cpworker 16)")
    add("--output-format", choices=("tar", "zip", "tar.gz"), default="tar")
    add("--profile", help="write a cProfile of the handler here (event loop thread only)")
    add("--out", default=str(HERE / "results" / "artifacts.json"))
    args = parser.parse_args()
    if args.size_mib < 1 or args.rounds < 1:
        parser.error("--size-mib and --rounds must be 1 or more")
    try:
        result = anyio.run(measure, args)
    except KeyboardInterrupt:
        sys.exit(130)  # the temp dir, the worker and the emulator are gone already
    print("\n".join(report(result)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
