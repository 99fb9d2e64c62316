"""The app factory: one FastAPI app over one store, with its routes, guards and loops."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from jobledger import __version__
from jobledger.config import Settings
from jobledger.errors import StoreError
from jobledger.heartbeat import Health
from jobledger.integrations.base import Registry, registry
from jobledger.manager import Manager
from jobledger.model import JobRecord
from jobledger.runtime.service import Service
from jobledger.serialize import format_seconds
from jobledger.server import api, dashboard, errors, seed
from jobledger.server.auth import Auth
from jobledger.server.context import Context, context
from jobledger.server.limits import BodyLimit, SecurityHeaders
from jobledger.server.maintenance import maintenance_loops, untracked_heartbeat
from jobledger.server.metrics import CONTENT_TYPE, Metrics
from jobledger.stores import Store, store_for

log = logging.getLogger(__name__)

HERE = Path(__file__).parent


def templates() -> Jinja2Templates:
    """Autoescaped templates: every value a job client sent renders as text."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["ago"] = format_seconds
    env.filters["preview"] = preview
    env.filters["size"] = format_size
    env.filters["epoch"] = lambda moment: None if moment is None else moment.timestamp()
    env.filters["utc"] = lambda epoch: (
        f"{datetime.fromtimestamp(epoch, timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    )
    return Jinja2Templates(env=env)


#: The most characters of a job's arguments a list shows (the job page shows more).
PREVIEW_LENGTH = 120


def preview(job: JobRecord) -> str:
    """A job's arguments for a list: the JSON of its args (and kwargs), cut to
    :data:`PREVIEW_LENGTH` characters, so an 800 KB argument costs a list nothing."""
    text = json.dumps(job.args, ensure_ascii=False)
    if job.kwargs:
        text += " " + json.dumps(job.kwargs, ensure_ascii=False)
    return text if len(text) <= PREVIEW_LENGTH else text[: PREVIEW_LENGTH - 1] + "…"


def format_size(size: int) -> str:
    """``812 KB``: a byte count for people."""
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / 1024 / 1024:.1f} MB"


def _stop_all(loops: list[Service]) -> None:
    for loop in loops:
        loop.stop()


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    integrations: Registry | None = None,
    maintenance: bool = True,
) -> FastAPI:
    """The supervisor app.

    ``store`` defaults to one opened from ``settings.database_url`` (and closed on shutdown);
    ``integrations`` to the process-wide registry (restarts and recovery publish through it);
    ``maintenance`` runs the recovery sweep and pruning loops while the app is up (their
    intervals are ``settings.recovery_interval`` and ``settings.prune_interval``).
    """
    settings = settings if settings is not None else Settings.from_env()
    owns_store = store is None
    the_store: Store = store if store is not None else store_for(settings)
    the_registry = integrations if integrations is not None else registry
    manager = Manager(the_store, integrations=the_registry, settings=settings)
    metrics = Metrics(the_store, settings.ttl)
    ctx = Context(
        settings=settings,
        store=the_store,
        manager=manager,
        auth=Auth(settings.api_token, settings.open_reads),
        metrics=metrics,
        templates=templates(),
    )
    ledger_health = Health(settings.ttl)
    loops: list[Service] = [untracked_heartbeat(the_store, settings, metrics, ledger_health)]
    if maintenance:
        loops += maintenance_loops(
            the_store, settings, manager, the_registry, metrics, ledger_health
        )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for loop in loops:
            loop.start()
        try:
            yield
        finally:
            await run_in_threadpool(_stop_all, loops)
            if owns_store:
                the_store.close()

    app = FastAPI(
        title="jobledger supervisor",
        version=__version__,
        description="The ledger of background jobs: seed endpoints, queries, restarts.",
        docs_url=None,  # Swagger UI loads from a CDN; the CSP (and offline hosts) refuse it
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.loops = loops
    errors.install(app, on_store_error=metrics.ledger_errors.inc)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    app.include_router(seed.router)
    app.include_router(api.router)
    app.include_router(dashboard.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(api.read_access)])
    def prometheus(request: Request) -> Response:
        """Prometheus metrics: jobs per state and queue, lag, dead jobs, instances, errors."""
        return Response(context(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz", tags=["ops"])
    def health(request: Request) -> JSONResponse:
        """200 when the ledger answers, 503 when it does not (no auth: for load balancers)."""
        body: dict[str, Any] = {"ok": True, "version": __version__}
        try:
            context(request).store.now()
        except StoreError as exc:
            body.update(ok=False, error=str(exc))
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    return app
