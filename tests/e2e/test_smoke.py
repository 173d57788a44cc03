"""
The shortest path through a real linkup: one master, one worker, one file.
"""

from __future__ import annotations

import base64

from tests.e2e.harness import create_session, register_worker


async def test_one_file_goes_from_master_to_worker_and_back(linkup_url):
    url = linkup_url()
    worker, _ = await register_worker(url)
    master, session_id, stats = await create_session(url)
    assert stats["workerCount"] == 1

    data = base64.b64encode(b"hello \x00\xff").decode()
    await master.send(
        "SUBMIT_TASKS",
        sessionId=session_id,
        tasks=[
            {
                "filename": "a.png",
                "mimeType": "image/png",
                "dataBase64": data,
                "size": 8,
            }
        ],
    )
    submitted = await master.expect("TASKS_SUBMITTED")
    assert submitted["taskCount"] == 1

    assigned = await worker.expect("TASK_ASSIGNED")
    assert assigned["task"]["dataBase64"] == data
    await worker.send(
        "TASK_COMPLETED", taskId=assigned["task"]["id"], resultUrl="https://x/a.png"
    )

    completed = await master.expect("TASK_COMPLETED")
    assert completed["resultUrl"] == "https://x/a.png"
    assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}
    finished = await master.expect("SESSION_COMPLETED")
    assert finished["stats"] == {"completed": 1, "failed": 0, "total": 1}
    await worker.close()
    await master.close()
