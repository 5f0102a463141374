"""What the baseline workers share: arguments, the job loop, the handlers.

The loop is the one of the CodePipeline custom action tutorials: poll for one job, sleep
a second if there is none, otherwise acknowledge it, run the handler and report success
(or failure, with the handler's error as the message). Errors of the job API are logged
and the loop goes on; botocore's standard retry mode (5 attempts) retries them first.

Handlers (`--handler`):

- `noop`: nothing; `sleep`: `time.sleep(--sleep-s)`;
- `artifacts`: the tutorials' artifact flow with boto3: an S3 client built for the job
  from its artifact credentials, `download_file` + `zipfile` for every input artifact,
  `shutil.make_archive` + `upload_file` (SSE-KMS with the job's key) for every output;
- `artifacts-cli`: the same flow, each transfer an `aws s3 cp` subprocess given the job's
  credentials in its environment (the shell-script style of worker).

Both handlers work in a `tempfile.TemporaryDirectory` removed after every job: inputs
are unpacked into one folder, which is zipped once and uploaded as every output.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_codepipeline import CodePipelineClient
    from mypy_boto3_codepipeline.type_defs import (
        ActionTypeIdTypeDef,
        ArtifactTypeDef,
        AWSSessionCredentialsTypeDef,
        JobDataTypeDef,
        JobTypeDef,
    )
    from mypy_boto3_s3 import S3Client

__all__ = [
    "HANDLERS",
    "Options",
    "Shutdown",
    "codepipeline_client",
    "configure_logging",
    "handle_job",
    "log",
    "parse_args",
    "work_loop",
]

REGION = "us-east-1"
DEFAULT_KMS_KEY_ID = "alias/aws/s3"  # what S3 uses for SSE-KMS when a job names no key
AWS = Path(sys.executable).with_name("aws")  # the AWS CLI installed with this Python
CATEGORIES = ("Approval", "Build", "Compute", "Deploy", "Invoke", "Source", "Test")
FAILURE_MESSAGE_MAX = 500

log = logging.getLogger("baseline")


# --- options -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The command line of a baseline worker."""

    endpoint_url: str
    s3_endpoint_url: str | None
    action_type: ActionTypeIdTypeDef
    handler: str
    sleep_s: float
    empty_sleep_s: float
    max_jobs: int | None
    threads: int


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def parse_args(argv: Sequence[str] | None, description: str, *, threaded: bool) -> Options:
    """Parse a baseline's arguments; `--threads` exists only when `threaded`."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--endpoint-url", required=True, help="the CodePipeline endpoint")
    add("--s3-endpoint-url", help="the S3 endpoint of the artifact bucket (default: AWS's)")
    add("--category", default="Build", choices=CATEGORIES, help="action type category")
    add("--provider", required=True, help="action type provider (owner is Custom)")
    add("--version", default="1", help="action type version")
    add("--handler", default="noop", choices=sorted(HANDLERS), help="what each job does")
    add("--sleep-s", type=_seconds, default=1.0, help="the sleep handler's duration")
    add("--empty-sleep-s", type=_seconds, default=1.0, help="the sleep after an empty poll")
    add("--max-jobs", type=_positive_int, help="exit 0 once this many jobs were handled")
    if threaded:
        add("--threads", type=_positive_int, default=32, help="worker threads (and connections)")
    args = parser.parse_args(argv)
    action_type = {
        "category": args.category,
        "owner": "Custom",
        "provider": args.provider,
        "version": args.version,
    }
    return Options(
        endpoint_url=args.endpoint_url,
        s3_endpoint_url=args.s3_endpoint_url,
        action_type=cast("ActionTypeIdTypeDef", action_type),
        handler=args.handler,
        sleep_s=args.sleep_s,
        empty_sleep_s=args.empty_sleep_s,
        max_jobs=args.max_jobs,
        threads=args.threads if threaded else 1,
    )


def configure_logging() -> None:
    """Our own messages at INFO on stderr; other libraries' at WARNING."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(threadName)s %(levelname)s %(message)s"
    )
    log.setLevel(logging.INFO)


def codepipeline_client(endpoint_url: str, max_pool_connections: int = 10) -> CodePipelineClient:
    """The worker's CodePipeline client: credentials found by boto3, standard retries."""
    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=max_pool_connections,
    )
    return boto3.client(
        "codepipeline", endpoint_url=endpoint_url, region_name=REGION, config=config
    )


# --- stopping ----------------------------------------------------------------------------


class _WakeUp(Exception):
    """Raised by the signal handler to end the main thread's idle sleep early."""


class Shutdown:
    """When to stop polling: after SIGTERM or SIGINT, or once `max_jobs` jobs were handled.

    The job in hand is always finished first. Idle sleeps end at once: worker threads
    (`threaded`) sleep on an Event that is set; the main thread sleeps in `time.sleep`,
    which the signal handler interrupts by raising. The main thread never waits on the
    Event, because a handler setting an Event whose lock the interrupted thread holds
    would deadlock.
    """

    def __init__(self, max_jobs: int | None, *, threaded: bool) -> None:
        self._requested = False
        self._wake = threading.Event() if threaded else None
        self._max_jobs = max_jobs
        self._handled = 0
        self._lock = threading.Lock()  # never taken by the signal handler
        self._main_sleeping = False

    @property
    def requested(self) -> bool:
        return self._requested

    @property
    def handled(self) -> int:
        return self._handled

    def install(self) -> None:
        """Handle SIGTERM and SIGINT (call from the main thread)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def request(self) -> None:
        """Stop polling (from any thread)."""
        self._requested = True
        if self._wake is not None:
            self._wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request()
        if self._main_sleeping:
            raise _WakeUp

    def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or less if a stop is requested meanwhile."""
        if self._wake is not None:
            self._wake.wait(seconds)
            return
        try:
            self._main_sleeping = True
            if not self._requested:
                time.sleep(seconds)
        except _WakeUp:
            pass
        finally:
            self._main_sleeping = False

    def job_handled(self) -> None:
        """Count a job; request the stop once `max_jobs` are done."""
        with self._lock:
            self._handled += 1
            done = self._max_jobs is not None and self._handled >= self._max_jobs
        if done:
            self.request()


# --- the loop ----------------------------------------------------------------------------


def work_loop(client: CodePipelineClient, options: Options, shutdown: Shutdown) -> None:
    """Poll and handle jobs one at a time until a stop is requested."""
    handler = HANDLERS[options.handler]
    while not shutdown.requested:
        job = poll_one(client, options.action_type)
        if job is None:
            shutdown.sleep(options.empty_sleep_s)
            continue
        handle_job(client, job, handler, options)
        shutdown.job_handled()


def poll_one(client: CodePipelineClient, action_type: ActionTypeIdTypeDef) -> JobTypeDef | None:
    """One job, or None if there is none (or PollForJobs failed after its retries)."""
    try:
        jobs = client.poll_for_jobs(actionTypeId=action_type, maxBatchSize=1)["jobs"]
    except (BotoCoreError, ClientError) as exc:
        log.warning("PollForJobs failed: %s", exc)
        return None
    return jobs[0] if jobs else None


def handle_job(
    client: CodePipelineClient, job: JobTypeDef, handler: Handler, options: Options
) -> None:
    """Acknowledge the job, run the handler, report success or failure."""
    job_id = job["id"]
    try:
        client.acknowledge_job(jobId=job_id, nonce=job["nonce"])
    except (BotoCoreError, ClientError) as exc:
        log.warning("job %s: AcknowledgeJob failed, leaving the job: %s", job_id, exc)
        return
    try:
        handler(job["data"], options)
    except Exception as exc:
        log.warning("job %s failed: %s: %s", job_id, type(exc).__name__, exc)
        message = str(exc)[:FAILURE_MESSAGE_MAX] or type(exc).__name__
        try:
            client.put_job_failure_result(
                jobId=job_id, failureDetails={"type": "JobFailed", "message": message}
            )
        except (BotoCoreError, ClientError) as report_exc:
            log.warning("job %s: PutJobFailureResult failed: %s", job_id, report_exc)
        return
    try:
        client.put_job_success_result(jobId=job_id)
    except (BotoCoreError, ClientError) as exc:
        log.warning("job %s: PutJobSuccessResult failed: %s", job_id, exc)


# --- handlers ----------------------------------------------------------------------------

Handler = Callable[["JobDataTypeDef", Options], None]
# (bucket, key, local file): one transfer of an artifact.
Transfer = Callable[[str, str, Path], None]


def noop(data: JobDataTypeDef, options: Options) -> None:
    """Nothing: the cost of the job API alone."""


def sleep(data: JobDataTypeDef, options: Options) -> None:
    """A job that waits (`--sleep-s`): stands for work done elsewhere."""
    time.sleep(options.sleep_s)


def artifacts(data: JobDataTypeDef, options: Options) -> None:
    """The artifact flow with a boto3 S3 client made for this job."""
    credentials = data["artifactCredentials"]
    session = boto3.session.Session(
        aws_access_key_id=credentials["accessKeyId"],
        aws_secret_access_key=credentials["secretAccessKey"],
        aws_session_token=credentials["sessionToken"],
    )
    s3: S3Client = session.client(
        "s3",
        endpoint_url=options.s3_endpoint_url,
        region_name=REGION,
        config=Config(signature_version="s3v4"),
    )
    extra_args = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id(data)}

    def upload(bucket: str, key: str, path: Path) -> None:
        s3.upload_file(str(path), bucket, key, ExtraArgs=extra_args)

    def download(bucket: str, key: str, path: Path) -> None:
        s3.download_file(bucket, key, str(path))

    try:
        artifact_flow(data, download, upload)
    finally:
        s3.close()


def artifacts_cli(data: JobDataTypeDef, options: Options) -> None:
    """The artifact flow with one `aws s3 cp` process per transfer."""
    env = cli_environment(data["artifactCredentials"])
    endpoint = ["--endpoint-url", options.s3_endpoint_url] if options.s3_endpoint_url else []
    sse = ["--sse", "aws:kms", "--sse-kms-key-id", kms_key_id(data)]

    def upload(bucket: str, key: str, path: Path) -> None:
        aws_s3_cp([str(path), f"s3://{bucket}/{key}", *endpoint, *sse], env)

    def download(bucket: str, key: str, path: Path) -> None:
        aws_s3_cp([f"s3://{bucket}/{key}", str(path), *endpoint], env)

    artifact_flow(data, download, upload)


def artifact_flow(data: JobDataTypeDef, download: Transfer, upload: Transfer) -> None:
    """Download and unzip every input into one folder, zip it, upload it as every output."""
    with tempfile.TemporaryDirectory(prefix="baseline-job-") as tmp:
        work = Path(tmp)
        folder = work / "src"
        folder.mkdir()
        for artifact in data.get("inputArtifacts", []):
            archive = work / "in.zip"
            download(*s3_location(artifact), archive)
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(folder)
            archive.unlink()
        outputs = data.get("outputArtifacts", [])
        if outputs:
            packed = Path(shutil.make_archive(str(work / "out"), "zip", root_dir=folder))
            for artifact in outputs:
                upload(*s3_location(artifact), packed)


def s3_location(artifact: ArtifactTypeDef) -> tuple[str, str]:
    """An artifact's bucket and key."""
    location = artifact["location"]["s3Location"]
    return location["bucketName"], location["objectKey"]


def kms_key_id(data: JobDataTypeDef) -> str:
    """The job's KMS key for the outputs, or S3's default key if it names none."""
    key = data.get("encryptionKey")
    return key["id"] if key else DEFAULT_KMS_KEY_ID


def cli_environment(credentials: AWSSessionCredentialsTypeDef) -> dict[str, str]:
    """This process's environment with the job's credentials, for the AWS CLI."""
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": credentials["accessKeyId"],
        "AWS_SECRET_ACCESS_KEY": credentials["secretAccessKey"],
        "AWS_SESSION_TOKEN": credentials["sessionToken"],
        "AWS_DEFAULT_REGION": REGION,
    }


def aws_s3_cp(arguments: list[str], env: dict[str, str]) -> None:
    """`aws s3 cp ARGUMENTS --no-progress`; raises with the end of its stderr if it fails."""
    command = [str(AWS), "s3", "cp", *arguments, "--no-progress"]
    done = subprocess.run(
        command, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False
    )
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip()[-400:]
        raise RuntimeError(f"aws s3 cp exited with {done.returncode}: {error}")


HANDLERS: dict[str, Handler] = {
    "noop": noop,
    "sleep": sleep,
    "artifacts": artifacts,
    "artifacts-cli": artifacts_cli,
}
