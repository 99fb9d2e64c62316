"""Running the real ``jobledger`` command, seeding a ledger through the Store API, and taking a
snapshot of every stored row to prove a failed command changed nothing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jobledger.integrations.base import registry
from jobledger.lifecycle import Lifecycle
from jobledger.model import Instance, JobRecord, JobState, to_datetime
from jobledger.stores.base import Store
from ledgerdb import age_heartbeat

REPO = Path(__file__).resolve().parents[2]
RECORDING_APP = "tests.cli.recording_app"
DAY = 86400.0

LIVE_WORKER = Instance(
    name="worker-live", nonce="n1", hostname="host-a", pid=101, queues=("reports", "mail")
)
GONE_WORKER = Instance(
    name="worker-gone", nonce="n2", hostname="host-b", pid=202, queues=("media",)
)


def jobledger_command() -> list[str]:
    """The installed console script next to this interpreter (as a user would run it)."""
    script = Path(sys.executable).with_name("jobledger")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from jobledger.cli import main; main()"]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: ours without any ``JOBLEDGER_*`` setting (so the
    developer's own settings cannot leak in) and with the repository importable for ``--app``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JOBLEDGER_", "RECORDING_APP_")) and k != "PYTHONUNBUFFERED"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"$ jobledger {' '.join(self.args)}\n-> exit {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )

    def ok(self) -> Result:
        assert self.returncode == 0, str(self)
        return self

    def json(self) -> Any:
        return json.loads(self.ok().stdout)

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.ok().stdout.splitlines()]

    def ids(self) -> list[str]:
        return [line["id"] for line in self.json_lines()]

    def error(self, *fragments: str) -> str:
        """Assert the bad-input contract: exit 2, nothing on stdout, exactly one stderr line
        starting ``error:`` (so no traceback), containing each of ``fragments``."""
        assert self.returncode == 2, str(self)
        assert self.stdout == "", str(self)
        lines = self.stderr.splitlines()
        assert len(lines) == 1, str(self)
        assert lines[0].startswith("error: "), str(self)
        assert "Traceback" not in self.stderr, str(self)
        for fragment in fragments:
            assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
        return lines[0]


def run_jobledger(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: Any = subprocess.DEVNULL,
    timeout: float = 60,
) -> Result:
    completed = subprocess.run(
        [*jobledger_command(), *args],
        env=child_env(env),
        cwd=cwd,
        stdin=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        check=False,
    )
    return Result(list(args), completed.returncode, completed.stdout, completed.stderr)


def run_in_process(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Result:
    """:func:`run_jobledger` without starting a process (~1.5 s each saved): ``main()``, the
    console script's entry point, run on ``args`` with what a fresh child would have, so a test
    sees the same exit code, stdout and stderr. Not thread-safe (it swaps process-wide state):
    run these one after another.

    As in the child: the environment of :func:`child_env` (no ``JOBLEDGER_*`` or
    ``RECORDING_APP_*`` of ours), ``cwd`` as the working directory, the repository importable,
    no integration registered, log records of WARNING and up printed to stderr as an
    unconfigured interpreter does (pytest's own handlers set aside), and an ``--app`` module
    imported afresh each time (forgotten after, with whatever it registered). Python warnings
    are pytest's to record here, not printed on stderr: a test about them runs a real process."""
    from typer.testing import CliRunner

    from jobledger.cli import main

    clean: dict[str, str | None] = {
        k: None for k in os.environ if k.startswith(("JOBLEDGER_", "RECORDING_APP_"))
    }
    clean.update(env or {})
    with _as_a_fresh_process(cwd), CliRunner().isolation(env=clean) as (out, err, _):
        sys.argv = ["jobledger", *args]
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code
        else:  # main() always ends in sys.exit
            raise AssertionError(f"jobledger {' '.join(args)} returned without an exit status")
        finally:  # as the interpreter does at exit
            sys.stdout.flush()
            sys.stderr.flush()
        stdout, stderr = out.getvalue(), err.getvalue()
    status = code if isinstance(code, int) else 0 if code is None else 1
    return Result(list(args), status, stdout.decode(), stderr.decode())


@contextmanager
def _as_a_fresh_process(cwd: Path | None) -> Iterator[None]:
    """Give :func:`run_in_process` a child's process-wide state; put ours back after."""
    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    saved_modules = set(sys.modules)
    integrations = {system: registry.get(system) for system in registry.systems()}
    hooks = list(registry._hooks)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for system in integrations:
        registry.unregister(system)
    for hook in hooks:
        registry.remove_republish_hook(hook)
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.argv, sys.path[:] = saved_argv, saved_path
        root.handlers[:] = handlers
        root.setLevel(level)
        for system in registry.systems():
            registry.unregister(system)
        for integration in integrations.values():
            registry.register(integration)
        for hook in hooks:
            registry.on_republish(hook)
        app_dirs = [str(REPO / "tests"), *([str(cwd)] if cwd is not None else [])]
        for name in set(sys.modules) - saved_modules:
            where = getattr(sys.modules[name], "__file__", None) or ""
            if name == "tests" or where.startswith(tuple(app_dirs)):
                del sys.modules[name]


class Cli:
    """``jobledger`` bound to one ledger: ``cli("jobs", "--json")`` adds ``--database-url``."""

    def __init__(self, url: str, cwd: Path) -> None:
        self.url = url
        self.cwd = cwd

    def __call__(
        self, *args: str, env: Mapping[str, str] | None = None, url: bool = True, **kw: Any
    ) -> Result:
        full = [*args, "--database-url", self.url] if url else list(args)
        return run_jobledger(full, env=env, cwd=self.cwd, **kw)

    def quick(self, *args: str, env: Mapping[str, str] | None = None, url: bool = True) -> Result:
        """The same command through the real entry point in this process (see
        :func:`run_in_process`): for matrices whose process-level behaviour the subprocess tests
        already cover."""
        full = [*args, "--database-url", self.url] if url else list(args)
        return run_in_process(full, env=env, cwd=self.cwd)

    def quick_each(
        self, *commands: Sequence[str], env: Mapping[str, str] | None = None
    ) -> list[Result]:
        """:meth:`quick` on each command in turn, results in order."""
        return [self.quick(*args, env=env) for args in commands]


def at(seconds: float) -> Any:
    return to_datetime(seconds)


@dataclass(frozen=True)
class Ledger:
    """The seeded ledger: ``now`` on the database clock at seeding, ids newest last."""

    store: Store
    now: float
    order: list[str]

    def get(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        assert record is not None, job_id
        return record


def _job(now: float, k: int, job_id: str, state: JobState, **fields: Any) -> JobRecord:
    """A record created ``1000 - k`` seconds ago (so a larger ``k`` is newer)."""
    fields.setdefault("system", "celery")
    fields.setdefault("updated_at", at(now - 600 + k))
    return JobRecord(id=job_id, state=state, created_at=at(now - 1000 + k), **fields)


def seed_ledger(store: Store) -> Ledger:
    """A ledger with one or more jobs in every state, two worker instances (one alive, one
    silent for an hour), known phase times and arguments that test literal matching."""
    now = store.now()
    store.heartbeat(LIVE_WORKER)
    store.heartbeat(GONE_WORKER)
    age_heartbeat(store, GONE_WORKER.id, 3600)
    q = JobState
    records = [
        _job(now, 1, "mail-alice", q.QUEUED, name="send_email", queue="mail",
             args=["alice@example.com"], kwargs={"template": "welcome"},
             options={"priority": 5}, tags={"tenant": "acme"}, queued_at=at(now - 60),
             updated_at=at(now - 60)),
        _job(now, 2, "mail-bob", q.QUEUED, name="send_email", queue="mail",
             args=["bob@example.com"], kwargs={"template": "reset"},
             queued_at=at(now - 3 * DAY), updated_at=at(now - 3 * DAY)),
        _job(now, 3, "report-4242", q.QUEUED, name="build_report", queue="reports",
             args=[2026, 11], kwargs={"model_id": 4242}, queued_at=at(now - 30)),
        _job(now, 4, "resize-1", q.SUCCEEDED, name="resize_image", queue="media",
             args=["cat.png"], kwargs={"width": 640}, owner=LIVE_WORKER.id, attempts=1,
             queued_at=at(now - 100), started_at=at(now - 40), finished_at=at(now - 10),
             updated_at=at(now - 10)),
        _job(now, 5, "resize-2", q.SUCCEEDED, name="resize_image", queue="media",
             args=["dog.png"], owner=LIVE_WORKER.id, attempts=1, queued_at=at(now - 50),
             started_at=at(now - 45), finished_at=at(now - 5), updated_at=at(now - 5)),
        _job(now, 6, "charge-100", q.FAILED, name="charge_invoice", queue="billing",
             args=["inv_100%_off"], error="CardDeclined: insufficient funds", attempts=3,
             queued_at=at(now - 310), started_at=at(now - 300), finished_at=at(now - 290),
             updated_at=at(now - 290)),
        _job(now, 7, "charge-100x", q.QUEUED, name="charge_invoice", queue="billing",
             args=["inv_100X_off"], queued_at=at(now - 200), updated_at=at(now - 200)),
        _job(now, 8, "order-12345", q.DEAD, name="charge_invoice", queue="billing",
             args=["order-12345"], recoveries=4, finished_at=at(now - 100),
             updated_at=at(now - 100)),
        _job(now, 9, "cancelled-1", q.CANCELLED, name="send_email", queue="mail",
             args=["carol@example.com"], finished_at=at(now - 20), updated_at=at(now - 20)),
        _job(now, 10, "retry-1", q.RETRYING, name="resize_image", queue="media",
             args=["café ☕.png"], attempts=1, error="Timeout", updated_at=at(now - 15)),
        _job(now, 11, "staged-1", q.STAGED, name="build_report", queue="reports",
             args=[1999, 1], staged_at=at(now - 500), updated_at=at(now - 500)),
    ]  # fmt: skip
    for record in records:
        assert store.create(record)
    # The report is running on the live worker: claimed through the real lifecycle.
    assert Lifecycle(store, LIVE_WORKER.id, ttl=30).claim("report-4242").should_run
    return Ledger(store, now, [r.id for r in records])


def restart_targets(store: Store, now: float) -> dict[str, JobRecord]:
    """Jobs for restart tests, one per case, all of system ``celery``."""
    dead_owner = GONE_WORKER.id
    records = {
        "failed-1": _job(now, 1, "failed-1", JobState.FAILED, name="charge", queue="billing",
                         args=["inv-1", {"amount": 12.5}], kwargs={"currency": "EUR"},
                         options={"priority": 9, "expires": 3600}, attempts=3,
                         error="boom", finished_at=at(now - 50)),
        "dead-1": _job(now, 2, "dead-1", JobState.DEAD, name="charge", queue="billing",
                       args=["inv-2"], recoveries=4, restarts=1, finished_at=at(now - 40)),
        "queued-1": _job(now, 3, "queued-1", JobState.QUEUED, name="mail", queue="mail",
                         args=["stuck@example.com"], queued_at=at(now - 7200),
                         updated_at=at(now - 7200)),
        "done-1": _job(now, 4, "done-1", JobState.SUCCEEDED, name="mail", queue="mail",
                       finished_at=at(now - 5)),
        "cancelled-1": _job(now, 5, "cancelled-1", JobState.CANCELLED, name="mail",
                            queue="mail", finished_at=at(now - 5)),
        "running-1": _job(now, 6, "running-1", JobState.QUEUED, name="report", queue="reports"),
        "orphan-1": _job(now, 7, "orphan-1", JobState.QUEUED, name="report", queue="reports",
                         args=[7]),
        "orphan-2": replace(
            _job(now, 8, "orphan-2", JobState.STARTED, name="report", queue="reports",
                 args=[8], started_at=at(now - 30)),
            owner="worker-vanished:n9", attempts=1,
        ),
    }  # fmt: skip
    store.heartbeat(LIVE_WORKER)
    store.heartbeat(GONE_WORKER)
    age_heartbeat(store, dead_owner, 3600)
    for record in records.values():
        assert store.create(record)
    assert Lifecycle(store, LIVE_WORKER.id, ttl=30).claim("running-1").should_run
    assert Lifecycle(store, dead_owner, ttl=30).claim("orphan-1").should_run
    return {job_id: _get(store, job_id) for job_id in records}


def _get(store: Store, job_id: str) -> JobRecord:
    record = store.get(job_id)
    assert record is not None, job_id
    return record


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
