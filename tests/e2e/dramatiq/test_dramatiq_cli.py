"""``jobledger restart`` publishes a failed Dramatiq job again by actor name, from a process
that imports no actor (invariant 10), and the job runs once more under its own id."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from dramatiq_harness import HERE, Harness, make_harness_fixture, wait_for  # noqa: F401

from jobledger.model import JobState


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_restart_by_actor_name_without_the_actors_code(
    make_harness: Callable[..., Harness], broker: str
) -> None:
    h = make_harness(broker)
    h.start_worker("w1", processes=1, threads=2)
    job_id = h.send("e2e.flaky", 4)  # its 4 tries (3 retries) fail; a fifth would succeed

    def state() -> JobState | None:
        job = h.store.get(job_id)
        return job.state if job is not None else None

    wait_for("the job to fail", lambda: state() is JobState.FAILED)
    done = subprocess.run(
        [sys.executable, "-m", "jobledger", "restart", job_id, "--app", "bare", "--yes"],
        cwd=HERE,
        env=h.env("operator", E2E_WORKER="0"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for("the restart to succeed", lambda: state() is JobState.SUCCEEDED)
    job = h.store.get(job_id)
    assert job is not None and job.restarts == 1 and job.generation == 1
    assert sum(1 for r in h.runs() if r[0] == job_id and r[1] == "start") == 5
