"""The Dramatiq integration (``pip install 'jobledger[dramatiq]'``): ``install(broker)`` adds
:class:`LedgerMiddleware`; actors declared ``@dramatiq.actor(tracked=True)`` (or all, with
``track_all=True``, unless ``tracked=False``) get a ledger record, the claim guard and recovery.
"""

from jobledger.integrations.dramatiq.middleware import LedgerMiddleware, install

__all__ = ["LedgerMiddleware", "install"]
