"""A failed job's traceback as a person reads it: starting at the task's own frames.

The frames a job's exception passes through before the task's code (jobledger's claim guard,
the queue's call machinery) are the same for every job and push the frame that failed out of
view; every integration formats a task's error here, so each queue trims the same way.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from types import TracebackType

#: The packages whose frames lead every job's traceback, whatever the queue.
_OWN = ("jobledger",)


def task_traceback(exc: BaseException, *, wrappers: Iterable[str] = ()) -> str:
    """The traceback of ``exc`` without its leading frames from jobledger or the ``wrappers``
    packages (the queue's own, e.g. ``celery``); whole if no other frame is left (the error
    was raised by jobledger or the queue itself, so those frames are the story)."""
    packages = (*_OWN, *wrappers)
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and _belongs(tb, packages):
        tb = tb.tb_next
    shown = tb if tb is not None else exc.__traceback__
    return "".join(traceback.format_exception(type(exc), exc, shown))


def _belongs(tb: TracebackType, packages: tuple[str, ...]) -> bool:
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return any(module == p or module.startswith(f"{p}.") for p in packages)
