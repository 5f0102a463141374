"""The transfer engine against the emulator's real S3: ranged downloads, multipart uploads,
streams, the shared budget, aborts, and credentials renewed when S3 refuses them.

Each test polls a job of its own action type and moves bytes under new keys of the job's
bucket, signed with that job's credentials.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from cpworker import models as m
from cpworker.control_plane import ControlPlane
from cpworker.emulator.client import EmulatorProcess
from cpworker.errors import ArtifactError, CpWorkerError
from cpworker.s3 import JobCredentials, ObjectRef, S3Settings, SharedS3
from cpworker.transfers import MIB, GrowingFile, Transfers, TransferSettings
from tests.conftest import plain_s3

KEY = "alias/aws/s3"
SMALL_PARTS = TransferSettings(
    part_size=MIB, multipart_threshold=MIB, job_concurrency=3, process_concurrency=8
)


class Job:
    """A polled job: its credentials, bucket, and what renewing its credentials did."""

    def __init__(self, polled: m.Job, cp: ControlPlane) -> None:
        assert polled.data.artifact_credentials is not None
        self.id = polled.id
        self.credentials = polled.data.artifact_credentials
        [artifact] = polled.data.input_artifacts
        assert artifact.location is not None and artifact.location.s3_location is not None
        self.bucket = artifact.location.s3_location.bucket_name
        self.cp = cp
        self.renewals: list[str] = []

    def ref(self, what: str = "test object") -> ObjectRef:
        return ObjectRef(what=what, bucket=self.bucket, key=f"tests/{uuid.uuid4().hex}")

    def job_credentials(
        self, initial: m.ArtifactCredentials | None = None, refresh_s: float = 600.0
    ) -> JobCredentials:
        async def fetch() -> m.ArtifactCredentials:
            details = await self.cp.get_job_details(self.id)
            assert details.data.artifact_credentials is not None
            return details.data.artifact_credentials

        return JobCredentials(
            initial or self.credentials,
            fetch,
            refresh_s=refresh_s,
            on_renewal=lambda reason, _: self.renewals.append(reason),
        )


@pytest.fixture
async def job(emulator: EmulatorProcess, cp: ControlPlane, action_type: m.ActionTypeId) -> Job:
    await emulator.admin.create_jobs(
        {
            "actionTypeId": m.to_builtins(action_type),
            "inputArtifacts": [{"name": "Src", "files": {"a.txt": "a"}}],
        }
    )
    [polled] = await cp.poll_for_jobs(action_type, 1)
    return Job(polled, cp)


@pytest.fixture
async def shared(emulator: EmulatorProcess) -> AsyncIterator[SharedS3]:
    async with SharedS3.open(S3Settings(endpoint_url=emulator.s3, max_attempts=2)) as s3:
        yield s3


@pytest.fixture
async def raw(emulator: EmulatorProcess, job: Job) -> AsyncIterator[Any]:
    async with plain_s3(emulator, job.credentials) as client:
        yield client


async def _put(raw: Any, ref: ObjectRef, body: bytes) -> None:
    await raw.put_object(Bucket=ref.bucket, Key=ref.key, Body=body)


async def _get(raw: Any, ref: ObjectRef) -> bytes:
    answer = await raw.get_object(Bucket=ref.bucket, Key=ref.key)
    async with answer["Body"] as body:
        data: bytes = await body.read()
    return data


async def _open_uploads(raw: Any, ref: ObjectRef) -> list[Any]:
    answer = await raw.list_multipart_uploads(Bucket=ref.bucket, Prefix=ref.key)
    uploads: list[Any] = answer.get("Uploads", [])
    return uploads


class Peak:
    """The most budget tokens seen in use, sampled at every chunk moved."""

    def __init__(self) -> None:
        self.transfers: Transfers | None = None
        self.peak = 0
        self.moved: dict[str, int] = {"download": 0, "upload": 0}

    def __call__(self, direction: str, count: int) -> None:
        assert self.transfers is not None
        self.peak = max(self.peak, int(self.transfers.budget.borrowed_tokens))
        self.moved[direction] += count


def _transfers(
    shared: SharedS3, settings: TransferSettings = SMALL_PARTS
) -> tuple[Transfers, Peak]:
    peak = Peak()
    transfers = Transfers(shared, settings, peak)
    peak.transfers = transfers
    return transfers, peak


# --- downloads ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1000, MIB, 3 * MIB + 12345])
async def test_download_in_ranged_parts_is_byte_exact(
    shared: SharedS3, raw: Any, job: Job, tmp_path: Path, size: int
) -> None:
    body = os.urandom(size)
    ref = job.ref()
    await _put(raw, ref, body)
    transfers, peak = _transfers(shared)
    credentials = job.job_credentials()
    info = await shared.head(credentials, ref)
    assert info.size == size
    target = tmp_path / "object"
    target.touch()
    await transfers.download(credentials, ref, info, target)
    assert target.read_bytes() == body
    assert peak.moved["download"] == size
    if size > MIB:  # parts moved side by side, within the job's limit of 3
        assert 1 < peak.peak <= 3


async def test_concurrent_downloads_share_one_process_budget(
    shared: SharedS3, raw: Any, job: Job, tmp_path: Path
) -> None:
    body = os.urandom(4 * MIB)
    ref = job.ref()
    await _put(raw, ref, body)
    settings = TransferSettings(
        part_size=256 * 1024, multipart_threshold=1, job_concurrency=4, process_concurrency=5
    )
    transfers, peak = _transfers(shared, settings)
    credentials = job.job_credentials()
    info = await shared.head(credentials, ref)
    targets = [tmp_path / f"copy{i}" for i in range(4)]
    async with anyio.create_task_group() as tg:
        for target in targets:
            target.touch()
            tg.start_soon(transfers.download, credentials, ref, info, target)
    assert all(t.read_bytes() == body for t in targets)
    assert peak.peak == 5  # 4 jobs x 4 parts wanted 16: the process budget held them to 5


async def test_an_object_that_changed_since_its_head_is_refused(
    shared: SharedS3, raw: Any, job: Job, tmp_path: Path
) -> None:
    ref = job.ref("input artifact 'Src'")
    await _put(raw, ref, os.urandom(2 * MIB))
    transfers, _ = _transfers(shared)
    credentials = job.job_credentials()
    info = await shared.head(credentials, ref)
    await _put(raw, ref, os.urandom(2 * MIB))  # a new version under the same key
    target = tmp_path / "object"
    target.touch()
    with pytest.raises(ArtifactError, match="changed while it was being downloaded") as caught:
        await transfers.download(credentials, ref, info, target)
    assert caught.value.failure_type == "RevisionUnavailable"
    assert "'Src'" in str(caught.value)


async def test_stream_yields_the_object_in_order(shared: SharedS3, raw: Any, job: Job) -> None:
    body = os.urandom(3 * MIB + 7)
    ref = job.ref()
    await _put(raw, ref, body)
    transfers, peak = _transfers(shared)
    received = []
    async with aclosing(transfers.stream(job.job_credentials(), ref, chunk_size=64 * 1024)) as s:
        async for chunk in s:
            assert 0 < len(chunk) <= 64 * 1024
            received.append(chunk)
    assert b"".join(received) == body
    assert peak.moved["download"] == len(body)


# --- uploads --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 12 * MIB + 5])
async def test_upload_of_a_file_with_sse_kms(
    shared: SharedS3, raw: Any, job: Job, tmp_path: Path, size: int
) -> None:
    body = os.urandom(size)
    source = tmp_path / "file"
    source.write_bytes(body)
    ref = job.ref()
    transfers, peak = _transfers(shared)
    assert await transfers.upload(job.job_credentials(), ref, source, kms_key_id=KEY) == size
    assert await _get(raw, ref) == body
    head = await raw.head_object(Bucket=ref.bucket, Key=ref.key)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert "aws/s3" in head["SSEKMSKeyId"]
    # 5 MiB parts at least (S3's minimum): 3 parts for 12 MiB; one PutObject for 10 bytes.
    assert head["ETag"].strip('"').endswith("-3") == (size > MIB)
    assert peak.moved["upload"] == size
    assert await _open_uploads(raw, ref) == []


class Moved:
    """Bytes uploaded so far, and a wait until they reach a count (no polling, no sleeps)."""

    def __init__(self) -> None:
        self.total = 0
        self._wanted: tuple[int, anyio.Event] | None = None

    def __call__(self, direction: str, count: int) -> None:
        self.total += count
        if self._wanted is not None and self.total >= self._wanted[0]:
            self._wanted[1].set()

    async def reach(self, total: int) -> None:
        event = anyio.Event()
        self._wanted = (total, event)
        if self.total < total:
            await event.wait()


async def test_a_growing_file_is_uploaded_as_its_parts_become_final(
    shared: SharedS3, raw: Any, job: Job, tmp_path: Path
) -> None:
    """Parts go while the file is written, a held range (a zip header) waits for its
    release, and the object is the file as it ended up, rewritten bytes included."""
    path = tmp_path / "growing"
    path.write_bytes(b"")
    ref = job.ref()
    growing = GrowingFile(path)
    moved = Moved()
    transfers = Transfers(
        shared, TransferSettings(part_size=5 * MIB, multipart_threshold=MIB), moved
    )
    body = bytearray(os.urandom(17 * MIB))

    def write(start: int, stop: int) -> None:  # in a worker thread, as packing does
        with path.open("r+b") as file:
            file.seek(start)
            file.write(body[start:stop])
        growing.grew(stop)

    result: list[int] = []

    async def upload() -> None:
        result.append(await transfers.upload(job.job_credentials(), ref, growing, kms_key_id=KEY))

    with anyio.fail_after(60):  # a wrong wait would hang: fail instead
        async with anyio.create_task_group() as tg:
            tg.start_soon(upload)
            growing.hold(0, 512)  # part 1 holds bytes that are written again later
            await anyio.to_thread.run_sync(write, 0, 12 * MIB)
            await moved.reach(5 * MIB)
            assert moved.total == 5 * MIB  # part 2 only: part 1 is held, part 3 is not written
            body[:512] = os.urandom(512)

            def rewrite_and_grow() -> None:
                write(0, 512)
                growing.release()
                write(12 * MIB, 15 * MIB)

            await anyio.to_thread.run_sync(rewrite_and_grow)
            await moved.reach(15 * MIB)  # parts 1 and 3, before the file is finished
            assert growing.size is None
            await anyio.to_thread.run_sync(write, 15 * MIB, len(body))
            growing.finish(len(body))
    assert result == [len(body)]
    assert await _get(raw, ref) == bytes(body)
    head = await raw.head_object(Bucket=ref.bucket, Key=ref.key)
    assert head["ETag"].strip('"').endswith("-4")
    assert await _open_uploads(raw, ref) == []


def test_part_sizes_double_every_thousand_parts_up_to_s3s_limits() -> None:
    settings = TransferSettings(part_size=MIB)  # below S3's minimum: 5 MiB
    sizes = [settings.part_length(n) for n in (1, 1000, 1001, 2001, 10_000)]
    assert sizes == [5 * MIB, 5 * MIB, 10 * MIB, 20 * MIB, 5 * MIB << 9]
    assert sum(settings.part_length(n) for n in range(1, 10_001)) > 4.8 * 1024**4
    assert TransferSettings(part_size=4096 * MIB).part_length(3001) == 5 * 1024 * MIB


async def test_a_cancelled_multipart_upload_is_aborted(
    shared: SharedS3, raw: Any, job: Job, tmp_path: Path
) -> None:
    source = tmp_path / "file"
    source.write_bytes(os.urandom(16 * MIB))
    ref = job.ref()
    scope = anyio.CancelScope()
    transfers, _ = _transfers(
        shared, TransferSettings(part_size=5 * MIB, multipart_threshold=1, job_concurrency=1)
    )

    def cancel_after_first_part(direction: str, count: int) -> None:
        scope.cancel()  # the first part is in: cancel while the others are due

    transfers.on_bytes = cancel_after_first_part
    with scope:
        await transfers.upload(job.job_credentials(), ref, source, kms_key_id=KEY)
    assert scope.cancelled_caught
    assert await _open_uploads(raw, ref) == []  # aborted: no parts left behind
    with pytest.raises(raw.exceptions.ClientError, match=r"NoSuchKey|Not Found|404"):
        await raw.head_object(Bucket=ref.bucket, Key=ref.key)


@pytest.mark.parametrize("size", [0, 3 * MIB, 11 * MIB + 1])
async def test_writer_uploads_bytes_without_a_file(
    shared: SharedS3, raw: Any, job: Job, size: int
) -> None:
    body = os.urandom(size)
    ref = job.ref()
    transfers, peak = _transfers(shared)
    async with transfers.writer(job.job_credentials(), ref, kms_key_id=KEY) as writer:
        for start in range(0, size, 700_000):
            await writer.write(body[start : start + 700_000])
    assert writer.size == size
    assert await _get(raw, ref) == body
    head = await raw.head_object(Bucket=ref.bucket, Key=ref.key)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["ETag"].strip('"').endswith("-3") == (size > 5 * MIB)
    assert peak.moved["upload"] == size


async def test_a_writer_whose_block_raises_aborts_the_upload(
    shared: SharedS3, raw: Any, job: Job
) -> None:
    ref = job.ref()
    transfers, _ = _transfers(shared)

    async def handler() -> None:
        async with transfers.writer(job.job_credentials(), ref, kms_key_id=KEY) as writer:
            await writer.write(os.urandom(6 * MIB))  # one part is on its way
            raise RuntimeError("handler broke")

    with pytest.raises(RuntimeError, match="handler broke"):
        await handler()
    assert await _open_uploads(raw, ref) == []
    with pytest.raises(raw.exceptions.ClientError):
        await raw.head_object(Bucket=ref.bucket, Key=ref.key)


# --- credentials ----------------------------------------------------------------------


async def test_refused_credentials_are_renewed_once_for_all_parts(
    shared: SharedS3, raw: Any, job: Job, tmp_path: Path
) -> None:
    body = os.urandom(4 * MIB)
    ref = job.ref()
    await _put(raw, ref, body)
    unknown = m.ArtifactCredentials(
        access_key_id="ASIAUNKNOWNKEY000001",
        secret_access_key=job.credentials.secret_access_key,
        session_token=job.credentials.session_token,
    )
    good = job.job_credentials()
    info = await shared.head(good, ref)
    credentials = job.job_credentials(initial=unknown)
    transfers, _ = _transfers(shared, TransferSettings(part_size=MIB, multipart_threshold=1))
    target = tmp_path / "object"
    target.touch()
    await transfers.download(credentials, ref, info, target)
    assert target.read_bytes() == body
    # 4 parts were refused side by side (InvalidAccessKeyId); one renewal served them all.
    assert job.renewals == ["refused"]


async def test_credentials_are_renewed_on_schedule(
    shared: SharedS3, raw: Any, job: Job, tmp_path: Path
) -> None:
    ref = job.ref()
    await _put(raw, ref, b"x")
    credentials = job.job_credentials(refresh_s=0.05)
    first = await credentials.access_key()
    # Renewed on the first request after refresh_s: keep asking until that happens.
    with anyio.fail_after(10):
        while not job.renewals:
            await shared.head(credentials, ref)
    assert job.renewals == ["scheduled"]
    assert await credentials.access_key() != first


async def test_a_cancelled_write_fails_the_upload_instead_of_losing_bytes(
    shared: SharedS3, raw: Any, job: Job
) -> None:
    ref = job.ref()
    transfers, _ = _transfers(shared, TransferSettings(job_concurrency=1, process_concurrency=1))

    async def handler() -> None:
        async with transfers.writer(job.job_credentials(), ref, kms_key_id=KEY) as out:
            await out.write(os.urandom(8 * MIB))  # part 1 takes the only slot
            with anyio.move_on_after(0):  # the handler gives up on one write...
                await out.write(os.urandom(8 * MIB))
            await out.write(b"...and carries on")  # refused: the artifact has a hole

    with pytest.raises(ArtifactError, match="interrupted"):
        await handler()
    assert await _open_uploads(raw, ref) == []
    with pytest.raises(raw.exceptions.ClientError):
        await raw.head_object(Bucket=ref.bucket, Key=ref.key)


async def test_a_write_after_the_block_is_refused(shared: SharedS3, raw: Any, job: Job) -> None:
    ref = job.ref()
    transfers, _ = _transfers(shared)
    async with transfers.writer(job.job_credentials(), ref, kms_key_id=KEY) as out:
        await out.write(b"all of it")
    with pytest.raises(ArtifactError, match="after the writer's block ended"):
        await out.write(b"more")
    assert await _get(raw, ref) == b"all of it"


async def test_a_failed_part_aborts_the_multipart_upload(
    shared: SharedS3, raw: Any, job: Job, tmp_path: Path
) -> None:
    source = tmp_path / "file"
    source.write_bytes(os.urandom(12 * MIB))
    ref = job.ref("output artifact 'Out'")
    transfers, _ = _transfers(
        shared, TransferSettings(part_size=5 * MIB, multipart_threshold=1, job_concurrency=1)
    )
    transfers.on_bytes = lambda *_: source.unlink(missing_ok=True)  # gone after part 1
    with pytest.raises(ArtifactError, match="cannot read") as caught:
        await transfers.upload(job.job_credentials(), ref, source, kms_key_id=KEY)
    assert str(source) in str(caught.value)
    assert await _open_uploads(raw, ref) == []


async def test_a_failed_renewal_is_an_artifact_error_naming_the_artifact(
    shared: SharedS3, raw: Any, job: Job
) -> None:
    ref = job.ref("input artifact 'Src'")
    await _put(raw, ref, b"x")

    async def fetch() -> m.ArtifactCredentials:
        raise CpWorkerError("GetJobDetails answered JobNotFoundException")

    credentials = JobCredentials(job.credentials, fetch, refresh_s=0.01)
    with anyio.fail_after(10):  # renewal is mandatory after 1.5 x refresh_s
        while True:
            try:
                await shared.head(credentials, ref)
            except ArtifactError as exc:
                error = exc
                break
    assert error.failure_type == "PermissionError"
    assert error.code == "RenewalFailed"
    assert "'Src'" in str(error)
    assert "JobNotFoundException" in str(error)
    assert job.credentials.secret_access_key not in str(error)


async def test_one_renewal_serves_all_refused_parts_even_if_the_key_is_the_same(
    shared: SharedS3, raw: Any, job: Job, tmp_path: Path
) -> None:
    ref = job.ref()
    await _put(raw, ref, os.urandom(4 * MIB))
    info = await shared.head(job.job_credentials(), ref)
    bad = m.ArtifactCredentials(
        access_key_id="ASIAUNKNOWNKEY000002",
        secret_access_key=job.credentials.secret_access_key,
        session_token=job.credentials.session_token,
    )
    fetched = []

    async def fetch() -> m.ArtifactCredentials:
        fetched.append(1)
        await anyio.lowlevel.checkpoint()  # the other refused parts arrive while this one renews
        return bad  # GetJobDetails gives the same (still refused) credentials again

    credentials = JobCredentials(bad, fetch)
    transfers, _ = _transfers(shared, TransferSettings(part_size=MIB, multipart_threshold=1))
    target = tmp_path / "object"
    target.touch()
    with pytest.raises(ArtifactError) as caught:
        await transfers.download(credentials, ref, info, target)
    assert caught.value.code == "InvalidAccessKeyId"
    # 4 parts refused side by side: 3 renewals in a row for the job, not 3 per part; then
    # every refused part gives up, however their answers interleave.
    assert len(fetched) == 3
