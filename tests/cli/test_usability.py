"""A user's first hour with the CLI (issue 15): importing ``--app`` from the working directory,
help that shows defaults, ``--version``, errors that name the missing option or extra, the
demo's hints, ``postgres://`` URLs, ambiguous regular expressions, and ``scripts/test``
stopping on SIGINT."""

from __future__ import annotations

import os
import pty
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobledger import __version__
from jobledger.cli import app
from jobledger.demo import cli_command
from jobledger.query import JobQuery
from jobledger.stores.base import Store
from jobledger.stores.sql import SQLStore, parse_url
from jobledger.testing import wait_for
from ledgerdb import database_url, empty_sql_store

from .helpers import REPO, Cli, child_env, run_jobledger, seed_ledger


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())  # one line: wrapping does not split a fragment


def test_app_is_imported_from_the_working_directory(
    sqlite_store: SQLStore, sqlite_url: str, tmp_path: Path
) -> None:
    """``--app shop`` finds ``shop.py`` in the current directory, as ``celery -A shop`` does."""
    (tmp_path / "shop.py").write_text("import tests.cli.recording_app  # registers 'celery'\n")
    result = run_jobledger(
        ["relay", "--once", "--app", "shop", "--database-url", sqlite_url], cwd=tmp_path
    )
    assert result.ok().stdout.strip() == "published 0 staged jobs"


def test_help_shows_defaults_and_no_type_tags() -> None:
    listing = _help("jobs")
    assert "[default: $JOBLEDGER_DATABASE_URL or sqlite:///jobledger.db]" in listing
    assert "[default: 50" in listing and "--older-than DURATION" in listing
    assert "<bool>" not in listing and "<str>" not in listing
    assert "[default: $JOBLEDGER_KEEP_SUCCEEDED or 7d]" in _help("prune")
    assert "[default: $JOBLEDGER_RELAY_GRACE or 5s]" in _help("relay")
    assert "[default: started]" in _help("durations")
    restart, cancel = _help("restart"), _help("cancel")
    assert "--app MODULE" in restart and "--broker URL" in restart
    assert "--app" not in cancel and "--broker" not in cancel  # cancel never publishes
    top = CliRunner().invoke(app, ["--version"])
    assert top.exit_code == 0 and top.stdout == f"jobledger {__version__}\n"
    assert "--version" in _help()


def test_cancel_refuses_app_and_broker(cli: Cli) -> None:
    cli("cancel", "some-id", "--app", "shop").error("No such option: --app")


def test_restart_without_app_or_broker_names_the_option(cli: Cli, store: Store) -> None:
    """Celery is installed: the missing piece is the option, not ``pip install``."""
    seed_ledger(store)
    line = cli.quick("restart", "charge-100").error(
        "no integration for queue system 'celery'", "pass --app", "--broker"
    )
    assert "pip install" not in line


def test_the_demo_without_celery_names_the_extra(tmp_path: Path) -> None:
    """A plain ``pip install jobledger``: a ``celery`` that cannot be imported stands in."""
    missing = tmp_path / "no-celery" / "celery"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'celery'\", name='celery')\n"
    )
    path = os.pathsep.join([str(missing.parent), child_env()["PYTHONPATH"]])
    result = run_jobledger(["demo"], env={"PYTHONPATH": path}, cwd=tmp_path)
    result.error("the demo needs Celery", "pip install 'jobledger[celery]'")


def test_the_demo_hint_runs_whether_or_not_the_cli_is_on_the_path(
    monkeypatch: pytest.MonkeyPatch, sqlite_store: SQLStore, sqlite_url: str
) -> None:
    """The demo ends by suggesting a command: it must run where the user is, also when the
    virtualenv's ``bin`` is not on the PATH."""
    script = Path(sys.executable).with_name("jobledger")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli_command() == shlex.quote(str(script))
    off_path = subprocess.run(
        [*shlex.split(cli_command()), "jobs", "--database-url", sqlite_url],
        env={**child_env(), "PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert off_path.returncode == 0, off_path.stderr
    monkeypatch.setenv("PATH", str(script.parent))
    assert cli_command() == "jobledger"


def test_postgres_urls_are_postgresql(tmp_path: Path) -> None:
    """``postgres://`` (Heroku's, libpq's spelling) works wherever a URL is read."""
    url = database_url("postgresql", tmp_path)
    empty_sql_store(url).close()
    short = re.sub(r"^postgresql(\+psycopg)?://", "postgres://", url)
    assert short.startswith("postgres://")
    assert parse_url(short).drivername == "postgresql+psycopg"
    result = run_jobledger(["stats", "--json", "--database-url", short], cwd=tmp_path)
    assert result.json()["queues"] == []
    env_result = run_jobledger(["jobs"], env={"JOBLEDGER_DATABASE_URL": short}, cwd=tmp_path)
    assert env_result.ok().stderr == ""


def test_an_ambiguous_regex_is_one_clear_error(cli: Cli) -> None:
    """``[[:alpha:]]`` is a POSIX class to PostgreSQL and a set of characters to Python (SQLite
    and the memory store): one error line instead of a FutureWarning and differing answers."""
    line = cli("jobs", "--match", "[[:alpha:]]", "--regex").error(
        "'[[:alpha:]]' is ambiguous", "[A-Za-z]"
    )
    assert "FutureWarning" not in line


def test_the_prompt_counts_one_job_in_the_singular(sqlite_store: SQLStore, sqlite_url: str) -> None:
    seed_ledger(sqlite_store)
    leader, follower = pty.openpty()
    try:
        os.write(leader, b"n\n")
        result = run_jobledger(
            ["cancel", "--queue", "billing", "--database-url", sqlite_url], stdin=follower
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert result.returncode == 1, result
    assert "Cancel 1 job?" in result.stdout


def test_sigint_stops_the_test_runner_started_with_sigint_ignored(tmp_path: Path) -> None:
    """A background job of a shell that is not interactive starts with SIGINT ignored (bash
    cannot undo it); ``scripts/test`` runs pytest through ``scripts/run_pytest.py``, which
    SIGINT stops all the same."""
    started = tmp_path / "started"
    (tmp_path / "test_waits.py").write_text(
        "import pathlib, time\n\n"
        "def test_waits():\n"
        f"    pathlib.Path({str(started)!r}).write_text('yes')\n"
        "    deadline = time.monotonic() + 120\n"
        "    while time.monotonic() < deadline:\n"
        "        time.sleep(0.05)\n"
    )
    assert "scripts/run_pytest.py" in (REPO / "scripts" / "test").read_text()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "run_pytest.py"), "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        wait_for("the inner test to start", started.exists, timeout=60)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 2, output  # pytest's "interrupted"
    assert re.search(r"KeyboardInterrupt", output), output


def test_the_readme_python_quick_start_runs(tmp_path: Path) -> None:
    """The README's first example runs as written (every name it uses is defined), on a
    SQLite ledger instead of its PostgreSQL one."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start (Python)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    url = f"sqlite:///{tmp_path / 'quick.db'}"
    code = code.replace('"postgresql://app@db/app"', repr(url))
    assert repr(url) in code
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    store = SQLStore(url)
    try:
        assert [r.state.value for r in store.iter_jobs(JobQuery())] == ["succeeded"]
    finally:
        store.close()


def test_the_cli_ends_an_unknown_scheme_in_one_line(tmp_path: Path) -> None:
    run_jobledger(["jobs", "--database-url", "mongodb://h/db"], cwd=tmp_path).error(
        "unknown ledger URL scheme 'mongodb'", "postgresql://", "redis://"
    )
