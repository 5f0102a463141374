"""Input and output artifacts: zip archives in S3, moved with the job's own credentials.

`download_input` streams an input artifact into a private temp file next to its target
directory and unpacks it there, off the event loop, under these rules (anything else is
refused with an `ArtifactError` of failure type `JobFailed` that names the rule):

- every entry has a relative path that stays inside the target (no absolute paths, no
  `..` escaping it);
- a symlink may only point inside the target, also through other symlinks;
- at most `UnpackLimits.max_files` entries and `UnpackLimits.max_bytes` bytes unpacked;
- no encrypted entries; a corrupt archive or one that is not a zip is refused.

Nested folders, Unix permission bits (`external_attr >> 16`) and symlinks are kept.
Regular files and folders are written first and symlinks last, so no entry is ever
written through a symlink from the archive.

`upload_output` zips a directory (recursively, relative paths, permission bits kept,
symlinks stored as symlinks) into a temp file next to it and uploads it with SSE-KMS: the
job's encryption key when it has one, else the AWS-managed `aws/s3` key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import IO, Any

import aiofiles.threadpool
import anyio
import anyio.from_thread
import anyio.to_thread
import msgspec

from cpworker import models, s3
from cpworker.errors import ArtifactError, CpWorkerError

__all__ = ["UnpackLimits", "download_input", "upload_output"]

_CHUNK = 1 << 20
_MAX_LINK_BYTES = 4096
# What zipfile raises on an archive that is corrupt, truncated or not a zip at all.
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)
_DRIVE = re.compile(r"^[A-Za-z]:")


class UnpackLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds on what one input artifact may unpack to."""

    max_files: int = 100_000
    max_bytes: int = 10 * 1024**3

    def __post_init__(self) -> None:
        if self.max_files < 0 or self.max_bytes < 0:
            raise CpWorkerError(
                f"max_files={self.max_files}, max_bytes={self.max_bytes}: must be 0 or more"
            )


async def download_input(
    client: Any, artifact: models.Artifact, target: Path, limits: UnpackLimits
) -> Path:
    """Download the input artifact and unpack it into `target`; returns `target`.

    `target` must not exist; it is created with mode 0o700 (its parent must exist) and
    the archive is downloaded to a temp file beside it. On any failure (or cancellation)
    `target` and the temp file are removed again; errors are raised as `ArtifactError`.
    """
    ref = _object_ref(artifact, "input")
    _make_target(target, ref)
    archive: Path | None = None
    try:
        fd, archive = _temp_file(target, ".zip.part", ref)
        await _fetch(client, ref, fd, archive)
        await anyio.to_thread.run_sync(_unpack_or_remove, archive, target, limits, str(ref))
    except BaseException:
        # Usually already gone (the unpacking thread cleans up after itself) or empty;
        # only a cancellation that lands as the thread finishes leaves a full tree here.
        shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        if archive is not None:
            archive.unlink(missing_ok=True)  # synchronous on purpose, see _temp_file
    return target


async def upload_output(
    client: Any,
    artifact: models.Artifact,
    source: Path,
    encryption_key: models.EncryptionKey | None,
) -> int:
    """Zip the directory `source` and upload it as the output artifact; returns its size.

    The zip is written to a temp file beside `source` (removed afterwards, whatever
    happens) and uploaded with SSE-KMS: `encryption_key.id`, or the AWS-managed `aws/s3`
    key when it is None. Every failure is raised as `ArtifactError`.
    """
    ref = _object_ref(artifact, "output")
    if not await anyio.Path(source).is_dir():
        raise ArtifactError(
            f"{ref}: {source} does not exist or is not a directory; the handler must write "
            "the artifact's files into that directory before it returns"
        )
    fd, archive = _temp_file(source, ".zip", ref)
    os.close(fd)
    try:
        size, digest = await anyio.to_thread.run_sync(_pack, source, archive, str(ref))
        key = encryption_key.id if encryption_key is not None else s3.DEFAULT_KMS_KEY
        await s3.put_object_file(client, ref, archive, kms_key_id=key, checksum_sha256=digest)
    finally:
        archive.unlink(missing_ok=True)  # synchronous on purpose, see _temp_file
    return size


def _object_ref(artifact: models.Artifact, role: str) -> s3.ObjectRef:
    what = f"{role} artifact {artifact.name!r}" if artifact.name else f"unnamed {role} artifact"
    location = artifact.location.s3_location if artifact.location is not None else None
    if location is None:
        raise ArtifactError(
            f"{what} has no S3 location (location.s3Location) in the job data; only S3 "
            "artifact stores are supported, check the pipeline's artifact store"
        )
    return s3.ObjectRef(what=what, bucket=location.bucket_name, key=location.object_key)


def _make_target(target: Path, ref: s3.ObjectRef) -> None:
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


def _temp_file(beside: Path, suffix: str, ref: s3.ObjectRef) -> tuple[int, Path]:
    """A new private (0o600) temp file in the folder of `beside`, open for writing.

    Created synchronously, as is its removal in `finally` blocks: a cancelled task
    could not await anything there, and a file made in a thread could be lost.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=f".{beside.name}.", suffix=suffix, dir=beside.parent)
    except OSError as exc:
        raise ArtifactError(
            f"{ref}: cannot create a temp file in {beside.parent} ({exc.strerror}); the "
            "worker needs write access and free space there"
        ) from None
    return fd, Path(name)


async def _fetch(client: Any, ref: s3.ObjectRef, fd: int, path: Path) -> None:
    """Stream the object into the open temp file `fd` (at `path`), chunk by chunk.

    Memory stays bounded by `_CHUNK`. The file is opened and closed synchronously, so a
    cancelled task cannot leave it open; aiofiles does the writes in its thread pool.
    """
    try:
        with os.fdopen(fd, "wb") as file:
            out = aiofiles.threadpool.wrap(file)
            async with aclosing(s3.iter_object(client, ref, _CHUNK)) as chunks:
                async for chunk in chunks:
                    await out.write(chunk)
    except OSError as exc:
        raise ArtifactError(
            f"{ref}: cannot write the download to {path.parent} ({exc.strerror}); "
            "free disk space there or give the worker another work directory"
        ) from None


# --- unpacking (runs in a worker thread) ---------------------------------------------


def _unpack_or_remove(archive: Path, target: Path, limits: UnpackLimits, what: str) -> None:
    try:
        _unpack(archive, target, limits, what)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _unpack(archive: Path, target: Path, limits: UnpackLimits, what: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _check_totals(infos, limits, what)
            _Unpacker(zf, target, limits, what).run(infos)
    except _CORRUPT as exc:
        raise ArtifactError(
            f"{what}: the archive is corrupt or not a valid zip file ({exc}); check the "
            "action that produced it, or run the pipeline again from that stage"
        ) from None
    except OSError as exc:
        raise ArtifactError(
            f"{what}: cannot unpack into {target} ({exc}); check the disk and the archive"
        ) from None


def _check_totals(infos: list[zipfile.ZipInfo], limits: UnpackLimits, what: str) -> None:
    if len(infos) > limits.max_files:
        raise _refused(
            what,
            f"it has {len(infos)} entries, more than the limit of {limits.max_files} "
            "(UnpackLimits.max_files)",
        )
    total = sum(info.file_size for info in infos)
    if total > limits.max_bytes:
        raise _refused(
            what,
            f"it unpacks to {total} bytes, more than the limit of {limits.max_bytes} "
            "(UnpackLimits.max_bytes)",
        )


def _refused(what: str, why: str) -> ArtifactError:
    return ArtifactError(
        f"{what}: refused to unpack, {why}; rebuild the artifact within the rules or "
        "raise the worker's unpack limits"
    )


class _Unpacker:
    """Writes one archive's entries: folders and files first, symlinks last."""

    def __init__(self, zf: zipfile.ZipFile, target: Path, limits: UnpackLimits, what: str):
        self.zf, self.target, self.limits, self.what = zf, target, limits, what
        self.root = os.path.realpath(target)
        self.written = 0
        self.dirs: list[tuple[Path, int]] = []
        self.links: list[tuple[str, str]] = []  # (relative path, link text)

    def run(self, infos: list[zipfile.ZipInfo]) -> None:
        for info in infos:
            anyio.from_thread.check_cancelled()
            self._entry(info)
        for relative, text in self.links:
            self._link(relative, text)
        for relative, _ in self.links:
            self._check_link(relative)
        for path, mode in reversed(self.dirs):
            path.chmod(mode | 0o700)  # the owner keeps full access to its folders

    def _entry(self, info: zipfile.ZipInfo) -> None:
        relative = self._relative(info.filename)
        if relative is None:
            return
        if info.flag_bits & 0x1:
            raise _refused(self.what, f"entry {info.filename!r} is encrypted")
        mode = info.external_attr >> 16
        path = self.target / relative
        try:
            if stat.S_ISLNK(mode):
                self.links.append((relative, self._link_text(info)))
            elif info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                self.dirs.append((path, (mode & 0o777) or 0o755))
            else:
                self._file(info, path)
                path.chmod((mode & 0o777) or 0o644)
        except OSError as exc:
            raise ArtifactError(
                f"{self.what}: cannot unpack entry {info.filename!r} ({exc.strerror}); the "
                "archive may hold the same path twice, or the disk may be full"
            ) from None

    def _relative(self, name: str) -> str | None:
        """The entry's normalized relative path; None for the archive's root itself."""
        if name.startswith(("/", "\\")) or _DRIVE.match(name):
            raise _refused(self.what, f"entry {name!r} has an absolute path")
        relative = posixpath.normpath(name)
        if relative == ".." or relative.startswith("../"):
            raise _refused(self.what, f"entry {name!r} escapes the target directory ('..')")
        return None if relative == "." else relative

    def _file(self, info: zipfile.ZipInfo, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.zf.open(info) as src, open(path, "wb", opener=_no_follow) as out:
            while chunk := src.read(_CHUNK):
                self.written += len(chunk)
                if self.written > self.limits.max_bytes:
                    raise _refused(
                        self.what,
                        f"it unpacks to more than the limit of {self.limits.max_bytes} bytes "
                        "(UnpackLimits.max_bytes)",
                    )
                anyio.from_thread.check_cancelled()
                out.write(chunk)

    def _link_text(self, info: zipfile.ZipInfo) -> str:
        if info.file_size > _MAX_LINK_BYTES:
            raise _refused(self.what, f"symlink {info.filename!r} has a target that is too long")
        text = os.fsdecode(self.zf.read(info))
        if not text or "\0" in text:
            raise _refused(self.what, f"symlink {info.filename!r} has an invalid target")
        return text

    def _link(self, relative: str, text: str) -> None:
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relative), text))
        escapes = resolved == ".." or resolved.startswith("../")
        path = self.target / relative
        if posixpath.isabs(text) or escapes or not self._inside(str(path.parent)):
            raise self._link_escapes(relative, text)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(text)
        except OSError as exc:
            raise ArtifactError(
                f"{self.what}: cannot create symlink {relative!r} ({exc.strerror}); the "
                "archive may hold the same path twice"
            ) from None

    def _check_link(self, relative: str) -> None:
        """Once every link exists: does it still resolve inside (links through links)?"""
        path = self.target / relative
        if not self._inside(str(path)):
            raise self._link_escapes(relative, os.readlink(path))

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.root or real.startswith(self.root + os.sep)

    def _link_escapes(self, relative: str, text: str) -> ArtifactError:
        return _refused(
            self.what, f"symlink {relative!r} -> {text!r} points outside the target directory"
        )


def _no_follow(path: str, flags: int) -> int:
    """Open for writing without following a symlink in the last component."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


# --- packing (runs in a worker thread) -----------------------------------------------


def _pack(source: Path, archive: Path, what: str) -> tuple[int, str]:
    """Zip `source` into `archive`; returns the archive's size and base64 SHA-256."""
    try:
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zf:
            for path, name in _walk(source):
                anyio.from_thread.check_cancelled()
                _add(zf, path, name, what)
        with archive.open("rb") as packed:
            return archive.stat().st_size, _sha256(packed)
    except OSError as exc:
        raise ArtifactError(
            f"{what}: cannot pack {source} ({exc}); check that the worker may read every "
            "file in it and that the disk is not full"
        ) from None


def _walk(source: Path) -> Iterator[tuple[Path, str]]:
    """Every folder, file and symlink under `source` with its archive name, in order."""

    def fail(exc: OSError) -> None:
        raise exc

    for top, dirnames, filenames in os.walk(source, onerror=fail):
        dirnames.sort()
        base = Path(top)
        if base != source:
            yield base, base.relative_to(source).as_posix()
        # os.walk does not enter symlinked folders; they are stored as symlinks.
        linked = [d for d in dirnames if (base / d).is_symlink()]
        for name in sorted(filenames + linked):
            path = base / name
            yield path, path.relative_to(source).as_posix()


def _add(zf: zipfile.ZipFile, path: Path, name: str, what: str) -> None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        info = zipfile.ZipInfo(name, date_time=_zip_time(st.st_mtime))
        info.create_system = 3  # Unix, so that readers honour the mode bits
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, os.fsencode(os.readlink(path)))
    elif stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        zf.write(path, name)
    else:
        raise ArtifactError(
            f"{what}: cannot pack {path}: it is not a regular file, folder or symlink "
            "(sockets, pipes and devices cannot be stored); remove it from the output"
        )


def _zip_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    """A zip timestamp (years 1980 to 2107 only)."""
    year, month, day, hour, minute, second = time.localtime(mtime)[:6]
    if year < 1980:
        return (1980, 1, 1, 0, 0, 0)
    if year > 2107:
        return (2107, 12, 31, 23, 59, 58)
    return (year, month, day, hour, minute, second)


def _sha256(file: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(_CHUNK):
        digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")
