"""The supervisor: the seed's HTTP endpoints, a JSON API, the dashboard and ``/metrics``.

Needs the ``server`` extra (``pip install 'jobledger[server]'``); nothing else in jobledger
imports this package, so the core and the CLI work without FastAPI installed.
"""

from jobledger.server.app import create_app

__all__ = ["create_app"]
