"""Event counters shared by a worker's processes, for ``/metrics`` through the ledger.

A prefork worker's pool processes skip duplicates and defer claims, but only its main process
beats: the counts live in shared memory made before the pool forks (as
:class:`jobledger.heartbeat.Health` does), every process adds to them, and each heartbeat
writes the totals on the instance's row, where the supervisor's ``/metrics`` reads them. A
supervisor on another host needs no channel to the workers but the ledger it already reads.
"""

from __future__ import annotations

import multiprocessing.sharedctypes
from collections import Counter
from collections.abc import Iterable
from typing import Any


class SharedCounters:
    """Counters of the ``names`` given, shared across fork; any other name counts in this
    process only (and still reaches the snapshot of the process that reads it)."""

    def __init__(self, names: Iterable[str]) -> None:
        self._index = {name: i for i, name in enumerate(dict.fromkeys(names))}
        self._values: Any = multiprocessing.sharedctypes.RawArray("q", len(self._index))
        self._local: Counter[str] = Counter()

    def add(self, name: str, amount: int = 1) -> None:
        index = self._index.get(name)
        if index is None:
            self._local[name] += amount
            return
        self._values[index] += amount

    def __getitem__(self, name: str) -> int:
        index = self._index.get(name)
        return self._local[name] if index is None else int(self._values[index])

    def snapshot(self) -> dict[str, int]:
        """Every counter that is not zero."""
        shared = {name: int(self._values[i]) for name, i in self._index.items()}
        found = {**shared, **self._local}
        return {name: count for name, count in found.items() if count}
