"""
Tests of :mod:`core.spool`: the files of queued tasks, on disk or in memory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from core.spool import (
    INLINE_LIMIT,
    DiskSpool,
    MemorySpool,
    Spool,
    StorageError,
    StorageFull,
)
from core.store import SqliteStore

REPO = Path(__file__).resolve().parents[2]
DATA = b"aGVsbG8gd29ybGQ="


@pytest.fixture(params=["disk", "disk+table", "memory"])
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Spool]:
    store = SqliteStore(tmp_path / "queue.sqlite3")
    spool: Spool
    if request.param == "disk":
        spool = DiskSpool(tmp_path / "spool")
    elif request.param == "disk+table":
        spool = DiskSpool(tmp_path / "spool", table=store)
    else:
        spool = MemorySpool()
    yield spool
    spool.close()
    store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "queue.sqlite3")
    yield store
    store.close()


def rows_in(store: SqliteStore) -> list[int]:
    return [row for (row,) in store._db.execute("SELECT id FROM payloads")]


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# Both spools.


def test_put_then_get_returns_the_bytes(spool: Spool) -> None:
    key = spool.put(DATA)

    assert bytes(spool.get(key)) == DATA
    assert spool.keys() == {key}


def test_each_put_gets_a_new_key(spool: Spool) -> None:
    keys = {spool.put(DATA) for _ in range(100)}

    assert len(keys) == 100
    assert spool.keys() == keys


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(zmq.Frame(DATA), id="zmq.Frame"),
        pytest.param(memoryview(b"xx" + DATA)[2:], id="memoryview"),
        pytest.param(bytearray(DATA), id="bytearray"),
        pytest.param(b"", id="empty"),
    ],
)
def test_any_buffer_can_be_put(spool: Spool, data: object) -> None:
    key = spool.put(data)

    assert bytes(spool.get(key)) == bytes(memoryview(data))  # type: ignore[arg-type]


def test_count_and_bytes_used_follow_puts_and_deletes(spool: Spool) -> None:
    first = spool.put(b"a" * 10)
    spool.put(zmq.Frame(b"b" * 32))
    assert (spool.count, spool.bytes_used) == (2, 42)

    spool.delete(first)
    assert (spool.count, spool.bytes_used) == (1, 32)


def test_deleting_a_missing_key_is_harmless(spool: Spool) -> None:
    key = spool.put(DATA)
    spool.delete(key)

    spool.delete(key)

    assert (spool.count, spool.bytes_used, spool.keys()) == (0, 0, set())


def test_getting_a_missing_key_raises_key_error(spool: Spool) -> None:
    key = spool.put(DATA)
    spool.delete(key)

    with pytest.raises(KeyError):
        spool.get(key)


def test_put_many_returns_a_key_per_file_in_order(spool: Spool) -> None:
    files = [b"a" * 5, zmq.Frame(b"b" * 70_000), bytearray(b"c"), b""]

    keys = spool.put_many(files)

    assert len(set(keys)) == 4
    assert [bytes(spool.get(key)) for key in keys] == [
        bytes(memoryview(f)) for f in files
    ]
    assert (spool.count, spool.bytes_used) == (4, 70_006)

    spool.delete_many([keys[0], keys[1], "0123456789abcdef"])
    assert spool.keys() == {keys[2], keys[3]}
    assert (spool.count, spool.bytes_used) == (2, 1)


# MemorySpool.


def test_the_memory_spool_keeps_the_very_object() -> None:
    """No copy: the frame that came in is the frame that goes out."""
    spool = MemorySpool()
    frame = zmq.Frame(DATA)

    assert spool.get(spool.put(frame)) is frame


# DiskSpool.


def test_one_file_per_payload_named_by_its_key(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path)

    key = spool.put(DATA)

    assert files_in(tmp_path) == [key]
    assert (tmp_path / key).read_bytes() == DATA


def test_get_reads_into_a_bytearray(tmp_path: Path) -> None:
    """A mutable buffer ZeroMQ can send with copy=False."""
    spool = DiskSpool(tmp_path)

    data = spool.get(spool.put(DATA))

    assert type(data) is bytearray
    assert data == DATA


def test_a_large_file_round_trips(tmp_path: Path) -> None:
    payload = os.urandom(3 * 2**20 + 7)
    spool = DiskSpool(tmp_path, fsync=True)

    key = spool.put(zmq.Frame(payload))

    assert spool.get(key) == payload
    assert spool.bytes_used == len(payload)


def test_delete_removes_the_file(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path)
    key = spool.put(DATA)

    spool.delete(key)

    assert files_in(tmp_path) == []


def test_opening_counts_what_is_there(tmp_path: Path) -> None:
    first = DiskSpool(tmp_path)
    keys = {first.put(b"x" * size) for size in (1, 20, 300)}

    again = DiskSpool(tmp_path)

    assert again.keys() == keys
    assert (again.count, again.bytes_used) == (3, 321)


def test_opening_removes_half_written_files(tmp_path: Path) -> None:
    """A crash during put() leaves its temporary file, never a real key."""
    kept = DiskSpool(tmp_path).put(DATA)
    (tmp_path / ".tmp-0123456789abcdef").write_bytes(b"half")

    spool = DiskSpool(tmp_path)

    assert files_in(tmp_path) == [kept]
    assert spool.keys() == {kept}


def test_opening_creates_the_directory(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path / "a" / "spool")

    assert spool.get(spool.put(DATA)) == DATA


def test_a_directory_that_cannot_be_created_raises_storage_error(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    with pytest.raises(StorageError, match="cannot create spool"):
        DiskSpool(blocker / "spool")


def test_a_failed_write_raises_storage_error_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    spool = DiskSpool(tmp_path / "spool")
    (tmp_path / "spool").rmdir()

    with pytest.raises(StorageError) as failed:
        spool.put(DATA)

    assert str(failed.value) == (
        f"cannot write a 16 byte file to spool {tmp_path / 'spool'}: "
        "[Errno 2] No such file or directory"
    )
    assert (spool.count, spool.bytes_used) == (0, 0)


def test_a_file_over_the_size_limit_raises_storage_full_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """
    RLIMIT_FSIZE stands in for a full disk: the write stops part-way with
    EFBIG (Python ignores SIGXFSZ). Done in a child so the limit cannot leak.

    """
    script = f"""
        import os, resource
        from pathlib import Path
        from core.spool import DiskSpool, StorageFull

        spool = DiskSpool(Path({str(tmp_path)!r}))
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        try:
            spool.put(bytes(2 * 2**20))
        except StorageFull as error:
            print(error)
        print(spool.count, spool.bytes_used, sorted(os.listdir({str(tmp_path)!r})))
    """
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines() == [
        f"cannot write a 2097152 byte file to spool {tmp_path}: "
        "[Errno 27] File too large",
        "0 0 []",
    ]


def test_storage_full_is_a_storage_error() -> None:
    assert issubclass(StorageFull, StorageError)


# DiskSpool with a table: small files as rows of the store's database.


def test_small_files_become_rows_and_large_ones_files(
    tmp_path: Path, store: SqliteStore
) -> None:
    spool = DiskSpool(tmp_path / "spool", table=store)
    small = b"s" * (INLINE_LIMIT - 1)
    large = b"L" * INLINE_LIMIT

    small_key, large_key = spool.put_many([small, large])

    assert files_in(tmp_path / "spool") == [large_key]
    assert rows_in(store) == [int(small_key, 16)]
    assert spool.get(small_key) == small
    assert spool.get(large_key) == large
    assert type(spool.get(large_key)) is bytearray
    assert (spool.count, spool.file_count) == (2, 1)
    assert spool.bytes_used == len(small) + len(large)


def test_rows_are_numbered_in_order_across_restarts(
    tmp_path: Path, store: SqliteStore
) -> None:
    """In order, rows of a batch fill pages at the end of the table."""
    spool = DiskSpool(tmp_path / "spool", table=store)
    first = spool.put_many([DATA] * 3)
    assert first == [f"{n:016x}" for n in (1, 2, 3)]

    store.close()
    store = SqliteStore(tmp_path / "queue.sqlite3")
    spool = DiskSpool(tmp_path / "spool", table=store)

    assert spool.keys() == set(first)
    assert spool.put(DATA) == f"{4:016x}"
    store.close()


def test_a_batch_that_cannot_be_kept_leaves_nothing(
    tmp_path: Path, store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows and files written before the failure are removed again."""
    spool = DiskSpool(tmp_path / "spool", table=store)
    write = DiskSpool._write_new_file
    written: list[str] = []

    def write_twice(self: DiskSpool, path: str, view: memoryview) -> None:
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        write(self, path, view)

    monkeypatch.setattr(DiskSpool, "_write_new_file", write_twice)
    monkeypatch.setattr("core.spool._INLINE_TRANSACTION_BYTES", 10)
    batch = [DATA * 2, b"L" * INLINE_LIMIT, DATA, b"L" * INLINE_LIMIT]

    with pytest.raises(StorageFull, match="No space left"):
        spool.put_many(batch)

    assert written
    assert files_in(tmp_path / "spool") == []
    assert rows_in(store) == []
    assert (spool.count, spool.bytes_used, spool.keys()) == (0, 0, set())


def test_a_full_database_refuses_rows_and_keeps_none(
    tmp_path: Path, store: SqliteStore
) -> None:
    spool = DiskSpool(tmp_path / "spool", table=store)
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")

    with pytest.raises(StorageFull, match=r"cannot write 40 files to spool .* full"):
        spool.put_many([os.urandom(2000) for _ in range(40)])

    assert rows_in(store) == []
    assert (spool.count, spool.bytes_used) == (0, 0)


def test_put_many_lets_the_caller_speak_while_it_writes(
    tmp_path: Path, store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once after each file and each transaction of rows."""
    spool = DiskSpool(tmp_path / "spool", table=store)
    monkeypatch.setattr("core.spool._INLINE_TRANSACTION_BYTES", 2 * len(DATA))
    calls: list[int] = []

    spool.put_many(
        [DATA, DATA, DATA, b"L" * INLINE_LIMIT, DATA],
        between=lambda: calls.append(spool.count),
    )

    assert calls == [2, 3, 5]
    assert spool.count == 5


def test_a_row_no_task_needs_is_deleted_at_once(
    tmp_path: Path, store: SqliteStore
) -> None:
    spool = DiskSpool(tmp_path / "spool", table=store)
    kept, dropped = spool.put_many([DATA, DATA])

    spool.delete(dropped)

    assert rows_in(store) == [int(kept, 16)]
    assert spool.keys() == {kept}


@pytest.mark.parametrize("key", ["../lock", ".tmp-0123456789abcdef", "", "ABC"])
def test_a_key_that_is_not_a_spool_key_is_refused(tmp_path: Path, key: str) -> None:
    """A damaged store must not name a file outside the spool."""
    spool = DiskSpool(tmp_path)

    with pytest.raises(ValueError, match=re.escape(repr(key))):
        spool.get(key)
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        spool.delete(key)
