"""Artifact archives: detect, unpack and pack zip, tar and tar.gz, safely and streaming.

Synchronous: callers run these functions in worker threads (`anyio.to_thread.run_sync`).
They call `anyio.from_thread.check_cancelled()` per entry and per 1 MiB chunk; in any
other thread (plain tests, scripts) they run without that check.

`unpack` detects the format by content, never by name, and refuses (`ArtifactError`,
failure type `JobFailed`, naming the artifact, the entry, the rule and the fix):
- paths that are absolute, have a drive letter or escape the target with `..`;
- symlinks pointing outside the target, also through other symlinks (checked once all
  exist); tar hardlinks to anything but a regular file unpacked before them;
- tar devices and fifos, encrypted zip entries;
- more than `max_files` entries or `max_bytes` bytes, counting the bytes really written
  (a zip's central directory is checked first as well);
- ratio rule: more bytes written than max(1 MiB, `max_ratio` x the archive file's size),
  which stops zip and gzip bombs early;
- more bytes written than `disk_bytes`, the job's remaining disk budget.

Folders, permission bits (the owner always keeps rwx on folders, rw on files) and
symlinks are kept, mtimes are not. Folders and files are written first (`O_NOFOLLOW`),
symlinks last, so nothing is written through a link. A tar(.gz) is read in one streaming
pass; memory stays bounded. Packing is in `cpworker.packing`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Literal

import anyio.from_thread
import msgspec

from cpworker.errors import ArtifactError, CpWorkerError

__all__ = [
    "FORMATS",
    "Format",
    "UnpackLimits",
    "Unpacked",
    "cancel_checker",
    "detect_format",
    "unpack",
]

Format = Literal["zip", "tar", "tar.gz"]
FORMATS: tuple[Format, ...] = ("zip", "tar", "tar.gz")

_CHUNK = 1 << 20
_RATIO_FLOOR = 1 << 20  # archives may always unpack to 1 MiB, whatever their ratio
_MAX_LINK_BYTES = 4096
# What tarfile may read on its own between two entries (pax headers, long names): real
# headers are a few KiB; a bound keeps a crafted multi-GiB header out of memory.
_MAX_TAR_HEADER = 16 << 20
# What zipfile, tarfile and gzip raise reading an archive that is corrupt or truncated
# (gzip.BadGzipFile is an OSError).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)
_CORRUPT = (*_ZIP_ERRORS, tarfile.TarError, OSError)
_DRIVE = re.compile(r"^[A-Za-z]:")
_LINK_FIX = "store the file itself, or a relative link to a path inside the artifact"


class UnpackLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds on what one input artifact may unpack to (see the module docstring)."""

    max_files: int = 100_000
    max_bytes: int = 10 * 1024**3
    # Bytes written / archive bytes; never applies below 1 MiB written.
    max_ratio: float = 200.0

    def __post_init__(self) -> None:
        for name in ("max_files", "max_bytes"):
            if getattr(self, name) < 0:
                raise CpWorkerError(f"{name}={getattr(self, name)}: must be 0 or more")
        if not (math.isfinite(self.max_ratio) and self.max_ratio > 0):
            raise CpWorkerError(f"max_ratio={self.max_ratio}: must be a finite number above 0")


class Unpacked(msgspec.Struct, frozen=True, kw_only=True):
    """What `unpack` wrote: entries (files, folders and links) and bytes of file content."""

    format: Format
    files: int
    bytes: int


def detect_format(archive: Path, what: str) -> Format:
    """The archive's format, from its first bytes (never its name).

    A gzip file is "tar.gz"; `unpack` refuses it if it holds no tar. Anything else that
    is not a zip or a tar raises `ArtifactError`.
    """
    try:
        with archive.open("rb") as file:
            head = file.read(1024)
    except OSError as exc:
        raise ArtifactError(
            f"{what}: cannot read the archive {archive} ({exc.strerror}); check the disk"
        ) from None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    # POSIX "ustar\0" and old GNU "ustar  \0"; an empty tar is only zero blocks.
    if head[257:262] == b"ustar" or head == bytes(1024):
        return "tar"
    start = f"starts with bytes {head[:8].hex(' ')}" if head else "is empty"
    raise ArtifactError(
        f"{what}: not a zip, tar or tar.gz archive (it {start}); the action that "
        "produced it must store its output artifact as one of those formats"
    )


def unpack(
    archive: Path, target: Path, limits: UnpackLimits, what: str, *, disk_bytes: int | None = None
) -> Unpacked:
    """Unpack `archive` into the existing, empty folder `target` under the module's rules.

    `disk_bytes`, when not None, is what is left of the job's disk budget. Every failure
    is raised as `ArtifactError`; on any failure (or cancellation) everything written
    under `target` is removed again, `target` itself is kept.
    """
    check = cancel_checker()
    try:
        fmt = detect_format(archive, what)
        try:
            tally = _Tally(limits, archive.stat().st_size, disk_bytes, what)
            writer = _Writer(target, tally, check)
            if fmt == "zip":
                _unpack_zip(archive, writer)
            else:
                _unpack_tar(archive, fmt == "tar.gz", writer)
            writer.finish()
        except _Corrupt as exc:
            raise ArtifactError(
                f"{what}: the archive is corrupt or truncated ({exc}); check the action "
                "that produced it, or run the pipeline again from that stage"
            ) from None
        except OSError as exc:
            raise ArtifactError(
                f"{what}: cannot unpack into {target} ({exc}); check the disk and the archive"
            ) from None
    except BaseException:
        _clear(target)
        raise
    return Unpacked(format=fmt, files=writer.count, bytes=tally.written)


# --- errors and limits --------------------------------------------------------------


class _Corrupt(Exception):
    """Reading the archive failed; raised as the "corrupt" ArtifactError by `unpack`."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error) or type(error).__name__)
        self.error = error


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """Around reads from the archive only: its errors mean the archive is corrupt."""
    try:
        yield
    except _CORRUPT as exc:
        raise _Corrupt(exc) from None


def _refused(what: str, entry: str | None, rule: str, fix: str) -> ArtifactError:
    at = f" entry {entry!r}" if entry is not None else ""
    return ArtifactError(f"{what}: refused to unpack{at}: {rule}; {fix}")


def _mib(n: float) -> str:
    return f"{n:.0f} bytes" + (f" ({n / 1024**2:.1f} MiB)" if n >= 1024**2 else "")


class _Tally:
    """Counts entries and bytes written; refuses past a limit, naming the smallest one."""

    def __init__(
        self, limits: UnpackLimits, archive_bytes: int, disk_bytes: int | None, what: str
    ) -> None:
        self.limits, self.archive_bytes, self.what = limits, archive_bytes, what
        self.entries = 0
        self.written = 0
        caps: list[tuple[float, str]] = [
            (limits.max_bytes, "bytes"),
            (max(_RATIO_FLOOR, limits.max_ratio * archive_bytes), "ratio"),
        ]
        if disk_bytes is not None:
            caps.append((disk_bytes, "disk"))
        self.caps = sorted(caps)
        self.cap = self.caps[0][0]

    def totals(self, entries: int, claimed: int) -> None:
        """Check what a zip's central directory announces, before writing anything."""
        if entries > self.limits.max_files:
            raise self._too_many(f"it has {entries} entries", None)
        if claimed > self.cap:
            raise self._over(claimed, None)

    def entry(self, name: str) -> None:
        self.entries += 1
        if self.entries > self.limits.max_files:
            raise self._too_many(f"it is entry number {self.entries}", name)

    def add(self, n: int, name: str) -> None:
        self.written += n
        if self.written > self.cap:
            raise self._over(self.written, name)

    def _too_many(self, count: str, entry: str | None) -> ArtifactError:
        rule = f"{count}, more than the limit of {self.limits.max_files} (`unpack_max_files`)"
        fix = "pack fewer files, or raise `unpack_max_files` in the worker config"
        return _refused(self.what, entry, rule, fix)

    def _over(self, total: int, entry: str | None) -> ArtifactError:
        cap, kind = next((cap, kind) for cap, kind in self.caps if total > cap)
        unpacks = f"the archive unpacks to more than {_mib(cap)}"
        if kind == "bytes":
            rule, key = f"{unpacks}, the limit `unpack_max_mib`", "unpack_max_mib"
            fix = "make the artifact smaller"
        elif kind == "ratio":
            rule = (
                f"{unpacks}, over {self.limits.max_ratio:g} times its {self.archive_bytes} "
                "archive bytes: an extreme compression ratio, as in a zip bomb (limit "
                "`unpack_max_ratio`, never below 1 MiB)"
            )
            key, fix = "unpack_max_ratio", "check the action that produced it"
        else:
            rule = f"it does not fit the disk budget: {unpacks}, what is left of `disk_budget_mib`"
            key, fix = "disk_budget_mib", "free space in the job's work folder"
        return _refused(self.what, entry, rule, f"{fix}, or raise `{key}` in the worker config")


def cancel_checker() -> Callable[[], None]:
    """anyio's `check_cancelled` in an anyio worker thread; elsewhere a no-op."""
    try:
        anyio.from_thread.check_cancelled()
    except RuntimeError:  # anyio.NoEventLoopError: not a thread of anyio.to_thread
        return lambda: None
    return anyio.from_thread.check_cancelled


# --- writing entries -----------------------------------------------------------------


class _Writer:
    """Writes entries under `target`: folders and files at once, symlinks in `finish`."""

    def __init__(self, target: Path, tally: _Tally, check: Callable[[], None]) -> None:
        self.target, self.tally, self.check, self.what = target, tally, check, tally.what
        self.root = os.path.realpath(target)
        self.count = 0
        self.dirs: list[tuple[Path, int]] = []
        self.links: list[tuple[str, str, str]] = []  # (relative path, link text, entry)
        self.files: set[str] = set()  # regular files written: what hardlinks may point to

    def start(self, name: str) -> str | None:
        """Count the entry; its normalized relative path (None for the root itself)."""
        self.check()
        self.tally.entry(name)
        relative = _relative(name)
        if relative is None:
            rule = "it has an absolute path or an invalid name"
            raise _refused(self.what, name, rule, "store relative paths")
        if relative.startswith("../") or relative == "..":
            rule = "its path escapes the target directory ('..')"
            raise _refused(self.what, name, rule, "store paths inside the artifact")
        return None if relative == "." else relative

    def folder(self, relative: str, perm: int, name: str) -> None:
        path = self.target / relative
        with self._writing(name):
            path.mkdir(parents=True, exist_ok=True)
        self.dirs.append((path, perm | 0o700))  # the owner keeps full access
        self.count += 1

    def file(self, relative: str, src: IO[bytes], perm: int, name: str) -> None:
        path = self._fresh(relative, name)
        with self._writing(name), open(path, "wb", opener=_no_follow) as out:
            self._copy(src, out, name)
            os.fchmod(out.fileno(), perm | 0o600)  # the owner keeps read and write
        self.files.add(relative)
        self.count += 1

    def hardlink(self, relative: str, linkname: str, name: str) -> None:
        source = _relative(linkname)
        if source is None or source == ".." or source.startswith("../"):
            raise self._escapes(name, linkname, "hardlink")
        if source not in self.files:
            rule = f"hardlink to {linkname!r} does not point to a regular file unpacked before it"
            raise _refused(self.what, name, rule, _LINK_FIX)
        path = self._fresh(relative, name)
        with self._writing(name):
            try:
                os.link(self.target / source, path, follow_symlinks=False)
            except OSError:  # e.g. too many links: a copy will do
                with open(self.target / source, "rb") as src, open(path, "xb") as out:
                    self._copy(src, out, name)
                    shutil.copymode(self.target / source, path)
        self.files.add(relative)
        self.count += 1

    def symlink(self, relative: str, text: str, name: str) -> None:
        if not text or "\0" in text or len(os.fsencode(text)) > _MAX_LINK_BYTES:
            raise _refused(self.what, name, "the symlink's target is empty or invalid", _LINK_FIX)
        self.links.append((relative, text, name))
        self.count += 1

    def finish(self) -> None:
        """Create the symlinks, check where they lead, then set the folders' modes."""
        for relative, text, name in self.links:
            self.check()
            self._link(relative, text, name)
        for relative, text, name in self.links:
            if not self._inside(str(self.target / relative)):
                raise self._escapes(name, text, "symlink")
        for path, perm in reversed(self.dirs):
            with self._writing(str(path.relative_to(self.target))):
                path.chmod(perm)

    def _copy(self, src: IO[bytes], out: IO[bytes], name: str) -> None:
        while True:
            with _reading():
                chunk = src.read(_CHUNK)
            if not chunk:
                return
            self.tally.add(len(chunk), name)
            self.check()
            out.write(chunk)

    def _fresh(self, relative: str, name: str) -> Path:
        """The entry's path, its folder created and an earlier file there removed."""
        path = self.target / relative
        with self._writing(name):
            path.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(path) and not path.is_dir():
                path.unlink()  # a later duplicate replaces the file (never writes through)
        return path

    def _link(self, relative: str, text: str, name: str) -> None:
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relative), text))
        path = self.target / relative
        if posixpath.isabs(text) or resolved == ".." or resolved.startswith("../"):
            raise self._escapes(name, text, "symlink")
        if not self._inside(str(path.parent)):
            raise self._escapes(name, text, "symlink")
        with self._writing(name):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(text)

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.root or real.startswith(self.root + os.sep)

    def _escapes(self, name: str, text: str, kind: str) -> ArtifactError:
        rule = f"{kind} to {text!r} points outside the target directory"
        return _refused(self.what, name, rule, _LINK_FIX)

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise ArtifactError(
                f"{self.what}: cannot unpack entry {name!r} ({exc.strerror}); the archive "
                "may hold the same path twice, or the disk may be full"
            ) from None


def _relative(name: str) -> str | None:
    """`name` normalized (may start with '..'); None if absolute or not a valid name."""
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or "\0" in name:
        return None
    return posixpath.normpath(name)


def _no_follow(path: str, flags: int) -> int:
    """Open for writing without following a symlink in the last component."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def _clear(target: Path) -> None:
    """Remove everything under `target`, not `target` itself (best effort)."""
    with contextlib.suppress(OSError), os.scandir(target) as entries:
        for entry in list(entries):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


# --- zip and tar readers --------------------------------------------------------------


def _unpack_zip(archive: Path, writer: _Writer) -> None:
    with _reading():
        zf = zipfile.ZipFile(archive)
    with zf:
        infos = zf.infolist()
        writer.tally.totals(len(infos), sum(info.file_size for info in infos))
        for info in infos:
            relative = writer.start(info.filename)
            if relative is not None:
                _zip_entry(zf, info, relative, writer)


def _zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, relative: str, writer: _Writer) -> None:
    name = info.filename
    if info.flag_bits & 0x1:
        rule = "it is encrypted"
        raise _refused(writer.what, name, rule, "store the artifact without a password")
    mode = info.external_attr >> 16  # 0: made on Windows, no Unix mode
    if stat.S_ISLNK(mode):
        if info.file_size > _MAX_LINK_BYTES:
            raise _refused(writer.what, name, "the symlink's target is too long", _LINK_FIX)
        with _reading():
            text = os.fsdecode(zf.read(info))
        writer.symlink(relative, text, name)
    elif info.is_dir():
        writer.folder(relative, mode & 0o777 if mode else 0o755, name)
    else:
        with _reading():
            src = zf.open(info)
        with src:
            writer.file(relative, src, mode & 0o777 if mode else 0o644, name)


class _Meter(io.RawIOBase):
    """The (decompressed) tar stream, bounding what tarfile reads between two entries."""

    def __init__(self, stream: io.BufferedIOBase, what: str) -> None:
        super().__init__()
        self.stream, self.what = stream, what
        self.header = -1  # bytes read since the current header began; -1: reading data
        self.after = "the start"

    def read(self, size: int | None = -1, /) -> bytes:
        data = self.stream.read(_CHUNK if size is None or size < 0 else min(size, _CHUNK))
        if self.header >= 0:
            self.header += len(data)
            if self.header > _MAX_TAR_HEADER:
                rule = f"a tar header after {self.after} is larger than {_mib(_MAX_TAR_HEADER)}"
                raise _refused(self.what, None, rule, "create the archive with a tar tool")
        return data


def _unpack_tar(archive: Path, gzipped: bool, writer: _Writer) -> None:
    with contextlib.ExitStack() as stack:
        stream: io.BufferedIOBase = stack.enter_context(archive.open("rb"))
        if gzipped:
            stream = stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb"))
        meter = _Meter(stream, writer.what)
        meter.header = 0
        try:
            with _reading():  # reads the first header
                tar = stack.enter_context(tarfile.open(fileobj=meter, mode="r|", bufsize=64 << 10))
        except _Corrupt as exc:
            if gzipped and isinstance(exc.error, tarfile.ReadError):
                raise ArtifactError(
                    f"{writer.what}: the archive is gzip-compressed but holds no tar archive "
                    f"({exc.error}); only zip, tar and tar.gz artifacts can be unpacked"
                ) from None
            raise
        while True:
            meter.header = 0
            with _reading():
                member = tar.next()
            if member is None:
                break
            meter.header, meter.after = -1, repr(member.name)
            relative = writer.start(member.name)
            if relative is not None:
                _tar_entry(tar, member, relative, writer)
        if gzipped:  # read to the end, so that gzip checks its CRC and length
            meter.header = 0
            with _reading():
                while meter.read(_CHUNK):
                    pass


def _tar_entry(tar: tarfile.TarFile, member: tarfile.TarInfo, relative: str, w: _Writer) -> None:
    name, perm = member.name, member.mode & 0o777
    if member.isreg():
        with _reading():
            src = tar.extractfile(member)
        assert src is not None  # regular files always have data
        with src:
            w.file(relative, src, perm, name)
    elif member.isdir():
        w.folder(relative, perm, name)
    elif member.issym():
        w.symlink(relative, member.linkname, name)
    elif member.islnk():
        w.hardlink(relative, member.linkname, name)
    else:
        kind = "a device or fifo" if member.isdev() else f"of unknown tar type {member.type!r}"
        fix = "archive only files, folders and links"
        raise _refused(w.what, name, f"it is {kind}, which cannot be unpacked", fix)
