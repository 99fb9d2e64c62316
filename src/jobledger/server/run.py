"""``jobledger serve``: the supervisor on Uvicorn, refusing to expose an unprotected ledger."""

from __future__ import annotations

import ipaddress
import sys

import uvicorn

from jobledger.config import Settings
from jobledger.errors import ConfigError
from jobledger.server.app import create_app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> str:
    """The start-up line about access; :class:`ConfigError` for a tokenless public bind."""
    host = settings.server_host
    if settings.api_token is None:
        if not is_loopback(host):
            raise ConfigError(
                f"refusing to serve on {host} without JOBLEDGER_API_TOKEN: set a token "
                "(16+ characters) or bind a loopback address such as 127.0.0.1"
            )
        return (
            f"no JOBLEDGER_API_TOKEN set: serving on loopback only ({host}), without authentication"
        )
    reads = "open to anyone" if settings.open_reads else "need the token too"
    return f"writes need the API token; reads {reads}"


def serve(settings: Settings, *, maintenance: bool = True, log_level: str = "info") -> None:
    """Run the supervisor until interrupted (Uvicorn's signal handling stops the loops)."""
    notice = check_exposure(settings)
    app = create_app(settings, maintenance=maintenance)
    loops = ", ".join(loop.name for loop in app.state.loops)
    print(f"jobledger supervisor: {notice}", file=sys.stderr)
    print(f"jobledger supervisor: background loops: {loops}", file=sys.stderr)
    uvicorn.run(
        app,
        host=settings.server_host,
        port=settings.server_port,
        log_level=log_level,
        server_header=False,
    )
