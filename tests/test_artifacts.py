"""Artifact transfer against the emulator's real S3 (moto's server, authentication on).

Every test polls a job of its own action type and uses that job's artifact credentials.
Archives that break the unpack rules are uploaded with the job's own credentials to a new
key in the job's bucket, then downloaded like any input artifact.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import stat
import traceback
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from cpworker import archives, packing
from cpworker import models as m
from cpworker.artifacts import ArtifactSettings, DiskBudget, JobArtifacts, UnpackLimits
from cpworker.control_plane import ControlPlane
from cpworker.emulator.client import EmulatorProcess
from cpworker.errors import ArtifactError, CpWorkerError
from cpworker.s3 import JobCredentials, ObjectRef, S3Settings, SharedS3
from cpworker.transfers import Transfers, TransferSettings
from tests.conftest import plain_s3
from tests.trees import make_source, snapshot

KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
LIMITS = UnpackLimits()
DEFAULT_TRANSFERS = TransferSettings()
FILE, DIR, LINK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK

Entry = tuple[str, bytes, int]  # (name in the archive, content, st_mode)


def _settings(emulator: EmulatorProcess) -> S3Settings:
    return S3Settings(endpoint_url=emulator.s3, max_attempts=2)


def _credentials(job: m.Job) -> m.ArtifactCredentials:
    assert job.data.artifact_credentials is not None
    return job.data.artifact_credentials


def _location(artifact: m.Artifact) -> m.S3ArtifactLocation:
    assert artifact.location is not None
    assert artifact.location.s3_location is not None
    return artifact.location.s3_location


def _artifact(name: str, bucket: str, key: str) -> m.Artifact:
    location = m.S3ArtifactLocation(bucket_name=bucket, object_key=key)
    return m.Artifact(name=name, location=m.ArtifactLocation(type="S3", s3_location=location))


@pytest.fixture
async def job(emulator: EmulatorProcess, cp: ControlPlane, action_type: m.ActionTypeId) -> m.Job:
    """A polled job with input `Src` ({a/b.txt, top.txt}), output `Out` and a KMS key."""
    await emulator.admin.create_jobs(
        {
            "actionTypeId": m.to_builtins(action_type),
            "inputArtifacts": [{"name": "Src", "files": {"a/b.txt": "hi", "top.txt": "top"}}],
            "outputArtifacts": ["Out"],
            "encryptionKeyId": KEY_ARN,
        }
    )
    [polled] = await cp.poll_for_jobs(action_type, 10)
    return polled


class Kit:
    """The worker's artifact side for one job, and a plain S3 client to look at S3 with."""

    def __init__(self, shared: SharedS3, raw: Any, job: m.Job, tmp: Path) -> None:
        self.shared, self.raw, self.job, self.tmp = shared, raw, job, tmp
        self.fetched = 0

    def artifacts(
        self,
        *,
        credentials: m.ArtifactCredentials | None = None,
        limits: UnpackLimits = LIMITS,
        disk: DiskBudget | None = None,
        output_format: str = "zip",
        encryption_key: m.EncryptionKey | str | None = "job",
        transfers: TransferSettings = DEFAULT_TRANSFERS,
    ) -> JobArtifacts:
        initial = credentials or _credentials(self.job)

        async def fetch() -> m.ArtifactCredentials:
            self.fetched += 1
            return initial  # what GetJobDetails would answer: here, the same ones

        data = self.job.data
        if encryption_key != "job":
            data = msgspec.structs.replace(data, encryption_key=encryption_key)
        return JobArtifacts(
            Transfers(self.shared, transfers),
            ArtifactSettings(limits=limits),
            disk or DiskBudget(0, self.tmp),
            data,
            JobCredentials(initial, fetch),
            output_format,
        )

    async def download(self, artifact: m.Artifact, target: Path, **kw: Any) -> Path:
        return await self.artifacts(**kw).download(artifact, target)

    async def upload(self, artifact: m.Artifact, source: Path, **kw: Any) -> int:
        return await self.artifacts(**kw).upload(artifact, source)


@pytest.fixture
async def s3(emulator: EmulatorProcess, job: m.Job, tmp_path: Path) -> AsyncIterator[Kit]:
    """The worker's shared S3 client, and a plain one signed with the job's credentials."""
    async with (
        SharedS3.open(_settings(emulator)) as shared,
        plain_s3(emulator, _credentials(job)) as raw,
    ):
        yield Kit(shared, raw, job, tmp_path)


async def _put_zip(client: Any, job: m.Job, body: bytes, name: str = "Crafted") -> m.Artifact:
    """Store `body` under a new key of the job's bucket; the artifact pointing at it."""
    bucket = _location(job.data.input_artifacts[0]).bucket_name
    key = f"tests/{uuid.uuid4().hex}.zip"
    await client.put_object(Bucket=bucket, Key=key, Body=body)
    return _artifact(name, bucket, key)


def _zip(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            # mode 0: as written on Windows (DOS attributes only, no Unix mode)
            info.create_system = 3 if mode else 0
            info.external_attr = mode << 16 if mode else 0x20
            archive.writestr(info, data)
    return buffer.getvalue()


def _listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def _assert_no_secrets(exc: BaseException, secrets: list[str]) -> None:
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    chained: BaseException | None = exc
    while chained is not None:
        texts += [str(chained), repr(chained)]
        chained = chained.__cause__ or chained.__context__
    for text in texts:
        for secret in secrets:
            assert secret not in text


# --- round trips ----------------------------------------------------------------------


async def test_download_unpacks_the_jobs_input(s3: Kit, job: m.Job, tmp_path: Path) -> None:
    target = tmp_path / "src"
    unpacked = await s3.download(job.data.input_artifacts[0], target)
    assert unpacked == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert (target / "a" / "b.txt").read_text() == "hi"
    assert (target / "top.txt").read_text() == "top"
    assert _listing(tmp_path) == ["src"]  # the temp zip is gone


async def test_upload_then_download_round_trip_with_the_jobs_kms_key(
    s3: Kit, job: m.Job, tmp_path: Path
) -> None:
    source = tmp_path / "out"
    source.mkdir()
    make_source(source)
    before = _listing(tmp_path)
    [output] = job.data.output_artifacts
    size = await s3.upload(output, source)
    assert _listing(tmp_path) == before  # the temp zip is gone

    location = _location(output)
    head = await s3.raw.head_object(Bucket=location.bucket_name, Key=location.object_key)
    assert head["ContentLength"] == size > 0
    assert head["ServerSideEncryption"] == "aws:kms"
    assert KEY_ARN in head["SSEKMSKeyId"]

    back = await s3.download(output, tmp_path / "back")
    assert snapshot(back) == snapshot(source)
    assert (back / "latest").read_text() == "#!/bin/sh\necho built\n"


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
async def test_an_output_uploaded_while_it_is_packed_is_the_packed_archive(
    s3: Kit, job: m.Job, tmp_path: Path, fmt: str
) -> None:
    """Parts go up while packing goes on; zip headers written again once their entry is
    complete must not go up before that: the object equals the archive packed on disk."""
    source = tmp_path / "out"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(os.urandom(7 * 1024 * 1024))  # stored: does not compress
    (source / "sub" / "b.txt").write_bytes(b"line of text\n" * 600_000)  # deflated
    (source / "sub" / "c.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    (source / "link").symlink_to("sub/b.txt")
    [output] = job.data.output_artifacts
    parts = TransferSettings(part_size=5 * 1024 * 1024, multipart_threshold=1)
    size = await s3.upload(output, source, output_format=fmt, transfers=parts)

    location = _location(output)
    answer = await s3.raw.get_object(Bucket=location.bucket_name, Key=location.object_key)
    async with answer["Body"] as body:
        uploaded = await body.read()
    packed = tmp_path / "packed"
    packing.pack(source, packed, fmt, "test")  # type: ignore[arg-type]
    assert uploaded == packed.read_bytes()
    assert len(uploaded) == size
    assert answer["ETag"].strip('"').endswith(f"-{-(-size // (5 * 1024 * 1024))}")
    if fmt == "zip":
        with zipfile.ZipFile(packed) as archive:
            methods = {i.filename: i.compress_type for i in archive.infolist()}
        assert methods["a.bin"] == methods["sub/c.bin"] == zipfile.ZIP_STORED
        assert methods["sub/b.txt"] == zipfile.ZIP_DEFLATED


async def test_a_pack_failure_midway_aborts_the_upload_and_names_the_file(
    s3: Kit, job: m.Job, tmp_path: Path
) -> None:
    """Packing meets a fifo after a 12 MiB file, whose parts may be going up already."""
    source = tmp_path / "out"
    source.mkdir()
    (source / "a.bin").write_bytes(os.urandom(12 * 1024 * 1024))
    os.mkfifo(source / "z-pipe")  # packed last: names are sorted
    [output] = job.data.output_artifacts
    parts = TransferSettings(part_size=5 * 1024 * 1024, multipart_threshold=1)
    with pytest.raises(ArtifactError, match=r"cannot pack .*z-pipe: it is not a regular file"):
        await s3.upload(output, source, transfers=parts)
    location = _location(output)
    uploads = await s3.raw.list_multipart_uploads(Bucket=location.bucket_name)
    assert uploads.get("Uploads", []) == []  # aborted: no parts left behind
    with pytest.raises(s3.raw.exceptions.ClientError, match="404"):
        await s3.raw.head_object(Bucket=location.bucket_name, Key=location.object_key)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the temp archive is gone


async def test_upload_without_an_encryption_key_uses_the_aws_s3_key(
    s3: Kit, job: m.Job, tmp_path: Path
) -> None:
    source = tmp_path / "out"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "f.txt").write_text("f")
    [output] = job.data.output_artifacts
    await s3.upload(output, source, encryption_key=None)
    location = _location(output)
    head = await s3.raw.head_object(Bucket=location.bucket_name, Key=location.object_key)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert "aws/s3" in head["SSEKMSKeyId"]


# --- S3 errors ------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["key", "bucket"])
async def test_a_missing_object_is_revision_unavailable(
    s3: Kit, job: m.Job, tmp_path: Path, what: str
) -> None:
    bucket = _location(job.data.input_artifacts[0]).bucket_name
    if what == "bucket":
        bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    artifact = _artifact("Gone", bucket, "pipeline/Gone/missing-key")
    with pytest.raises(ArtifactError) as caught:
        await s3.download(artifact, tmp_path / "in")
    error = caught.value
    assert error.failure_type == "RevisionUnavailable"
    # The size is asked first (HeadObject): a 404 without a body says only "404".
    assert error.code in {"404", "NoSuchKey" if what == "key" else "NoSuchBucket"}
    for part in ("'Gone'", bucket, "pipeline/Gone/missing-key"):
        assert part in str(error)
    assert _listing(tmp_path) == []  # neither the target nor a temp file is left


def _bad_credentials(good: m.ArtifactCredentials, which: str) -> m.ArtifactCredentials:
    wrong = {
        "secret": {"secret_access_key": "W" * 40},
        "token": {"session_token": "T" * 300},
        "key id": {"access_key_id": "ASIAUNKNOWNKEY123456"},
    }[which]
    fields = {
        "access_key_id": good.access_key_id,
        "secret_access_key": good.secret_access_key,
        "session_token": good.session_token,
        **wrong,
    }
    return m.ArtifactCredentials(**fields)


@pytest.mark.parametrize("which", ["secret", "token", "key id"])
async def test_wrong_credentials_are_permission_errors_without_secrets(
    s3: Kit, job: m.Job, tmp_path: Path, which: str
) -> None:
    good = _credentials(job)
    bad = _bad_credentials(good, which)
    secrets = [good.access_key_id, good.secret_access_key, good.session_token]
    secrets += [bad.access_key_id, bad.secret_access_key, bad.session_token]
    source = tmp_path / "out"
    source.mkdir()
    (source / "f.txt").write_text("f")
    # The credentials "GetJobDetails" hands out stay bad, so renewing cannot help.
    with pytest.raises(ArtifactError) as download:
        await s3.download(job.data.input_artifacts[0], tmp_path / "in", credentials=bad)
    with pytest.raises(ArtifactError) as upload:
        await s3.upload(job.data.output_artifacts[0], source, credentials=bad)
    for caught in (download, upload):
        error = caught.value
        assert error.failure_type == "PermissionError"
        # The download asks HeadObject first, whose refusal has no body: a bare 400 or 403.
        assert error.code in {
            "SignatureDoesNotMatch",
            "InvalidToken",
            "InvalidAccessKeyId",
            "400",
            "403",
        }
        assert error.__cause__ is None
        assert error.__context__ is None
        _assert_no_secrets(error, secrets)
    assert "'Src'" in str(download.value)
    assert "'Out'" in str(upload.value)
    assert _listing(tmp_path) == ["out"]
    # Refused keys and tokens are renewed 3 times per request before giving up, the
    # HeadObject's bare 400/403 once; a bad signature is not a matter of renewal.
    assert s3.fetched == (1 if which == "secret" else 1 + 3)


async def test_a_body_that_does_not_match_its_checksum_is_refused(
    s3: Kit, job: m.Job, tmp_path: Path
) -> None:
    # moto stores the checksum it is given without checking it (real S3 would refuse the
    # PUT), which stands in for bytes corrupted on the way back.
    bucket = _location(job.data.input_artifacts[0]).bucket_name
    key = f"tests/{uuid.uuid4().hex}.zip"
    wrong = base64.b64encode(b"\0" * 32).decode()
    body = _zip([("f.txt", b"f", FILE | 0o644)])
    await s3.raw.put_object(
        Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=wrong
    )
    artifact = _artifact("Crafted", bucket, key)
    with pytest.raises(ArtifactError, match="checksum") as caught:
        await s3.download(artifact, tmp_path / "in")
    assert caught.value.failure_type == "JobFailed"
    assert _listing(tmp_path) == []


# --- unsafe or broken archives ------------------------------------------------------


def _corrupt_zip() -> bytes:
    """A stored (uncompressed) zip with one byte of the file's data changed."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("f.txt", b"A" * 100)
    data = bytearray(buffer.getvalue())
    data[data.index(b"A" * 100) + 50] = ord("B")
    return bytes(data)


UNSAFE: dict[str, tuple[list[Entry] | bytes, str]] = {
    "zip slip": ([("../evil.txt", b"x", FILE | 0o644)], "escapes the target"),
    "not an archive": (b"this is not a zip file at all", "not a zip, tar or tar.gz"),
    "corrupt zip": (_corrupt_zip(), "corrupt"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
async def test_unsafe_or_broken_archives_fail_the_job_and_leave_nothing(
    s3: Kit, job: m.Job, tmp_path: Path, case: str
) -> None:
    # Every rule is tested in test_archives; this is the path through a job's download.
    entries, rule = UNSAFE[case]
    work = tmp_path / "work"
    work.mkdir()
    body = _zip(entries) if isinstance(entries, list) else entries
    artifact = await _put_zip(s3.raw, job, body)
    with pytest.raises(ArtifactError) as caught:
        await s3.download(artifact, work / "in")
    error = caught.value
    assert error.failure_type == "JobFailed"
    assert rule in str(error)
    assert "'Crafted'" in str(error)
    assert _listing(work) == []  # target removed, temp archive removed
    assert _listing(tmp_path) == ["work"]  # nothing written next to it either


async def test_an_input_that_does_not_fit_the_disk_budget_fails_before_downloading(
    emulator: EmulatorProcess, s3: Kit, job: m.Job, tmp_path: Path
) -> None:
    artifact = await _put_zip(s3.raw, job, os.urandom(3 * 1024 * 1024))
    key = _location(artifact).object_key
    disk = DiskBudget(2 * 1024 * 1024, tmp_path)
    disk.reserve(512 * 1024, _object_ref_for_test())  # another job's download
    with pytest.raises(ArtifactError) as caught:
        await s3.download(artifact, tmp_path / "in", disk=disk)
    message = str(caught.value)
    assert "'Crafted'" in message
    assert "do not fit in the disk budget (disk_budget_mib = 2" in message
    assert "raise disk_budget_mib" in message
    assert (await emulator.admin.s3_log())["gets"].get(key, 0) == 0  # not a byte fetched
    assert disk.used == 512 * 1024  # nothing of the refused job is still counted
    assert _listing(tmp_path) == []


async def test_the_disk_budget_counts_unpacked_inputs_until_the_job_ends(
    s3: Kit, job: m.Job, tmp_path: Path
) -> None:
    disk = DiskBudget(10 * 1024 * 1024, tmp_path)
    artifacts = s3.artifacts(disk=disk)
    await artifacts.download(job.data.input_artifacts[0], tmp_path / "in")
    assert disk.used == len("hi") + len("top")  # the unpacked bytes; the archive is gone
    await artifacts.aclose()
    assert disk.used == 0


@pytest.mark.parametrize("fmt", ["tar", "tar.gz"])
async def test_a_tar_input_is_unpacked_and_the_output_follows_its_format(
    emulator: EmulatorProcess, s3: Kit, job: m.Job, tmp_path: Path, fmt: str
) -> None:
    source = tmp_path / "made"
    source.mkdir()
    make_source(source)
    packed = tmp_path / "made.archive"
    packing.pack(source, packed, fmt, "test")  # type: ignore[arg-type]
    artifact = await _put_zip(s3.raw, job, packed.read_bytes())
    artifacts = s3.artifacts(output_format="input")
    unpacked = await artifacts.download(artifact, tmp_path / "in")
    assert snapshot(unpacked) == snapshot(source)
    [output] = job.data.output_artifacts
    await artifacts.upload(output, unpacked)
    stored = tmp_path / "stored"
    location = _location(output)
    answer = await s3.raw.get_object(Bucket=location.bucket_name, Key=location.object_key)
    stored.write_bytes(await answer["Body"].read())
    assert archives.detect_format(stored, "output") == fmt
    [upload] = [
        u for u in (await emulator.admin.s3_log())["uploads"] if u["key"] == location.object_key
    ]
    assert upload["kmsKeyOk"] is True
    assert upload["kmsKeyId"] == KEY_ARN


def test_without_a_fixed_budget_inputs_must_fit_the_free_space(tmp_path: Path) -> None:
    disk = DiskBudget(0, tmp_path)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ArtifactError, match=f"do not fit in the free space of {tmp_path}"):
        disk.reserve(free + 1024**3, _object_ref_for_test())
    disk.reserve(1024, _object_ref_for_test())
    disk.count(10 * 1024**2)  # unpacked bytes already left the free space: not counted twice
    assert disk.used == 0
    assert abs(disk.available() - free) < 1024**3  # (other processes write meanwhile)


def _object_ref_for_test() -> ObjectRef:
    return ObjectRef(what="another job's input", bucket="b", key="k")


# --- bad arguments and cancellation -----------------------------------------------


async def test_an_artifact_without_location_is_refused(s3: Kit, tmp_path: Path, job: m.Job) -> None:
    artifact = m.Artifact(name="NoWhere")
    with pytest.raises(ArtifactError, match=r"'NoWhere'.*no S3 location"):
        await s3.download(artifact, tmp_path / "in")
    with pytest.raises(ArtifactError, match=r"'NoWhere'.*no S3 location"):
        await s3.upload(artifact, tmp_path)
    assert _listing(tmp_path) == []


async def test_an_existing_target_is_refused(s3: Kit, job: m.Job, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        await s3.download(job.data.input_artifacts[0], tmp_path / "in")
    assert _listing(tmp_path) == ["in"]
    assert _listing(tmp_path / "in") == []


@pytest.mark.parametrize("kind", ["missing", "file"])
async def test_a_missing_output_directory_is_refused(
    s3: Kit, job: m.Job, tmp_path: Path, kind: str
) -> None:
    source = tmp_path / "out"
    if kind == "file":
        source.write_text("not a folder")
    before = _listing(tmp_path)
    with pytest.raises(ArtifactError) as caught:
        await s3.upload(job.data.output_artifacts[0], source)
    assert "'Out'" in str(caught.value)
    assert str(source) in str(caught.value)
    assert "not a directory" in str(caught.value)
    assert _listing(tmp_path) == before


async def test_a_cancelled_download_leaves_nothing_behind(
    s3: Kit, job: m.Job, tmp_path: Path
) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await s3.download(job.data.input_artifacts[0], tmp_path / "in")
    assert scope.cancelled_caught
    assert _listing(tmp_path) == []


async def _cancel_when(check: Callable[[], bool], scope: anyio.CancelScope, what: str) -> None:
    """Cancel `scope` as soon as `check()` holds (it is watched, not timed)."""
    try:
        with anyio.fail_after(30):
            while not check():  # noqa: ASYNC110 - the state is in a worker thread
                await anyio.sleep(0.002)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")
    scope.cancel()


def _many_files(root: Path, count: int) -> None:
    root.mkdir()
    for i in range(count):
        (root / f"f{i:05}.txt").write_bytes(os.urandom(64))


async def test_a_download_cancelled_while_unpacking_leaves_nothing_behind(
    s3: Kit, job: m.Job, tmp_path: Path
) -> None:
    body = _zip([(f"f{i:05}.txt", b"x" * 64, FILE | 0o644) for i in range(5000)])
    artifact = await _put_zip(s3.raw, job, body)
    target = tmp_path / "in"
    scope = anyio.CancelScope()

    async def download() -> None:
        with scope:
            await s3.download(artifact, target)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(download)
        await _cancel_when(lambda: len(_listing(target)) > 10, scope, "unpacking to start")
    assert scope.cancelled_caught
    assert _listing(tmp_path) == []


async def test_an_upload_cancelled_while_packing_leaves_nothing_behind(
    s3: Kit, job: m.Job, tmp_path: Path
) -> None:
    source = tmp_path / "out"
    _many_files(source, 5000)
    scope = anyio.CancelScope()

    async def upload() -> None:
        with scope:
            await s3.upload(job.data.output_artifacts[0], source, encryption_key=None)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(upload)
        await _cancel_when(lambda: len(_listing(tmp_path)) > 1, scope, "packing to start")
    assert scope.cancelled_caught
    assert _listing(tmp_path) == ["out"]


def test_settings_and_limits_are_checked() -> None:
    with pytest.raises(CpWorkerError, match="max_attempts"):
        S3Settings(max_attempts=0)
    with pytest.raises(CpWorkerError, match="timeouts"):
        S3Settings(read_timeout_s=0)
    with pytest.raises(CpWorkerError, match="disk budget"):
        DiskBudget(-1, Path("/"))
    with pytest.raises(ValueError, match="failure_type"):
        ArtifactError("x", failure_type="Oops")
