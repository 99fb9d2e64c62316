"""``jobledger recover`` and ``jobledger restart`` with ``--broker``: no task code needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import REDIS, Harness, redis_harness_fixture, wait_for  # noqa: F401

from jobledger.model import JobRecord, JobState
from jobledger.query import JobQuery


def jobledger(h: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, in a directory without the test app (no task code)."""
    script = Path(sys.executable).with_name("jobledger")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBLEDGER_", "E2E_"))}
    env["JOBLEDGER_DATABASE_URL"] = h.url
    return subprocess.run(
        [str(script), *args],
        cwd=h.tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_recover_and_restart_from_the_cli_with_a_bare_broker(redis_harness: Harness) -> None:
    h = redis_harness
    orphans = [f"orphan-{i}" for i in range(3)]
    for i, job_id in enumerate(orphans):  # started by an instance that is gone
        h.store.create(
            JobRecord(
                id=job_id,
                name="e2e.work",
                system="celery",
                queue=h.queue,
                args=[i],
                kwargs={"seconds": 0.0},
                state=JobState.STARTED,
                owner="gone:0",
            )
        )
    h.store.create(
        JobRecord(
            id="failed-1",
            name="e2e.work",
            system="celery",
            queue=h.queue,
            args=[9],
            state=JobState.FAILED,
            error="boom",
        )
    )

    # without a way to publish, nothing moves and the command says so
    bare = jobledger(h, "recover", "--json")
    assert bare.returncode == 1, bare.stderr
    assert json.loads(bare.stdout)["publish_failed"] == orphans
    assert h.store.count(JobQuery(states=frozenset({JobState.STARTED}))) == 3

    recovered = jobledger(h, "recover", "--broker", REDIS, "--json")
    assert recovered.returncode == 0, recovered.stderr
    report = json.loads(recovered.stdout)
    assert report["requeued"] == orphans and report["locked_out"] is False
    text = jobledger(h, "recover", "--broker", REDIS)  # the table form; nothing left to do
    assert text.returncode == 0 and "requeued: 0" in text.stdout

    restarted = jobledger(h, "restart", "failed-1", "--broker", REDIS, "--json")
    assert restarted.returncode == 0, restarted.stderr
    assert json.loads(restarted.stdout)["done"] == ["failed-1"]

    h.start_worker("w1", concurrency=2)  # the messages the CLI published run here
    wait_for(
        "the recovered and restarted jobs to succeed",
        lambda: h.store.count(JobQuery(states=frozenset({JobState.SUCCEEDED}))) == 4,
    )
    for job_id in orphans:
        job = h.store.get(job_id)
        assert job is not None and job.recoveries == 1 and job.owner and job.owner[:3] == "w1:"
    done = sorted(r[0] for r in h.runs() if r[1] == "done")
    assert done == sorted([*orphans, "failed-1"])
