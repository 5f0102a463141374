"""Moving artifact bytes: concurrent ranged downloads, multipart uploads, streams.

One `Transfers` per worker process shares one S3 client and one budget of concurrent part
transfers between all jobs, so 200 jobs with 8 parts each cannot exhaust memory or
sockets: a part waits first for its job's limit (`job_concurrency`) and then for the
process's (`process_concurrency`). Memory stays bounded by the number of parts in flight
times the write buffer (1 MiB) for downloads and times 256 KiB (aiohttp's read size) for
uploads from files, never by artifact size. Streams hold one part each in memory, and an
`ArtifactWriter` the part it fills, plus its parts in flight (within both budgets).

- **Download**: objects up to `multipart_threshold` in one GET (botocore checks the
  object's checksum when it has one); larger ones in ranged GETs of `part_size`, each sent
  with `If-Match` of the object's ETag, so every part comes from the same version, written
  at its offset with aiofiles. A part whose connection breaks mid-answer is fetched again
  from where it stopped (twice at most). The file must end up exactly the object's size.
- **Upload**: files up to `multipart_threshold` in one PutObject with a SHA-256 checksum;
  larger ones by multipart upload with a CRC32 checksum per part (computed off the event
  loop; S3 checks it). Parts are `part_size` (at least 5 MiB), doubled after every 1,000
  parts, so no total size has to be known in advance. A `GrowingFile` (an archive still
  being packed) is uploaded part by part as its bytes become final. A failed or cancelled
  multipart upload is aborted, so no parts are left behind, and the error is raised.

Every request is signed with the job's `JobCredentials` and renewed as `cpworker.s3`
describes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import threading
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, Final

import aiofiles.threadpool
import anyio
import anyio.lowlevel
import msgspec

from cpworker.errors import ArtifactError, CpWorkerError, first_exception
from cpworker.s3 import TRANSPORT_CODE, JobCredentials, ObjectInfo, ObjectRef, SharedS3

__all__ = ["MIB", "ArtifactWriter", "GrowingFile", "TransferSettings", "Transfers"]

log = logging.getLogger("cpworker.transfers")

MIB: Final = 1024 * 1024
# S3's limits on multipart uploads.
MIN_UPLOAD_PART: Final = 5 * MIB
MAX_UPLOAD_PART: Final = 5 * 1024 * MIB
MAX_PARTS: Final = 10_000
_WRITE_BUFFER = MIB
_READ_ATTEMPTS = 3
_ABORT_TIMEOUT_S = 30.0


class TransferSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Part sizes (bytes) and how many parts move at once, per job and per process."""

    part_size: int = 8 * MIB
    multipart_threshold: int = 16 * MIB
    job_concurrency: int = 8
    process_concurrency: int = 32

    def __post_init__(self) -> None:
        for name in ("part_size", "multipart_threshold", "job_concurrency", "process_concurrency"):
            if getattr(self, name) < 1:
                raise CpWorkerError(f"{name}={getattr(self, name)!r}: must be 1 or more")

    def part_length(self, number: int) -> int:
        """Upload part `number`'s size: `part_size` (at least S3's 5 MiB), doubled after
        every 1,000 parts (S3 takes parts of different sizes), so that the 10,000 parts S3
        allows hold about 5 TiB, its largest object, whatever the total turns out to be."""
        return min(max(self.part_size, MIN_UPLOAD_PART) << (number - 1) // 1000, MAX_UPLOAD_PART)


class Transfers:
    """The process's transfer engine: one S3 client, one budget, one byte counter."""

    def __init__(
        self,
        s3: SharedS3,
        settings: TransferSettings,
        on_bytes: Callable[[str, int], None] = lambda *_: None,
    ) -> None:
        self.s3 = s3
        self.settings = settings
        self.budget = anyio.CapacityLimiter(settings.process_concurrency)
        self.on_bytes = on_bytes

    # --- download ----------------------------------------------------------------------

    def job_limit(self) -> anyio.CapacityLimiter:
        """A new job's own limit on its parts in flight (share it across its transfers)."""
        return anyio.CapacityLimiter(self.settings.job_concurrency)

    async def download(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        info: ObjectInfo,
        path: Path,
        job_limit: anyio.CapacityLimiter | None = None,
    ) -> None:
        """Fetch the object (`info` from `SharedS3.head`) into the existing file at `path`."""
        if info.size <= self.settings.multipart_threshold:
            ranges: list[tuple[int, int] | None] = [None]
        else:
            step = self.settings.part_size
            ranges = [(s, min(s + step, info.size) - 1) for s in range(0, info.size, step)]
        job_limit = job_limit or self.job_limit()
        written = [0]
        try:
            async with anyio.create_task_group() as tg:
                for byte_range in ranges:
                    tg.start_soon(
                        self._download_part, credentials, ref, info, path, byte_range, job_limit,
                        written,
                    )  # fmt: skip
        except ExceptionGroup as group:  # only plain exceptions: cancellation passes through
            raise first_exception(group) from None
        if written[0] != info.size:
            raise ArtifactError(
                f"{ref}: download incomplete, got {written[0]} of {info.size} bytes; retry the job"
            )

    async def _download_part(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        info: ObjectInfo,
        path: Path,
        byte_range: tuple[int, int] | None,
        job_limit: anyio.CapacityLimiter,
        written: list[int],
    ) -> None:
        first, last = byte_range if byte_range is not None else (0, info.size - 1)
        position = [first]  # the next byte to fetch, moved on by every write
        async with job_limit, self.budget:
            for attempt in range(_READ_ATTEMPTS):
                try:
                    whole = byte_range is None and position[0] == 0
                    await self._fetch_into(credentials, ref, info, path, position, last, whole)
                    break
                except ArtifactError as exc:
                    if exc.code != TRANSPORT_CODE or attempt == _READ_ATTEMPTS - 1:
                        raise
                    log.info("%s: connection broke, fetching again from byte %d", ref, position[0])
        written[0] += position[0] - first

    async def _fetch_into(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        info: ObjectInfo,
        path: Path,
        position: list[int],
        last: int,
        whole: bool,
    ) -> None:
        """Write bytes `position[0]`..`last` at their offset in `path` (`whole`: one GET).

        Opened synchronously, so a cancelled task cannot leave the file open; aiofiles does
        the writes in its thread pool, a buffer of about 1 MiB at a time.
        """
        start = position[0]
        chunks = self.s3.iter_range(credentials, ref, None if whole else start, last, info.etag)
        with _open_for_writing(path, ref) as file:
            out = aiofiles.threadpool.wrap(file)
            await out.seek(start)
            buffer: list[bytes] = []
            buffered = 0
            async with aclosing(chunks) as stream:
                async for chunk in stream:
                    buffer.append(chunk)
                    buffered += len(chunk)
                    if buffered >= _WRITE_BUFFER:
                        position[0] += await self._write(out, buffer, ref)
                        buffered = 0
            position[0] += await self._write(out, buffer, ref)
        if position[0] != last + 1:
            raise ArtifactError(
                f"{ref}: S3 sent {position[0] - start} bytes for bytes {start}-{last}; "
                "retry the job",
                code=TRANSPORT_CODE,
            )

    async def _write(self, out: Any, buffer: list[bytes], ref: ObjectRef) -> int:
        data = b"".join(buffer)
        buffer.clear()
        try:
            await out.write(data)
        except OSError as exc:
            raise ArtifactError(
                f"{ref}: cannot write the download ({exc.strerror}); free disk space or give "
                "the worker another work_dir"
            ) from None
        self.on_bytes("download", len(data))
        return len(data)

    # --- upload ------------------------------------------------------------------------

    async def upload(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        source: Path | GrowingFile,
        *,
        kms_key_id: str,
        job_limit: anyio.CapacityLimiter | None = None,
    ) -> int:
        """Upload a file with SSE-KMS under `kms_key_id`; returns its size.

        `source` is a complete file, or a `GrowingFile` still being written: its parts are
        uploaded as they become final, and the upload completes once it is finished.
        """
        if isinstance(source, GrowingFile):
            file = source
        else:
            file = GrowingFile(source, size=(await anyio.Path(source).stat()).st_size)
        threshold = self.settings.multipart_threshold
        while file.size is None and file.written() <= threshold:
            await file.changed()
        if file.size is not None and file.size <= threshold:
            digest = await anyio.to_thread.run_sync(_sha256, file.path)
            async with self.budget:
                with file.path.open("rb") as body:
                    await self.s3.put_file(
                        credentials, ref, body, kms_key_id=kms_key_id, checksum_sha256=digest
                    )
            self.on_bytes("upload", file.size)
            return file.size
        async with self._multipart(credentials, ref, kms_key_id) as (upload_id, parts):
            job_limit = job_limit or self.job_limit()
            async with (
                anyio.create_task_group() as tg,
                aclosing(self._final_parts(file, ref)) as final_parts,
            ):
                async for part in final_parts:
                    tg.start_soon(
                        self._upload_file_part, credentials, ref, upload_id, file.path, part,
                        job_limit, parts,
                    )  # fmt: skip
        assert file.size is not None  # _final_parts ends when the file is finished
        return file.size

    async def _final_parts(
        self, file: GrowingFile, ref: ObjectRef
    ) -> AsyncGenerator[tuple[int, int, int], None]:
        """The file's parts (number, start, length) as each becomes final, until it ends."""
        cut: list[tuple[int, int, int]] = []  # written, but (partly) held
        start, number = 0, 1
        while True:
            while file.size is None or start < file.size:
                length = self.settings.part_length(number)
                if file.size is not None:
                    length = min(length, file.size - start)
                elif start + length > file.written():
                    break
                if number > MAX_PARTS:
                    raise _too_many_parts(ref)
                cut.append((number, start, length))
                start, number = start + length, number + 1
            for part in [p for p in cut if file.final(p[1], p[1] + p[2])]:
                cut.remove(part)
                yield part
            if file.size is not None and not cut:
                return
            await file.changed()

    async def _upload_file_part(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        upload_id: str,
        path: Path,
        part: tuple[int, int, int],
        job_limit: anyio.CapacityLimiter,
        parts: list[dict[str, Any]],
    ) -> None:
        number, start, length = part
        async with job_limit, self.budget:
            crc = await anyio.to_thread.run_sync(_crc32_file, path, start, length)
            with _FileSlice(path, start, length) as body:
                entry = await self.s3.upload_part(
                    credentials, ref, upload_id, number, body, length=length, checksum_crc32=crc
                )
        parts.append(entry)
        self.on_bytes("upload", length)

    async def upload_bytes_part(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        upload_id: str,
        number: int,
        data: bytes | bytearray,
        parts: list[dict[str, Any]],
    ) -> None:
        """One part from memory (for `ArtifactWriter`, which holds the budget for it)."""
        crc = _b64_crc32(await anyio.to_thread.run_sync(zlib.crc32, data))
        entry = await self.s3.upload_part(
            credentials, ref, upload_id, number, _BytesBody(data),
            length=len(data), checksum_crc32=crc,
        )  # fmt: skip
        parts.append(entry)
        self.on_bytes("upload", len(data))

    @asynccontextmanager
    async def _multipart(
        self, credentials: JobCredentials, ref: ObjectRef, kms_key_id: str
    ) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
        """A multipart upload: completed when the body ends, aborted when it raises."""
        upload_id = await self.create_multipart(credentials, ref, kms_key_id)
        parts: list[dict[str, Any]] = []
        try:
            await anyio.lowlevel.checkpoint()  # a cancellation during the create lands here
            try:
                yield upload_id, parts
            except ExceptionGroup as group:  # only plain exceptions: cancellation passes
                raise first_exception(group) from None
            await self.s3.complete_multipart(credentials, ref, upload_id, parts)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_ABORT_TIMEOUT_S):
                await self.abort_multipart(credentials, ref, upload_id)
            raise

    async def create_multipart(
        self, credentials: JobCredentials, ref: ObjectRef, kms_key_id: str
    ) -> str:
        """CreateMultipartUpload, shielded from cancellation: cancelled while S3 answers, the
        upload would exist with no id to abort it by (its parts orphaned). The caller's
        next checkpoint delivers the cancellation, with the id in hand to abort."""
        with anyio.CancelScope(shield=True):
            upload_id = await self.s3.create_multipart(credentials, ref, kms_key_id=kms_key_id)
        return upload_id  # noqa: RET504 - out of the scope: mypy sees that it may swallow

    async def abort_multipart(
        self, credentials: JobCredentials, ref: ObjectRef, upload_id: str
    ) -> None:
        """Abort a multipart upload; a failure is logged (the parts would be orphaned)."""
        try:
            await self.s3.abort_multipart(credentials, ref, upload_id)
        except ArtifactError as exc:
            log.warning(
                "%s: could not abort multipart upload %s (%s); a bucket lifecycle rule "
                "(AbortIncompleteMultipartUpload) removes its parts",
                ref,
                upload_id,
                exc.code,
                extra={"event": "multipart_abort_failed"},
            )

    # --- streams -----------------------------------------------------------------------

    async def stream(
        self, credentials: JobCredentials, ref: ObjectRef, chunk_size: int = MIB
    ) -> AsyncGenerator[bytes, None]:
        """The object's bytes in order, chunks of at most `chunk_size`, never on disk.

        Read ahead one part at a time (ranged GETs of `part_size`, under the process
        budget), so no connection is held while the consumer works with a chunk: a handler
        can stream an input into an `ArtifactWriter` however few connections there are.
        Memory: one part per open stream.
        """
        info = await self.s3.head(credentials, ref)
        step = self.settings.part_size
        for first in range(0, info.size, step):
            last = min(first + step, info.size) - 1
            part = await self._read_range(credentials, ref, info, first, last)
            view = memoryview(part)
            for start in range(0, len(part), chunk_size):
                yield bytes(view[start : start + chunk_size])

    async def _read_range(
        self, credentials: JobCredentials, ref: ObjectRef, info: ObjectInfo, first: int, last: int
    ) -> bytearray:
        """Bytes `first`..`last` in memory; a broken connection is resumed (twice at most).

        Filled in place, so the part is in memory once (growing a buffer and copying it
        out would hold it three times over at the peak).
        """
        received = bytearray(last - first + 1)
        filled = 0
        async with self.budget:
            for attempt in range(_READ_ATTEMPTS):
                chunks = self.s3.iter_range(credentials, ref, first + filled, last, info.etag)
                try:
                    async with aclosing(chunks) as stream:
                        async for chunk in stream:
                            if filled + len(chunk) > len(received):
                                filled += len(chunk)
                                break
                            received[filled : filled + len(chunk)] = chunk
                            filled += len(chunk)
                            self.on_bytes("download", len(chunk))
                    break
                except ArtifactError as exc:
                    if exc.code != TRANSPORT_CODE or attempt == _READ_ATTEMPTS - 1:
                        raise
        if filled != len(received):
            raise ArtifactError(
                f"{ref}: S3 sent {'more than ' if filled > len(received) else ''}{filled} "
                f"bytes for bytes {first}-{last}; retry the job"
            )
        return received

    @asynccontextmanager
    async def writer(
        self,
        credentials: JobCredentials,
        ref: ObjectRef,
        *,
        kms_key_id: str,
        job_limit: anyio.CapacityLimiter | None = None,
    ) -> AsyncIterator[ArtifactWriter]:
        """An `ArtifactWriter`; the object exists once the block ends without an error."""
        writer = ArtifactWriter(self, credentials, ref, kms_key_id, job_limit or self.job_limit())
        try:
            try:
                async with anyio.create_task_group() as tg:
                    writer._task_group = tg
                    yield writer
                    await writer._flush()
            except ExceptionGroup as group:  # only plain exceptions: cancellation passes
                raise first_exception(group) from None
            await writer._complete()
        except BaseException:
            await writer._abort()
            raise
        finally:
            writer._closed = True


class GrowingFile:
    """A file that is uploaded while a worker thread still writes it (`packing.pack`).

    The writing thread says how far the file is written (`grew`) and which bytes it will
    write again (`hold`/`release`: a zip entry's header); the event loop is woken once per
    MiB written. `finish(size)`, on the event loop, says the file is complete. A file
    that is complete from the start is `GrowingFile(path, size=...)`.
    """

    def __init__(self, path: Path, size: int | None = None) -> None:
        self.path = path
        self.size = size  # None until it is finished
        self._lock = threading.Lock()
        self._end = size or 0
        self._held: tuple[int, int | None] | None = None
        self._woken_at = 0
        self._changed = anyio.Event()

    # --- called by the writing thread (an anyio worker thread) --------------------------

    def grew(self, end: int) -> None:
        with self._lock:
            self._end = max(self._end, end)
            wake = self._end - self._woken_at >= MIB
            if wake:
                self._woken_at = self._end
        if wake:
            anyio.from_thread.run_sync(self._wake)

    def hold(self, start: int, stop: int | None = None) -> None:
        with self._lock:
            self._held = (start, stop)

    def release(self) -> None:
        with self._lock:
            self._held = None

    # --- called on the event loop ------------------------------------------------------

    def finish(self, size: int) -> None:
        """The file is complete: `size` bytes, all final."""
        with self._lock:
            self.size, self._end, self._held = size, size, None
        self._wake()

    def written(self) -> int:
        with self._lock:
            return self._end

    def final(self, start: int, stop: int) -> bool:
        """Whether bytes `start`..`stop` are written and not held."""
        with self._lock:
            if stop > self._end:
                return False
            if self._held is None:
                return True
            held_start, held_stop = self._held
            return stop <= held_start or (held_stop is not None and start >= held_stop)

    async def changed(self) -> None:
        """Until the file grows by a MiB or is finished."""
        await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


class ArtifactWriter:
    """Bytes written by a handler, uploaded in parts while it writes (see `Transfers.writer`).

    A full part starts uploading in the background once it holds one of its job's part
    slots and one of the process's, so `write()` waits while they are taken: memory stays
    below the part being filled plus the parts in flight, which the process budget
    bounds. If everything fits in one part, it is sent in one PutObject. A `write()` that
    is cancelled makes the upload fail (it is aborted when the block ends): the artifact
    would be missing bytes otherwise.
    """

    def __init__(
        self,
        transfers: Transfers,
        credentials: JobCredentials,
        ref: ObjectRef,
        kms_key_id: str,
        job_limit: anyio.CapacityLimiter,
    ) -> None:
        self._transfers = transfers
        self._credentials = credentials
        self._ref = ref
        self._kms_key_id = kms_key_id
        self._job_limit = job_limit
        self._part_size = transfers.settings.part_length(1)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._next_part = 1
        self._interrupted = False
        self._closed = False
        self._task_group: Any = None
        self.size = 0

    async def write(self, data: bytes) -> None:
        """Append `data`; each full part starts uploading in the background."""
        if self._closed or self._interrupted:
            raise ArtifactError(
                f"{self._ref}: write() after the writer's block ended or a write was "
                "interrupted; write everything inside one `async with ... writer()` block"
            )
        view = memoryview(data)
        try:
            while view:
                take = min(self._part_size - len(self._buffer), len(view))
                self._buffer += view[:take]
                view = view[take:]
                self.size += take
                if len(self._buffer) == self._part_size:
                    await self._start_part()
        except BaseException:
            self._interrupted = True
            raise

    async def _start_part(self) -> None:
        if self._next_part > MAX_PARTS:
            raise _too_many_parts(self._ref)
        if self._upload_id is None:  # aborted when the block ends, even if cancelled now
            self._upload_id = await self._transfers.create_multipart(
                self._credentials, self._ref, self._kms_key_id
            )
        token = object()
        await self._job_limit.acquire_on_behalf_of(token)
        try:
            await self._transfers.budget.acquire_on_behalf_of(token)
        except BaseException:
            self._job_limit.release_on_behalf_of(token)
            raise
        data, self._buffer = self._buffer, bytearray()  # handed over, not copied
        number, self._next_part = self._next_part, self._next_part + 1
        self._part_size = self._transfers.settings.part_length(self._next_part)
        self._task_group.start_soon(self._upload_part, self._upload_id, number, data, token)

    async def _upload_part(
        self, upload_id: str, number: int, data: bytearray, token: object
    ) -> None:
        try:
            await self._transfers.upload_bytes_part(
                self._credentials, self._ref, upload_id, number, data, self._parts
            )
        finally:
            self._transfers.budget.release_on_behalf_of(token)
            self._job_limit.release_on_behalf_of(token)

    async def _flush(self) -> None:
        """Send what is buffered: the last part, or the whole object in one PutObject."""
        if self._interrupted:
            raise ArtifactError(
                f"{self._ref}: a write() was interrupted, so the artifact would be missing "
                "bytes; the upload is aborted"
            )
        if self._upload_id is not None:
            if self._buffer:
                await self._start_part()
            return
        data = bytes(self._buffer)
        digest = await anyio.to_thread.run_sync(_sha256_bytes, data)
        async with self._transfers.budget:
            await self._transfers.s3.put_file(
                self._credentials, self._ref, data,
                kms_key_id=self._kms_key_id, checksum_sha256=digest,
            )  # fmt: skip
        self._transfers.on_bytes("upload", len(data))

    async def _complete(self) -> None:
        """Once every part is uploaded: complete the multipart upload."""
        if self._upload_id is not None:
            await self._transfers.s3.complete_multipart(
                self._credentials, self._ref, self._upload_id, self._parts
            )

    async def _abort(self) -> None:
        if self._upload_id is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_ABORT_TIMEOUT_S):
                await self._transfers.abort_multipart(self._credentials, self._ref, self._upload_id)


class _FileSlice(io.RawIOBase):
    """Bytes `start`..`start + length` of a file, as a seekable file of its own.

    An upload part's body: aiohttp reads it in its executor, botocore rewinds it (`seek(0)`)
    before a retry, so no part is ever held in memory.
    """

    def __init__(self, path: Path, start: int, length: int) -> None:
        super().__init__()
        try:
            self._file = path.open("rb", buffering=0)
        except OSError as exc:
            raise ArtifactError(
                f"cannot read {path} to upload it ({exc.strerror}); the packed artifact "
                "must stay in place until it is uploaded"
            ) from None
        self._start, self._length, self._pos = start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[: max(0, self._length - self._pos)]
        if not view:
            return 0
        count = os.preadv(self._file.fileno(), [view], self._start + self._pos)
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a slice of a file has no file descriptor of its own")

    def close(self) -> None:
        self._file.close()
        super().close()


class _BytesBody(io.RawIOBase):
    """A part in memory as a seekable file: aiohttp then sends it 256 KiB at a time.

    Handed over as `bytes`, the whole part would be copied into the socket transport's
    buffer as well (and `io.BytesIO` copies it when aiohttp asks for its size).
    """

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__()
        self._view, self._pos = memoryview(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(buffer)]
        memoryview(buffer)[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        raise io.UnsupportedOperation("bytes in memory have no file descriptor")


def _too_many_parts(ref: ObjectRef) -> ArtifactError:
    return ArtifactError(
        f"{ref}: more than {MAX_PARTS} parts, S3's limit (about 5 TiB); raise "
        "transfer_part_size_mib or split the artifact"
    )


def _open_for_writing(path: Path, ref: ObjectRef) -> Any:
    try:
        return path.open("r+b")
    except OSError as exc:
        raise ArtifactError(
            f"{ref}: cannot open {path} for the download ({exc.strerror}); the worker needs "
            "write access to its work_dir"
        ) from None


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return base64.b64encode(hashlib.file_digest(file, "sha256").digest()).decode("ascii")


def _sha256_bytes(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _crc32_file(path: Path, start: int, length: int) -> str:
    crc = 0
    with _FileSlice(path, start, length) as body:
        while chunk := body.read(MIB):
            crc = zlib.crc32(chunk, crc)
    return _b64_crc32(crc)


def _b64_crc32(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")
