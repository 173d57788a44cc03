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

from core.spool import DiskSpool, MemorySpool, Spool, StorageError, StorageFull

REPO = Path(__file__).resolve().parents[2]
DATA = b"aGVsbG8gd29ybGQ="


@pytest.fixture(params=["disk", "memory"])
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Spool]:
    spool: Spool = (
        DiskSpool(tmp_path / "spool") if request.param == "disk" else MemorySpool()
    )
    yield spool
    spool.close()


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


@pytest.mark.parametrize("key", ["../lock", ".tmp-0123456789abcdef", "", "ABC"])
def test_a_key_that_is_not_a_spool_key_is_refused(tmp_path: Path, key: str) -> None:
    """A damaged store must not name a file outside the spool."""
    spool = DiskSpool(tmp_path)

    with pytest.raises(ValueError, match=re.escape(repr(key))):
        spool.get(key)
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        spool.delete(key)
