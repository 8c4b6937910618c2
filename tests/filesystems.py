"""Real small file systems for store-failure tests: a tmpfs that can be filled up, an ext4 image whose WAL can be
made immutable (what a card gone read-only does to SQLite) or that can be frozen (a card that stops answering).
They need root (mount); without it the test is skipped with the reason."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of `size` at `mountpoint` (skips the test where mounting is not allowed)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mountpoint
    finally:
        _run("umount", "-l", str(mountpoint))  # lazy: a process killed a moment ago may still hold a file


@contextlib.contextmanager
def ext4(image: Path, mountpoint: Path, size_mb: int = 8) -> Iterator[Path]:
    """A loop-mounted ext4 image (skips the test where loop devices or mkfs.ext4 are not available)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as f:
        f.truncate(size_mb << 20)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 image: {made.stderr.strip() or made.returncode}")
    mounted = _run("mount", "-o", "loop", str(image), str(mountpoint))
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here (needs root and loop devices): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        _run("fsfreeze", "-u", str(mountpoint))  # a test that failed while the file system was frozen
        _run("umount", "-l", str(mountpoint))


@contextlib.contextmanager
def frozen(mountpoint: Path) -> Iterator[None]:
    """fsfreeze: every write to the file system blocks until it is thawed (a card that stopped answering)."""
    froze = _run("fsfreeze", "-f", str(mountpoint))
    if froze.returncode != 0:
        pytest.skip(f"fsfreeze is not available here: {froze.stderr.strip() or froze.returncode}")
    try:
        yield
    finally:
        _run("fsfreeze", "-u", str(mountpoint))


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte; delete the returned file to free it again."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    if os.write(fd, b"\0" * size) < size:
                        break
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    return filler


def immutable(path: Path, on: bool) -> None:
    """chattr +i / -i: even root cannot write the file (SQLite then fails with an I/O error)."""
    changed = _run("chattr", "+i" if on else "-i", str(path))
    if changed.returncode != 0:
        pytest.skip(f"chattr is not available or not supported here: {changed.stderr.strip()}")
