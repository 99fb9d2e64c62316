"""What one job writes to PostgreSQL's WAL, and whether its updates stay HOT (issue 12).

A fresh database, migrated as ``jobledger migrate`` does (with the ``pg_trgm`` indexes when
the server has the extension), then ``--jobs`` lifecycles exactly as a publisher and a worker
make them: ``store.create`` of a queued record, ``Lifecycle.claim``, ``Lifecycle.succeed``.
It reports, per job, the WAL records and bytes that belong to this database (read back with
``pg_walinspect``, so other databases on a shared server do not count; commit records are
counted by their transaction ids), which relations they touched, and the share of the jobs
table's updates that were HOT (``pg_stat_user_tables``).

    python bench/wal.py                     # 500 jobs
    python bench/wal.py --jobs 500 --top 12

It needs a superuser (``pg_walinspect``); the URL only says where the server is
(``JOBLEDGER_BENCH_POSTGRES_URL``, default ``postgresql://postgres@127.0.0.1:5432/postgres``).
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Sequence

from sqlalchemy import Connection, create_engine, make_url, text

from jobledger.lifecycle import Lifecycle
from jobledger.model import JobRecord
from jobledger.stores.sql import SQLStore, parse_url

SERVER = os.environ.get(
    "JOBLEDGER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def fresh_database(name: str) -> str:
    admin = create_engine(parse_url(SERVER), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return make_url(SERVER).set(database=name).render_as_string(False)


def lsn(conn: Connection) -> str:
    return str(conn.execute(text("SELECT pg_current_wal_insert_lsn()")).scalar_one())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="lifecycles (500)")
    parser.add_argument("--database", default="jl_bench_wal", help="the bench's database")
    parser.add_argument("--top", type=int, default=8, help="relations listed (8)")
    args = parser.parse_args(argv)
    url = fresh_database(args.database)
    store = SQLStore(url)
    print("argument search:", store.migrate_report())
    engine = create_engine(parse_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_walinspect"))
        database_oid = conn.execute(
            text("SELECT oid FROM pg_database WHERE datname = current_database()")
        ).scalar_one()
        worker = Lifecycle(store, owner="bench:1", ttl=30)
        ids = [f"wal-{uuid.uuid4().hex}" for _ in range(args.jobs)]
        kwargs = {"model_id": 4242, "user": "u17", "note": "an argument of ordinary length"}
        conn.execute(text("SELECT pg_stat_reset()"))
        start = lsn(conn)
        began = time.perf_counter()
        for job_id in ids:
            store.create(JobRecord(id=job_id, name="bench.task", queue="q", kwargs=kwargs))
            assert worker.claim(job_id).should_run
            assert worker.succeed(job_id)
        elapsed = time.perf_counter() - began
        end = lsn(conn)
        time.sleep(1.0)  # the statistics collector's flush
        rows = conn.execute(
            text(
                """
                WITH records AS (
                    SELECT * FROM pg_get_wal_records_info(CAST(:start AS pg_lsn),
                                                          CAST(:end AS pg_lsn))
                ), ours AS (
                    SELECT DISTINCT xid FROM records
                    WHERE block_ref LIKE '%/' || :oid || '/%' AND xid <> 0
                )
                SELECT
                    coalesce(
                        substring(block_ref from '/' || :oid || '/([0-9]+)'), resource_manager
                    ),
                    count(*),
                    sum(record_length - fpi_length),
                    sum(fpi_length)
                FROM records
                WHERE block_ref LIKE '%/' || :oid || '/%'
                   OR (resource_manager = 'Transaction' AND xid IN (SELECT xid FROM ours))
                GROUP BY 1 ORDER BY 3 DESC
                """
            ),
            {"start": start, "end": end, "oid": str(database_oid)},
        ).all()
        names = dict(
            conn.execute(
                text(
                    "SELECT CAST(pg_relation_filenode(oid) AS text), relname FROM pg_class "
                    "WHERE pg_relation_filenode(oid) IS NOT NULL"
                )
            ).all()
        )
        updates, hot = conn.execute(
            text(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE relname = 'jobledger_jobs'"
            )
        ).one()
    engine.dispose()
    store.close()
    records, size, images = (sum(int(r[i]) for r in rows) / args.jobs for i in (1, 2, 3))
    print(
        f"{args.jobs} lifecycles in {elapsed:.1f} s: per job {records:.1f} WAL records, "
        f"{size / 1024:.2f} kB of WAL without full-page images (+ {images / 1024:.2f} kB of "
        f"them, which depend on when the last checkpoint was); jobs table updates {updates}, "
        f"HOT {hot} ({100 * hot / max(updates, 1):.0f}%)"
    )
    print(f"{'relation':<40}{'records/job':>12}{'bytes/job':>11}")
    for relation, count, length, _ in rows[: args.top]:
        print(
            f"{names.get(relation, relation):<40}{int(count) / args.jobs:>12.2f}"
            f"{int(length) / args.jobs:>11.0f}"
        )


if __name__ == "__main__":
    main()
