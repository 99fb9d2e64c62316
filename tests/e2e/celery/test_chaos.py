"""The chaos run, short and seeded: issue 13's scenario on every CI run (``scripts/chaos`` is
the long one). ``JOBLEDGER_CHAOS_SEED`` replays another plan."""

from __future__ import annotations

import os

import pytest
from chaos import ChaosRun, Config


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_faults_lose_no_job_and_rerun_no_success() -> None:
    config = Config(
        jobs=400,
        faults=9,  # every kind at least once, three of them twice
        # a plan that reached the holes of issue 13 on every run against the code it was
        # written beside (seeds 1 and 2 happened to miss them there)
        seed=int(os.environ.get("JOBLEDGER_CHAOS_SEED", "3")),
        settle_timeout=90,
    )
    lines: list[str] = []
    verdict = ChaosRun(config, say=lambda line: (lines.append(line), print(line))).run()
    assert verdict.ok, "\n".join(lines)
