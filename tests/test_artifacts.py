"""Artifact transfer against the emulator's real S3 (moto's server, authentication on).

Every test polls a job of its own action type and uses that job's artifact credentials.
Archives that break the unpack rules are uploaded with the job's own credentials to a new
key in the job's bucket, then downloaded like any input artifact.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import traceback
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from cpworker import models as m
from cpworker.artifacts import UnpackLimits, download_input, upload_output
from cpworker.control_plane import ControlPlane
from cpworker.emulator.client import EmulatorProcess
from cpworker.errors import ArtifactError, CpWorkerError
from cpworker.s3 import S3Settings, job_s3_client

KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
LIMITS = UnpackLimits()
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


@pytest.fixture
async def s3(emulator: EmulatorProcess, job: m.Job) -> AsyncIterator[Any]:
    """An S3 client signed with the job's artifact credentials."""
    async with job_s3_client(_settings(emulator), _credentials(job)) as client:
        yield client


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


def _snapshot(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Every path under `root`: (kind, permission bits, content or link text)."""
    tree: dict[str, tuple[str, int, bytes | str]] = {}
    for top, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(top, name)
            st = path.lstat()
            relative = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                tree[relative] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                tree[relative] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                tree[relative] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return tree


def _make_source(root: Path) -> None:
    """An output folder: nested folders, an executable, a private file, inner symlinks."""
    for folder, mode in (("bin", 0o755), ("conf", 0o750), ("deep/er/est", 0o755), ("empty", 0o755)):
        (root / folder).mkdir(parents=True)
        (root / folder).chmod(mode)
    for folder in ("deep", "deep/er"):
        (root / folder).chmod(0o755)
    for name, text, mode in (
        ("bin/run.sh", "#!/bin/sh\necho built\n", 0o755),
        ("conf/private.key", "not really a key\n", 0o600),
        ("deep/er/est/data.txt", "x" * 50_000, 0o644),
        ("README", "top level\n", 0o644),
    ):
        (root / name).write_text(text)
        (root / name).chmod(mode)
    (root / "latest").symlink_to("bin/run.sh")
    (root / "deep/er/conf").symlink_to("../../conf")


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


async def test_download_unpacks_the_jobs_input(s3: Any, job: m.Job, tmp_path: Path) -> None:
    target = tmp_path / "src"
    unpacked = await download_input(s3, job.data.input_artifacts[0], target, LIMITS)
    assert unpacked == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert (target / "a" / "b.txt").read_text() == "hi"
    assert (target / "top.txt").read_text() == "top"
    assert _listing(tmp_path) == ["src"]  # the temp zip is gone


async def test_download_keeps_folders_modes_and_inner_symlinks(
    s3: Any, job: m.Job, tmp_path: Path
) -> None:
    body = _zip(
        [
            ("bin/", b"", DIR | 0o750),
            ("bin/run.sh", b"#!/bin/sh\n", FILE | 0o755),
            ("conf/private.key", b"k", FILE | 0o600),
            ("deep/a/b/c.txt", b"deep", FILE | 0o644),
            ("plain.txt", b"no unix mode", 0),
            ("latest", b"bin/run.sh", LINK | 0o777),
            ("deep/a/conf", b"../../conf", LINK | 0o777),
        ]
    )
    artifact = await _put_zip(s3, job, body)
    target = await download_input(s3, artifact, tmp_path / "in", LIMITS)
    tree = _snapshot(target)
    assert tree["bin"] == ("dir", 0o750, "")
    assert tree["bin/run.sh"] == ("file", 0o755, b"#!/bin/sh\n")
    assert tree["conf/private.key"] == ("file", 0o600, b"k")
    assert tree["deep/a/b/c.txt"] == ("file", 0o644, b"deep")
    assert tree["plain.txt"] == ("file", 0o644, b"no unix mode")
    assert tree["latest"] == ("link", 0, "bin/run.sh")
    assert tree["deep/a/conf"] == ("link", 0, "../../conf")
    assert (target / "deep/a/conf/private.key").read_bytes() == b"k"
    assert _listing(tmp_path) == ["in"]


async def test_upload_then_download_round_trip_with_the_jobs_kms_key(
    s3: Any, job: m.Job, tmp_path: Path
) -> None:
    source = tmp_path / "out"
    source.mkdir()
    _make_source(source)
    before = _listing(tmp_path)
    [output] = job.data.output_artifacts
    size = await upload_output(s3, output, source, job.data.encryption_key)
    assert _listing(tmp_path) == before  # the temp zip is gone

    location = _location(output)
    head = await s3.head_object(Bucket=location.bucket_name, Key=location.object_key)
    assert head["ContentLength"] == size > 0
    assert head["ServerSideEncryption"] == "aws:kms"
    assert KEY_ARN in head["SSEKMSKeyId"]

    back = await download_input(s3, output, tmp_path / "back", LIMITS)
    assert _snapshot(back) == _snapshot(source)
    assert (back / "latest").read_text() == "#!/bin/sh\necho built\n"


async def test_upload_without_an_encryption_key_uses_the_aws_s3_key(
    s3: Any, job: m.Job, tmp_path: Path
) -> None:
    source = tmp_path / "out"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "f.txt").write_text("f")
    [output] = job.data.output_artifacts
    await upload_output(s3, output, source, None)
    location = _location(output)
    head = await s3.head_object(Bucket=location.bucket_name, Key=location.object_key)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert "aws/s3" in head["SSEKMSKeyId"]


# --- S3 errors ------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["key", "bucket"])
async def test_a_missing_object_is_revision_unavailable(
    s3: Any, job: m.Job, tmp_path: Path, what: str
) -> None:
    bucket = _location(job.data.input_artifacts[0]).bucket_name
    if what == "bucket":
        bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    artifact = _artifact("Gone", bucket, "pipeline/Gone/missing-key")
    with pytest.raises(ArtifactError) as caught:
        await download_input(s3, artifact, tmp_path / "in", LIMITS)
    error = caught.value
    assert error.failure_type == "RevisionUnavailable"
    assert error.code == ("NoSuchKey" if what == "key" else "NoSuchBucket")
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
    emulator: EmulatorProcess, job: m.Job, tmp_path: Path, which: str
) -> None:
    good = _credentials(job)
    bad = _bad_credentials(good, which)
    secrets = [good.access_key_id, good.secret_access_key, good.session_token]
    secrets += [bad.access_key_id, bad.secret_access_key, bad.session_token]
    source = tmp_path / "out"
    source.mkdir()
    (source / "f.txt").write_text("f")
    async with job_s3_client(_settings(emulator), bad) as client:
        with pytest.raises(ArtifactError) as download:
            await download_input(client, job.data.input_artifacts[0], tmp_path / "in", LIMITS)
        with pytest.raises(ArtifactError) as upload:
            await upload_output(client, job.data.output_artifacts[0], source, None)
    for caught in (download, upload):
        error = caught.value
        assert error.failure_type == "PermissionError"
        assert error.code in {"SignatureDoesNotMatch", "InvalidToken", "InvalidAccessKeyId"}
        assert error.__cause__ is None
        assert error.__context__ is None
        _assert_no_secrets(error, secrets)
    assert "'Src'" in str(download.value)
    assert "'Out'" in str(upload.value)
    assert _listing(tmp_path) == ["out"]


async def test_a_body_that_does_not_match_its_checksum_is_refused(
    s3: Any, job: m.Job, tmp_path: Path
) -> None:
    # moto stores the checksum it is given without checking it (real S3 would refuse the
    # PUT), which stands in for bytes corrupted on the way back.
    bucket = _location(job.data.input_artifacts[0]).bucket_name
    key = f"tests/{uuid.uuid4().hex}.zip"
    wrong = base64.b64encode(b"\0" * 32).decode()
    body = _zip([("f.txt", b"f", FILE | 0o644)])
    await s3.put_object(
        Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=wrong
    )
    artifact = _artifact("Crafted", bucket, key)
    with pytest.raises(ArtifactError, match="checksum") as caught:
        await download_input(s3, artifact, tmp_path / "in", LIMITS)
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


UNSAFE: dict[str, tuple[list[Entry] | bytes, UnpackLimits, str]] = {
    "zip slip": ([("../evil.txt", b"x", FILE | 0o644)], LIMITS, "escapes the target"),
    "zip slip inside a path": (
        [("a/../../evil.txt", b"x", FILE | 0o644)],
        LIMITS,
        "escapes the target",
    ),
    "absolute path": ([("/TMP_PATH/evil.txt", b"x", FILE | 0o644)], LIMITS, "absolute path"),
    "symlink out": ([("link", b"../evil", LINK | 0o777)], LIMITS, "points outside"),
    "absolute symlink": ([("link", b"/etc", LINK | 0o777)], LIMITS, "points outside"),
    "symlink out through symlinks": (
        [("x", b".", LINK | 0o777), ("y", b"x/..", LINK | 0o777)],
        LIMITS,
        "points outside",
    ),
    "symlink made through a symlink": (
        [("x", b"z/..", LINK | 0o777), ("z", b".", LINK | 0o777), ("x/evil", b".", LINK | 0o777)],
        LIMITS,
        "points outside",
    ),
    "too many files": (
        [(f"f{i}.txt", b"x", FILE | 0o644) for i in range(5)],
        UnpackLimits(max_files=4),
        "UnpackLimits.max_files",
    ),
    "too many bytes": (
        [("a.txt", b"x" * 60, FILE | 0o644), ("b.txt", b"x" * 60, FILE | 0o644)],
        UnpackLimits(max_bytes=100),
        "UnpackLimits.max_bytes",
    ),
    "not a zip": (b"this is not a zip file at all", LIMITS, "not a valid zip"),
    "corrupt zip": (_corrupt_zip(), LIMITS, "corrupt"),
    "empty object": (b"", LIMITS, "not a valid zip"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
async def test_unsafe_or_broken_archives_are_refused(
    s3: Any, job: m.Job, tmp_path: Path, case: str
) -> None:
    entries, limits, rule = UNSAFE[case]
    work = tmp_path / "work"
    work.mkdir()
    if isinstance(entries, list):
        entries = [(n.replace("/TMP_PATH", str(tmp_path)), d, mode) for n, d, mode in entries]
        body = _zip(entries)
    else:
        body = entries
    artifact = await _put_zip(s3, job, body)
    with pytest.raises(ArtifactError) as caught:
        await download_input(s3, artifact, work / "in", limits)
    error = caught.value
    assert error.failure_type == "JobFailed"
    assert rule in str(error)
    assert "'Crafted'" in str(error)
    assert _listing(work) == []  # target removed, temp zip removed
    assert _listing(tmp_path) == ["work"]  # nothing written next to it either


async def test_a_file_limit_of_exactly_the_count_is_allowed(
    s3: Any, job: m.Job, tmp_path: Path
) -> None:
    body = _zip([(f"f{i}.txt", b"x" * 10, FILE | 0o644) for i in range(4)])
    artifact = await _put_zip(s3, job, body)
    limits = UnpackLimits(max_files=4, max_bytes=40)
    target = await download_input(s3, artifact, tmp_path / "in", limits)
    assert _listing(target) == ["f0.txt", "f1.txt", "f2.txt", "f3.txt"]


# --- bad arguments and cancellation -----------------------------------------------


async def test_an_artifact_without_location_is_refused(s3: Any, tmp_path: Path, job: m.Job) -> None:
    artifact = m.Artifact(name="NoWhere")
    with pytest.raises(ArtifactError, match=r"'NoWhere'.*no S3 location"):
        await download_input(s3, artifact, tmp_path / "in", LIMITS)
    with pytest.raises(ArtifactError, match=r"'NoWhere'.*no S3 location"):
        await upload_output(s3, artifact, tmp_path, None)
    assert _listing(tmp_path) == []


async def test_an_existing_target_is_refused(s3: Any, job: m.Job, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        await download_input(s3, job.data.input_artifacts[0], tmp_path / "in", LIMITS)
    assert _listing(tmp_path) == ["in"]
    assert _listing(tmp_path / "in") == []


@pytest.mark.parametrize("kind", ["missing", "file"])
async def test_a_missing_output_directory_is_refused(
    s3: Any, job: m.Job, tmp_path: Path, kind: str
) -> None:
    source = tmp_path / "out"
    if kind == "file":
        source.write_text("not a folder")
    before = _listing(tmp_path)
    with pytest.raises(ArtifactError) as caught:
        await upload_output(s3, job.data.output_artifacts[0], source, job.data.encryption_key)
    assert "'Out'" in str(caught.value)
    assert str(source) in str(caught.value)
    assert "not a directory" in str(caught.value)
    assert _listing(tmp_path) == before


async def test_a_cancelled_download_leaves_nothing_behind(
    s3: Any, job: m.Job, tmp_path: Path
) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await download_input(s3, job.data.input_artifacts[0], tmp_path / "in", LIMITS)
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
    s3: Any, job: m.Job, tmp_path: Path
) -> None:
    body = _zip([(f"f{i:05}.txt", b"x" * 64, FILE | 0o644) for i in range(5000)])
    artifact = await _put_zip(s3, job, body)
    target = tmp_path / "in"
    scope = anyio.CancelScope()

    async def download() -> None:
        with scope:
            await download_input(s3, artifact, target, LIMITS)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(download)
        await _cancel_when(lambda: len(_listing(target)) > 10, scope, "unpacking to start")
    assert scope.cancelled_caught
    assert _listing(tmp_path) == []


async def test_an_upload_cancelled_while_packing_leaves_nothing_behind(
    s3: Any, job: m.Job, tmp_path: Path
) -> None:
    source = tmp_path / "out"
    _many_files(source, 5000)
    scope = anyio.CancelScope()

    async def upload() -> None:
        with scope:
            await upload_output(s3, job.data.output_artifacts[0], source, None)

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
    with pytest.raises(CpWorkerError, match="max_files"):
        UnpackLimits(max_files=-1)
    with pytest.raises(ValueError, match="failure_type"):
        ArtifactError("x", failure_type="Oops")
