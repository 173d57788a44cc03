"""
The plugin protocol when all goes well: files out to workers, results back.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections import Counter

import pytest

from tests.e2e.harness import UNIT
from tests.e2e.protocol_helpers import (
    collect_results,
    expect_silence,
    in_background,
    make_task,
    result_url_for,
    sha256_hex,
    submit,
    upload_forever,
    watching,
)


def fifty_files(rng: random.Random) -> dict[str, bytes]:
    files = {}
    for index in range(50):
        size = (
            rng.randint(190_000, 210_000) if index % 10 == 7 else rng.randint(1, 8000)
        )
        files[f"photo-{index:02d}.jpg"] = rng.randbytes(size)
    return files


async def test_fifty_files_reach_three_workers_and_every_result_reaches_the_master(
    start,
):
    """50 files go out to 3 workers one at a time and each result comes back right."""
    clients = await start()
    rng = random.Random(20240611)
    files = fifty_files(rng)
    workers = [(await clients.worker())[0] for _ in range(3)]
    master, session_id, _ = await clients.master()
    uploads: list[list] = [[] for _ in workers]

    async with in_background(
        *(
            upload_forever(worker, log, random.Random(i), upload_time=0.02 * UNIT)
            for i, (worker, log) in enumerate(zip(workers, uploads, strict=True))
        )
    ) as background:
        tasks = [make_task(name, data, "image/jpeg") for name, data in files.items()]
        submitted = await submit(master, session_id, tasks)
        assert submitted["taskCount"] == 50
        results, finished = await watching(background, collect_results(master))
        await expect_silence(
            master,
            "TASK_COMPLETED",
            "TASK_FAILED",
            "SESSION_COMPLETED",
            within=0.5 * UNIT,
        )

    # Every file was uploaded exactly once, with its own bytes.
    every_upload = [upload for log in uploads for upload in log]
    assert sorted(u.filename for u in every_upload) == sorted(files)
    assert len({u.task_id for u in every_upload}) == 50
    for upload in every_upload:
        assert upload.digest == sha256_hex(files[upload.filename]), upload.filename
        assert upload.mime_type == "image/jpeg"
    assert all(log for log in uploads), [len(log) for log in uploads]

    # Every result names the right file and carries the URL of its bytes.
    assert [r["type"] for r in results] == ["TASK_COMPLETED"] * 50
    task_of = {u.task_id: u.filename for u in every_upload}
    assert sorted(r["filename"] for r in results) == sorted(files)
    for result in results:
        assert task_of[result["taskId"]] == result["filename"]
        assert result["resultUrl"] == result_url_for(files[result["filename"]])

    # Progress rises one by one to the total, never past it.
    progress = [r["progress"] for r in results]
    assert progress == [
        {"completed": n, "failed": 0, "total": 50} for n in range(1, 51)
    ]
    assert finished["sessionId"] == session_id
    assert finished["stats"] == {"completed": 50, "failed": 0, "total": 50}


async def test_task_assigned_carries_the_file_exactly_as_submitted(start):
    """TASK_ASSIGNED holds the id, filename, mimeType, size and Base64 text as sent."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    data = bytes(range(256)) * 3
    task = make_task("raw.webp", data, "image/webp")
    await submit(master, session_id, [task])

    assigned = await worker.expect("TASK_ASSIGNED")
    sent = assigned["task"]
    assert isinstance(sent["id"], str)
    assert sent["id"]
    assert {k: sent[k] for k in task} == task
    assert base64.b64decode(sent["dataBase64"]) == data


async def test_task_waiting_is_forwarded_to_the_master(start):
    """TASK_WAITING from the holder reaches the master, with the workerId added."""
    clients = await start()
    worker, worker_id = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task("slow.png", b"rate limited")])
    task = (await worker.expect("TASK_ASSIGNED"))["task"]

    wait_start = int(time.time() * 1000)
    await worker.send(
        "TASK_WAITING",
        taskId=task["id"],
        filename="slow.png",
        waitTime=30,
        waitStart=wait_start,
    )
    waiting = await master.expect("TASK_WAITING")
    assert waiting["taskId"] == task["id"]
    assert waiting["filename"] == "slow.png"
    assert waiting["waitTime"] == 30
    assert waiting["waitStart"] == wait_start
    assert waiting["workerId"] == worker_id

    # Waiting is not a result: the task still completes normally afterwards.
    await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/slow")
    completed = await master.expect("TASK_COMPLETED")
    assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}
    await master.expect("SESSION_COMPLETED")


UNICODE_NAMES = [
    "测试图片 🐱.png",
    "報告—最終版.jpg",
    "👨‍👩‍👧 家族写真.gif",
    "Ünïcödé café ☕ 𝄞.webp",
    'quote " and back\\slash.png',
]


@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["escaped", "utf8"])
async def test_unicode_filenames_round_trip_exactly(start, ensure_ascii):
    """Chinese and emoji filenames round-trip in TASK_ASSIGNED and TASK_COMPLETED."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    tasks = [make_task(name, name.encode()) for name in UNICODE_NAMES]
    # The plugin's JSON.stringify sends raw UTF-8; Python escapes by default.
    await master.send_raw(
        json.dumps(
            {"type": "SUBMIT_TASKS", "sessionId": session_id, "tasks": tasks},
            ensure_ascii=ensure_ascii,
        )
    )
    await master.expect("TASKS_SUBMITTED")

    for name in UNICODE_NAMES:
        task = (await worker.expect("TASK_ASSIGNED"))["task"]
        assert task["filename"] == name
        assert base64.b64decode(task["dataBase64"]) == name.encode()
        await worker.send(
            "TASK_COMPLETED", taskId=task["id"], resultUrl=f"https://x/{name}"
        )
        completed = await master.expect("TASK_COMPLETED")
        assert completed["taskId"] == task["id"]
        assert completed["filename"] == name
        assert completed["resultUrl"] == f"https://x/{name}"
    await master.expect("SESSION_COMPLETED")


async def test_a_url_with_a_path_and_query_is_served(start):
    """The plugin connects to the URL as typed, path and ?token included."""
    clients = await start()
    worker = await clients.connect(clients.url + "/linkup/ws?token=s3cret")
    await worker.send("WORKER_REGISTER")
    await worker.expect("WORKER_REGISTERED")
    master = await clients.connect(clients.url + "/?room=1")
    await master.send("CREATE_SESSION")
    session_id = (await master.expect("SESSION_CREATED"))["sessionId"]
    await submit(master, session_id, [make_task("p.png", b"path")])
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/p")
    assert (await master.expect("TASK_COMPLETED"))["filename"] == "p.png"


async def test_each_worker_holds_at_most_one_task(start):
    """With more files than workers, each worker gets one task and the rest wait."""
    clients = await start()
    workers = [(await clients.worker())[0] for _ in range(2)]
    master, session_id, _ = await clients.master()
    await submit(
        master, session_id, [make_task(f"f{i}.png", bytes([i])) for i in range(5)]
    )
    held = [(await worker.expect("TASK_ASSIGNED"))["task"] for worker in workers]
    assert held[0]["id"] != held[1]["id"]
    for worker in workers:
        await expect_silence(worker, "TASK_ASSIGNED", within=0.3 * UNIT)

    # Reporting frees the worker, which gets the next file at once.
    await workers[0].send("TASK_COMPLETED", taskId=held[0]["id"], resultUrl="u0")
    following = (await workers[0].expect("TASK_ASSIGNED"))["task"]
    assert following["id"] not in {t["id"] for t in held}
    counts = Counter(t["filename"] for t in [*held, following])
    assert all(n == 1 for n in counts.values()), counts


async def test_an_empty_file_round_trips(start):
    """A 0-byte file is handed out with empty Base64 and completes like any other."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task("empty.txt", b"", "text/plain")])
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert task["dataBase64"] == ""
    assert task["size"] == 0
    await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/e")
    completed = await master.expect("TASK_COMPLETED")
    assert completed["filename"] == "empty.txt"
    await master.expect("SESSION_COMPLETED")


async def test_a_one_file_master_is_not_starved_by_a_big_batch(start):
    """
    Sessions take turns: a master with one file waits for at most one other
    file, even behind a 500-file batch sharing the only worker.
    """
    clients = await start()
    worker, _ = await clients.worker()
    big, big_session, _ = await clients.master()
    small, small_session, _ = await clients.master()
    await submit(big, big_session, [make_task(f"b{i}.png", b"b") for i in range(500)])
    first = (await worker.expect("TASK_ASSIGNED"))["task"]
    await submit(small, small_session, [make_task("only.png", b"s")])

    # The worker finishes its current file; the next one is the small master's.
    await worker.send("TASK_COMPLETED", taskId=first["id"], resultUrl="https://x/b")
    second = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert second["filename"] == "only.png"
    await worker.send("TASK_COMPLETED", taskId=second["id"], resultUrl="https://x/s")
    assert (await small.expect("SESSION_COMPLETED"))["stats"]["completed"] == 1
