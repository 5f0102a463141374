"""Packing output artifacts: a folder into zip, tar or tar.gz, streaming.

Synchronous, like `cpworker.archives` (run it in a worker thread): entries are relative,
sorted and keep their permission bits; symlinks (also to folders) are stored as links,
not followed; sockets, fifos and devices are refused. Files are streamed in 1 MiB chunks.
zip uses deflate (zip64 when needed) except for files that do not compress (already
compressed data: stored as they are), tar is PAX, tar.gz is gzip level 6 with a fixed
header, so the same folder gives the same bytes.

The archive can be uploaded while it is written: a `PackProgress` is told how far the
file has been written and which bytes will still be written again (a zip entry's header,
rewritten with its size and CRC once the entry is complete). tar and tar.gz are written
front to back only.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from cpworker.archives import FORMATS, Format, cancel_checker
from cpworker.errors import ArtifactError

__all__ = ["PackProgress", "pack"]

_CHUNK = 1 << 20
# zlib's default: level 9 costs 2-3x the CPU for 1-3% smaller archives (tarfile's "w:gz"
# would use 9), and GNU gzip defaults to 6 as well.
_GZIP_LEVEL = 6
# A zip entry of at least _SAMPLE bytes is stored, not deflated, when deflate (level 1)
# saves less than _WORTH of its first _SAMPLE bytes: compressed data would cost deflate's
# CPU (about 30 MiB/s here) for nothing.
_SAMPLE = 256 * 1024
_WORTH = 0.05


class PackProgress(Protocol):
    """Told, from the packing thread, which bytes of the archive are final."""

    def grew(self, end: int) -> None:
        """The file's first `end` bytes have been written (to the OS, not a buffer)."""

    def hold(self, start: int, stop: int | None = None) -> None:
        """Bytes `start`..`stop` (None: to the end) will be written again; not final yet."""

    def release(self) -> None:
        """The held bytes are final now."""


class _Unwatched:
    """No one listens: the archive is uploaded once it is complete."""

    def grew(self, end: int) -> None:
        pass

    def hold(self, start: int, stop: int | None = None) -> None:
        pass

    def release(self) -> None:
        pass


def pack(
    source: Path, archive: Path, fmt: Format, what: str, progress: PackProgress | None = None
) -> int:
    """Archive the folder `source` into the file `archive` (overwritten); returns its size.

    Entries are relative, sorted, keep their permission bits; symlinks (also to folders)
    are stored as links, not followed. Sockets, fifos and devices are refused. Files are
    streamed in 1 MiB chunks. `progress` (optional) hears which bytes are final as they
    are written. On failure (`ArtifactError`) the caller removes `archive`.
    """
    if fmt not in FORMATS:
        raise ArtifactError(f"{what}: unknown archive format {fmt!r}; use one of {FORMATS}")
    if archive.absolute().is_relative_to(source.absolute()):
        raise ArtifactError(f"{what}: cannot pack {source} into {archive} inside it")
    check = cancel_checker()
    progress = progress or _Unwatched()
    try:
        with _Output(archive, progress) as raw, io.BufferedWriter(raw, _CHUNK) as out:
            if fmt == "zip":
                _pack_zip(source, out, progress, what, check)
            elif fmt == "tar":
                _pack_tar(source, out, what, check)
            else:
                # No file name and a fixed time in the gzip header: same input, same bytes.
                with gzip.GzipFile("", "wb", _GZIP_LEVEL, out, mtime=0) as gz:
                    _pack_tar(source, gz, what, check)
        return archive.stat().st_size
    except OSError as exc:
        raise ArtifactError(
            f"{what}: cannot pack {source} ({exc}); check that the worker may read every "
            "file in it and that the disk is not full"
        ) from None
    except UnicodeEncodeError:  # zip stores names as UTF-8 only
        raise ArtifactError(
            f"{what}: cannot pack {source} as zip: a file name in it is not valid UTF-8; "
            "rename the file, or use the tar or tar.gz format"
        ) from None


class _Output(io.FileIO):
    """The archive file: tells `progress` how far it has been written after each write."""

    def __init__(self, path: Path, progress: PackProgress) -> None:
        super().__init__(path, "w")
        self.progress = progress
        self.end = 0

    def write(self, data: Any, /) -> int:
        count = super().write(data)
        position = self.tell()
        if position > self.end:  # not a header written again
            self.end = position
            self.progress.grew(position)
        return count


class _Source(io.FileIO):
    """A file to pack: opened without following a symlink, checking cancellation per read."""

    def __init__(self, path: Path, check: Callable[[], None]) -> None:
        super().__init__(path, "r", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW))
        self.check = check

    def read(self, size: int | None = -1, /) -> bytes:
        self.check()
        return super().read(size)


def _walk(source: Path, what: str) -> Iterator[tuple[Path, str, os.stat_result]]:
    """Every folder, file and symlink under `source`, sorted: path, name, lstat."""

    def fail(exc: OSError) -> None:
        raise exc

    for top, dirnames, filenames in os.walk(source, onerror=fail):
        dirnames.sort()
        base = Path(top)
        if base != source:
            yield base, base.relative_to(source).as_posix(), base.lstat()
        # os.walk does not enter symlinked folders; they are stored as symlinks.
        linked = [d for d in dirnames if (base / d).is_symlink()]
        for name in sorted(filenames + linked):
            path = base / name
            st = path.lstat()
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise ArtifactError(
                    f"{what}: cannot pack {path}: it is not a regular file, folder or "
                    "symlink (sockets, pipes and devices cannot be stored); remove it from "
                    "the output"
                )
            yield path, path.relative_to(source).as_posix(), st


def _pack_zip(
    source: Path,
    out: io.BufferedIOBase,
    progress: PackProgress,
    what: str,
    check: Callable[[], None],
) -> None:
    """zipfile writes each entry's header, then its data, then the header again with the
    data's size and CRC: `progress` hears that the header's bytes are held until then."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, name, st in _walk(source, what):
            check()
            is_dir = stat.S_ISDIR(st.st_mode)
            info = zipfile.ZipInfo(name + "/" if is_dir else name, _zip_time(st.st_mtime))
            info.create_system = 3  # Unix, so that readers honour the mode bits
            info.external_attr = (st.st_mode & 0xFFFF) << 16 | (0x10 if is_dir else 0)
            start = out.tell()
            progress.hold(start)
            if stat.S_ISLNK(st.st_mode):
                zf.writestr(info, os.fsencode(os.readlink(path)))
            elif is_dir:
                zf.writestr(info, b"")
            else:
                info.file_size = st.st_size  # zipfile decides on zip64 from this
                with _Source(path, check) as src:
                    sample = src.read(_SAMPLE)
                    info.compress_type = _zip_method(sample)
                    with zf.open(info, "w") as entry:
                        progress.hold(start, out.tell())  # the header; the data is final as written
                        entry.write(sample)
                        shutil.copyfileobj(src, entry, _CHUNK)
            progress.release()


def _zip_method(sample: bytes) -> int:
    """ZIP_STORED for a file whose first bytes do not compress, else ZIP_DEFLATED."""
    if len(sample) < _SAMPLE:
        return zipfile.ZIP_DEFLATED
    saved = 1 - len(zlib.compress(sample, 1)) / len(sample)
    return zipfile.ZIP_DEFLATED if saved >= _WORTH else zipfile.ZIP_STORED


def _pack_tar(source: Path, out: io.BufferedIOBase, what: str, check: Callable[[], None]) -> None:
    with tarfile.TarFile(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK
    ) as tar:
        for path, name, st in _walk(source, what):
            check()
            # Owner 0 and no user names: the unpacking side never uses them.
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
            if stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = st.st_size
                with _Source(path, check) as src:
                    tar.addfile(info, src)


def _zip_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    """A zip timestamp (years 1980 to 2107 only)."""
    t = time.localtime(mtime)
    if not 1980 <= t.tm_year <= 2107:
        return (1980, 1, 1, 0, 0, 0) if t.tm_year < 1980 else (2107, 12, 31, 23, 59, 58)
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
