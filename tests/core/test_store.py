"""
Tests of :mod:`core.store`: the queue in SQLite and the data directory.

Every round trip saves through one SqliteStore and loads through a new one on
the same file, so nothing can come from memory.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.model import (
    Changes,
    Session,
    SessionState,
    Task,
    TaskSpec,
    TaskState,
    Worker,
)
from core.store import (
    DB_NAME,
    SCHEMA_VERSION,
    SPOOL_NAME,
    DataDirLocked,
    Snapshot,
    SqliteStore,
    StorageError,
    StorageFull,
    open_data_dir,
    open_memory,
)

REPO = Path(__file__).resolve().parents[2]
BRIDGE = b"\x00k\x8b\x45\x67"
MASTER = (BRIDGE, 1)
OTHER_MASTER = (b"bridge-2", 9)


def make_session(session_id: str = "s-1", **fields: Any) -> Session:
    return Session(session_id, MASTER, **fields)


def make_task(
    task_id: str = "t-1",
    session_id: str = "s-1",
    seq: int = 0,
    payload_key: str | None = None,
    **fields: Any,
) -> Task:
    key = payload_key or f"{seq:016x}"
    spec = TaskSpec(f"{task_id}.png", "image/png", 1000 + seq, key, 1336)
    return Task(task_id, session_id, seq, spec, **fields)


def make_worker(worker_id: str = "w-1", conn: int = 2, **fields: Any) -> Worker:
    """A worker as load() returns it: never seen, not yet claimed."""
    return Worker(worker_id, (BRIDGE, conn), 0.0, claimed=False, **fields)


def outcome(task_id: str) -> dict[str, Any]:
    return {"type": "TASK_COMPLETED", "taskId": task_id, "resultUrl": "https://x/1"}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / DB_NAME


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(db_path)
    yield store
    store.close()


def reload(path: Path) -> Snapshot:
    """Load through a fresh store, as a restarted core would."""
    store = SqliteStore(path)
    try:
        return store.load()
    finally:
        store.close()


# Round trips.


def test_a_new_store_is_empty(store: SqliteStore) -> None:
    assert store.load() == Snapshot([], [], [])


def test_every_stored_field_round_trips(store: SqliteStore, db_path: Path) -> None:
    session = make_session(
        state=SessionState.CANCELLED, total=7, completed=3, failed=2, cancelled=1
    )
    task = make_task(
        state=TaskState.ASSIGNED, attempts=2, worker_id="w-1", last_error="429 busy"
    )
    worker = make_worker(
        task_id="t-1", released="expired", completed=5, failed=4, total_bytes=10**12
    )
    results: list[dict[str, Any]] = [
        outcome("t-0"),
        {"type": "TASK_FAILED", "taskId": "t-9", "n": None},
    ]

    store.save(
        Changes(
            sessions={session.id: session},
            tasks={task.id: task},
            workers={worker.client: worker},
            outcomes=[("s-1", 0, results[0]), ("s-1", 1, results[1])],
        )
    )

    session.results = results
    assert reload(db_path) == Snapshot([session], [task], [worker])


def test_fields_that_are_not_stored_come_back_as_defaults(
    store: SqliteStore, db_path: Path
) -> None:
    """Timers and queues belong to the running scheduler, which rebuilds them."""
    session = make_session(
        attached=False,
        detached_until=5.0,
        expires_at=6.0,
        pending=deque(["t-1"]),
        last_served=12,
    )
    task = make_task(deadline=99.0)
    worker = Worker("w-1", (BRIDGE, 2), last_seen=42.0, not_before=50.0, claimed=True)

    store.save(
        Changes(
            sessions={session.id: session},
            tasks={task.id: task},
            workers={worker.client: worker},
        )
    )

    snapshot = reload(db_path)
    assert snapshot.sessions == [make_session()]
    assert snapshot.tasks[0].deadline is None
    assert snapshot.workers == [make_worker()]


def test_a_changed_record_is_updated_in_place(
    store: SqliteStore, db_path: Path
) -> None:
    session, task, worker = make_session(total=1), make_task(), make_worker()
    store.save(
        Changes(
            sessions={session.id: session},
            tasks={task.id: task},
            workers={worker.client: worker},
        )
    )

    session.master = OTHER_MASTER
    session.completed = 1
    session.state = SessionState.COMPLETED
    task.state, task.attempts, task.worker_id = TaskState.ASSIGNED, 1, "w-1"
    worker.id, worker.task_id, worker.total_bytes = "w-renamed", "t-1", 1336
    store.save(
        Changes(
            sessions={session.id: session},
            tasks={task.id: task},
            workers={worker.client: worker},
        )
    )

    assert reload(db_path) == Snapshot([session], [task], [worker])


def test_records_load_in_the_order_first_stored(
    store: SqliteStore, db_path: Path
) -> None:
    """An update keeps a record's place, so a restart keeps the order."""
    first, second = make_session("s-b"), make_session("s-a")
    old, new = make_worker("w-z", conn=9), make_worker("w-a", conn=1)
    store.save(Changes(sessions={"s-b": first}, workers={old.client: old}))
    store.save(Changes(sessions={"s-a": second}, workers={new.client: new}))

    first.total = 3
    store.save(Changes(sessions={"s-b": first}, workers={old.client: old}))

    snapshot = reload(db_path)
    assert [s.id for s in snapshot.sessions] == ["s-b", "s-a"]
    assert [w.id for w in snapshot.workers] == ["w-z", "w-a"]


def test_tasks_load_by_session_then_seq(store: SqliteStore, db_path: Path) -> None:
    tasks = [make_task(f"t-{seq}", seq=seq) for seq in (3, 0, 2, 1)]
    tasks.append(make_task("t-other", session_id="s-0", seq=5))
    store.save(Changes(tasks={task.id: task for task in tasks}))

    loaded = reload(db_path).tasks
    assert [(t.session_id, t.seq) for t in loaded] == [
        ("s-0", 5),
        ("s-1", 0),
        ("s-1", 1),
        ("s-1", 2),
        ("s-1", 3),
    ]


def test_outcomes_load_in_index_order(store: SqliteStore, db_path: Path) -> None:
    session = make_session()
    store.save(Changes(sessions={"s-1": session}, outcomes=[("s-1", 2, outcome("c"))]))
    store.save(Changes(outcomes=[("s-1", 0, outcome("a")), ("s-1", 1, outcome("b"))]))

    results = reload(db_path).sessions[0].results
    assert [r["taskId"] for r in results] == ["a", "b", "c"]


# Deletes.


def test_deleting_a_session_deletes_its_tasks_and_outcomes(
    store: SqliteStore, db_path: Path
) -> None:
    doomed, kept = make_session("s-1"), make_session("s-2")
    store.save(
        Changes(
            sessions={"s-1": doomed, "s-2": kept},
            tasks={
                "t-1": make_task("t-1", "s-1"),
                "t-2": make_task("t-2", "s-1", seq=1),
                "t-3": make_task("t-3", "s-2"),
            },
            outcomes=[("s-1", 0, outcome("x")), ("s-2", 0, outcome("y"))],
        )
    )

    store.save(Changes(sessions={"s-1": None}))

    snapshot = reload(db_path)
    assert [s.id for s in snapshot.sessions] == ["s-2"]
    assert snapshot.sessions[0].results == [outcome("y")]
    assert [t.id for t in snapshot.tasks] == ["t-3"]


def test_a_session_takes_only_its_own_outcomes_with_it(
    store: SqliteStore, db_path: Path
) -> None:
    """Sessions write their outcomes side by side, and after a restart too."""
    sessions = {sid: make_session(sid) for sid in ("s-1", "s-2", "s-3")}
    store.save(Changes(sessions=dict(sessions)))
    for index in range(3):
        store.save(
            Changes(
                outcomes=[(sid, index, outcome(f"{sid}/{index}")) for sid in sessions]
            )
        )
    store.close()
    store = SqliteStore(db_path)
    store.save(Changes(outcomes=[("s-1", 3, outcome("s-1/3"))]))

    store.save(Changes(sessions={"s-1": None}))
    store.close()
    store = SqliteStore(db_path)
    store.save(Changes(sessions={"s-3": None}))

    snapshot = store.load()
    assert [s.id for s in snapshot.sessions] == ["s-2"]
    assert [r["taskId"] for r in snapshot.sessions[0].results] == [
        "s-2/0",
        "s-2/1",
        "s-2/2",
    ]
    (rows,) = store._db.execute("SELECT count(*) FROM outcomes").fetchone()
    assert rows == 3
    store.close()


def test_a_session_deleted_with_its_last_update_stays_deleted(
    store: SqliteStore, db_path: Path
) -> None:
    """Deletes come after upserts, so one turn's last word wins."""
    store.save(Changes(sessions={"s-1": make_session()}))

    store.save(
        Changes(
            sessions={"s-1": None},
            tasks={"t-1": make_task()},
            outcomes=[("s-1", 0, outcome("t-1"))],
        )
    )

    assert reload(db_path) == Snapshot([], [], [])


def test_deleting_tasks_and_workers(store: SqliteStore, db_path: Path) -> None:
    gone, kept = make_worker("w-1", conn=1), make_worker("w-2", conn=2)
    store.save(
        Changes(
            tasks={"t-1": make_task("t-1"), "t-2": make_task("t-2", seq=1)},
            workers={gone.client: gone, kept.client: kept},
        )
    )

    store.save(Changes(tasks={"t-1": None}, workers={gone.client: None}))

    snapshot = reload(db_path)
    assert [t.id for t in snapshot.tasks] == ["t-2"]
    assert snapshot.workers == [kept]


def test_deleting_what_is_not_there_is_harmless(
    store: SqliteStore, db_path: Path
) -> None:
    store.save(
        Changes(sessions={"s-9": None}, tasks={"t-9": None}, workers={MASTER: None})
    )

    assert reload(db_path) == Snapshot([], [], [])


# Small files (the spool's table).


def payload_rows(store: SqliteStore) -> list[int]:
    return [row for (row,) in store._db.execute("SELECT id FROM payloads ORDER BY id")]


def test_rows_of_ended_tasks_are_deleted_in_bulk(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A freed row stops counting at once; it is deleted with the next ones,
    whole pages at a time.

    """
    monkeypatch.setattr("core.store._DELETE_ROWS_AT", 3)
    keys = [f"{n:016x}" for n in range(1, 6)]
    store.insert_payloads([(key, b"x" * 10) for key in keys])
    assert (len(store.payload_sizes), store.payload_bytes) == (5, 50)

    store.save(Changes(tasks={"t-1": None}, freed_payloads=keys[:2]))

    assert (len(store.payload_sizes), store.payload_bytes) == (3, 30)
    assert payload_rows(store) == [1, 2, 3, 4, 5]

    store.save(Changes(tasks={"t-2": None}, freed_payloads=[keys[2], "f" * 16]))

    assert payload_rows(store) == [4, 5]
    assert set(store.payload_sizes) == set(keys[3:])


def test_rows_freed_but_not_yet_deleted_go_when_the_store_closes(
    store: SqliteStore, db_path: Path
) -> None:
    store.insert_payloads([("0000000000000001", b"x"), ("0000000000000002", b"y")])
    store.save(Changes(tasks={"t-1": None}, freed_payloads=["0000000000000001"]))

    store.close()

    again = SqliteStore(db_path)
    assert dict(again.payload_sizes) == {"0000000000000002": 1}
    again.close()


def test_a_failed_save_frees_no_row(store: SqliteStore) -> None:
    store.insert_payloads([("0000000000000001", b"data")])
    store._db.execute("PRAGMA query_only = ON")

    with pytest.raises(StorageError):
        store.save(Changes(tasks={"t-1": None}, freed_payloads=["0000000000000001"]))

    store._db.execute("PRAGMA query_only = OFF")
    assert store.read_payload("0000000000000001") == b"data"
    assert store.payload_bytes == 4
    assert store._doomed_rows == []


def test_freed_payloads_alone_write_nothing(store: SqliteStore) -> None:
    """The spool, not the store, deals with freed files."""
    store.save(Changes(freed_payloads=["0123456789abcdef"]))

    assert store.load() == Snapshot([], [], [])


# Failures.


def test_a_database_from_a_newer_linkup_is_refused(db_path: Path) -> None:
    SqliteStore(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    with pytest.raises(
        StorageError, match=rf"schema version {SCHEMA_VERSION + 1}.*newer linkup"
    ):
        SqliteStore(db_path)


def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"this is not SQLite, just some text\n" * 100)

    with pytest.raises(
        StorageError, match=f"{re.escape(str(db_path))}.*not a database"
    ):
        SqliteStore(db_path)


def test_a_database_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open queue database"):
        SqliteStore(tmp_path / "missing" / DB_NAME)


def test_a_full_database_rolls_back_the_whole_save(
    store: SqliteStore, db_path: Path
) -> None:
    """SQLite's max_page_count gives "database or disk is full" on demand."""
    store.save(Changes(sessions={"s-1": make_session()}))
    before = reload(db_path)
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")

    big: dict[str, Task | None] = {
        f"t-{i}": make_task(f"t-{i}", seq=i) for i in range(5000)
    }
    failure = f"cannot save the queue to {re.escape(str(db_path))}: .* is full"
    with pytest.raises(StorageFull, match=failure):
        store.save(Changes(sessions={"s-1": make_session(total=5000)}, tasks=big))

    assert not store._db.in_transaction
    assert store.load() == before
    assert reload(db_path) == before


def test_a_read_only_database_raises_storage_error(store: SqliteStore) -> None:
    store._db.execute("PRAGMA query_only = ON")

    with pytest.raises(StorageError, match=r"cannot save the queue.* readonly"):
        store.save(Changes(sessions={"s-1": make_session()}))

    assert not store._db.in_transaction


def test_a_bug_in_a_record_rolls_back_and_passes_through(
    store: SqliteStore,
) -> None:
    """A message orjson cannot encode is a scheduler bug, not a storage error."""
    changes = Changes(
        sessions={"s-1": make_session()}, outcomes=[("s-1", 0, {"bad": object()})]
    )

    with pytest.raises(TypeError):
        store.save(changes)

    assert store.load() == Snapshot([], [], [])


# Size and the memory store.


def test_size_counts_the_database_and_its_log(
    store: SqliteStore, db_path: Path
) -> None:
    empty = store.size_bytes
    store.save(Changes(tasks={f"t-{i}": make_task(f"t-{i}") for i in range(1000)}))

    assert 0 < empty < store.size_bytes
    wal = Path(f"{db_path}-wal")
    assert store.size_bytes == db_path.stat().st_size + wal.stat().st_size


def test_the_memory_store_runs_the_same_code() -> None:
    store, spool = open_memory()
    session = make_session(results=[outcome("t-1")])
    task = make_task(payload_key=spool.put(b"aGVsbG8="))

    store.save(
        Changes(
            sessions={"s-1": session},
            tasks={task.id: task},
            outcomes=[("s-1", 0, outcome("t-1"))],
        )
    )

    assert store.load() == Snapshot([session], [task], [])
    assert store.size_bytes == 0
    store.close()
    spool.close()


# The data directory.


def test_open_data_dir_creates_the_directory_and_its_parts(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"

    store, spool = open_data_dir(data_dir)

    assert (data_dir / DB_NAME).is_file()
    assert (data_dir / SPOOL_NAME).is_dir()
    assert (data_dir / "lock").read_text() == f"{os.getpid()}\n"
    assert [p.name for p in data_dir.iterdir() if p.name.startswith(".")] == []
    spool.close()
    store.close()


def test_a_data_dir_in_use_is_refused_until_closed(tmp_path: Path) -> None:
    store, _ = open_data_dir(tmp_path)

    with pytest.raises(DataDirLocked) as refused:
        open_data_dir(tmp_path)
    assert str(refused.value) == (
        f"data dir {tmp_path} is in use by another linkup core (pid {os.getpid()})"
    )

    store.close()
    store, _ = open_data_dir(tmp_path)
    store.close()


def test_the_lock_of_a_dead_core_is_free(tmp_path: Path) -> None:
    """The kernel drops a flock with its process, so a crash leaves no stale lock."""
    script = """
        import os
        from pathlib import Path
        from core.store import open_data_dir
        open_data_dir(Path(DATA_DIR))
        os._exit(0)
    """
    assert run_child(script, tmp_path).returncode == 0

    store, _ = open_data_dir(tmp_path)
    store.close()


def test_an_unwritable_data_dir_is_refused(tmp_path: Path) -> None:
    """A regular file in the way stops even root, unlike permission bits."""
    blocker = tmp_path / "file"
    blocker.write_text("")

    failure = f"cannot create data dir {re.escape(str(blocker))}/data: .*directory"
    with pytest.raises(StorageError, match=failure):
        open_data_dir(blocker / "data")


def test_a_data_dir_short_of_space_is_refused_and_left_unlocked(
    tmp_path: Path,
) -> None:
    with pytest.raises(StorageFull) as refused:
        open_data_dir(tmp_path, min_free_bytes=2**60)

    assert str(refused.value).startswith("only ")
    assert str(refused.value).endswith(
        f" MiB free in {tmp_path}; linkup-core needs at least 1099511627776 MiB "
        "(--min-free-space)"
    )
    store, _ = open_data_dir(tmp_path)
    store.close()


def test_small_files_are_kept_in_the_database(tmp_path: Path) -> None:
    store, spool = open_data_dir(tmp_path)
    small, large = spool.put_many([b"c21hbGw=", b"L" * (64 * 2**10)])
    tasks = [make_task("t-1", payload_key=small), make_task("t-2", payload_key=large)]
    store.save(Changes(tasks={task.id: task for task in tasks}))
    store.close()

    store, spool = open_data_dir(tmp_path)

    assert sorted(p.name for p in (tmp_path / SPOOL_NAME).iterdir()) == [large]
    assert spool.get(small) == b"c21hbGw="
    assert (spool.count, spool.bytes_used) == (2, 8 + 64 * 2**10)
    store.close()


def test_the_database_is_the_core_s_alone(tmp_path: Path) -> None:
    """
    The lock already keeps other cores out: SQLite's own locking is off
    (no shared-memory file), and nobody else can read the queue meanwhile.

    """
    store, _ = open_data_dir(tmp_path)
    store.save(Changes(sessions={"s-1": make_session()}))

    assert not (tmp_path / f"{DB_NAME}-shm").exists()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite3.connect(tmp_path / DB_NAME, timeout=0).execute("SELECT * FROM sessions")
    store.close()
    assert reload(tmp_path / DB_NAME).sessions == [make_session()]


def test_free_pages_go_back_to_the_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large queue of small files does not leave the database large."""
    monkeypatch.setattr("core.store._FREE_PAGES_KEPT", 64 * 2**10)
    monkeypatch.setattr("core.store._VACUUM_CHECK_BYTES", 2**20)
    monkeypatch.setattr("core.store._DELETE_ROWS_AT", 10)
    store, spool = open_data_dir(tmp_path)
    keys = spool.put_many([os.urandom(30_000) for _ in range(200)])
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    full = (tmp_path / DB_NAME).stat().st_size

    for start in range(0, 200, 50):
        store.save(
            Changes(tasks={"t-1": None}, freed_payloads=keys[start : start + 50])
        )
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    (free_pages,) = store._db.execute("PRAGMA freelist_count").fetchone()
    assert free_pages * 4096 <= 64 * 2**10
    assert (tmp_path / DB_NAME).stat().st_size < full / 4
    assert spool.count == 0
    store.close()


def test_orphan_files_are_removed_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash between spooling a file and committing its task leaves an orphan."""
    store, spool = open_data_dir(tmp_path)
    needed = spool.put(b"bmVlZGVk")
    orphan = spool.put(b"b3JwaGFu")
    task = make_task(payload_key=needed)
    store.save(Changes(tasks={task.id: task}))
    store.close()

    caplog.set_level(logging.INFO, logger="linkup.core.store")
    store, spool = open_data_dir(tmp_path)

    assert spool.keys() == {needed}
    assert not (tmp_path / SPOOL_NAME / orphan).exists()
    assert "1 files (0.00 MiB) in the spool; removed 1 orphans" in caplog.text
    store.close()


def test_orphan_rows_are_removed_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A core killed before it deleted a freed row leaves it behind."""
    script = """
        import os
        from pathlib import Path
        from core.model import Changes, Task, TaskSpec
        from core.store import open_data_dir

        store, spool = open_data_dir(Path(DATA_DIR))
        kept, freed, orphan = spool.put_many([b"a2VwdA==", b"ZnJlZWQ=", b"b3JwaA=="])
        tasks = {
            key: Task(key, "s-1", n, TaskSpec("f", "image/png", 1, key, 8))
            for n, key in enumerate((kept, freed))
        }
        store.save(Changes(tasks=dict(tasks)))
        store.save(Changes(tasks={freed: None}, freed_payloads=[freed]))
        print(kept)
        os._exit(0)
    """
    child = run_child(script, tmp_path)
    assert child.returncode == 0, child.stderr
    kept = child.stdout.strip()

    caplog.set_level(logging.INFO, logger="linkup.core.store")
    store, spool = open_data_dir(tmp_path)

    assert spool.keys() == {kept}
    assert payload_rows(store) == [int(kept, 16)]
    assert "removed 2 orphans" in caplog.text
    store.close()


def test_tasks_whose_files_are_gone_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, _ = open_data_dir(tmp_path)
    store.save(Changes(tasks={"t-1": make_task()}))
    store.close()

    caplog.set_level(logging.WARNING, logger="linkup.core.store")
    store, _ = open_data_dir(tmp_path)

    assert "1 stored tasks have lost their files" in caplog.text
    store.close()


# Crash safety.


def run_child(script: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new interpreter with DATA_DIR set to ``data_dir``."""
    code = f"DATA_DIR = {str(data_dir)!r}\n" + textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_killed_core_keeps_exactly_what_it_committed(tmp_path: Path) -> None:
    """
    The child commits one save, spools a file, then is killed with SIGKILL
    between the statements of a second save and its COMMIT.

    """
    script = """
        import os, signal
        from pathlib import Path
        from core.model import Changes, Session, Task, TaskSpec
        from core.store import SqliteStore, open_data_dir

        store, spool = open_data_dir(Path(DATA_DIR))
        key = spool.put(b"Y29tbWl0dGVk")
        session = Session("s-1", (b"b", 1), total=1)
        task = Task("t-1", "s-1", 0, TaskSpec("a.png", "image/png", 9, key, 12))
        store.save(Changes(sessions={"s-1": session}, tasks={"t-1": task}))

        orphan = spool.put(b"bG9zdA==")
        write = SqliteStore._write
        def write_then_die(self, changes):
            write(self, changes)
            os.kill(os.getpid(), signal.SIGKILL)
        SqliteStore._write = write_then_die
        lost = Task("t-2", "s-1", 1, TaskSpec("b.png", "image/png", 6, orphan, 8))
        session.total = 2
        store.save(Changes(sessions={"s-1": session}, tasks={"t-2": lost}))
        print("not killed")
    """
    child = run_child(script, tmp_path)
    assert child.returncode == -9, child.stderr
    assert "not killed" not in child.stdout

    store, spool = open_data_dir(tmp_path)
    snapshot = store.load()

    assert [(s.id, s.total) for s in snapshot.sessions] == [("s-1", 1)]
    assert [t.id for t in snapshot.tasks] == ["t-1"]
    assert spool.keys() == {snapshot.tasks[0].spec.payload_key}
    assert spool.get(snapshot.tasks[0].spec.payload_key) == b"Y29tbWl0dGVk"
    store.close()


# Upgrades.

# The schema of version 1, as linkup 0.1 made it.
_SCHEMA_1 = (
    """
    CREATE TABLE sessions (
        id TEXT NOT NULL PRIMARY KEY, master_bridge BLOB NOT NULL,
        master_conn INTEGER NOT NULL, state TEXT NOT NULL, total INTEGER NOT NULL,
        completed INTEGER NOT NULL, failed INTEGER NOT NULL,
        cancelled INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE tasks (
        id TEXT NOT NULL PRIMARY KEY, session_id TEXT NOT NULL, seq INTEGER NOT NULL,
        filename TEXT NOT NULL, mime_type TEXT NOT NULL, size INTEGER NOT NULL,
        payload_key TEXT NOT NULL, payload_size INTEGER NOT NULL,
        state TEXT NOT NULL, attempts INTEGER NOT NULL, worker_id TEXT,
        last_error TEXT
    ) WITHOUT ROWID
    """,
    "CREATE INDEX tasks_by_session ON tasks (session_id, seq)",
    """
    CREATE TABLE outcomes (
        session_id TEXT NOT NULL, idx INTEGER NOT NULL, message BLOB NOT NULL,
        PRIMARY KEY (session_id, idx)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE workers (
        bridge BLOB NOT NULL, conn INTEGER NOT NULL, id TEXT NOT NULL,
        task_id TEXT, released TEXT, completed INTEGER NOT NULL,
        failed INTEGER NOT NULL, total_bytes INTEGER NOT NULL,
        PRIMARY KEY (bridge, conn)
    )
    """,
)


def test_a_data_dir_of_version_1_is_upgraded_and_keeps_its_queue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its files stay in the spool's directory; new small ones go to the table."""
    spool_dir = tmp_path / SPOOL_NAME
    spool_dir.mkdir()
    (spool_dir / "00000000deadbeef").write_bytes(b"b2xk")
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("PRAGMA journal_mode = WAL")
    for statement in _SCHEMA_1:
        db.execute(statement)
    db.execute(
        "INSERT INTO sessions VALUES ('s-2', ?, 1, 'open', 2, 1, 0, 0)", (BRIDGE,)
    )
    db.execute(
        "INSERT INTO sessions VALUES ('s-1', ?, 3, 'completed', 1, 1, 0, 0)", (BRIDGE,)
    )
    db.execute(
        "INSERT INTO tasks VALUES ('t-2', 's-2', 1, 'b.png', 'image/png', 3, "
        "'00000000deadbeef', 4, 'assigned', 1, 'w-1', NULL)"
    )
    for session_id, idx, task_id in [("s-2", 1, "b"), ("s-1", 0, "z"), ("s-2", 0, "a")]:
        db.execute(
            "INSERT INTO outcomes VALUES (?, ?, ?)",
            (session_id, idx, f'{{"taskId": "{task_id}"}}'.encode()),
        )
    db.execute(
        "INSERT INTO workers VALUES (?, 2, 'w-1', 't-2', NULL, 4, 1, 99)", (BRIDGE,)
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()

    caplog.set_level(logging.INFO, logger="linkup.core.store")
    store, spool = open_data_dir(tmp_path)
    snapshot = store.load()

    assert "upgraded from schema version 1 to 2" in caplog.text
    assert store._db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert store._db.execute("PRAGMA auto_vacuum").fetchone() == (2,)
    assert [(s.id, s.state, s.total) for s in snapshot.sessions] == [
        ("s-2", SessionState.OPEN, 2),
        ("s-1", SessionState.COMPLETED, 1),
    ]
    assert [[r["taskId"] for r in s.results] for s in snapshot.sessions] == [
        ["a", "b"],
        ["z"],
    ]
    (task,) = snapshot.tasks
    assert (task.id, task.state, task.worker_id) == ("t-2", TaskState.ASSIGNED, "w-1")
    assert spool.get(task.spec.payload_key) == b"b2xk"
    assert [(w.id, w.task_id, w.total_bytes) for w in snapshot.workers] == [
        ("w-1", "t-2", 99)
    ]

    # It carries on as a new one would.
    key = spool.put(b"bmV3")
    assert not (spool_dir / key).exists()
    store.save(Changes(sessions={"s-1": None}, outcomes=[("s-2", 2, outcome("c"))]))
    store.close()
    store, _ = open_data_dir(tmp_path)
    (session,) = store.load().sessions
    assert [r["taskId"] for r in session.results] == ["a", "b", "c"]
    store.close()


def test_an_exit_without_close_keeps_every_commit(tmp_path: Path) -> None:
    """os._exit skips every cleanup: no checkpoint, no close, no atexit."""
    script = """
        import os
        from pathlib import Path
        from core.model import Changes, Worker
        from core.store import open_data_dir

        store, spool = open_data_dir(Path(DATA_DIR))
        for conn in range(100):
            worker = Worker(f"w-{conn}", (b"b", conn), 0.0, completed=conn)
            store.save(Changes(workers={worker.client: worker}))
        os._exit(0)
    """
    child = run_child(script, tmp_path)
    assert child.returncode == 0, child.stderr

    store, _ = open_data_dir(tmp_path)
    workers = store.load().workers

    assert [w.completed for w in workers] == list(range(100))
    store.close()
