"""
The store: the core's queue on disk, so that a restart loses nothing it has
acknowledged.

This is the Titanic pattern: a request is stored before it is acknowledged.
After every turn of the scheduler the shell (:mod:`core.server`) does, in
this order:

1. ``changes = scheduler.take_changes()``;
2. ``store.save(changes)``: one SQLite transaction, committed; from then on
   the small files of ended tasks (rows of ``payloads``) no longer count, and
   a later save deletes them, many at a time;
3. ``spool.delete_many(changes.freed_payloads)``: the files of their own;
4. send the scheduler's messages.

A turn may cover many link messages (group commit, :mod:`core.server`).

So a master never hears ``TASKS_SUBMITTED`` for tasks a crash could lose, a
worker never gets a task the store does not know it holds, and a spooled file
is deleted only once no stored task needs it. At start-up the shell calls
:meth:`SqliteStore.load` and hands the records to the scheduler.

Only the lasting part of each record is stored (see :class:`Snapshot`); the
timers and queues the scheduler keeps in memory are rebuilt from it.

Durability. ``synchronous=NORMAL`` with write-ahead logging (the default)
makes each commit a write to the WAL file without fsync: it survives the
core being killed (even ``kill -9``), since the operating system still has
the data, but a power loss may lose the last commits. ``fsync=True`` selects
``synchronous=FULL``, which survives a power loss as well, at the cost of an
fsync per commit.

:func:`open_data_dir` opens a data directory for one core::

    DIR/lock            flock held while the core runs; holds its pid
    DIR/queue.sqlite3   the store (plus a -wal file while open), and the
                        small files (table payloads)
    DIR/spool/          the larger files, one per task (core.spool.DiskSpool)

The lock keeps every other core out, so the database is opened with
``locking_mode=EXCLUSIVE``: no file lock per transaction, no shared memory.

The store is also the spool's :class:`core.spool.PayloadTable`: files under
:data:`core.spool.INLINE_LIMIT` are rows of ``payloads``, inserted (and
committed) by the spool before their tasks are saved, and deleted by
:meth:`SqliteStore.save` after their tasks, in bulk. A row no stored task
needs is an orphan, as a file is, and goes at the next start.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from core.model import (
    Changes,
    Session,
    SessionState,
    Task,
    TaskSpec,
    TaskState,
    Worker,
)
from core.spool import (
    Buffer,
    DiskSpool,
    MemorySpool,
    StorageError,
    StorageFull,
    describe,
    storage_error,
)

__all__ = [
    "DB_NAME",
    "DEFAULT_MIN_FREE_BYTES",
    "LOCK_NAME",
    "SCHEMA_VERSION",
    "SPOOL_NAME",
    "DataDirLocked",
    "Snapshot",
    "SqliteStore",
    "StorageError",
    "StorageFull",
    "Store",
    "check_free_space",
    "open_data_dir",
    "open_memory",
]

logger = logging.getLogger("linkup.core.store")

K = TypeVar("K")
R = TypeVar("R")

DB_NAME = "queue.sqlite3"
SPOOL_NAME = "spool"
LOCK_NAME = "lock"

#: Below this much free space in the data directory the core refuses to start.
DEFAULT_MIN_FREE_BYTES = 64 * 2**20

#: Bumped, with a migration in SqliteStore._migrate, whenever the schema
#: changes. A core refuses a database with a newer version than it knows.
#: 1: sessions, tasks, outcomes, workers. 2: adds payloads (small files);
#: outcomes become a rowid table, in the order they were written.
SCHEMA_VERSION = 2

# The WAL file grows to hold the largest transaction (a big SUBMIT_TASKS) and
# is reused, not shrunk, after each checkpoint; this caps what stays behind.
_JOURNAL_SIZE_LIMIT = 16 * 2**20

# Pages in the WAL before a checkpoint copies them into the database (SQLite's
# default is 1000): a page written by many commits in between is copied once,
# and each checkpoint costs two fsyncs. 4000 pages of 4 KiB stay within
# _JOURNAL_SIZE_LIMIT.
_WAL_AUTOCHECKPOINT = 4000

# Small files come and go through the database, so its file grows to hold the
# largest queue of them; pages they freed are given back to the file system
# (incremental vacuum) once more than this many bytes of them are free. The
# check is made after this many bytes of rows were deleted.
_FREE_PAGES_KEPT = 16 * 2**20
_VACUUM_CHECK_BYTES = 4 * 2**20

# The rows of ended tasks' files are deleted this many at a time, in a later
# save: deleting them one by one rewrites a page or more for each, in bulk
# whole pages go at once. Until then they are orphans, which a restart also
# deletes.
_DELETE_ROWS_AT = 256

# Sessions and workers keep a rowid so that load() returns them in the order
# they were first stored; an upsert (ON CONFLICT DO UPDATE) keeps the rowid.
_SCHEMA = (
    """
    CREATE TABLE sessions (
        id TEXT NOT NULL PRIMARY KEY,
        master_bridge BLOB NOT NULL,
        master_conn INTEGER NOT NULL,
        state TEXT NOT NULL,
        total INTEGER NOT NULL,
        completed INTEGER NOT NULL,
        failed INTEGER NOT NULL,
        cancelled INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE tasks (
        id TEXT NOT NULL PRIMARY KEY,
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        filename TEXT NOT NULL,
        mime_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        payload_key TEXT NOT NULL,
        payload_size INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        worker_id TEXT,
        last_error TEXT
    ) WITHOUT ROWID
    """,
    "CREATE INDEX tasks_by_session ON tasks (session_id, seq)",
    """
    CREATE TABLE outcomes (
        session_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        message BLOB NOT NULL,
        PRIMARY KEY (session_id, idx)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE workers (
        bridge BLOB NOT NULL,
        conn INTEGER NOT NULL,
        id TEXT NOT NULL,
        task_id TEXT,
        released TEXT,
        completed INTEGER NOT NULL,
        failed INTEGER NOT NULL,
        total_bytes INTEGER NOT NULL,
        PRIMARY KEY (bridge, conn)
    )
    """,
)

# Version 2.
#
# Outcomes: one is written for nearly every task, and sessions write theirs
# side by side. Keyed by session, each session appended in a page of its own,
# and the many pages rewritten made up a third of a commit; in the order
# written, they all go to the last page. A session's are deleted by the range
# of ids it wrote (SqliteStore._outcome_spans), so no index is needed.
#
# Payloads: the key of a row is its spool key read as a hexadecimal number.
# The spool numbers rows in order (core.spool.DiskSpool), so a batch fills
# pages at the end of the table and tasks ending in order empty pages at its
# start: few pages written per file. A rowid table: a row of a WITHOUT ROWID
# table spills to an overflow page beyond about 1000 bytes, a rowid table's
# only beyond 4000.
_SCHEMA_2 = (
    """
    CREATE TABLE outcomes_2 (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        message BLOB NOT NULL
    )
    """,
    """
    INSERT INTO outcomes_2 (session_id, idx, message)
        SELECT session_id, idx, message FROM outcomes ORDER BY session_id, idx
    """,
    "DROP TABLE outcomes",
    "ALTER TABLE outcomes_2 RENAME TO outcomes",
    """
    CREATE TABLE payloads (
        id INTEGER PRIMARY KEY,
        data BLOB NOT NULL
    )
    """,
)

#: The statements that bring a database of each version to the next one; a
#: new database (version 0) goes through all of them.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: _SCHEMA,
    1: _SCHEMA_2,
}

_SESSION_COLUMNS = (
    "id",
    "master_bridge",
    "master_conn",
    "state",
    "total",
    "completed",
    "failed",
    "cancelled",
)
_TASK_COLUMNS = (
    "id",
    "session_id",
    "seq",
    "filename",
    "mime_type",
    "size",
    "payload_key",
    "payload_size",
    "state",
    "attempts",
    "worker_id",
    "last_error",
)
_WORKER_COLUMNS = (
    "bridge",
    "conn",
    "id",
    "task_id",
    "released",
    "completed",
    "failed",
    "total_bytes",
)

# Only these states are stored; a task leaves the store when it ends.
_LIVE_TASK_STATES = tuple(state.value for state in TaskState)

# SQLite's primary result code for "database or disk is full".
_SQLITE_FULL = 13


def _upsert(
    table: str,
    columns: Sequence[str],
    key: Sequence[str],
    fixed: Sequence[str] = (),
) -> str:
    """
    INSERT that updates the row in place if the key exists, keeping its rowid.
    Columns in ``fixed`` never change once inserted, and are not updated: an
    index on them then needs no write.

    """
    names = ", ".join(columns)
    marks = ", ".join("?" for _ in columns)
    updates = ", ".join(
        f"{c} = excluded.{c}" for c in columns if c not in key and c not in fixed
    )
    return (
        f"INSERT INTO {table} ({names}) VALUES ({marks}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )


_UPSERT_SESSION = _upsert("sessions", _SESSION_COLUMNS, ["id"])
# A task's session, place and spec (TaskSpec is frozen) never change.
_UPSERT_TASK = _upsert("tasks", _TASK_COLUMNS, ["id"], _TASK_COLUMNS[1:8])
_UPSERT_WORKER = _upsert("workers", _WORKER_COLUMNS, ["bridge", "conn"])
_INSERT_OUTCOME = (
    "INSERT INTO outcomes (id, session_id, idx, message) VALUES (?, ?, ?, ?)"
)
_DELETE_TASK = "DELETE FROM tasks WHERE id = ?"
_DELETE_WORKER = "DELETE FROM workers WHERE bridge = ? AND conn = ?"
# A session takes its tasks and outcomes with it; its outcomes lie between
# the first and the last id it wrote.
_DELETE_SESSION_OUTCOMES = (
    "DELETE FROM outcomes WHERE id BETWEEN ? AND ? AND session_id = ?"
)
_DELETE_SESSION = (
    "DELETE FROM tasks WHERE session_id = ?",
    "DELETE FROM sessions WHERE id = ?",
)

_SELECT_SESSIONS = f"SELECT {', '.join(_SESSION_COLUMNS)} FROM sessions ORDER BY rowid"
# Sorted at load, which happens once: no index to keep up to date meanwhile.
_SELECT_OUTCOMES = (
    "SELECT session_id, idx, message FROM outcomes ORDER BY session_id, idx, id"
)
_SELECT_OUTCOME_SPANS = (
    "SELECT session_id, min(id), max(id) FROM outcomes GROUP BY session_id"
)
_SELECT_LAST_OUTCOME = "SELECT max(id) FROM outcomes"
_SELECT_TASKS = (
    f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks "
    f"WHERE state IN ({', '.join('?' for _ in _LIVE_TASK_STATES)}) "
    "ORDER BY session_id, seq"
)
_SELECT_WORKERS = f"SELECT {', '.join(_WORKER_COLUMNS)} FROM workers ORDER BY rowid"

_INSERT_PAYLOAD = "INSERT INTO payloads (id, data) VALUES (?, ?)"
_SELECT_PAYLOAD = "SELECT data FROM payloads WHERE id = ?"
_SELECT_PAYLOAD_SIZES = "SELECT id, length(data) FROM payloads"
_DELETE_PAYLOAD = "DELETE FROM payloads WHERE id = ?"


class DataDirLocked(StorageError):
    """
    Another core holds the data directory. Two cores on one queue would hand
    out the same tasks twice, so the second one must not start.

    """


@dataclass(slots=True)
class Snapshot:
    """
    What the store holds, for the scheduler to start from.

    Attributes:
        sessions: In the order first stored, each with ``results`` filled in
            order. The fields that are not stored have their defaults:
            ``attached``, ``detached_until``, ``expires_at``,
            ``last_served``, and ``pending`` is empty.
        tasks: The live tasks (pending or assigned), by session and then
            ``seq``, so each session's queue can be rebuilt in order.
            ``deadline`` is None.
        workers: In the order first stored, with ``last_seen`` and
            ``not_before`` 0.0 and ``claimed`` False.

    """

    sessions: list[Session] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)


class Store(Protocol):
    def load(self) -> Snapshot:
        """Everything stored, for the scheduler to start from."""
        ...

    def save(self, changes: Changes) -> None:
        """
        Write ``changes`` atomically: all of it or, on StorageError, none.

        """
        ...

    def close(self) -> None: ...

    @property
    def size_bytes(self) -> int:
        """Bytes on disk, for metrics."""
        ...


class SqliteStore:
    """
    The store in one SQLite database.

    Args:
        path: The database file, or ``":memory:"`` for a store that lives and
            dies with the object (tests, ``--memory`` mode) but runs the same
            SQL.
        fsync: Make each commit survive a power loss, not only a crash of
            the process (``synchronous=FULL`` rather than ``NORMAL``).
        exclusive: Only this connection uses the database while it is open
            (``locking_mode=EXCLUSIVE``), as the data directory's lock
            guarantees: SQLite then takes no file lock per transaction and
            keeps the WAL index in memory. Another process cannot even read
            the database meanwhile.

    Raises:
        StorageError: The database cannot be opened, is not a database, or
            was written by a newer linkup.

    """

    def __init__(
        self, path: Path | str, *, fsync: bool = False, exclusive: bool = False
    ) -> None:
        self.path = path
        self._in_memory = str(path) == ":memory:"
        self._lock: _DirLock | None = None
        # The rows of payloads: key -> size, and their sum. Kept up to date
        # as rows come and go, after each commit.
        self._payload_sizes: dict[str, int] = {}
        self._payload_bytes = 0
        # Bytes of rows deleted since the last look at the free pages.
        self._freed_bytes = 0
        # Rows whose tasks are gone, to delete in bulk (_DELETE_ROWS_AT).
        self._doomed_rows: list[tuple[int]] = []
        # For each session, the first and last id of its outcomes; the id
        # of the next outcome; and the spans a save in progress changes.
        self._outcome_spans: dict[str, tuple[int, int]] = {}
        self._next_outcome = 1
        self._new_spans: dict[str, tuple[int, int]] = {}

        # isolation_level=None: the sqlite3 module opens no transactions of
        # its own; every write below is inside an explicit BEGIN ... COMMIT.
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as error:
            raise _sqlite_error(f"cannot open queue database {path}", error) from error

        try:
            self._configure(fsync, exclusive)
            self._migrate()
            self._load_payload_sizes()
            self._load_outcome_spans()
        except sqlite3.Error as error:
            self._db.close()
            raise _sqlite_error(f"cannot open queue database {path}", error) from error
        except BaseException:
            self._db.close()
            raise

    # The Store protocol.

    def load(self) -> Snapshot:
        """
        Everything stored, for the scheduler to start from.

        Raises:
            StorageError: The database cannot be read or holds a record this
                version of linkup does not understand.

        """
        try:
            sessions = self._load_sessions()
            tasks = self._load_tasks()
            workers = self._load_workers()
        except sqlite3.Error as error:
            raise _sqlite_error(
                f"cannot read the queue from {self.path}", error
            ) from error
        except (ValueError, TypeError) as error:
            raise StorageError(
                f"queue database {self.path} holds a record this linkup-core "
                f"cannot read: {error}"
            ) from error

        return Snapshot(sessions, tasks, workers)

    def save(self, changes: Changes) -> None:
        """
        Write ``changes`` in one transaction and commit it.

        Upserts go first and deletions last, so a session deleted in the same
        turn that last touched one of its tasks still takes that task with it.

        Rows of ``payloads`` named in ``changes.freed_payloads`` stop counting
        (``payload_sizes``) once this commits, and are deleted
        ``_DELETE_ROWS_AT`` at a time, in this save or a later one (or by
        :meth:`close`); a crash meanwhile leaves them as orphans.

        Raises:
            StorageError: The write failed (StorageFull if the disk is full)
                and was rolled back: the store is as after the last save that
                returned. The scheduler has moved on regardless, so the shell
                must not send the messages of this turn; stopping is the safe
                course.

        """
        if not changes:
            return

        payload_sizes = self._payload_sizes
        freed = [key for key in changes.freed_payloads if key in payload_sizes]
        # Only once committed does a row become doomed.
        doomed = self._doomed_rows + [_row_id(key) for key in freed]
        bulk = len(doomed) >= _DELETE_ROWS_AT
        try:
            with self._transaction(f"cannot save the queue to {self.path}"):
                self._write(changes)
                if bulk:
                    self._db.executemany(_DELETE_PAYLOAD, doomed)
        except BaseException:
            self._new_spans.clear()
            raise
        spans = self._outcome_spans
        spans.update(self._new_spans)
        self._new_spans.clear()
        for session_id, session in changes.sessions.items():
            if session is None:
                spans.pop(session_id, None)
        if freed:
            self._forget_payloads(freed)
        if bulk:
            self._doomed_rows = []
            self._rows_deleted()
        else:
            self._doomed_rows = doomed

    def close(self) -> None:
        """Close the database, then give up the data directory, if held."""
        if self._doomed_rows:
            failure = f"cannot delete the files of ended tasks from {self.path}"
            try:
                with self._transaction(failure):
                    self._db.executemany(_DELETE_PAYLOAD, self._doomed_rows)
            except StorageError as error:
                logger.warning("%s; the next start deletes them", error)
            self._doomed_rows = []
        self._db.close()

        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def size_bytes(self) -> int:
        """The database and its write-ahead log, in bytes; 0 in memory."""
        if self._in_memory:
            return 0

        total = 0
        for name in (str(self.path), f"{self.path}-wal"):
            with suppress(OSError):
                total += os.stat(name).st_size
        return total

    # The spool's PayloadTable (core.spool): small files.

    @property
    def payload_sizes(self) -> Mapping[str, int]:
        return self._payload_sizes

    @property
    def payload_bytes(self) -> int:
        return self._payload_bytes

    def insert_payloads(self, items: Sequence[tuple[str, Buffer]]) -> None:
        """
        Insert rows of small files and commit them, all or none.

        Raises:
            StorageError: StorageFull if the disk is full. Nothing was
                inserted; unlike a failed save, the core can carry on.

        """
        with self._transaction(f"cannot save files to {self.path}"):
            self._db.executemany(
                _INSERT_PAYLOAD, [(int(key, 16), data) for key, data in items]
            )
        sizes = self._payload_sizes
        for key, data in items:
            size = memoryview(data).nbytes
            sizes[key] = size
            self._payload_bytes += size

    def read_payload(self, key: str) -> bytes:
        try:
            row = self._db.execute(_SELECT_PAYLOAD, _row_id(key)).fetchone()
        except sqlite3.Error as error:
            raise _sqlite_error(
                f"cannot read file {key} from {self.path}", error
            ) from error
        if row is None:
            raise KeyError(key)
        data: bytes = row[0]
        return data

    def delete_payloads(self, keys: Collection[str]) -> None:
        """Delete rows of small files and commit, for rows no task needs."""
        with self._transaction(f"cannot delete files from {self.path}"):
            self._db.executemany(_DELETE_PAYLOAD, [_row_id(key) for key in keys])
        self._forget_payloads(keys)
        self._rows_deleted()

    # Beyond the protocol.

    def payload_keys(self) -> set[str]:
        """The spool keys that stored tasks need, to find orphaned files."""
        try:
            rows = self._db.execute("SELECT payload_key FROM tasks").fetchall()
        except sqlite3.Error as error:
            raise _sqlite_error(
                f"cannot read the queue from {self.path}", error
            ) from error

        return {key for (key,) in rows}

    # Opening.

    def _configure(self, fsync: bool, exclusive: bool) -> None:
        if exclusive:
            # Before the first access in WAL mode, so that no shared memory
            # (the -shm file) is used at all.
            self._db.execute("PRAGMA locking_mode = EXCLUSIVE")
        # Only takes effect in a new database, before WAL mode writes its
        # first page (or by a VACUUM, _enable_incremental_vacuum): lets
        # _give_back_free_pages shrink the file.
        self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        if not self._in_memory:
            (mode,) = self._db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                logger.warning(
                    "queue database %s cannot use write-ahead logging (journal "
                    "mode %s); saves will be slower",
                    self.path,
                    mode,
                )

        synchronous = "FULL" if fsync else "NORMAL"
        self._db.execute(f"PRAGMA synchronous = {synchronous}")
        self._db.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        self._db.execute(f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT}")

    def _migrate(self) -> None:
        """
        Create the schema in a new database, bring an older one up to date;
        refuse one from the future.

        """
        (version,) = self._db.execute("PRAGMA user_version").fetchone()

        if version > SCHEMA_VERSION:
            raise StorageError(
                f"queue database {self.path} has schema version {version}, but "
                f"this linkup-core knows only versions up to {SCHEMA_VERSION}: "
                "it was written by a newer linkup. Upgrade linkup-core, or "
                "start with another data dir."
            )

        if version == SCHEMA_VERSION:
            return

        with self._transaction(f"cannot create the queue in {self.path}"):
            for from_version in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[from_version]:
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if version > 0:
            logger.info(
                "queue database %s upgraded from schema version %d to %d",
                self.path,
                version,
                SCHEMA_VERSION,
            )
            self._enable_incremental_vacuum()

    def _enable_incremental_vacuum(self) -> None:
        """
        Rewrite a database made before version 2 so that it can give free
        pages back (a VACUUM, once). Not needed to run: if it fails, the file
        only keeps its largest size.

        """
        try:
            self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._db.execute("VACUUM")
        except sqlite3.Error as error:
            logger.warning(
                "cannot compact queue database %s (%s); it will not shrink after "
                "a large queue of small files",
                self.path,
                error,
            )

    def _hold(self, lock: _DirLock) -> None:
        """Release ``lock`` on close: the data directory is ours until then."""
        self._lock = lock

    # Writing.

    @contextmanager
    def _transaction(self, failure: str) -> Iterator[None]:
        """
        BEGIN ... COMMIT around the body; ROLLBACK if anything fails.

        SQLite errors become StorageError with ``failure`` in front of
        SQLite's own reason; others (bugs) pass through unchanged.

        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield
            self._db.execute("COMMIT")
        except BaseException as error:
            self._rollback()
            # ProgrammingError is a misuse of the API, such as a closed store.
            if isinstance(error, sqlite3.Error) and not isinstance(
                error, sqlite3.ProgrammingError
            ):
                raise _sqlite_error(failure, error) from error
            raise

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (it does on a full
        # disk); a failure to roll back leaves nothing more to undo here.
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error as error:
            logger.warning("rollback of %s failed: %s", self.path, error)

    def _write(self, changes: Changes) -> None:
        sessions, gone_sessions = _split(changes.sessions)
        tasks, gone_tasks = _split(changes.tasks)
        workers, gone_workers = _split(changes.workers)

        self._many(_UPSERT_SESSION, [_session_row(s) for s in sessions])
        self._many(_UPSERT_TASK, [_task_row(t) for t in tasks])
        self._many(_INSERT_OUTCOME, self._outcome_rows(changes.outcomes))
        self._many(_UPSERT_WORKER, [_worker_row(w) for w in workers])

        self._many(_DELETE_TASK, [(key,) for key in gone_tasks])
        self._many(_DELETE_WORKER, gone_workers)
        if gone_sessions:
            self._many(
                _DELETE_SESSION_OUTCOMES,
                [
                    (*span, key)
                    for key in gone_sessions
                    if (span := self._span_of(key)) is not None
                ],
            )
        for statement in _DELETE_SESSION:
            self._many(statement, [(key,) for key in gone_sessions])

    def _outcome_rows(
        self, outcomes: list[tuple[str, int, dict[str, Any]]]
    ) -> list[tuple[Any, ...]]:
        """Rows for new outcomes, each with the next id; notes the spans."""
        rows = []
        new_spans = self._new_spans
        for session_id, index, message in outcomes:
            row_id = self._next_outcome
            self._next_outcome += 1
            span = new_spans.get(session_id) or self._outcome_spans.get(session_id)
            new_spans[session_id] = (span[0] if span else row_id, row_id)
            rows.append((row_id, session_id, index, orjson.dumps(message)))
        return rows

    def _span_of(self, session_id: str) -> tuple[int, int] | None:
        return self._new_spans.get(session_id) or self._outcome_spans.get(session_id)

    def _many(self, statement: str, rows: list[Any]) -> None:
        if rows:
            self._db.executemany(statement, rows)

    def _forget_payloads(self, keys: Collection[str]) -> None:
        """After a commit that deleted the rows of ``keys``, or doomed them."""
        sizes = self._payload_sizes
        freed = 0
        for key in keys:
            freed += sizes.pop(key, 0)
        self._payload_bytes -= freed
        self._freed_bytes += freed

    def _rows_deleted(self) -> None:
        if self._freed_bytes >= _VACUUM_CHECK_BYTES:
            self._freed_bytes = 0
            self._give_back_free_pages()

    def _give_back_free_pages(self) -> None:
        """
        Shrink the database file when rows of deleted files left more than
        _FREE_PAGES_KEPT bytes of free pages in it. Keeping some saves
        growing the file again at once.

        """
        try:
            (free_pages,) = self._db.execute("PRAGMA freelist_count").fetchone()
            (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
            excess = free_pages - _FREE_PAGES_KEPT // page_size
            if excess > 0:
                # Each step of the statement frees one page, and execute()
                # takes only the first: run it to the end.
                self._db.executescript(f"PRAGMA incremental_vacuum({excess});")
        except sqlite3.Error as error:
            logger.warning("cannot shrink queue database %s: %s", self.path, error)

    # Reading.

    def _load_sessions(self) -> list[Session]:
        sessions = {
            row[0]: _session_from(row) for row in self._db.execute(_SELECT_SESSIONS)
        }

        for session_id, index, message in self._db.execute(_SELECT_OUTCOMES):
            session = sessions.get(session_id)
            if session is None:
                continue
            results = session.results
            if index < len(results):
                # Written again (never, today): the later one counts.
                results[index] = orjson.loads(message)
            else:
                results.append(orjson.loads(message))

        return list(sessions.values())

    def _load_tasks(self) -> list[Task]:
        rows = self._db.execute(_SELECT_TASKS, _LIVE_TASK_STATES)
        return [_task_from(row) for row in rows]

    def _load_workers(self) -> list[Worker]:
        return [_worker_from(row) for row in self._db.execute(_SELECT_WORKERS)]

    def _load_outcome_spans(self) -> None:
        self._outcome_spans = {
            session_id: (first, last)
            for session_id, first, last in self._db.execute(_SELECT_OUTCOME_SPANS)
        }
        (last,) = self._db.execute(_SELECT_LAST_OUTCOME).fetchone()
        self._next_outcome = (last or 0) + 1

    def _load_payload_sizes(self) -> None:
        self._payload_sizes = {
            f"{row_id:016x}": size
            for row_id, size in self._db.execute(_SELECT_PAYLOAD_SIZES)
        }
        self._payload_bytes = sum(self._payload_sizes.values())


# Records to rows and back. Enums are stored by value; the row layouts follow
# the _*_COLUMNS tuples.


def _session_row(session: Session) -> tuple[Any, ...]:
    bridge, conn = session.master
    return (
        session.id,
        bridge,
        conn,
        session.state.value,
        session.total,
        session.completed,
        session.failed,
        session.cancelled,
    )


def _session_from(row: Any) -> Session:
    return Session(
        id=row[0],
        master=(row[1], row[2]),
        state=SessionState(row[3]),
        total=row[4],
        completed=row[5],
        failed=row[6],
        cancelled=row[7],
    )


def _task_row(task: Task) -> tuple[Any, ...]:
    spec = task.spec
    return (
        task.id,
        task.session_id,
        task.seq,
        spec.filename,
        spec.mime_type,
        spec.size,
        spec.payload_key,
        spec.payload_size,
        task.state.value,
        task.attempts,
        task.worker_id,
        task.last_error,
    )


def _task_from(row: Any) -> Task:
    return Task(
        id=row[0],
        session_id=row[1],
        seq=row[2],
        spec=TaskSpec(
            filename=row[3],
            mime_type=row[4],
            size=row[5],
            payload_key=row[6],
            payload_size=row[7],
        ),
        state=TaskState(row[8]),
        attempts=row[9],
        worker_id=row[10],
        last_error=row[11],
    )


def _worker_row(worker: Worker) -> tuple[Any, ...]:
    bridge, conn = worker.client
    return (
        bridge,
        conn,
        worker.id,
        worker.task_id,
        worker.released,
        worker.completed,
        worker.failed,
        # A sum of declared sizes: bounded so that it always fits SQLite.
        min(worker.total_bytes, 2**63 - 1),
    )


def _worker_from(row: Any) -> Worker:
    return Worker(
        id=row[2],
        client=(row[0], row[1]),
        last_seen=0.0,
        task_id=row[3],
        released=row[4],
        claimed=False,
        completed=row[5],
        failed=row[6],
        total_bytes=row[7],
    )


def _row_id(key: str) -> tuple[int]:
    """The parameters that name the row of a small file."""
    return (int(key, 16),)


def _split(records: dict[K, R | None]) -> tuple[list[R], list[K]]:
    """The records to write, and the keys of those to delete (None)."""
    live = [record for record in records.values() if record is not None]
    gone = [key for key, record in records.items() if record is None]
    return live, gone


def _sqlite_error(message: str, error: sqlite3.Error) -> StorageError:
    """A StorageError, or StorageFull for SQLite's "database or disk is full"."""
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    cls = StorageFull if code == _SQLITE_FULL else StorageError
    return cls(f"{message}: {error}")


# The data directory.


class _DirLock:
    """
    An exclusive flock on the data directory's lock file, for as long as the
    core runs. The kernel drops it when the process dies, however it dies, so
    a stale lock never keeps a restarted core out.

    """

    def __init__(self, path: Path) -> None:
        self.path = path
        directory = path.parent

        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise storage_error(
                f"cannot write to data dir {directory}", error
            ) from error

        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._owner()
            os.close(self._fd)
            raise DataDirLocked(
                f"data dir {directory} is in use by another linkup core (pid {owner})"
            ) from None
        except OSError as error:
            os.close(self._fd)
            raise storage_error(f"cannot lock data dir {directory}", error) from error

        # The pid is for the operator, and for the message above; the lock
        # itself is the flock.
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd < 0:
            return
        with suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = -1

    def _owner(self) -> str:
        try:
            text = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        return text or "unknown"


def open_data_dir(
    path: Path,
    *,
    fsync: bool = False,
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
) -> tuple[SqliteStore, DiskSpool]:
    """
    Open a core's data directory, creating it if need be, and make it ours.

    Checks that the directory is writable and has ``min_free_bytes`` free,
    so that an operator hears about a bad ``--data-dir`` at start-up rather
    than when the first file arrives. Removes spool files that no stored task
    needs: a crash after spooling a file and before committing its task
    leaves one behind.

    Close the spool, then the store: ``store.close()`` releases the lock.

    Raises:
        DataDirLocked: Another core holds the directory.
        StorageFull: Less than ``min_free_bytes`` free.
        StorageError: The directory cannot be created or written, or the
            store cannot be opened.

    """
    path = Path(path)
    _create_dir(path)

    with ExitStack() as undo:
        lock = _DirLock(path / LOCK_NAME)
        undo.callback(lock.release)

        _check_writable(path)
        check_free_space(path, min_free_bytes)

        # The lock makes this core the database's only user.
        store = SqliteStore(path / DB_NAME, fsync=fsync, exclusive=True)
        undo.callback(store.close)
        spool = DiskSpool(path / SPOOL_NAME, fsync=fsync, table=store)

        _remove_orphans(store, spool)

        store._hold(lock)
        undo.pop_all()

    return store, spool


def open_memory() -> tuple[SqliteStore, MemorySpool]:
    """
    A store and spool that vanish with the process, for ``--memory`` mode
    and tests. The store is still SQLite, so the same code runs.

    """
    return SqliteStore(":memory:"), MemorySpool()


def check_free_space(path: Path, min_free_bytes: int) -> None:
    """
    Raise StorageFull if the file system of ``path`` has less than
    ``min_free_bytes`` available to unprivileged users (the conservative
    figure: root may have a little more).

    """
    try:
        stats = os.statvfs(path)
    except OSError as error:
        raise storage_error(f"cannot check free space in {path}", error) from error

    free = stats.f_bavail * stats.f_frsize
    if free < min_free_bytes:
        raise StorageFull(
            f"only {_mib(free)} MiB free in {path}; linkup-core needs at least "
            f"{_mib(min_free_bytes)} MiB (--min-free-space)"
        )


def check_room_for(path: Path, incoming: int, min_free_bytes: int) -> None:
    """
    Raise StorageFull unless ``incoming`` more bytes leave ``min_free_bytes``
    free: the core's own queue must never fill the disk it needs to run.

    """
    try:
        stats = os.statvfs(path)
    except OSError as error:
        raise storage_error(f"cannot check free space in {path}", error) from error

    free = stats.f_bavail * stats.f_frsize
    if free - incoming < min_free_bytes:
        raise StorageFull(
            f"disk nearly full: {_mib(free)} MiB free in {path}, the files need "
            f"{_mib(incoming)} MiB and --min-free-space keeps "
            f"{_mib(min_free_bytes)} MiB free"
        )


def _create_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(f"cannot create data dir {path}", error) from error


def _check_writable(path: Path) -> None:
    """
    Write and remove a small file. Permission bits alone do not tell (root
    ignores them; a read-only mount does not change them).

    """
    probe = path / f".write-test-{os.getpid()}"

    try:
        probe.write_bytes(b"linkup\n")
        probe.unlink()
    except OSError as error:
        _remove_quietly(probe)
        raise storage_error(f"cannot write to data dir {path}", error) from error


def _remove_orphans(store: SqliteStore, spool: DiskSpool) -> None:
    """Delete spool files no stored task needs; warn of tasks whose file is gone."""
    needed = store.payload_keys()
    present = spool.keys()
    orphans = present - needed
    before = spool.bytes_used

    spool.delete_many(orphans)

    logger.info(
        "data dir %s: %d files (%s MiB) in the spool; removed %d orphans (%s MiB)",
        spool.directory.parent,
        spool.count,
        _mib(spool.bytes_used),
        len(orphans),
        _mib(before - spool.bytes_used),
    )

    missing = needed - present
    if missing:
        logger.warning(
            "%d stored tasks have lost their files from %s; they cannot be sent",
            len(missing),
            spool.directory,
        )


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        logger.debug("cannot remove %s: %s", path, describe(error))


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f}" if size >= 2**20 else f"{size / 2**20:.2f}"
