"""One job's artifacts: inputs downloaded and unpacked, outputs packed and uploaded.

`JobArtifacts` is what `JobContext`'s `InputArtifact`/`OutputArtifact` call:

- `download` asks S3 for the input's size (HeadObject) and checks it against the disk
  budget before a byte is fetched; then downloads it (`cpworker.transfers`) into a private
  temp file beside its target directory (mode 0700) and unpacks it there off the event
  loop (`cpworker.archives`: zip, tar or tar.gz by content, with the unpack limits).
- `upload` packs a directory off the event loop (`cpworker.packing`) into a temp file in
  the job's work directory (zip, tar or tar.gz as configured; `input`: the format of the
  first input the job unpacked) and uploads it with SSE-KMS (the job's encryption key,
  else the AWS-managed `aws/s3` key) while it is packed: each part as soon as its bytes
  are final.
- `stream` and `writer` move an artifact's bytes as they are, without touching disk.

Temp files and failed targets are removed whatever happens, also on cancellation; every
failure is an `ArtifactError` naming the artifact, the rule or S3's answer, and the fix.

The disk budget counts, per process, the archives being downloaded and the bytes unpacked
from them until their job ends; each unpack may write what is left of it when it starts
(so unpacks running at the same moment can overrun it by what they write together).
With a budget of 0 there is no fixed budget and each download must fit the free space of
the work directory's file system when it starts (nothing is counted).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import anyio
import msgspec

from cpworker import archives, models, packing
from cpworker.archives import Format, UnpackLimits
from cpworker.context import ArtifactIO
from cpworker.errors import ArtifactError, CpWorkerError, first_exception
from cpworker.s3 import DEFAULT_KMS_KEY, JobCredentials, ObjectRef
from cpworker.transfers import MIB, ArtifactWriter, GrowingFile, Transfers, TransferSettings

__all__ = ["ArtifactSettings", "DiskBudget", "JobArtifacts", "UnpackLimits"]


class ArtifactSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What every job's artifacts share (from the worker's configuration)."""

    transfers: TransferSettings = TransferSettings()
    limits: UnpackLimits = UnpackLimits()
    # Seconds after which a job's artifact credentials are renewed (GetJobDetails).
    credentials_refresh_s: float = 600.0


class DiskBudget:
    """Bytes of the work directory that jobs' inputs may take, shared by the process."""

    def __init__(self, limit_bytes: int, root: Path) -> None:
        if limit_bytes < 0:
            raise CpWorkerError(f"disk budget {limit_bytes}: must be 0 (free space) or more")
        self.limit = limit_bytes
        self.root = root
        self.used = 0

    def available(self) -> int:
        if self.limit:
            return max(0, self.limit - self.used)
        return shutil.disk_usage(self.root).free

    def reserve(self, size: int, ref: ObjectRef) -> None:
        """Take `size` bytes, or fail (before anything is downloaded) naming the fix."""
        available = self.available()
        if size > available:
            budget = (
                f"the disk budget (disk_budget_mib = {self.limit / MIB:g}; {self.used} bytes "
                "taken by running jobs)"
                if self.limit
                else f"the free space of {self.root}"
            )
            raise ArtifactError(
                f"{ref}: its {size} bytes do not fit in {budget}, {available} bytes are left; "
                "raise disk_budget_mib, give the worker more disk or fewer slots"
            )
        if self.limit:  # free space counts what is written by itself
            self.used += size

    def count(self, size: int) -> None:
        """Bytes already written (unpacked inputs): counted, never refused."""
        if self.limit:
            self.used += size

    def release(self, size: int) -> None:
        if self.limit:
            self.used = max(0, self.used - size)


class JobArtifacts(ArtifactIO):
    """The S3 side of one job, signed with its `JobCredentials`."""

    def __init__(
        self,
        transfers: Transfers,
        settings: ArtifactSettings,
        disk: DiskBudget,
        data: models.JobData,
        credentials: JobCredentials | None,
        output_format: Format | str = "zip",
    ) -> None:
        self._transfers = transfers
        self._settings = settings
        self._disk = disk
        self._data = data
        self._credentials = credentials
        self._output_format = output_format
        self._reserved = 0
        self._job_limit = transfers.job_limit()  # one limit for all the job's transfers
        self.unpacked_formats: list[Format] = []
        # Where temp archives are packed: the job's work directory (set by the runner,
        # made on first call); None: beside the directory being packed.
        self.temp_dir: Callable[[], Path] | None = None

    def _job_credentials(self) -> JobCredentials:
        if self._credentials is None:
            raise ArtifactError(
                "the job came without artifact credentials; CodePipeline sends them with "
                "every job that has artifacts",
                failure_type="SystemUnavailable",
            )
        return self._credentials

    async def download(self, artifact: models.Artifact, target: Path) -> Path:
        """Download the input and unpack it into `target` (which must not exist yet)."""
        ref = _object_ref(artifact, "input")
        credentials = self._job_credentials()
        info = await self._transfers.s3.head(credentials, ref)
        self._reserve(info.size, ref)
        try:
            _make_target(target, ref)
        except ArtifactError:
            self._release(info.size)
            raise
        try:
            archive = _temp_file(target.parent, ".part", ref)
            try:
                await self._transfers.download(credentials, ref, info, archive, self._job_limit)
                unpacked = await anyio.to_thread.run_sync(self._unpack, archive, target, str(ref))
            finally:
                archive.unlink(missing_ok=True)  # synchronous on purpose, see _temp_file
        except BaseException:
            with anyio.CancelScope(shield=True):  # may be many files: not on the event loop
                await anyio.to_thread.run_sync(shutil.rmtree, target, True)
            raise
        finally:
            self._release(info.size)
        self._reserve_unpacked(unpacked.bytes)
        self.unpacked_formats.append(unpacked.format)
        return target

    def _unpack(self, archive: Path, target: Path, what: str) -> archives.Unpacked:
        budget = self._disk.available() if self._disk.limit else None
        return archives.unpack(archive, target, self._settings.limits, what, disk_bytes=budget)

    async def upload(self, artifact: models.Artifact, source: Path) -> int:
        """Pack the directory `source` and upload it as the output; returns the bytes sent."""
        ref = _object_ref(artifact, "output")
        credentials = self._job_credentials()
        if not await anyio.Path(source).is_dir():
            raise ArtifactError(
                f"{ref}: {source} does not exist or is not a directory; the handler must write "
                "the artifact's files into that directory before it returns"
            )
        folder = self.temp_dir() if self.temp_dir is not None else source.parent
        archive = GrowingFile(_temp_file(folder, ".pack", ref))

        async def pack() -> None:
            run = functools.partial(packing.pack, progress=archive)
            fmt = self._format()
            archive.finish(await anyio.to_thread.run_sync(run, source, archive.path, fmt, str(ref)))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pack)
                return await self._transfers.upload(
                    credentials, ref, archive, kms_key_id=self._kms_key_id(),
                    job_limit=self._job_limit,
                )  # fmt: skip
        except ExceptionGroup as group:  # only plain exceptions: cancellation passes through
            failure = first_exception(group)
        finally:
            archive.path.unlink(missing_ok=True)  # synchronous on purpose, see _temp_file
        raise failure  # out here, it is not chained to the group

    async def stream(
        self, artifact: models.Artifact, chunk_size: int = MIB
    ) -> AsyncGenerator[bytes, None]:
        """The input artifact's bytes as stored (the archive itself), in order."""
        ref = _object_ref(artifact, "input")
        chunks = self._transfers.stream(self._job_credentials(), ref, chunk_size)
        async with aclosing(chunks) as stream:
            async for chunk in stream:
                yield chunk

    @asynccontextmanager
    async def writer(self, artifact: models.Artifact) -> AsyncIterator[ArtifactWriter]:
        """Write the output artifact's bytes as they are to be stored."""
        ref = _object_ref(artifact, "output")
        credentials = self._job_credentials()
        async with self._transfers.writer(
            credentials, ref, kms_key_id=self._kms_key_id(), job_limit=self._job_limit
        ) as writer:
            yield writer

    def _format(self) -> Format:
        if self._output_format == "input":
            return self.unpacked_formats[0] if self.unpacked_formats else "zip"
        return self._output_format  # type: ignore[return-value]

    def _kms_key_id(self) -> str:
        key = self._data.encryption_key
        return key.id if key is not None else DEFAULT_KMS_KEY

    def _reserve(self, size: int, ref: ObjectRef) -> None:
        self._disk.reserve(size, ref)
        self._reserved += size

    def _reserve_unpacked(self, size: int) -> None:
        self._disk.count(size)
        self._reserved += size

    def _release(self, size: int) -> None:
        self._disk.release(size)
        self._reserved -= size

    async def aclose(self) -> None:
        """The job is over (its work directory is removed): give back its disk budget."""
        self._disk.release(self._reserved)
        self._reserved = 0


def _object_ref(artifact: models.Artifact, role: str) -> ObjectRef:
    what = f"{role} artifact {artifact.name!r}" if artifact.name else f"unnamed {role} artifact"
    location = artifact.location.s3_location if artifact.location is not None else None
    if location is None:
        raise ArtifactError(
            f"{what} has no S3 location (location.s3Location) in the job data; only S3 "
            "artifact stores are supported, check the pipeline's artifact store"
        )
    return ObjectRef(what=what, bucket=location.bucket_name, key=location.object_key)


def _make_target(target: Path, ref: ObjectRef) -> None:
    try:
        target.mkdir(mode=0o700)
        target.chmod(0o700)
    except FileExistsError:
        raise ArtifactError(
            f"{ref}: cannot unpack into {target}: it already exists; give each artifact "
            "a new directory"
        ) from None
    except OSError as exc:
        raise ArtifactError(
            f"{ref}: cannot create {target} ({exc.strerror}); its parent directory must "
            "exist and be writable"
        ) from None


def _temp_file(folder: Path, suffix: str, ref: ObjectRef) -> Path:
    """A new, empty, private (0o600) temp file in `folder`.

    Created synchronously, as is its removal in `finally` blocks: a cancelled task
    could not await anything there, and a file made in a thread could be lost.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=".artifact.", suffix=suffix, dir=folder)
    except OSError as exc:
        raise ArtifactError(
            f"{ref}: cannot create a temp file in {folder} ({exc.strerror}); the "
            "worker needs write access and free space there"
        ) from None
    os.close(fd)
    return Path(name)
