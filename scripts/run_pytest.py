"""pytest for ``scripts/test``: the whole suite in shards that run side by side, or, with
arguments, one pytest with those arguments.

**Shards.** Most of the suite's time is real worker processes waiting out heartbeats, TTLs and
sweeps, not CPU, so the end-to-end directories run beside the rest, each shard a pytest
process of its own (:data:`SHARDS`). They cannot step on each other: every test already works
on a queue, a key prefix and a database of its own (each pytest session creates its own
throwaway databases), and each shard gets a Redis database number of its own as well, unless
``JOBLEDGER_TEST_REDIS_URL`` says where to go. A shard's output goes to a log printed when it
ends (in full if it failed, its summary otherwise). ``JOBLEDGER_TEST_SHARDS=1`` runs the whole
suite as one pytest instead.

**Ctrl-C.** A shell that is not interactive starts a background job with SIGINT ignored, bash
cannot undo that and Python keeps it, so Ctrl-C or ``kill -INT`` did nothing to
``scripts/test`` run that way: SIGINT is given its default handler back here, in each shard
too (they run this file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The shards of a whole-suite run, by name: the directories each runs. The last shard runs
#: everything the others do not, so a new test directory is never left out.
SHARDS: dict[str, list[str]] = {
    "e2e-celery": ["tests/e2e/celery"],
    "e2e-rq-dramatiq-sidekiq": ["tests/e2e/rq", "tests/e2e/dramatiq", "tests/e2e/sidekiq"],
    "stores": ["tests/contract", "tests/databases", "tests/integration"],
    # 42 tests of real workers, 4-5 minutes on a busy machine: beside the e2e shards, not in one;
    # with the CLI tests (real `jobledger` processes, ~2 minutes), which made the rest the long pole
    "e2e-contract-cli": ["tests/e2e/test_integration_contract.py", "tests/cli"],
}
REST = "the rest"

#: How many lines of a passing shard's log are printed (its slowest tests and its summary).
SUMMARY_LINES = 40


def shard_arguments() -> dict[str, list[str]]:
    """Each shard's pytest arguments."""
    taken = [path for paths in SHARDS.values() for path in paths]
    shards = {name: list(paths) for name, paths in SHARDS.items()}
    shards[REST] = ["tests", *(f"--ignore={path}" for path in taken)]
    return shards


def shard_environment(index: int) -> dict[str, str]:
    """A shard's environment: its own Redis database unless the caller named one."""
    env = dict(os.environ)
    env.setdefault("JOBLEDGER_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{index}")
    return env


def run_shards() -> int:
    """Start every shard, wait for all, print each one's log as it ends; the worst exit code."""
    logs = Path(tempfile.mkdtemp(prefix="jl-test-"))
    started = time.monotonic()
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for index, (name, arguments) in enumerate(shard_arguments().items()):
        log = logs / f"{name.replace(' ', '-')}.log"
        with log.open("wb") as out:
            running[name] = (
                subprocess.Popen(
                    [sys.executable, __file__, *arguments],
                    cwd=ROOT,
                    env=shard_environment(index),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        print(f"shard {name!r}: pytest {' '.join(arguments)}", flush=True)
    worst = 0
    try:
        while running:
            for name, (proc, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                worst = max(worst, code)
                _report(name, code, log, time.monotonic() - started)
            time.sleep(0.5)
    except KeyboardInterrupt:
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)
        for proc, _ in running.values():
            proc.wait()
        print(f"interrupted; the shards' logs are in {logs}", flush=True)
        return 130
    print(f"all shards done in {time.monotonic() - started:.0f} s; logs in {logs}", flush=True)
    return worst


def _report(name: str, code: int, log: Path, elapsed: float) -> None:
    lines = log.read_text(errors="replace").splitlines()
    verdict = "passed" if code == 0 else f"FAILED (exit code {code})"
    shown = lines if code != 0 else lines[-SUMMARY_LINES:]
    print(f"\n===== shard {name!r} {verdict} after {elapsed:.0f} s =====", flush=True)
    print("\n".join(shown), flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    arguments = sys.argv[1:]
    if arguments or os.environ.get("JOBLEDGER_TEST_SHARDS") == "1":
        sys.exit(pytest.main(arguments))
    sys.exit(run_shards())
