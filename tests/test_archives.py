"""Archives on the local disk: format detection, safe unpacking, packing, round trips.

Every archive that breaks a rule is built here, byte for byte where the standard library
would not write it, and unpacked with `unpack()` directly into an empty target folder.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from cpworker.archives import (
    FORMATS,
    Format,
    Unpacked,
    UnpackLimits,
    detect_format,
    unpack,
)
from cpworker.errors import ArtifactError, CpWorkerError
from cpworker.packing import pack
from tests.trees import make_source, snapshot

LIMITS = UnpackLimits()
WHAT = "input artifact 'Crafted'"
FILE, DIR, LINK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
HARDLINK = 0o1_000_000  # a tar hardlink (not a st_mode type; zip cannot store one)
TAR_TYPES = {
    FILE: tarfile.REGTYPE,
    DIR: tarfile.DIRTYPE,
    LINK: tarfile.SYMTYPE,
    HARDLINK: tarfile.LNKTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}

Entry = tuple[str, bytes, int]  # (name in the archive, content or link text, type | mode)


def _zip(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": some cases hold a path twice
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data, mode in entries:
                info = zipfile.ZipInfo(name)
                # mode 0: as written on Windows (DOS attributes only, no Unix mode)
                info.create_system = 3 if mode else 0
                info.external_attr = mode << 16 if mode else 0x20
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, data)
    return buffer.getvalue()


def _tar(entries: list[Entry], gzipped: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data, st_mode in entries:
            info = tarfile.TarInfo(name)
            info.type = TAR_TYPES[st_mode & ~0o7777]
            info.mode = st_mode & 0o7777
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = data.decode()
                archive.addfile(info)
            elif info.type == tarfile.REGTYPE:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return gzip.compress(buffer.getvalue()) if gzipped else buffer.getvalue()


def _archive(fmt: Format, entries: list[Entry]) -> bytes:
    return _zip(entries) if fmt == "zip" else _tar(entries, gzipped=fmt == "tar.gz")


def _write(tmp_path: Path, body: bytes, name: str = "artifact.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(body)
    return path


def _target(tmp_path: Path) -> Path:
    target = tmp_path / "in"
    target.mkdir(mode=0o700)
    return target


def _listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _refused(
    tmp_path: Path, body: bytes, limits: UnpackLimits = LIMITS, *, disk_bytes: int | None = None
) -> str:
    """Unpack `body`, which must be refused; the message. The target must be left empty."""
    archive = _write(tmp_path, body)
    target = _target(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(ArtifactError) as caught:
        unpack(archive, target, limits, WHAT, disk_bytes=disk_bytes)
    assert caught.value.failure_type == "JobFailed"
    assert _listing(target) == []
    assert _listing(tmp_path) == before  # nothing written beside it either
    message = str(caught.value)
    assert message.startswith(WHAT)
    return message


# --- format detection ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["artifact.zip", "artifact.tar.gz", "artifact.txt", "noext"])
def test_the_format_is_detected_by_content_not_by_name(
    tmp_path: Path, fmt: Format, name: str
) -> None:
    archive = _write(tmp_path, _archive(fmt, [("a/b.txt", b"hi", FILE | 0o644)]), name)
    assert detect_format(archive, WHAT) == fmt
    result = unpack(archive, _target(tmp_path), LIMITS, WHAT)
    assert result == Unpacked(format=fmt, files=1, bytes=2)
    assert (tmp_path / "in/a/b.txt").read_bytes() == b"hi"


@pytest.mark.parametrize(
    ("body", "start"),
    [
        (b"this is not an archive\n", "it starts with bytes 74 68 69 73 20 69 73 20"),
        (b"", "it is empty"),
        (b"PK\x01\x02central", "it starts with bytes 50 4b 01 02 63 65 6e 74"),
    ],
)
def test_a_file_that_is_no_archive_is_refused(tmp_path: Path, body: bytes, start: str) -> None:
    with pytest.raises(ArtifactError) as caught:
        detect_format(_write(tmp_path, body, "looks.zip"), WHAT)
    expected = f"{WHAT}: not a zip, tar or tar.gz archive ({start})"
    assert str(caught.value).startswith(expected)
    assert expected in _refused(tmp_path, body)


def test_empty_archives_of_every_format_unpack_to_nothing(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for fmt in FORMATS:
        archive = tmp_path / f"empty.{fmt}"
        pack(tmp_path / "src", archive, fmt, "output artifact 'Out'")
        target = tmp_path / f"in-{fmt}"
        target.mkdir()
        assert unpack(archive, target, LIMITS, WHAT) == Unpacked(format=fmt, files=0, bytes=0)
        assert _listing(target) == []


# --- unsafe archives, all three formats -----------------------------------------------

# case: (formats, entries, limits, what the message must say, the entry it must name)
UNSAFE: dict[str, tuple[tuple[Format, ...], list[Entry], UnpackLimits, str, str | None]] = {
    "slip": (FORMATS, [("../evil.txt", b"x", FILE | 0o644)], LIMITS, "escapes the", "../evil.txt"),
    "slip inside a path": (
        FORMATS,
        [("a/b.txt", b"ok", FILE | 0o644), ("a/../../evil.txt", b"x", FILE | 0o644)],
        LIMITS,
        "escapes the target",
        "a/../../evil.txt",
    ),
    "absolute path": (
        FORMATS,
        [("/TMP_PATH/evil.txt", b"x", FILE | 0o644)],
        LIMITS,
        "absolute path",
        "/TMP_PATH/evil.txt",
    ),
    "drive letter": (
        FORMATS,
        [("C:/evil.txt", b"x", FILE | 0o644)],
        LIMITS,
        "absolute",
        "C:/evil.txt",
    ),
    "symlink out": (
        FORMATS,
        [("link", b"../evil", LINK | 0o777)],
        LIMITS,
        "points outside",
        "link",
    ),
    "absolute symlink": (FORMATS, [("link", b"/etc", LINK | 0o777)], LIMITS, "outside", "link"),
    "symlink out through symlinks": (
        FORMATS,
        [("x", b".", LINK | 0o777), ("y", b"x/..", LINK | 0o777)],
        LIMITS,
        "symlink to 'x/..' points outside the target directory",
        "y",
    ),
    "symlink made through a symlink": (
        FORMATS,
        [("x", b"z/..", LINK | 0o777), ("z", b".", LINK | 0o777), ("x/evil", b".", LINK | 0o777)],
        LIMITS,
        "points outside",
        None,
    ),
    "same path as file and symlink": (
        FORMATS,
        [("a", b"file", FILE | 0o644), ("a", b"elsewhere", LINK | 0o777)],
        LIMITS,
        "the same path twice",
        "a",
    ),
    "too many files": (
        FORMATS,
        [(f"f{i}.txt", b"x", FILE | 0o644) for i in range(5)],
        UnpackLimits(max_files=4),
        "more than the limit of 4 (`unpack_max_files`)",
        None,
    ),
    "too many bytes": (
        FORMATS,
        [("a.txt", b"x" * 60, FILE | 0o644), ("b.txt", b"x" * 60, FILE | 0o644)],
        UnpackLimits(max_bytes=100),
        "unpacks to more than 100 bytes, the limit `unpack_max_mib`",
        None,
    ),
    "hardlink out": (
        ("tar", "tar.gz"),
        [("h", b"../../etc/passwd", HARDLINK | 0o644)],
        LIMITS,
        "hardlink to '../../etc/passwd' points outside the target directory",
        "h",
    ),
    "absolute hardlink": (("tar",), [("h", b"/etc/passwd", HARDLINK | 0o644)], LIMITS, "out", "h"),
    "hardlink to a file not unpacked": (
        ("tar", "tar.gz"),
        [("h", b"later.txt", HARDLINK | 0o644), ("later.txt", b"x", FILE | 0o644)],
        LIMITS,
        "does not point to a regular file unpacked before it",
        "h",
    ),
    "hardlink to a folder": (
        ("tar",),
        [("d", b"", DIR | 0o755), ("h", b"d", HARDLINK | 0o644)],
        LIMITS,
        "does not point to a regular file",
        "h",
    ),
    "character device": (
        ("tar", "tar.gz"),
        [("dev/null", b"", stat.S_IFCHR | 0o666)],
        LIMITS,
        "it is a device or fifo",
        "dev/null",
    ),
    "block device": (("tar",), [("sda", b"", stat.S_IFBLK | 0o660)], LIMITS, "device", "sda"),
    "fifo": (("tar", "tar.gz"), [("pipe", b"", stat.S_IFIFO | 0o644)], LIMITS, "fifo", "pipe"),
}
UNSAFE_CASES = [(fmt, case) for case, (formats, *_) in UNSAFE.items() for fmt in formats]


@pytest.mark.parametrize(("fmt", "case"), UNSAFE_CASES)
def test_unsafe_archives_are_refused_and_leave_the_target_empty(
    tmp_path: Path, fmt: Format, case: str
) -> None:
    _, entries, limits, rule, entry = UNSAFE[case]
    entries = [(n.replace("/TMP_PATH", str(tmp_path)), d, mode) for n, d, mode in entries]
    message = _refused(tmp_path, _archive(fmt, entries), limits)
    assert rule in message
    if entry is not None:
        assert f"entry {entry.replace('/TMP_PATH', str(tmp_path))!r}" in message
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path.parent / "evil.txt").exists()


def _encrypted_zip() -> bytes:
    """A zip whose entry has the "encrypted" flag (zipfile cannot write encrypted ones)."""
    data = bytearray(_zip([("secret.txt", b"x" * 100, FILE | 0o644)]))
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + flags_at
        data[at] |= 0x1
    return bytes(data)


@pytest.mark.parametrize(
    ("fmt", "rule"),
    [
        ("zip", "refused to unpack: it has 5 entries, more than the limit of 4"),
        ("tar", "refused to unpack entry 'f4.txt': it is entry number 5, more than the limit of 4"),
        ("tar.gz", "entry 'f4.txt': it is entry number 5"),
    ],
)
def test_a_zip_is_checked_against_its_central_directory_before_writing(
    tmp_path: Path, fmt: Format, rule: str
) -> None:
    # A tar is streamed, so it is refused at the entry that breaks the limit.
    body = _archive(fmt, [(f"f{i}.txt", b"x", FILE | 0o644) for i in range(5)])
    assert rule in _refused(tmp_path, body, UnpackLimits(max_files=4))


def test_an_encrypted_zip_entry_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, _encrypted_zip())
    assert "entry 'secret.txt': it is encrypted" in message


def test_no_entry_is_written_through_a_symlink_of_the_archive(tmp_path: Path) -> None:
    # A link to the outside (refused later) followed by a file of the same path: the file
    # is written first, as a file, and the link then cannot replace it.
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    entries = [("a", str(outside).encode(), LINK | 0o777), ("a", b"overwrite", FILE | 0o644)]
    for fmt in FORMATS:
        assert "points outside" in _refused(tmp_path, _archive(fmt, entries))
        (tmp_path / "artifact.bin").unlink()
        (tmp_path / "in").rmdir()
    assert outside.read_text() == "keep"


@pytest.mark.parametrize("fmt", FORMATS)
def test_limits_of_exactly_the_count_and_size_are_allowed(tmp_path: Path, fmt: Format) -> None:
    body = _archive(fmt, [(f"f{i}.txt", b"x" * 10, FILE | 0o644) for i in range(4)])
    target = _target(tmp_path)
    limits = UnpackLimits(max_files=4, max_bytes=40)
    result = unpack(_write(tmp_path, body), target, limits, WHAT, disk_bytes=40)
    assert result == Unpacked(format=fmt, files=4, bytes=40)
    assert _listing(target) == ["f0.txt", "f1.txt", "f2.txt", "f3.txt"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_more_than_the_disk_budget_is_refused_with_its_own_message(
    tmp_path: Path, fmt: Format
) -> None:
    body = _archive(fmt, [(f"f{i}.txt", b"x" * 1000, FILE | 0o644) for i in range(3)])
    message = _refused(tmp_path, body, disk_bytes=2500)
    assert "it does not fit the disk budget" in message
    assert "`disk_budget_mib`" in message
    assert "unpack_max_mib" not in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_modes_are_kept_and_the_owner_keeps_access(tmp_path: Path, fmt: Format) -> None:
    entries = [
        ("bin/", b"", DIR | 0o750),
        ("bin/run.sh", b"#!/bin/sh\n", FILE | 0o755),
        ("ro/", b"", DIR | 0o500),
        ("ro/key", b"k", FILE | 0o400),
        ("private", b"p", FILE | 0o600),
        ("setuid", b"s", FILE | 0o4755),
    ]
    expected = {"bin": 0o750, "bin/run.sh": 0o755, "ro": 0o700, "ro/key": 0o600}
    expected |= {"private": 0o600, "setuid": 0o755}
    if fmt == "zip":  # written on Windows: no Unix mode, the defaults apply
        entries += [("plain.txt", b"x", 0), ("windir/", b"", 0)]
        expected |= {"plain.txt": 0o644, "windir": 0o755}
    target = _target(tmp_path)
    unpack(_write(tmp_path, _archive(fmt, entries)), target, LIMITS, WHAT)
    tree = snapshot(target)
    assert {name: mode for name, (_, mode, _) in tree.items()} == expected
    assert tree["bin/run.sh"] == ("file", 0o755, b"#!/bin/sh\n")


@pytest.mark.parametrize("fmt", ["tar", "tar.gz"])
def test_a_hardlink_to_a_file_inside_is_a_real_hardlink(tmp_path: Path, fmt: Format) -> None:
    entries = [
        ("bin/tool", b"#!/bin/sh\n", FILE | 0o755),
        ("alias/tool", b"bin/tool", HARDLINK | 0o755),
    ]
    target = _target(tmp_path)
    result = unpack(_write(tmp_path, _archive(fmt, entries)), target, LIMITS, WHAT)
    assert result == Unpacked(format=fmt, files=2, bytes=10)
    original, alias = (target / "bin/tool").stat(), (target / "alias/tool").stat()
    assert original.st_ino == alias.st_ino
    assert (target / "alias/tool").read_bytes() == b"#!/bin/sh\n"


def test_a_later_file_replaces_a_hardlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    entries = [
        ("a.txt", b"first", FILE | 0o644),
        ("b.txt", b"a.txt", HARDLINK | 0o644),
        ("b.txt", b"second", FILE | 0o644),
    ]
    target = _target(tmp_path)
    unpack(_write(tmp_path, _tar(entries)), target, LIMITS, WHAT)
    assert (target / "a.txt").read_bytes() == b"first"
    assert (target / "b.txt").read_bytes() == b"second"


# --- broken archives and bombs -------------------------------------------------------


def _corrupt_zip() -> bytes:
    """A stored (uncompressed) zip with one byte of the file's data changed."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("f.txt", b"A" * 100)
    data = bytearray(buffer.getvalue())
    data[data.index(b"A" * 100) + 50] = ord("B")
    return bytes(data)


def _understated_zip() -> bytes:
    """A 4 MiB entry whose local and central headers both claim 100 bytes."""
    data = bytearray(_zip([("big.bin", bytes(4 << 20), FILE | 0o644)]))
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature) + size_at
        data[at : at + 4] = struct.pack("<I", 100)
    return bytes(data)


def _corrupt_tar() -> bytes:
    """A tar whose first header was changed after its checksum was computed."""
    data = bytearray(_tar([("f.txt", b"x", FILE | 0o644)]))
    data[0] = ord("g")
    return bytes(data)


def _gz_bomb() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 50 << 20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    return buffer.getvalue()


def _targz(entries: list[Entry]) -> bytes:
    return _tar(entries, gzipped=True)


BIG = [("data.bin", os.urandom(64 << 10), FILE | 0o644)]


def _padded_targz() -> bytes:
    """A tar.gz whose tar is followed by 1 MiB of zeros, which tarfile never reads."""
    return gzip.compress(_tar(BIG) + bytes(1 << 20))


def _wrong_crc() -> bytes:
    """A tar.gz whose gzip trailer holds a wrong CRC-32 (the tar inside is whole)."""
    body = _padded_targz()
    return body[:-8] + b"\0\0\0\0" + body[-4:]


BROKEN: dict[str, tuple[Callable[[], bytes], str]] = {
    "corrupt zip": (_corrupt_zip, "the archive is corrupt or truncated (Bad CRC-32"),
    "truncated zip": (lambda: _zip(BIG)[: 30 << 10], "corrupt or truncated"),
    "zip that under-states its sizes": (_understated_zip, "corrupt or truncated (Bad CRC-32"),
    "corrupt tar header": (_corrupt_tar, "corrupt or truncated"),
    "truncated tar": (lambda: _tar(BIG)[: 30 << 10], "corrupt or truncated"),
    "truncated tar.gz": (lambda: _targz(BIG)[: 30 << 10], "corrupt or truncated"),
    "tar.gz without its gzip trailer": (lambda: _padded_targz()[:-4], "corrupt or truncated"),
    "tar.gz with a wrong CRC": (_wrong_crc, "corrupt or truncated (CRC check failed"),
    "gzip that is not a tar": (
        lambda: gzip.compress(b"just some text, no tar\n" * 100),
        "the archive is gzip-compressed but holds no tar archive",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_archives_are_refused_as_corrupt(tmp_path: Path, case: str) -> None:
    build, rule = BROKEN[case]
    message = _refused(tmp_path, build())
    assert rule in message
    assert "check the action that produced it" in message or "only zip, tar" in message


def test_a_zip_bomb_is_refused_by_the_ratio_rule(tmp_path: Path) -> None:
    # 50 MiB of zeros deflate to ~50 KiB: a ratio of ~1000, the limit is 200.
    body = _zip([("zeros.bin", bytes(50 << 20), FILE | 0o644)])
    assert len(body) < 100_000
    message = _refused(tmp_path, body)
    # Refused from the central directory's sizes, before anything is written.
    assert message.startswith(f"{WHAT}: refused to unpack: the archive unpacks to more than")
    assert f"over 200 times its {len(body)} archive bytes" in message
    assert "`unpack_max_ratio`" in message


def test_a_tar_gz_bomb_is_refused_while_streaming(tmp_path: Path) -> None:
    body = _gz_bomb()
    message = _refused(tmp_path, body)
    assert "entry 'zeros.bin'" in message
    cap = 200 * len(body)
    assert f"the archive unpacks to more than {cap} bytes" in message
    assert "`unpack_max_ratio`" in message


def test_below_1_mib_the_ratio_does_not_apply(tmp_path: Path) -> None:
    # ~1 KiB of archive for 1 MiB of zeros: a ratio of ~1000 is allowed at this size.
    body = _tar([("zeros.bin", bytes(1 << 20), FILE | 0o644)], gzipped=True)
    assert len(body) * 200 < 1 << 20
    target = _target(tmp_path)
    result = unpack(_write(tmp_path, body), target, LIMITS, WHAT)
    assert result == Unpacked(format="tar.gz", files=1, bytes=1 << 20)


def test_a_huge_tar_header_is_refused_without_reading_it_into_memory(tmp_path: Path) -> None:
    # A pax header of 64 MiB of "comment" (it compresses to ~64 KiB).
    header = tarfile.TarInfo("f.txt")
    header.pax_headers = {"comment": "x" * (64 << 20)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        archive.addfile(header, io.BytesIO(b""))
    body = buffer.getvalue()
    message = _refused(tmp_path, body, UnpackLimits(max_ratio=1e6))
    assert "a tar header after the start is larger than" in message


# --- packing and round trips ---------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_then_unpack_keeps_folders_modes_and_inner_symlinks(
    tmp_path: Path, fmt: Format
) -> None:
    source = tmp_path / "out"
    source.mkdir()
    make_source(source)
    archive = tmp_path / "archive.part"
    archive.write_bytes(b"left over from before " * 1000)  # overwritten
    size = pack(source, archive, fmt, "output artifact 'Out'")
    assert size == archive.stat().st_size > 0
    assert detect_format(archive, WHAT) == fmt

    target = _target(tmp_path)
    result = unpack(archive, target, LIMITS, WHAT)
    assert result == Unpacked(format=fmt, files=12, bytes=50_000 + 21 + 17 + 10)
    tree = snapshot(target)
    assert tree == snapshot(source)
    assert tree["bin/run.sh"] == ("file", 0o755, b"#!/bin/sh\necho built\n")
    assert tree["conf"] == ("dir", 0o750, "")
    assert tree["conf/private.key"][:2] == ("file", 0o600)
    assert tree["deep/er/conf"] == ("link", 0, "../../conf")
    assert (target / "deep/er/conf/private.key").read_text() == "not really a key\n"


def test_pack_is_deterministic_and_tar_gz_uses_level_6(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    (source / "text.txt").write_bytes(b"".join(b"line %d\n" % i for i in range(20_000)))
    first, second = tmp_path / "1", tmp_path / "2"
    pack(source, first, "tar.gz", "output")
    pack(source, second, "tar.gz", "output")
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes()[3:8] == bytes(5)  # no file name, no time in the gzip header
    inner = gzip.decompress(first.read_bytes())
    level6 = zlib.compressobj(6, zlib.DEFLATED, -15)
    deflated = level6.compress(inner) + level6.flush()
    assert len(first.read_bytes()) == 10 + len(deflated) + 8  # gzip header and trailer


def test_pack_refuses_a_fifo(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    (source / "ok.txt").write_text("ok")
    os.mkfifo(source / "pipe")
    for fmt in FORMATS:
        with pytest.raises(ArtifactError) as caught:
            pack(source, tmp_path / f"archive.{fmt}", fmt, "output artifact 'Out'")
        message = str(caught.value)
        assert message.startswith("output artifact 'Out': cannot pack")
        assert str(source / "pipe") in message
        assert "sockets, pipes and devices cannot be stored" in message


def test_names_that_are_not_utf8_are_kept_by_tar_and_refused_by_zip(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    name = os.fsencode(source) + b"/caf\xe9.txt"  # Latin-1, not UTF-8
    with open(name, "wb") as file:
        file.write(b"x")
    with pytest.raises(ArtifactError, match="a file name in it is not valid UTF-8"):
        pack(source, tmp_path / "a.zip", "zip", "output")
    pack(source, tmp_path / "a.tar", "tar", "output")
    target = _target(tmp_path)
    unpack(tmp_path / "a.tar", target, LIMITS, WHAT)
    assert os.listdir(os.fsencode(target)) == [b"caf\xe9.txt"]


def test_pack_reports_a_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"cannot pack .*No such file"):
        pack(tmp_path / "missing", tmp_path / "a.zip", "zip", "output artifact 'Out'")


def test_large_files_are_packed_as_zip64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Files over 4 GiB need zip64; a lower threshold exercises the same code path cheaply.
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1 << 20)
    source = tmp_path / "out"
    source.mkdir()
    data = os.urandom(3 << 20)
    (source / "big.bin").write_bytes(data)
    archive = tmp_path / "big.zip"
    pack(source, archive, "zip", "output")
    with zipfile.ZipFile(archive) as zf:
        [info] = zf.infolist()
        assert info.file_size == len(data)
        assert struct.unpack("<H", info.extra[:2])[0] == 0x0001  # the zip64 extra field
    target = _target(tmp_path)
    assert unpack(archive, target, LIMITS, WHAT).bytes == len(data)
    assert (target / "big.bin").read_bytes() == data


# --- threads, cancellation, limits ---------------------------------------------------


async def test_unpack_in_a_worker_thread_stops_when_cancelled(tmp_path: Path) -> None:
    body = _zip([(f"f{i:05}.txt", b"x" * 64, FILE | 0o644) for i in range(5000)])
    archive = _write(tmp_path, body)
    target = _target(tmp_path)
    scope = anyio.CancelScope()

    async def run() -> None:
        with scope:
            await anyio.to_thread.run_sync(unpack, archive, target, LIMITS, WHAT)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        with anyio.fail_after(30):
            while len(_listing(target)) <= 10:  # noqa: ASYNC110 - the state is in a thread
                await anyio.sleep(0.002)
        scope.cancel()
    assert scope.cancelled_caught
    assert _listing(target) == []


async def test_pack_in_a_worker_thread_stops_when_cancelled(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    for i in range(2000):
        (source / f"f{i:05}.txt").write_bytes(os.urandom(64))
    archive = tmp_path / "out.zip"
    scope = anyio.CancelScope()

    async def run() -> None:
        with scope:
            await anyio.to_thread.run_sync(pack, source, archive, "zip", "output")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        with anyio.fail_after(30):
            while not archive.exists() or archive.stat().st_size < 10_000:  # noqa: ASYNC110
                await anyio.sleep(0.002)
        scope.cancel()
    assert scope.cancelled_caught
    if zipfile.is_zipfile(archive):  # closed on the way out, with what was packed so far
        with zipfile.ZipFile(archive) as done:
            assert len(done.infolist()) < 2000


async def test_unpack_and_pack_run_in_worker_threads(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    make_source(source)
    archive = tmp_path / "a.tar.gz"
    await anyio.to_thread.run_sync(pack, source, archive, "tar.gz", "output")
    target = _target(tmp_path)
    await anyio.to_thread.run_sync(unpack, archive, target, LIMITS, WHAT)
    assert snapshot(target) == snapshot(source)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_files": -1}, "max_files"),
        ({"max_bytes": -1}, "max_bytes"),
        ({"max_ratio": 0}, "max_ratio"),
        ({"max_ratio": float("nan")}, "max_ratio"),
        ({"max_ratio": float("inf")}, "max_ratio"),
    ],
)
def test_limits_are_checked(fields: dict[str, float], field: str) -> None:
    with pytest.raises(CpWorkerError, match=f"^{field}="):
        UnpackLimits(**fields)  # type: ignore[arg-type]


class Watcher:
    """A `PackProgress` that, whenever it hears of progress, keeps every byte it was told
    is final (written and not held), to compare with what the archive ends up as."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.end = 0
        self.held: tuple[int, int | None] | None = None
        self.seen: list[tuple[int, bytes]] = []  # (offset, bytes final at that moment)
        self.holds = self.releases = 0

    def _keep(self) -> None:
        data = self.archive.read_bytes()[: self.end]
        if self.held is None:
            self.seen.append((0, data))
            return
        start, stop = self.held
        self.seen.append((0, data[:start]))
        if stop is not None:
            self.seen.append((stop, data[stop:]))

    def grew(self, end: int) -> None:
        assert end > self.end  # only ever more
        self.end = end
        self._keep()

    def hold(self, start: int, stop: int | None = None) -> None:
        self._keep()  # what was final just before
        self.held = (start, stop)
        self.holds += 1

    def release(self) -> None:
        self.held = None
        self.releases += 1
        self._keep()


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_reports_only_bytes_that_stay_as_they_are(tmp_path: Path, fmt: Format) -> None:
    """What packing calls final is never written again: zip headers are held until their
    entry is complete (then zipfile writes them again with the size and CRC)."""
    source = tmp_path / "out"
    source.mkdir()
    make_source(source)
    (source / "big.bin").write_bytes(os.urandom(3 << 20))
    (source / "text.txt").write_bytes(b"some text\n" * 300_000)
    archive = tmp_path / "archive"
    watcher = Watcher(archive)
    size = pack(source, archive, fmt, "output", watcher)
    final = archive.read_bytes()
    assert watcher.end == size == len(final)
    assert len(watcher.seen) > 3  # told of progress as it went, not only at the end
    for offset, data in watcher.seen:
        assert final[offset : offset + len(data)] == data
    if fmt == "zip":
        with zipfile.ZipFile(archive) as zf:
            entries = len(zf.infolist())
        assert watcher.holds >= entries == watcher.releases  # each entry held, then released
        # A file's data is final as it is written; only its header waits for the entry.
        assert any(offset > 0 for offset, _ in watcher.seen)
    else:
        assert watcher.holds == 0  # tar and tar.gz are written front to back


def test_zip_stores_files_that_do_not_compress(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    (source / "random.bin").write_bytes(os.urandom(1 << 20))
    (source / "small-random.bin").write_bytes(os.urandom(1000))  # too small to judge
    (source / "text.txt").write_bytes(b"compresses well\n" * 100_000)
    archive = tmp_path / "a.zip"
    pack(source, archive, "zip", "output")
    with zipfile.ZipFile(archive) as zf:
        methods = {info.filename: info.compress_type for info in zf.infolist()}
        assert zf.testzip() is None  # every CRC checks
    assert methods == {
        "random.bin": zipfile.ZIP_STORED,
        "small-random.bin": zipfile.ZIP_DEFLATED,
        "text.txt": zipfile.ZIP_DEFLATED,
    }
    assert archive.stat().st_size < (1 << 20) + 1000 + 100_000
