"""Folder trees for archive tests: one to pack, and a snapshot to compare trees by."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def make_source(root: Path) -> None:
    """An output folder: nested folders, an executable, a private file, inner symlinks."""
    for folder in ("bin", "conf", "deep/er/est", "empty"):
        (root / folder).mkdir(parents=True)
    for name, text, mode in (
        ("bin/run.sh", "#!/bin/sh\necho built\n", 0o755),
        ("conf/private.key", "not really a key\n", 0o600),
        ("deep/er/est/data.txt", "x" * 50_000, 0o644),
        ("README", "top level\n", 0o644),
    ):
        (root / name).write_text(text)
        (root / name).chmod(mode)
    for folder, mode in (("bin", 0o755), ("conf", 0o750), ("deep", 0o755), ("empty", 0o700)):
        (root / folder).chmod(mode)
    (root / "latest").symlink_to("bin/run.sh")
    (root / "deep/er/conf").symlink_to("../../conf")  # a symlinked folder: not followed


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
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
