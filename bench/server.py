"""Benchmark of issue 5: what the supervisor costs an HTTP job client, and how its pages hold up
on a large ledger.

1. Ingest: concurrent clients drive the seed endpoints exactly as the seed middleware does
   (form-encoded ``POST /api/v1/jobs``, ``.../started``, ``.../complete`` per job) against
   ``jobledger serve``; in the same run, the same requests against a bare FastAPI endpoint that
   parses the same form and answers JSON, on the same Uvicorn settings. Events/s and the ratio.
2. Batch: ``POST /api/v1/events`` with many events per request, events/s.
3. Big ledger: ``--big`` jobs (default 1,000,000) loaded into PostgreSQL with INSERT … SELECT
   FROM generate_series (the same rows as bench/ledger.py), then p50/p95 of the dashboard's job
   list page and the JSON list (first page, a filtered page, a page 100 pages deep).

Servers run as subprocesses (one Uvicorn worker each); the clients are httpx in this process.
The bench's PostgreSQL database (``--database``) is dropped and recreated per run.

    python bench/server.py                       # everything (figures in README.md)
    python bench/server.py --big 20000 --jobs 300   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).parent))
from jobledger.stores.sql import SQLStore
from ledger import LOAD_SQL, recreate_database

BARE_APP = textwrap.dedent(
    """
    from fastapi import FastAPI, Request
    app = FastAPI()

    async def _ok(request: Request) -> dict:
        form = await request.form()
        return {"id": form.get("job_id") or request.path_params.get("job_id"), "ok": True}

    app.add_api_route("/api/v1/jobs", _ok, methods=["POST"])
    app.add_api_route("/api/v1/jobs/{job_id}/started", _ok, methods=["POST"])
    app.add_api_route("/api/v1/jobs/{job_id}/complete", _ok, methods=["POST"])

    @app.get("/healthz")
    def health() -> dict:
        return {"ok": True}
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(argv: list[str], env: dict[str, str]) -> Iterator[str]:
    """Start a server subprocess on a free port; its base URL once /healthz answers."""
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in argv]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"server exited: {process.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start in 60s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def jobledger_server(db_url: str) -> list[str]:
    code = "from jobledger.cli import main; main()"
    return [
        sys.executable,
        "-c",
        code,
        "serve",
        "--port",
        "{port}",
        "--database-url",
        db_url,
        "--no-maintenance",
    ]


def bare_server(workdir: Path) -> list[str]:
    (workdir / "bare_app.py").write_text(BARE_APP)
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "bare_app:app",
        "--port",
        "{port}",
        "--log-level",
        "warning",
        "--app-dir",
        str(workdir),
    ]


def ingest(url: str, jobs: int, clients: int, prefix: str) -> float:
    """Seed lifecycles (queued, started, complete) of ``jobs`` jobs by ``clients`` concurrent
    clients (threads, one keep-alive connection each); events per second."""
    form = {"arguments": '[42, "report"]', "job_class": "Reports::Build", "queue": "reports"}

    def client(part: range) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for n in part:
                jid = f"{prefix}-{n}"
                for path, body in (
                    ("/api/v1/jobs", {"job_id": jid, **form}),
                    (f"/api/v1/jobs/{jid}/started", form),
                    (f"/api/v1/jobs/{jid}/complete", form),
                ):
                    r = http.post(path, data=body)
                    if r.status_code >= 300:
                        raise SystemExit(f"{path}: {r.status_code} {r.text}")

    parts = [range(k, jobs, clients) for k in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, parts))
    return 3 * jobs / (time.perf_counter() - start)


async def batch(url: str, jobs: int, per_request: int, clients: int) -> float:
    """The same lifecycles through ``POST /api/v1/events``; events per second."""
    ids = [f"batch-{i}" for i in range(jobs)]
    requests: list[list[dict[str, str]]] = []
    for kind in ("queued", "started", "complete"):
        events = [{"event": kind, "job_id": i, "job_class": "B", "arguments": "[1]"} for i in ids]
        requests += [events[k : k + per_request] for k in range(0, len(events), per_request)]
    total = sum(len(r) for r in requests)

    async def send(http: httpx.AsyncClient, events: list[dict[str, str]]) -> None:
        r = await http.post("/api/v1/events", json={"events": events})
        if r.status_code != 200 or r.json()["failed"]:
            raise SystemExit(f"batch: {r.status_code} {r.text[:300]}")

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        # each kind's requests run concurrently; kinds in order (started needs queued first)
        per_kind = len(requests) // 3
        for k in range(3):
            chunk = requests[k * per_kind : (k + 1) * per_kind]
            for j in range(0, len(chunk), clients):
                await asyncio.gather(*(send(http, ev) for ev in chunk[j : j + clients]))
    return total / (time.perf_counter() - start)


def latencies(url: str, path: str, runs: int) -> tuple[float, float]:
    """p50 and p95 in ms of ``runs`` GETs (after two untimed)."""
    timings = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for i in range(runs + 2):
            start = time.perf_counter()
            r = http.get(path)
            elapsed = (time.perf_counter() - start) * 1000
            if r.status_code != 200:
                raise SystemExit(f"{path}: {r.status_code} {r.text[:300]}")
            if i >= 2:
                timings.append(elapsed)
    timings.sort()
    return statistics.median(timings), timings[max(0, int(len(timings) * 0.95) - 1)]


def deep_cursor(url: str, pages: int) -> str:
    with httpx.Client(base_url=url, timeout=120) as http:
        cursor = None
        for _ in range(pages):
            params = {"limit": 50, **({"cursor": cursor} if cursor else {})}
            cursor = http.get("/api/v1/jobs", params=params).json()["next_cursor"]
        return str(cursor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server",
        default=os.environ.get(
            "JOBLEDGER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a PostgreSQL server URL (only connected to, to create --database)",
    )
    parser.add_argument("--database", default="jobledger_bench_server")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per ingest run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--batch-size", type=int, default=500, help="events per batch request")
    parser.add_argument("--big", type=int, default=1_000_000, help="rows of the big ledger")
    parser.add_argument("--runs", type=int, default=40, help="timed GETs per page")
    args = parser.parse_args()

    url = recreate_database(args.server, args.database)
    db_url = url.render_as_string(hide_password=False)
    store = SQLStore(db_url)
    store.migrate()
    env = {**os.environ}
    env.pop("JOBLEDGER_API_TOKEN", None)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"jl-bench-{os.getpid()}"
    workdir.mkdir(exist_ok=True)
    print(
        f"jobledger supervisor benchmark · PostgreSQL database {args.database} · "
        f"{os.cpu_count()} CPUs · Python {sys.version.split()[0]}"
    )

    with running(bare_server(workdir), env) as bare, running(jobledger_server(db_url), env) as jl:
        ingest(bare, 100, args.clients, "warm")  # warm-up, untimed
        ingest(jl, 100, args.clients, "warm")
        bare_rate = ingest(bare, args.jobs, args.clients, "bare")
        jl_rate = ingest(jl, args.jobs, args.clients, "seed")
        print(
            f"\n1. seed endpoints, {args.jobs} jobs x 3 events, {args.clients} clients "
            "(form-encoded)"
        )
        print(f"   bare FastAPI endpoint   {bare_rate:9.0f} events/s")
        print(f"   jobledger serve         {jl_rate:9.0f} events/s")
        print(f"   ratio jobledger / bare  {jl_rate / bare_rate:9.2f}")
        rate = asyncio.run(batch(jl, args.jobs, args.batch_size, 4))
        print(f"\n2. batch endpoint, {args.batch_size} events per request, 4 concurrent")
        print(f"   POST /api/v1/events     {rate:9.0f} events/s")

    if args.big:
        start = time.perf_counter()
        with store.engine.begin() as conn:
            conn.execute(text("TRUNCATE jobledger_jobs"))
            conn.execute(text(LOAD_SQL), {"rows": args.big})
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE jobledger_jobs"))
        print(f"\n3. big ledger: {args.big:,} jobs loaded in {time.perf_counter() - start:.0f}s")
        with running(jobledger_server(db_url), env) as jl:
            cursor = deep_cursor(jl, 100)
            cases = [
                ("dashboard /jobs (page 1)", "/jobs"),
                ("dashboard /jobs?state=failed", "/jobs?state=failed"),
                ("JSON /api/v1/jobs?limit=50", "/api/v1/jobs?limit=50"),
                ("JSON ?state=failed&queue=mail", "/api/v1/jobs?limit=50&state=failed&queue=mail"),
                ("JSON page 101 (cursor)", f"/api/v1/jobs?limit=50&cursor={cursor}"),
                (
                    'JSON ?match=model_id": 4242',
                    "/api/v1/jobs?limit=50&match=%22model_id%22%3A%204242,",
                ),
                ("dashboard overview /", "/"),
            ]
            print(f"   {'request':34} {'p50 ms':>8} {'p95 ms':>8}   ({args.runs} runs each)")
            for label, path in cases:
                p50, p95 = latencies(jl, path, args.runs)
                print(f"   {label:34} {p50:8.1f} {p95:8.1f}")
    store.close()


if __name__ == "__main__":
    main()
