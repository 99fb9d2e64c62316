"""The objects one running supervisor shares between its routes, kept on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from fastapi.templating import Jinja2Templates

from jobledger.config import Settings
from jobledger.manager import Manager
from jobledger.server.auth import Auth
from jobledger.server.metrics import Metrics
from jobledger.stores.base import Store


@dataclass
class Context:
    settings: Settings
    store: Store
    manager: Manager
    auth: Auth
    metrics: Metrics
    templates: Jinja2Templates


def context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx
