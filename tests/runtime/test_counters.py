"""Counters a worker's pool processes add to, read by its main process (real fork)."""

from __future__ import annotations

import os

from jobledger.counters import SharedCounters


def test_counts_made_in_forked_children_reach_the_parent() -> None:
    counters = SharedCounters(["skipped"])
    for _ in range(3):  # one after the other: counts are exact unless two add at one instant
        pid = os.fork()
        if pid == 0:  # a pool process
            for _ in range(100):
                counters.add("skipped")
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
    counters.add("undeclared")  # counted in this process only
    assert counters["skipped"] == 300
    assert counters.snapshot() == {"skipped": 300, "undeclared": 1}
    assert counters["never"] == 0
