"""Fault injection for the kill-and-resume tests: TSARANK_KILL_AT="<point>:<step>" makes the process SIGKILL
itself when it reaches that point of that step (points: "step", the start of a step; "save", a checkpoint
written but not yet renamed into place). A real hard kill, at a moment a test can name."""

from __future__ import annotations

import os
import signal


def kill_point(point: str, step: int) -> None:
    if os.environ.get("TSARANK_KILL_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
