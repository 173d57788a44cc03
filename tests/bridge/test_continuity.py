"""
Tests of :mod:`bridge.continuity`: what a bridge remembers per connection.
"""

from __future__ import annotations

from bridge.continuity import Continuity


def assigned(task_id: str) -> dict[str, object]:
    return {"type": "TASK_ASSIGNED", "task": {"id": task_id}}


def test_a_connection_has_a_role_once_the_core_gave_it_one() -> None:
    worker, master, other = Continuity(), Continuity(), Continuity()

    worker.delivered({"type": "WORKER_REGISTERED", "workerId": "w-1"})
    master.delivered({"type": "SESSION_CREATED", "sessionId": "s-1"})
    other.delivered({"type": "STATS_UPDATE", "stats": {}})

    assert (worker.has_role, master.has_role, other.has_role) == (True, True, False)
    assert master.claim(2)["sessions"] == ["s-1"]


def test_a_worker_holds_its_task_until_it_reports_it() -> None:
    continuity = Continuity()
    continuity.delivered(assigned("t-1"))
    assert continuity.claim(1)["holds"] == "t-1"

    report = {"type": "TASK_COMPLETED", "taskId": "t-1", "resultUrl": "u"}
    continuity.forwarded("TASK_COMPLETED", report)

    assert continuity.claim(1) == {
        "client": 1,
        "holds": None,
        "report": report,
        "results": {},
        "sessions": [],
    }


def test_the_next_assignment_forgets_the_last_report() -> None:
    continuity = Continuity()
    continuity.delivered(assigned("t-1"))
    continuity.forwarded("TASK_FAILED", {"type": "TASK_FAILED", "taskId": "t-1"})

    continuity.delivered(assigned("t-1"))

    claim = continuity.claim(1)
    assert (claim["holds"], claim["report"]) == ("t-1", None)


def test_a_report_on_another_task_does_not_release_the_held_one() -> None:
    continuity = Continuity()
    continuity.delivered(assigned("t-2"))

    continuity.forwarded("TASK_COMPLETED", {"type": "TASK_COMPLETED", "taskId": "t-1"})

    assert continuity.claim(1)["holds"] == "t-2"


def test_outcomes_are_counted_per_session_from_the_link_result() -> None:
    continuity = Continuity()

    continuity.delivered({"type": "TASK_COMPLETED"}, ["s-1", 0])
    continuity.delivered({"type": "TASK_COMPLETED"}, ["s-1", 1])
    continuity.delivered({"type": "TASK_FAILED"}, ["s-2", 0])
    continuity.delivered({"type": "STATS_UPDATE"})

    assert continuity.claim(1)["results"] == {"s-1": 2, "s-2": 1}


def test_a_resume_counts_the_outcomes_the_client_already_has() -> None:
    continuity = Continuity()

    continuity.forwarded(
        "RESUME_SESSION", {"type": "RESUME_SESSION", "sessionId": "s-1", "after": 5}
    )
    continuity.delivered({"type": "TASK_COMPLETED"}, ["s-1", 5])

    assert continuity.claim(1)["results"] == {"s-1": 6}


def test_a_request_waits_until_its_answer_or_an_error() -> None:
    answered, refused = Continuity(), Continuity()
    for continuity in (answered, refused):
        continuity.forwarded("SUBMIT_TASKS", {"type": "SUBMIT_TASKS"})
        assert continuity.awaiting == "SUBMIT_TASKS"

    answered.delivered({"type": "TASKS_SUBMITTED"})
    refused.delivered({"type": "ERROR", "code": "unknown_session"})

    assert (answered.awaiting, refused.awaiting) == (None, None)


def test_an_unrelated_message_does_not_end_the_wait() -> None:
    continuity = Continuity()
    continuity.forwarded("CREATE_SESSION", {"type": "CREATE_SESSION"})

    continuity.delivered({"type": "STATS_UPDATE", "stats": {}})

    assert continuity.awaiting == "CREATE_SESSION"
