"""
The spool: where the core keeps submitted files until their tasks end.

A file is the Base64 text a plugin sent, often hundreds of megabytes, so the
core keeps it on disk rather than in memory: :class:`DiskSpool` writes each
large file to its own file under the data directory, under a random key that
the task stores as ``TaskSpec.payload_key``. Small files (under
:data:`INLINE_LIMIT`) go instead into a table of the store's own database (a
:class:`PayloadTable`), many in one transaction: creating, renaming and
deleting a file costs far more than the few bytes it holds. :class:`MemorySpool`
keeps the objects themselves, for tests and for ``--memory`` mode.

The spool is written *before* the store commits the tasks that reference it
(a task must never point at a missing file), and files are deleted only
*after* the store has committed that their tasks are gone. A crash between the
two steps leaves unreferenced files, which :func:`core.store.open_data_dir`
removes at the next start. Never the other way round. A small file kept in the
database follows the same rule: it is committed before its task, and deleted
by a save after the one that deleted its task (:meth:`SqliteStore.save`).

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
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol, TypeAlias

__all__ = [
    "INLINE_LIMIT",
    "Buffer",
    "DiskSpool",
    "MemorySpool",
    "PayloadTable",
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

#: Files smaller than this (in bytes of Base64) go into the store's database
#: rather than into a file of their own, when the spool has a PayloadTable.
INLINE_LIMIT = 64 * 2**10

# Small files are inserted in transactions of at most this many bytes, so that
# one large batch of them does not grow the database's write-ahead log beyond
# what it keeps anyway (core.store's journal size limit).
_INLINE_TRANSACTION_BYTES = 8 * 2**20

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

    def put_many(
        self, files: Sequence[Buffer], between: Callable[[], None] | None = None
    ) -> list[str]:
        """
        Keep every one of ``files`` and return their keys, in order; on
        StorageError none of them is kept. ``between`` is called now and then
        while a long batch is written.

        """
        ...

    def get(self, key: str) -> Buffer:
        """The file under ``key``; KeyError if there is none."""
        ...

    def delete(self, key: str) -> None:
        """Drop the file under ``key``, if there is one."""
        ...

    def delete_many(self, keys: Iterable[str]) -> None:
        """Drop the files under ``keys``, those there are."""
        ...

    def keys(self) -> set[str]: ...

    @property
    def bytes_used(self) -> int: ...

    @property
    def count(self) -> int: ...

    def close(self) -> None: ...


class PayloadTable(Protocol):
    """
    Where a :class:`DiskSpool` keeps small files: a table in the store's
    database (:class:`core.store.SqliteStore`), so that a small file costs a
    row rather than a file of its own.

    Rows are inserted by the spool, before the tasks that need them are
    saved. The store stops counting a row in the save that deletes its task
    (``Changes.freed_payloads``) and deletes it, with others, in a later one;
    the spool deletes at once rows that no task needs (a refused batch,
    orphans). ``payload_sizes`` holds only the rows that count.

    """

    @property
    def payload_sizes(self) -> Mapping[str, int]:
        """Key -> size in bytes of every committed row."""
        ...

    @property
    def payload_bytes(self) -> int:
        """The sum of ``payload_sizes``, kept up to date."""
        ...

    def insert_payloads(self, items: Sequence[tuple[str, Buffer]]) -> None:
        """Insert and commit rows, all or (StorageError) none."""
        ...

    def read_payload(self, key: str) -> bytes:
        """The row's data; KeyError if there is none."""
        ...

    def delete_payloads(self, keys: Collection[str]) -> None:
        """Delete and commit rows; StorageError if that fails."""
        ...


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

    def put_many(
        self, files: Sequence[Buffer], between: Callable[[], None] | None = None
    ) -> list[str]:
        return [self.put(data) for data in files]

    def get(self, key: str) -> Buffer:
        return self._files[key]

    def delete(self, key: str) -> None:
        data = self._files.pop(key, None)
        if data is not None:
            self._bytes_used -= _nbytes(data)

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

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
    A spool with one file per payload in ``directory``, named by its key,
    and, given a ``table``, small payloads as rows of that table instead.

    A file is written under a temporary name and renamed to its key only when
    complete, so a crash never leaves half a file under a real key; leftover
    temporary files are removed when the spool is opened. A row is committed
    whole or not at all.

    Args:
        directory: Created if missing.
        fsync: Flush each file, and the directory entry, to the disk before
            :meth:`put` returns. Only needed to survive a power loss: after a
            crash of the process (even ``kill -9``) the page cache still
            reaches the disk. Rows follow the store's own ``fsync``.
        table: Where payloads smaller than ``inline_limit`` go; None to keep
            every payload in a file.
        inline_limit: In bytes.

    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = False,
        table: PayloadTable | None = None,
        inline_limit: int = INLINE_LIMIT,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.inline_limit = inline_limit if table is not None else 0
        self._table = table
        # Paths are made by string formatting: pathlib costs more than the
        # system call for a small file.
        self._prefix = os.path.join(os.fspath(self.directory), "")

        # key -> size in bytes of each file; the only record of what is in
        # the directory. Rows are in table.payload_sizes.
        self._sizes: dict[str, int] = {}
        self._bytes_used = 0
        self._inline: Mapping[str, int] = table.payload_sizes if table else {}
        # Rows are numbered in order (PayloadTable): the next number to try.
        self._next_row = max((int(key, 16) for key in self._inline), default=0) + 1

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise storage_error(
                f"cannot create spool {self.directory}", error
            ) from error

        self._scan()

    def put(self, data: Buffer) -> str:
        (key,) = self.put_many((data,))
        return key

    def put_many(
        self, files: Sequence[Buffer], between: Callable[[], None] | None = None
    ) -> list[str]:
        keys: list[str] = []
        # Small files waiting to be inserted, and their bytes.
        rows: list[tuple[str, memoryview]] = []
        row_bytes = 0
        try:
            for data in files:
                view = memoryview(data).cast("B")
                if view.nbytes < self.inline_limit:
                    key = self._new_row_key()
                    rows.append((key, view))
                    keys.append(key)
                    row_bytes += view.nbytes
                    if row_bytes >= _INLINE_TRANSACTION_BYTES:
                        self._insert(rows)
                        rows, row_bytes = [], 0
                        if between is not None:
                            between()
                else:
                    keys.append(self._put_file(view))
                    # Writing a large file takes a while.
                    if between is not None:
                        between()
            if rows:
                self._insert(rows)
        except BaseException:
            # All or nothing. Rows not inserted and files not written are
            # not there: deleting their keys does nothing.
            try:
                self.delete_many(keys)
            except StorageError as error:
                logger.warning(
                    "cannot remove part of a batch from the spool: %s", error
                )
            raise
        return keys

    def get(self, key: str) -> Buffer:
        """
        The file under ``key``: a row's bytes, or a file read in one go into a
        bytearray that ZeroMQ can send without a copy.

        """
        if key in self._inline:
            assert self._table is not None
            return self._table.read_payload(key)

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
        self.delete_many((key,))

    def delete_many(self, keys: Iterable[str]) -> None:
        rows = []
        for key in keys:
            if key in self._inline:
                rows.append(key)
            elif key in self._sizes:
                self._delete_file(key)
            else:
                # Not here (any more): a row the store deleted with its task,
                # or a key never written. Still refuse what is not a key.
                self._check_key(key)
        if rows:
            assert self._table is not None
            self._table.delete_payloads(rows)

    def keys(self) -> set[str]:
        return set(self._sizes).union(self._inline)

    @property
    def bytes_used(self) -> int:
        if self._table is None:
            return self._bytes_used
        return self._bytes_used + self._table.payload_bytes

    @property
    def count(self) -> int:
        return len(self._sizes) + len(self._inline)

    @property
    def file_count(self) -> int:
        """Payloads in files of their own, not in the table."""
        return len(self._sizes)

    def close(self) -> None:
        """Nothing to release: every file is closed as soon as it is written."""

    # Helpers.

    def _new_key(self) -> str:
        # 64 random bits: a clash is next to impossible, but cheap to rule out.
        while True:
            key = secrets.token_hex(8)
            if key not in self._sizes and key not in self._inline:
                return key

    def _new_row_key(self) -> str:
        # The next number, in 16 hex digits like any key. A number not used
        # is lost, which is harmless (2**63 of them).
        while True:
            key = f"{self._next_row:016x}"
            self._next_row += 1
            if key not in self._sizes and key not in self._inline:
                return key

    def _insert(self, rows: list[tuple[str, memoryview]]) -> None:
        assert self._table is not None
        try:
            self._table.insert_payloads(rows)
        except StorageError as error:
            raise type(error)(
                f"cannot write {len(rows)} files to spool {self.directory}: {error}"
            ) from error

    def _put_file(self, view: memoryview) -> str:
        key = self._new_key()
        temp = f"{self._prefix}{_TEMP_PREFIX}{key}"

        try:
            self._write_new_file(temp, view)
            os.rename(temp, self._prefix + key)
            if self.fsync:
                self._sync_directory()
        except OSError as error:
            _unlink_quietly(temp)
            raise storage_error(
                f"cannot write a {view.nbytes} byte file to spool {self.directory}",
                error,
            ) from error

        self._sizes[key] = view.nbytes
        self._bytes_used += view.nbytes
        return key

    def _delete_file(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise storage_error(
                f"cannot delete file {key} from spool {self.directory}", error
            ) from error

        size = self._sizes.pop(key, None)
        if size is not None:
            self._bytes_used -= size

    def _check_key(self, key: str) -> None:
        if not _KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a spool key")

    def _path(self, key: str) -> str:
        self._check_key(key)
        return self._prefix + key

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

    def _write_new_file(self, path: str, view: memoryview) -> None:
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


def _unlink_quietly(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)


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
