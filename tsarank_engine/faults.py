"""Fault injection for the reliability tests, each at a moment a test can name:

- TSARANK_KILL_AT="<point>:<step>": the process SIGKILLs itself at that point of that step (points: "step",
  the start of a step; "save", a checkpoint written but not yet renamed into place). A real hard kill.
- TSARANK_NAN_STEPS="<first>-<last>" (or one step): those steps' loss is multiplied by NaN, as a diverging
  run's would be, so that the non-finite step handling is exercised end to end.
"""

from __future__ import annotations

import os
import signal


def kill_point(point: str, step: int) -> None:
    if os.environ.get("TSARANK_KILL_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def poisoned(step: int) -> bool:
    """Whether step `step` (1-based) is one TSARANK_NAN_STEPS names."""
    spec = os.environ.get("TSARANK_NAN_STEPS")
    if not spec:
        return False
    first, _, last = spec.partition("-")
    return int(first) <= step <= int(last or first)
