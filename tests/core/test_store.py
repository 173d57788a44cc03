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


def test_freed_payloads_alone_write_nothing(store: SqliteStore) -> None:
    """The spool, not the store, deals with freed files."""
    store.save(Changes(freed_payloads=["0123456789abcdef"]))

    assert store.load() == Snapshot([], [], [])


# Failures.


def test_a_database_from_a_newer_linkup_is_refused(db_path: Path) -> None:
    SqliteStore(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    with pytest.raises(StorageError, match=r"schema version 2.*newer linkup"):
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
