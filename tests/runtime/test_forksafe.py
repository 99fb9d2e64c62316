"""A child forked while another thread of its parent holds one of the runtime's locks gets it
free: the thread that held it does not exist in the child, so an inherited held lock would
make the child's first use of the runtime wait forever (an RQ work horse that never claimed
its job, under load, once in some hundred forks)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from jobledger.runtime.guard import Guard
from jobledger.runtime.resources import ProcessResources
from jobledger.testing import MemoryStore

#: How long the child may take to use the runtime before it counts as hung (seconds).
HUNG = 10


def forked_while_held(held: AbstractContextManager[Any], use: Callable[[], object]) -> int:
    """Fork while another thread holds ``held``; the child calls ``use`` and exits 0, or 2
    if it hung; the child's exit status."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with held:
            holding.set()
            done.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    pid = os.fork()
    if pid == 0:  # the child: no holder thread here
        signal.signal(signal.SIGALRM, lambda *_: os._exit(2))
        signal.alarm(HUNG)
        try:
            use()
        finally:
            os._exit(0)
    done.set()
    holder.join()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def resources() -> Iterator[ProcessResources]:
    made = ProcessResources(MemoryStore, publish_many=lambda records: None)  # type: ignore[arg-type,return-value]
    yield made
    made.close()


def test_the_store_of_a_child_forked_while_the_parent_looks_it_up(
    resources: ProcessResources,
) -> None:
    assert forked_while_held(resources._lock, lambda: resources.store) == 0


def test_the_guard_of_a_child_forked_while_the_parent_reads_its_runs() -> None:
    guard = Guard(runtime=None)  # type: ignore[arg-type]  # the runs table needs no runtime
    assert forked_while_held(guard._lock, lambda: guard.running("job-1")) == 0
