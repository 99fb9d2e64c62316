"""``jobledger demo`` (what ``scripts/demo`` runs): its story ends with every job done."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from harness import REDIS

from ledgerdb import database_url


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("jobledger")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBLEDGER_", "E2E_"))}
    return subprocess.run(
        [str(script), "demo", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=55,
    )


def check_outcome(result: subprocess.CompletedProcess[str], jobs: int) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = re.search(
        r"^outcome: ok: (\d+)/(\d+) jobs succeeded .*; (\d+) recovered", result.stdout, re.M
    )
    assert outcome, result.stdout
    assert outcome.group(1) == outcome.group(2) == str(jobs)
    assert int(outcome.group(3)) >= 1  # the jobs the killed worker held were recovered
    assert "SIGKILL to worker-a" in result.stdout and "Traceback" not in result.stderr


def test_the_demo_needs_no_server(tmp_path: Path) -> None:
    """It leaves nothing in the working directory (kombu's filesystem transport keeps its
    ``control`` folder in the demo's own), and its closing hint is a command that runs."""
    result = run_demo(tmp_path)
    check_outcome(result, 10)
    assert list(tmp_path.iterdir()) == []
    hint = re.search(r"try `(.+ --database-url (sqlite:///(\S+)))`", result.stdout)
    assert hint, result.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")}
    listed = subprocess.run(
        [*shlex.split(hint.group(1)), "--json"], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 10, listed.stderr
    shutil.rmtree(Path(hint.group(3)).parent)


def test_the_demo_on_redis_and_postgresql(tmp_path: Path) -> None:
    url = database_url("postgresql", tmp_path)
    check_outcome(run_demo(tmp_path, "--broker", REDIS, "--database-url", url, "--jobs", "6"), 6)
