"""The ``jobledger`` command: queries, restarts and upkeep of the ledger from a shell.

Tables for people, ``--json`` for scripts (one JSON document; job listings are JSON Lines so a
million jobs stream in constant memory). Every command takes ``--database-url`` (default:
``JOBLEDGER_DATABASE_URL``). A bad input ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from jobledger import __version__
from jobledger.config import Settings, parse_duration
from jobledger.errors import ConfigError, IntegrationMissing, JobLedgerError
from jobledger.history import attempts, first_line, timeline
from jobledger.integrations.base import KNOWN, install_for_broker
from jobledger.manager import ActionReport, Manager
from jobledger.model import JobRecord, JobState, OutboxStats
from jobledger.query import JobQuery
from jobledger.serialize import (
    duration_stats_to_dict,
    format_seconds,
    instance_to_dict,
    job_to_dict,
    report_to_dict,
    stats_to_dict,
)
from jobledger.stores import Store, open_store, store_for

#: Plain help (no Rich markup): Rich read ``[default: …]`` in a help text as a markup tag and
#: dropped it, and printed ``<bool>`` beside every flag.
app = typer.Typer(
    name="jobledger",
    help="A durable ledger for background jobs: see what is stuck, restart it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"jobledger {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print jobledger's version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """A durable ledger for background jobs: see what is stuck, restart it."""


class _Console(Console):
    """Rich's console, except that a reader who left (``jobledger jobs | head``) ends the
    command like a JSON listing does (exit 0), not with Rich's own ``SystemExit(1)``."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _reader_left()
        raise BrokenPipeError


def _reader_left() -> None:
    """The reader of stdout went away: point stdout at /dev/null, so the flush of what is
    still buffered at exit cannot fail too (Python would then exit 120, not 0)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


#: Piped output is not cut to 80 columns: a script reading it wants whole ids and states.
out = _Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)
F = TypeVar("F", bound=Callable[..., Any])

#: Rows per printed table when streaming a listing (so widths stay fixed and memory flat).
_CHUNK = 200

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Ledger database URL [default: $JOBLEDGER_DATABASE_URL or sqlite:///jobledger.db]",
        metavar="URL",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
States = Annotated[
    list[str] | None,
    typer.Option(
        "--state",
        "-s",
        help="Job state (repeatable): " + ", ".join(s.value for s in JobState),
        metavar="STATE",
    ),
]
Queues = Annotated[
    list[str] | None,
    typer.Option("--queue", "-q", help="Queue (repeatable).", metavar="QUEUE"),
]
Names = Annotated[
    list[str] | None,
    typer.Option("--name", "-n", help="Task name (repeatable).", metavar="NAME"),
]
Systems = Annotated[
    list[str] | None,
    typer.Option(
        "--system", help="Queue system (repeatable): celery, sidekiq, ...", metavar="SYSTEM"
    ),
]
Match = Annotated[
    str | None,
    typer.Option("--match", "-m", help="Literal text the job's arguments contain.", metavar="TEXT"),
]
Regex = Annotated[bool, typer.Option("--regex", help="Read --match as a regular expression.")]
UniqueKeys = Annotated[
    list[str] | None,
    typer.Option(
        "--unique-key",
        "-u",
        help="Published with this unique key, finished or not (repeatable).",
        metavar="KEY",
    ),
]
OlderThan = Annotated[
    str | None,
    typer.Option(
        "--older-than",
        help="In its current state for longer than this: 90s, 15m, 3d.",
        metavar="DURATION",
    ),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Say what would be done; change nothing.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before a bulk change.")]
AppModule = Annotated[
    str | None,
    typer.Option(
        "--app",
        help="Module to import first so its queue integration registers (e.g. your Celery "
        "app's, as for celery -A; the current directory is on the import path).",
        metavar="MODULE",
    ),
]
BrokerUrl = Annotated[
    str | None,
    typer.Option(
        "--broker",
        help="Broker URL of --queue-system: publish jobs by name, without importing their code.",
        metavar="URL",
    ),
]
QueueSystem = Annotated[
    str,
    typer.Option(
        "--queue-system",
        help=f"Whose broker --broker is: {', '.join(sorted(KNOWN))}.",
        metavar="NAME",
    ),
]
#: The queue system ``--broker`` means unless ``--queue-system`` says otherwise.
DEFAULT_QUEUE_SYSTEM = "celery"


def _register_integration(
    app_module: str | None,
    broker: str | None,
    database_url: str | None,
    system: str = DEFAULT_QUEUE_SYSTEM,
) -> None:
    """Make ``publish`` work in this process: import ``--app`` (its integration registers
    itself), or for ``--broker`` install ``system``'s integration on a bare client of that
    broker (invariant 10: a record holds all a publish needs); and the Sidekiq integration where
    ``JOBLEDGER_SIDEKIQ_REDIS_URL`` is set (unless ``--broker`` is Sidekiq's)."""
    if app_module:
        if os.getcwd() not in sys.path:  # as `celery -A` finds a module beside the user
            sys.path.insert(0, os.getcwd())
        try:
            importlib.import_module(app_module)
        except Exception as exc:
            raise ConfigError(f"cannot import --app {app_module!r}: {exc}") from None
    settings = Settings.from_env(database_url=database_url)
    if broker:
        install_for_broker(system, broker, settings)
    if settings.sidekiq_redis_url is not None and not (broker and system == "sidekiq"):
        try:
            from jobledger.integrations.sidekiq import install
        except ImportError as exc:
            raise ConfigError(
                f"JOBLEDGER_SIDEKIQ_REDIS_URL needs redis-py ({exc}): "
                "pip install 'jobledger[sidekiq]'"
            ) from None
        install(settings)


def _command(**options: Any) -> Callable[[F], F]:
    """Register a command whose jobledger errors end in one line and exit status 2."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except JobLedgerError as exc:
                _fail(str(exc))
            except BrokenPipeError:  # `jobledger jobs | head`: the reader left, that is fine
                _reader_left()
                sys.stderr.close()
                raise typer.Exit(0) from None

        app.command(**options)(guarded)
        return function

    return decorate


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _open(database_url: str | None) -> tuple[Settings, Store]:
    settings = Settings.from_env(database_url=database_url)
    return settings, store_for(settings)


def _manager(
    database_url: str | None,
    app_module: str | None = None,
    broker: str | None = None,
    system: str = DEFAULT_QUEUE_SYSTEM,
) -> Manager:
    _register_integration(app_module, broker, database_url, system)
    settings, store = _open(database_url)
    if app_module or broker:
        return Manager(store, settings=settings)
    return Manager(store, settings=settings, explain_missing=_no_integration)


def _query(
    state: list[str] | None = None,
    queue: list[str] | None = None,
    name: list[str] | None = None,
    match: str | None = None,
    regex: bool = False,
    older_than: str | None = None,
    system: list[str] | None = None,
    unique_key: list[str] | None = None,
) -> JobQuery:
    return JobQuery(
        states=frozenset(JobState.parse(s) for s in state or ()),
        queues=frozenset(queue or ()),
        names=frozenset(name or ()),
        systems=frozenset(system or ()),
        match=match,
        regex=regex,
        older_than=parse_duration(older_than) if older_than is not None else None,
        unique_keys=frozenset(unique_key or ()),
    )


def _emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def _limited(records: Iterator[Any], limit: int) -> Iterator[Any]:
    for count, record in enumerate(records):
        if limit and count >= limit:
            return
        yield record


def _args_text(record: JobRecord, width: int = 60) -> str:
    text = json.dumps(record.args, ensure_ascii=False)
    if record.kwargs:
        text += " " + json.dumps(record.kwargs, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(*headers: str, numbers: int | None = None) -> Table:
    """A borderless table; columns from index ``numbers`` on are right-aligned figures."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for index, header in enumerate(headers):
        numeric = numbers is not None and index >= numbers
        table.add_column(header, justify="right" if numeric else "left")
    return table


def _job_table() -> Table:
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("ID", no_wrap=True, min_width=36, max_width=36, overflow="ellipsis")
    table.add_column("STATE", min_width=9, max_width=9)
    table.add_column("QUEUE", min_width=10, max_width=16, no_wrap=True, overflow="ellipsis")
    table.add_column("NAME", min_width=20, max_width=32, no_wrap=True, overflow="ellipsis")
    table.add_column("AGE", min_width=7, max_width=7, justify="right")
    table.add_column("TRIES", min_width=5, max_width=5, justify="right")
    table.add_column("ARGS", max_width=60, no_wrap=True, overflow="ellipsis")
    return table


def _print_jobs(records: Iterable[JobRecord], now: float, as_json: bool) -> int:
    """Stream records: JSON Lines, or tables of :data:`_CHUNK` rows. Returns how many."""
    count = 0
    table = _job_table()
    for record in records:
        count += 1
        if as_json:
            sys.stdout.write(json.dumps(job_to_dict(record), ensure_ascii=False) + "\n")
            continue
        age = now - record.updated_at.timestamp() if record.updated_at else None
        table.add_row(
            record.id,
            record.state.value,
            record.queue,
            record.name,
            format_seconds(age),
            str(record.attempts),
            _args_text(record),
        )
        if table.row_count == _CHUNK:
            out.print(table)
            table = _job_table()
            table.show_header = False
    if not as_json and (table.row_count or count == 0):
        out.print(table)
    return count


def _print_report(report: ActionReport, as_json: bool) -> None:
    if as_json:
        _emit_json(report_to_dict(report))
    else:
        past = {"restart": "restarted", "cancel": "cancelled"}[report.action]
        verb = f"would {report.action}" if report.dry_run else past
        out.print(f"{verb}: {len(report.done)}")
        for job_id in report.done:
            out.print(f"  {job_id}")
        for job_id, why in report.skipped.items():
            out.print(f"skipped {job_id}: {why}")
        for job_id, why in report.failed.items():
            out.print(f"[red]failed[/red] {job_id}: {why}")
    if report.not_found:  # bad input, told once the jobs that exist were seen to
        _fail(f"the ledger has no job with id {', '.join(report.not_found)}")
    if not report.ok:
        raise typer.Exit(1)


def _confirm_bulk(action: str, count: int, yes: bool) -> None:
    """A bulk change by filter asks first; without a terminal it needs ``--yes``."""
    if yes or count == 0:
        return
    jobs = "job" if count == 1 else "jobs"
    if not sys.stdin.isatty():
        raise ConfigError(f"{action} of {count} {jobs} by filter needs --yes (or --dry-run first)")
    if not typer.confirm(f"{action.capitalize()} {count} {jobs}?", default=False):
        raise typer.Exit(1)


# -- commands ------------------------------------------------------------------------------


@_command(name="migrate")
def migrate(database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the ledger: SQL tables; on Redis, check the server and write the
    ledger id. Safe to run again."""
    settings = Settings.from_env(database_url=database_url)
    store = open_store(settings.database_url, connect_timeout=settings.connect_timeout)
    report = store.migrate_report()
    out.print(f"ledger schema is up to date in {store.safe_url}")
    out.print(f"argument search: {report}")


@_command(name="jobs")
def jobs_command(
    state: States = None,
    queue: Queues = None,
    name: Names = None,
    system: Systems = None,
    match: Match = None,
    regex: Regex = False,
    older_than: OlderThan = None,
    unique_key: UniqueKeys = None,
    limit: Annotated[
        int, typer.Option(help="At most this many jobs; 0 for all.", min=0, metavar="N")
    ] = 50,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """List jobs, newest first (JSON Lines with --json)."""
    query = _query(state, queue, name, match, regex, older_than, system, unique_key)
    _, store = _open(database_url)
    now = store.now()
    page_size = min(limit, 500) if limit else 500
    shown = _print_jobs(_limited(store.iter_jobs(query, page_size=page_size), limit), now, as_json)
    if not as_json and limit and shown == limit:
        typer.echo(f"(first {limit}; --limit 0 for all)", err=True)


@_command(name="show")
def show(
    job_id: Annotated[str, typer.Argument(help="The job id (the queue's own).", metavar="ID")],
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Show one job: its record, arguments and last error, each attempt (who ran it, when,
    how it ended) and its timeline (recoveries and restarts included)."""
    record = _manager(database_url).get(job_id)
    data = job_to_dict(record)
    if as_json:
        _emit_json(data)
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in data.items():
        if key in ("history", "runs"):
            continue  # told below, as the attempts and the timeline
        if key in ("args", "kwargs", "options", "tags"):
            value = json.dumps(value, ensure_ascii=False)
        elif key in ("queued_to_finished", "started_to_finished"):
            value = format_seconds(value)
        table.add_row(key, "-" if value is None else str(value))
    out.print(table)
    runs = _table("#", "INSTANCE", "STARTED", "RAN FOR", "OUTCOME", "ERROR")
    for run in attempts(record):
        runs.add_row(
            str(run.number),
            run.owner or "-",
            run.started_at.isoformat() if run.started_at else "-",
            format_seconds(run.ran_for),
            run.outcome,
            first_line(run.error) or "-",
        )
    out.print("\nattempts", runs if runs.row_count else "  none yet")
    steps = _table("AT", "WHAT", "DETAIL")
    for step in timeline(record):
        steps.add_row(step.at.isoformat(), step.what, step.detail)
    out.print("\ntimeline", steps)


@_command(name="stats")
def stats(as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """Counts per state and lag (age of the oldest pending job) per queue, and the outbox
    backlog (staged jobs not yet published) with the age of the oldest."""
    rows = _manager(database_url).stats()
    if as_json:
        _emit_json(stats_to_dict(rows))
        return
    states = list(JobState)
    table = _table("QUEUE", *(s.value.upper() for s in states), "LAG", "STAGED LAG", numbers=1)
    for row in rows:
        table.add_row(
            row.queue,
            *(str(row.counts.get(s, 0)) for s in states),
            format_seconds(row.oldest_queued_age),
            format_seconds(row.oldest_staged_age),
        )
    out.print(table if rows else "no jobs in the ledger")
    outbox = OutboxStats.of(rows)
    if outbox.backlog:
        out.print(
            f"outbox: {outbox.backlog} staged, not yet published; the oldest staged "
            f"{format_seconds(outbox.oldest_staged_age)} ago"
        )


@_command(name="durations")
def durations(
    kind: Annotated[
        str,
        typer.Option(help="From 'queued' or 'started' to finished.", metavar="queued|started"),
    ] = "started",
    per_job: Annotated[bool, typer.Option("--per-job", help="One line per job.")] = False,
    state: States = None,
    queue: Queues = None,
    name: Names = None,
    system: Systems = None,
    match: Match = None,
    regex: Regex = False,
    older_than: OlderThan = None,
    limit: Annotated[
        int, typer.Option(help="With --per-job: at most this many; 0 for all.", min=0, metavar="N")
    ] = 50,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Durations of finished jobs: p50/p95/max per task name, or per job."""
    if kind not in ("queued", "started"):
        raise ConfigError(f"--kind must be 'queued' or 'started', not {kind!r}")
    query = _query(state, queue, name, match, regex, older_than, system)
    manager = _manager(database_url)
    if per_job:
        rows = _limited(manager.durations(query, kind), limit)  # type: ignore[arg-type]
        for record, seconds in rows:
            if as_json:
                line = {"id": record.id, "name": record.name, "seconds": seconds}
                sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
            else:
                out.print(f"{record.id}  {record.name}  {format_seconds(seconds)}")
        return
    summary = manager.duration_stats(query, kind)  # type: ignore[arg-type]
    if as_json:
        _emit_json([duration_stats_to_dict(s) for s in summary])
        return
    table = _table("NAME", "COUNT", "P50", "P95", "MAX", numbers=1)
    for s in summary:
        table.add_row(
            s.name,
            str(s.count),
            format_seconds(s.p50),
            format_seconds(s.p95),
            format_seconds(s.max),
        )
    out.print(table if summary else "no finished jobs match")


@_command(name="instances")
def instances(as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """Worker instances with the age of their last heartbeat (on the database clock)."""
    found = _manager(database_url).instances()
    if as_json:
        _emit_json([instance_to_dict(i) for i in found])
        return
    table = _table("INSTANCE", "HOST", "PID", "STATE", "HEARTBEAT", "QUEUES")
    for i in found:
        status = i.state.value if i.alive else "[red]dead[/red]"
        table.add_row(
            i.id,
            i.hostname,
            str(i.pid),
            status,
            format_seconds(i.heartbeat_age) + " ago",
            ",".join(i.queues),
        )
    out.print(table if found else "no instances registered")


def _bulk(
    action: str,
    ids: list[str] | None,
    query: JobQuery,
    filtered: bool,
    dry_run: bool,
    yes: bool,
    manager: Manager,
    force: bool = False,
) -> ActionReport:
    if not ids and not filtered:
        raise ConfigError(
            f"say which jobs to {action}: job ids, or filters such as --state failed "
            "(--state with every state selects all)"
        )
    run = functools.partial(manager.restart, force=force) if action == "restart" else manager.cancel
    if filtered and not dry_run:
        preview = run(ids or (), query, dry_run=True)
        _confirm_bulk(action, len(preview.done), yes)
    return run(ids or (), query if filtered else None, dry_run=dry_run)


Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Also restart jobs running on a live worker (the new generation fences off "
        "the run still going, so the job's result is recorded once).",
    ),
]


def _no_integration(exc: IntegrationMissing) -> str:
    """Why a job was not restarted by a command given neither ``--app`` nor ``--broker``: what
    to pass or set, and the extra to install only if its queue system is not installed."""
    system = exc.system or "?"
    known = KNOWN.get(system)
    if known is None:
        option = "pass --app with the module that installs its integration"
    elif known.reach is not None:
        option = known.reach
    else:
        option = f"pass --app with {known.app} or --broker with its broker URL"
        if system != DEFAULT_QUEUE_SYSTEM:
            option += f" and --queue-system {system}"
    install = (
        f"pip install 'jobledger[{known.extra}]', then "
        if known is not None and importlib.util.find_spec(known.requires or system) is None
        else ""
    )
    return f"no integration for queue system {system!r}: {install}{option}"


def _bulk_command(action: str, summary: str, *, publishes: bool) -> None:
    """Register ``restart`` or ``cancel``: the same selection (ids and/or filters), asked
    about before a bulk change, differing only in what the manager does with it (and only a
    command that publishes offers ``--app`` and ``--broker``)."""

    def command(
        ids: Annotated[
            list[str] | None, typer.Argument(help="Job ids.", show_default=False, metavar="ID")
        ] = None,
        state: States = None,
        queue: Queues = None,
        name: Names = None,
        system: Systems = None,
        match: Match = None,
        regex: Regex = False,
        older_than: OlderThan = None,
        unique_key: UniqueKeys = None,
        dry_run: DryRun = False,
        yes: Yes = False,
        force: Force = False,
        app_module: AppModule = None,
        broker: BrokerUrl = None,
        queue_system: QueueSystem = DEFAULT_QUEUE_SYSTEM,
        as_json: AsJson = False,
        database_url: DatabaseUrl = None,
    ) -> None:
        filtered = any((state, queue, name, system, match, older_than, unique_key))
        query = _query(state, queue, name, match, regex, older_than, system, unique_key)
        manager = _manager(database_url, app_module, broker, queue_system)
        try:
            report = _bulk(action, ids, query, filtered, dry_run, yes, manager, force)
        except IntegrationMissing as exc:  # nothing selected can be published from here
            raise ConfigError(manager.explain_missing(exc)) from None
        _print_report(report, as_json)

    command.__doc__ = summary
    command.__name__ = action
    if not publishes:
        signature = inspect.signature(command, eval_str=True)
        kept = [
            p
            for p in signature.parameters.values()
            if p.name not in ("app_module", "broker", "queue_system", "force")
        ]
        command.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined]
    _command(name=action)(command)


_bulk_command(
    "restart",
    "Publish jobs again with their own ids (failed, dead, stuck, orphaned; --force: running).",
    publishes=True,
)
_bulk_command(
    "cancel",
    "Cancel unfinished jobs: a later delivery is acknowledged and not run.",
    publishes=False,
)


@_command(name="prune")
def prune(
    keep_succeeded: Annotated[
        str | None,
        typer.Option(
            help="Keep succeeded/cancelled jobs this long "
            "[default: $JOBLEDGER_KEEP_SUCCEEDED or 7d]",
            metavar="DURATION",
        ),
    ] = None,
    keep_failed: Annotated[
        str | None,
        typer.Option(
            help="Also delete failed/dead jobs older than this [default: keep them]",
            metavar="DURATION",
        ),
    ] = None,
    dry_run: DryRun = False,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Delete finished jobs past their keep time (pending jobs are never pruned)."""
    settings = Settings.from_env(
        database_url=database_url,
        keep_succeeded=parse_duration(keep_succeeded) if keep_succeeded is not None else None,
        keep_failed=parse_duration(keep_failed) if keep_failed is not None else None,
    )
    store = store_for(settings)
    counts = Manager(store, settings=settings).prune(dry_run=dry_run)
    if as_json:
        _emit_json({"dry_run": dry_run, "deleted": counts})
        return
    verb = "would delete" if dry_run else "deleted"
    out.print(", ".join(f"{verb} {n} {state}" for state, n in counts.items()))


@_command(name="recover")
def recover(
    app_module: AppModule = None,
    broker: BrokerUrl = None,
    queue_system: QueueSystem = DEFAULT_QUEUE_SYSTEM,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Run one recovery sweep now: publish the jobs of dead instances again (same ids)."""
    from jobledger.recovery import Outcome, Recovery

    _register_integration(app_module, broker, database_url, queue_system)
    settings, store = _open(database_url)
    report = Recovery.from_settings(store, settings).sweep_once()
    if as_json:
        _emit_json(
            {
                "locked_out": report.locked_out,
                **{o.value: report.ids(o) for o in Outcome},
                "pruned_instances": report.pruned,
            }
        )
    elif report.locked_out:
        out.print("another recoverer holds the recovery lock: nothing done")
    else:
        for outcome in Outcome:
            found = report.ids(outcome)
            out.print(f"{outcome.value.replace('_', ' ')}: {len(found)}")
            for job_id in found:
                out.print(f"  {job_id}")
        if report.pruned:
            out.print(f"forgot long-dead instances: {', '.join(report.pruned)}")
    if report.ids(Outcome.PUBLISH_FAILED) or report.locked_out:
        raise typer.Exit(1)


@_command(name="relay")
def relay(
    once: Annotated[
        bool, typer.Option("--once", help="One pass over the backlog, then exit.")
    ] = False,
    grace: Annotated[
        str | None,
        typer.Option(
            help="Only jobs staged at least this long ago [default: $JOBLEDGER_RELAY_GRACE or 5s]",
            metavar="DURATION",
        ),
    ] = None,
    app_module: AppModule = None,
    broker: BrokerUrl = None,
    queue_system: QueueSystem = DEFAULT_QUEUE_SYSTEM,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Publish staged jobs the fast path missed (a crash after commit, a broker outage).

    Runs until interrupted, backing off while the broker is down; with --once, one pass, and
    exit status 1 if the broker could not be reached or refused a job's message. Relays may run
    side by side: none publishes a job another is publishing.
    """
    from jobledger.integrations.base import registry
    from jobledger.relay import Relay, RelayLoop

    _register_integration(app_module, broker, database_url, queue_system)
    systems = registry.systems()
    if not systems:
        raise ConfigError(
            "no queue integration to publish with: pass --app (the module that installs it) "
            "or --broker"
        )
    settings, store = _open(database_url)
    if grace is not None:
        settings = settings.replace(relay_grace=parse_duration(grace))
    worker = Relay.from_settings(store, settings, systems=systems)
    if once:
        report = worker.run_once()
        error = None if report.error is None else str(report.error)
        if as_json:
            _emit_json(
                {
                    "published": report.published,
                    "refused": report.refused,
                    "batches": report.batches,
                    "error": error,
                }
            )
        else:
            out.print(f"published {report.published} staged jobs")
            if report.refused:
                out.print(
                    f"failed {report.refused}: the queue system refused their messages "
                    "(jobledger jobs --state failed)"
                )
            if error:
                out.print(f"stopped: {error}")
        if error or report.refused:
            raise typer.Exit(1)
        return
    loop = RelayLoop(
        worker, interval=settings.relay_interval, max_backoff=settings.relay_max_backoff
    )
    out.print(f"relaying staged {', '.join(systems)} jobs from {store!r}; Ctrl-C stops")
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    loop.start()
    while not stopping.wait(0.5):
        pass
    loop.stop()
    out.print(f"relay stopped; {loop.runs} passes")


@_command(name="demo")
def demo(
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            help="Celery broker URL [default: a temporary filesystem queue]",
            metavar="URL",
        ),
    ] = None,
    jobs: Annotated[
        int, typer.Option(help="How many jobs to enqueue.", min=4, max=200, metavar="N")
    ] = 10,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="Ledger database URL [default: a temporary SQLite file]",
            metavar="URL",
        ),
    ] = None,
) -> None:
    """A Celery worker killed mid-batch (SIGKILL), and every job still completes. No server."""
    try:
        from jobledger.demo import run_demo
    except ImportError as exc:
        raise ConfigError(
            f"the demo needs Celery ({exc}): pip install 'jobledger[celery]'"
        ) from None
    if not run_demo(database_url, broker, jobs):
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``jobledger`` console script.

    Usage errors (an unknown option, ``--limit abc``) get the same one ``error:`` line and exit
    status 2 as every other bad input, instead of click's boxed help text.
    """
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except TyperException as exc:  # typer's usage errors: unknown option, bad value, …
        context = getattr(exc, "ctx", None)
        hint = f" (see: {context.command_path} --help)" if context is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


@_command(name="serve")
def serve(
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to bind [default: $JOBLEDGER_SERVER_HOST or 127.0.0.1]", metavar="HOST"
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Port [default: $JOBLEDGER_SERVER_PORT or 8000]", min=0, max=65535, metavar="PORT"
        ),
    ] = None,
    maintenance: Annotated[
        bool,
        typer.Option(
            "--maintenance/--no-maintenance",
            help="Run the recovery sweep and pruning loops in this process.",
        ),
    ] = True,
    app_module: AppModule = None,
    broker: BrokerUrl = None,
    queue_system: QueueSystem = DEFAULT_QUEUE_SYSTEM,
    database_url: DatabaseUrl = None,
) -> None:
    """Run the supervisor: the HTTP API, the dashboard, /metrics and the maintenance loops."""
    try:
        from jobledger.server.run import serve as run_server
    except ImportError as exc:
        raise ConfigError(
            f"the supervisor needs the server extra ({exc}): pip install 'jobledger[server]'"
        ) from None
    _register_integration(app_module, broker, database_url, queue_system)
    settings = Settings.from_env(database_url=database_url, server_host=host, server_port=port)
    run_server(settings, maintenance=maintenance)
