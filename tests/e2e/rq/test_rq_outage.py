"""Invariant 9 with RQ: a worker that cannot beat takes no job until the ledger answers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rqharness import REDIS, RQHarness, make_rq_fixture, wait_for  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "celery"))
from tcpproxy import TcpProxy

from jobledger.model import JobState


@pytest.mark.parametrize("worker_class", ["Worker", "SimpleWorker"])
def test_a_worker_cut_off_from_the_ledger_takes_no_job(
    make_rq: Callable[..., RQHarness], worker_class: str
) -> None:
    h = make_rq("postgresql", worker_class)
    target = h.store.url
    proxy = TcpProxy((target.host or "127.0.0.1", target.port or 5432))
    proxy.start()
    try:
        worker = h.start_worker("w1", JOBLEDGER_DATABASE_URL=proxy.url_for(h.url))
        proxy.pause()
        wait_for("its heartbeat to pass the TTL", lambda: not h.store.instances(ttl=3)[0].alive)
        job_id = h.enqueue("work", 1)
        wait_for(
            "the worker to give the job back and wait",
            lambda: "takes no jobs" in worker.output() and h.queue.get_job_ids() == [job_id],
        )
        assert h.runs() == []
        assert h.job(job_id).state is JobState.QUEUED
        proxy.resume()
        wait_for(
            "the job to succeed once the ledger answers",
            lambda: h.all_in([job_id], JobState.SUCCEEDED),
        )
        assert len(h.runs()) == 2  # one start, one done
    finally:
        proxy.close()


def test_a_worker_on_an_unmigrated_ledger_exits_with_one_line(
    make_rq: Callable[..., RQHarness], tmp_path: Path
) -> None:
    h = make_rq("sqlite", "Worker")
    env = h.env("w1", JOBLEDGER_DATABASE_URL=f"sqlite:///{tmp_path / 'empty.db'}")
    done = subprocess.run(
        [sys.executable, "-m", "rq.cli", "worker", "--url", REDIS, "--worker-class",
         "jobledger.integrations.rq.Worker", h.queue_name],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "jobledger: the ledger tables are missing" in done.stderr
    assert "Traceback" not in done.stderr
