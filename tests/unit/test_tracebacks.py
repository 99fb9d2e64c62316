"""A task's traceback starts at the task's frames, not at jobledger's or the queue's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobledger.tracebacks import task_traceback

_GUARD = """
def run_guarded(call, body):
    try:
        (lambda: call(body))()
    except Exception as exc:
        return exc
"""
_QUEUE = "def call(body):\n    return body()\n"


def _in_module(module: str, source: str, name: str) -> Callable[..., Any]:
    """A function whose frames belong to ``module`` (as the guard's and the queue's do)."""
    scope: dict[str, Any] = {"__name__": module}
    exec(source, scope)
    return scope[name]  # type: ignore[no-any-return]


run_guarded = _in_module("jobledger.integrations.fake", _GUARD, "run_guarded")
queue_call = _in_module("celery.app.task", _QUEUE, "call")


def charge_card() -> None:
    raise ValueError("card declined")


def frames(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("File ")]


def test_the_leading_frames_of_jobledger_and_the_queue_are_trimmed() -> None:
    exc = run_guarded(queue_call, charge_card)
    text = task_traceback(exc, wrappers=("celery",))
    shown = frames(text)
    assert len(shown) == 1 and "in charge_card" in shown[0]
    assert text.startswith("Traceback (most recent call last):")
    assert text.rstrip().endswith("ValueError: card declined")
    # without naming the queue, only jobledger's frames go
    assert "in call" in frames(task_traceback(exc))[0]


def test_an_error_raised_by_the_wrappers_themselves_keeps_every_frame() -> None:
    exc = run_guarded(queue_call, None)  # the queue's own code fails
    text = task_traceback(exc, wrappers=("celery",))
    assert any("in run_guarded" in f for f in frames(text))
    assert "TypeError" in text
