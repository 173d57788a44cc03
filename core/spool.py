"""
The spool: where the core keeps submitted files until their tasks end.

A file is the Base64 text a plugin sent, often hundreds of megabytes, so the
core keeps it on disk rather than in memory: :class:`DiskSpool` writes each
file to its own file under the data directory, under a random key that the
task stores as ``TaskSpec.payload_key``. :class:`MemorySpool` keeps the
objects themselves, for tests and for ``--memory`` mode.

The spool is written *before* the store commits the tasks that reference it
(a task must never point at a missing file), and files are deleted only
*after* the store has committed that their tasks are gone. A crash between the
two steps leaves unreferenced files, which :func:`core.store.open_data_dir`
removes at the next start. Never the other way round.

The storage errors live here, not in :mod:`core.store`, because the spool
raises them too and :mod:`core.store` already imports this module.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any, Protocol, TypeAlias

__all__ = [
    "Buffer",
    "DiskSpool",
    "MemorySpool",
    "Spool",
    "StorageError",
    "StorageFull",
]

logger = logging.getLogger("linkup.core.store")

# Anything with the buffer protocol: bytes, bytearray, memoryview, zmq.Frame.
# Typed loosely, like core.wire.Payload, because zmq.Frame does not declare the
# buffer protocol to the type checker and collections.abc.Buffer needs 3.12.
Buffer: TypeAlias = Any

# A key is what DiskSpool.put makes: secrets.token_hex(8). Checking it keeps a
# damaged store from naming a path outside the spool.
_KEY = re.compile(r"[0-9a-f]{16}")

# Where a file is written before it is renamed to its key: a name no key can
# have, so a scan can tell the two apart.
_TEMP_PREFIX = ".tmp-"

# errno values that mean "no room", whatever the limit: the disk, the user's
# quota, or the process's RLIMIT_FSIZE.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class StorageError(Exception):
    """
    The core cannot keep its queue or its files: a problem for the operator,
    not a bug. The message says what failed, where, and the system's reason.

    """


class StorageFull(StorageError):
    """
    Out of disk space (or quota, or file size limit). Worth its own class:
    the operator's fix is to free space, and the shell may refuse new files
    while still serving the tasks it has.

    """


def describe(error: OSError) -> str:
    """
    The system's reason without the file name, which the caller's message
    already gives in a form the operator recognises (the data directory).

    """
    if error.errno is not None and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error)


def storage_error(message: str, error: OSError) -> StorageError:
    """A :class:`StorageError`, or :class:`StorageFull` if ``error`` means no room."""
    cls = StorageFull if error.errno in _FULL_ERRNOS else StorageError
    return cls(f"{message}: {describe(error)}")


def _nbytes(data: Buffer) -> int:
    return memoryview(data).nbytes


class Spool(Protocol):
    """
    A key-value store of files, written once and read until deleted.

    ``bytes_used`` and ``count`` are what the core reports as metrics; they
    are kept up to date as files come and go, never by scanning.

    """

    def put(self, data: Buffer) -> str:
        """Keep ``data`` and return a new key for it."""
        ...

    def get(self, key: str) -> Buffer:
        """The file under ``key``; KeyError if there is none."""
        ...

    def delete(self, key: str) -> None:
        """Drop the file under ``key``, if there is one."""
        ...

    def keys(self) -> set[str]: ...

    @property
    def bytes_used(self) -> int: ...

    @property
    def count(self) -> int: ...

    def close(self) -> None: ...


class MemorySpool:
    """
    A spool in memory. It keeps the very objects given to :meth:`put`, so a
    zmq.Frame received without a copy is sent on without one either.

    """

    def __init__(self) -> None:
        self._files: dict[str, Buffer] = {}
        self._bytes_used = 0

    def put(self, data: Buffer) -> str:
        key = _new_key(self._files)
        self._files[key] = data
        self._bytes_used += _nbytes(data)
        return key

    def get(self, key: str) -> Buffer:
        return self._files[key]

    def delete(self, key: str) -> None:
        data = self._files.pop(key, None)
        if data is not None:
            self._bytes_used -= _nbytes(data)

    def keys(self) -> set[str]:
        return set(self._files)

    @property
    def bytes_used(self) -> int:
        return self._bytes_used

    @property
    def count(self) -> int:
        return len(self._files)

    def close(self) -> None:
        self._files.clear()
        self._bytes_used = 0


class DiskSpool:
    """
    A spool with one file per payload in ``directory``, named by its key.

    A file is written under a temporary name and renamed to its key only when
    complete, so a crash never leaves half a file under a real key; leftover
    temporary files are removed when the spool is opened.

    Args:
        directory: Created if missing.
        fsync: Flush each file, and the directory entry, to the disk before
            :meth:`put` returns. Only needed to survive a power loss: after a
            crash of the process (even ``kill -9``) the page cache still
            reaches the disk.

    """

    def __init__(self, directory: Path, *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.fsync = fsync

        # key -> size in bytes; the only record of what is in the spool.
        self._sizes: dict[str, int] = {}
        self._bytes_used = 0

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise storage_error(
                f"cannot create spool {self.directory}", error
            ) from error

        self._scan()

    def put(self, data: Buffer) -> str:
        view = memoryview(data).cast("B")
        key = _new_key(self._sizes)
        temp = self.directory / f"{_TEMP_PREFIX}{key}"

        try:
            self._write_new_file(temp, view)
            os.rename(temp, self._path(key))
            if self.fsync:
                self._sync_directory()
        except OSError as error:
            temp.unlink(missing_ok=True)
            raise storage_error(
                f"cannot write a {view.nbytes} byte file to spool {self.directory}",
                error,
            ) from error

        self._sizes[key] = view.nbytes
        self._bytes_used += view.nbytes
        return key

    def get(self, key: str) -> bytearray:
        """
        The file under ``key``, read in one go into a bytearray that ZeroMQ
        can send without a copy.

        """
        path = self._path(key)

        try:
            with open(path, "rb", buffering=0) as file:
                data = bytearray(os.fstat(file.fileno()).st_size)
                _read_exactly(file, memoryview(data))
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as error:
            raise storage_error(
                f"cannot read file {key} from spool {self.directory}", error
            ) from error

        return data

    def delete(self, key: str) -> None:
        """
        Remove a file. A file that cannot be removed is an error, but a
        harmless one: it is an orphan, removed at the next start.

        """
        path = self._path(key)

        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise storage_error(
                f"cannot delete file {key} from spool {self.directory}", error
            ) from error

        size = self._sizes.pop(key, None)
        if size is not None:
            self._bytes_used -= size

    def keys(self) -> set[str]:
        return set(self._sizes)

    @property
    def bytes_used(self) -> int:
        return self._bytes_used

    @property
    def count(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        """Nothing to release: every file is closed as soon as it is written."""

    # Helpers.

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a spool key")
        return self.directory / key

    def _scan(self) -> None:
        """Count the files already there and remove half-written ones."""
        removed = 0

        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if entry.name.startswith(_TEMP_PREFIX):
                        os.unlink(entry.path)
                        removed += 1
                    elif _KEY.fullmatch(entry.name) and entry.is_file():
                        self._sizes[entry.name] = entry.stat().st_size
        except OSError as error:
            raise storage_error(f"cannot read spool {self.directory}", error) from error

        self._bytes_used = sum(self._sizes.values())
        if removed:
            logger.info(
                "removed %d half-written files from spool %s", removed, self.directory
            )

    def _write_new_file(self, path: Path, view: memoryview) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            _write_all(fd, view)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_directory(self) -> None:
        """Make the rename itself durable, which fsync of the file is not."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_key(taken: dict[str, Any]) -> str:
    # 64 random bits: a clash is next to impossible, but cheap to rule out.
    while True:
        key = secrets.token_hex(8)
        if key not in taken:
            return key


def _write_all(fd: int, view: memoryview) -> None:
    """
    Write all of ``view``. One write() may take less than asked (Linux stops
    at 2 GiB, and at a file size limit), so loop on slices, which copy nothing.

    """
    written = 0
    while written < view.nbytes:
        written += os.write(fd, view[written:])


def _read_exactly(file: io.FileIO, view: memoryview) -> None:
    """Fill ``view`` from ``file``; a read may return less than asked."""
    done = 0
    while done < view.nbytes:
        count = file.readinto(view[done:])
        if not count:
            raise OSError(errno.EIO, "file shorter than its size")
        done += count
