"""
The store: the core's queue on disk, so that a restart loses nothing it has
acknowledged.

This is the Titanic pattern: a request is stored before it is acknowledged.
After every turn of the scheduler the shell (:mod:`core.server`) does, in
this order:

1. ``changes = scheduler.take_changes()``;
2. ``store.save(changes)``: one SQLite transaction, committed;
3. ``spool.delete(key)`` for each of ``changes.freed_payloads``;
4. send the scheduler's messages.

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
    DIR/queue.sqlite3   the store (plus -wal and -shm files while open)
    DIR/spool/          the files, one per task (core.spool.DiskSpool)
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator, Sequence
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
SCHEMA_VERSION = 1

# The WAL file grows to hold the largest transaction (a big SUBMIT_TASKS) and
# is reused, not shrunk, after each checkpoint; this caps what stays behind.
_JOURNAL_SIZE_LIMIT = 16 * 2**20

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


def _upsert(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    """INSERT that updates the row in place if the key exists, keeping its rowid."""
    names = ", ".join(columns)
    marks = ", ".join("?" for _ in columns)
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    return (
        f"INSERT INTO {table} ({names}) VALUES ({marks}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )


_UPSERT_SESSION = _upsert("sessions", _SESSION_COLUMNS, ["id"])
_UPSERT_TASK = _upsert("tasks", _TASK_COLUMNS, ["id"])
_UPSERT_WORKER = _upsert("workers", _WORKER_COLUMNS, ["bridge", "conn"])
_INSERT_OUTCOME = (
    "INSERT OR REPLACE INTO outcomes (session_id, idx, message) VALUES (?, ?, ?)"
)
_DELETE_TASK = "DELETE FROM tasks WHERE id = ?"
_DELETE_WORKER = "DELETE FROM workers WHERE bridge = ? AND conn = ?"
# A session takes its tasks and outcomes with it.
_DELETE_SESSION = (
    "DELETE FROM outcomes WHERE session_id = ?",
    "DELETE FROM tasks WHERE session_id = ?",
    "DELETE FROM sessions WHERE id = ?",
)

_SELECT_SESSIONS = f"SELECT {', '.join(_SESSION_COLUMNS)} FROM sessions ORDER BY rowid"
_SELECT_OUTCOMES = "SELECT session_id, message FROM outcomes ORDER BY session_id, idx"
_SELECT_TASKS = (
    f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks "
    f"WHERE state IN ({', '.join('?' for _ in _LIVE_TASK_STATES)}) "
    "ORDER BY session_id, seq"
)
_SELECT_WORKERS = f"SELECT {', '.join(_WORKER_COLUMNS)} FROM workers ORDER BY rowid"


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

    Raises:
        StorageError: The database cannot be opened, is not a database, or
            was written by a newer linkup.

    """

    def __init__(self, path: Path | str, *, fsync: bool = False) -> None:
        self.path = path
        self._in_memory = str(path) == ":memory:"
        self._lock: _DirLock | None = None

        # isolation_level=None: the sqlite3 module opens no transactions of
        # its own; every write below is inside an explicit BEGIN ... COMMIT.
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as error:
            raise _sqlite_error(f"cannot open queue database {path}", error) from error

        try:
            self._configure(fsync)
            self._migrate()
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

        Raises:
            StorageError: The write failed (StorageFull if the disk is full)
                and was rolled back: the store is as after the last save that
                returned. The scheduler has moved on regardless, so the shell
                must not send the messages of this turn; stopping is the safe
                course.

        """
        if not changes:
            return

        with self._transaction(f"cannot save the queue to {self.path}"):
            self._write(changes)

    def close(self) -> None:
        """Close the database, then give up the data directory, if held."""
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

    def _configure(self, fsync: bool) -> None:
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

    def _migrate(self) -> None:
        """Create the schema in a new database; refuse one from the future."""
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
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
        self._many(_INSERT_OUTCOME, [_outcome_row(*o) for o in changes.outcomes])
        self._many(_UPSERT_WORKER, [_worker_row(w) for w in workers])

        self._many(_DELETE_TASK, [(key,) for key in gone_tasks])
        self._many(_DELETE_WORKER, gone_workers)
        for statement in _DELETE_SESSION:
            self._many(statement, [(key,) for key in gone_sessions])

    def _many(self, statement: str, rows: list[Any]) -> None:
        if rows:
            self._db.executemany(statement, rows)

    # Reading.

    def _load_sessions(self) -> list[Session]:
        sessions = {
            row[0]: _session_from(row) for row in self._db.execute(_SELECT_SESSIONS)
        }

        for session_id, message in self._db.execute(_SELECT_OUTCOMES):
            session = sessions.get(session_id)
            if session is not None:
                session.results.append(orjson.loads(message))

        return list(sessions.values())

    def _load_tasks(self) -> list[Task]:
        rows = self._db.execute(_SELECT_TASKS, _LIVE_TASK_STATES)
        return [_task_from(row) for row in rows]

    def _load_workers(self) -> list[Worker]:
        return [_worker_from(row) for row in self._db.execute(_SELECT_WORKERS)]


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


def _outcome_row(
    session_id: str, index: int, message: dict[str, Any]
) -> tuple[Any, ...]:
    return (session_id, index, orjson.dumps(message))


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

        store = SqliteStore(path / DB_NAME, fsync=fsync)
        undo.callback(store.close)
        spool = DiskSpool(path / SPOOL_NAME, fsync=fsync)

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

    for key in orphans:
        spool.delete(key)

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
