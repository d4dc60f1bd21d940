"""Crash-safe file writing shared by every part that persists files: adapters, checkpoints, the embedded model's
conversion, saved KV caches and session exports.

A reader must never see a half-written file or directory, whatever kills the writer. Every writer here builds its
result under a temporary name beside the target (same filesystem, so the final ``os.replace`` is atomic), flushes
it to disk, then renames it into place; a failure removes the temporary, and one left by a killed process is
cleaned by the next build of the same target. No torch imports: the store and the CLI use this too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:  # POSIX only; elsewhere the lock is a no-op
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["TMP_PREFIX", "atomic_directory", "atomic_write", "atomic_write_bytes", "clean_temporaries", "file_lock"]

#: Temporary names are ``<parent>/.tmp-<final name>-<random>``, so leftovers of a target can be found and removed.
TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on *path* (created if needed), held for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_path(path: Path) -> None:
    """Flush *path* (a file or directory) to disk; a directory fsync makes a rename in it durable."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside *path*, then move it to *path* atomically.

    ``write`` gets the temporary path (writers such as ``safetensors.save_file`` want a name, not a handle).
    After a crash *path* holds either its old content or the new one, never a mixture. Returns *path*.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(_file_mode())  # mkstemp makes 0600; give the file the mode a plain open() would
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write *data* to *path* atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def clean_temporaries(final: Path) -> None:
    """Remove temporaries a crashed build of *final* left behind."""
    for leftover in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        logger.info("removing leftover temporary %s", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _apply_umask(directory: Path) -> None:
    """Give *directory* and its files the modes a plain mkdir/open would (mkdtemp makes 0700, and some writers
    0600), so a shared cache stays readable."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_directory(final: str | Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a fresh temporary directory beside *final*, then move it to *final*.

    A crash or an exception inside ``build`` never leaves a directory at *final*: its temporary is removed (or,
    after a hard crash, by the next call for the same *final*). An existing *final* is replaced as a whole — a
    reader sees the old directory or the new one. Two processes building the same *final* at once should hold a
    :func:`file_lock`; without one the last rename wins, still never a mixture.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    old: Path | None = None
    try:
        build(tmp)
        _apply_umask(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync_path(path)
        _fsync_path(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        _fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists() and (old / final.name).exists():
            os.replace(old / final.name, final)  # put the previous one back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return final
