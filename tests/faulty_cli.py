"""The tsarank-engine CLI with faults injected from outside the library, for the reliability tests:

    python tests/faulty_cli.py ARGS...   (or as torchrun's script)

- TSARANK_KILL_AT="step:N": the process SIGKILLs itself at the start of step N (1-based, counted by the
  scheduler, so a resumed run counts on from its checkpoint); "save:N": once step N's checkpoint is written and
  synced but not yet renamed into place. Real hard kills.
- TSARANK_KILL_AT="rewrite:NAME": the process SIGKILLs itself in the middle of the trainer's rewrite of the run's
  file NAME (metrics.jsonl when a resumed run trims it): once the first line of the new content is on disk.
- TSARANK_NAN_STEPS="FIRST-LAST" (or one step): those steps' loss is multiplied by NaN, as a diverging run's
  would be, so that the non-finite step handling is exercised end to end.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from pathlib import Path

from tsarank_engine import cli
from tsarank_engine.training import checkpoints, run_log, trainer


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _steps(spec: str) -> range:
    first, _, last = spec.partition("-")
    return range(int(first), int(last or first) + 1)


def install(kill_at: str, nan_steps: str) -> None:
    point, _, at = kill_at.partition(":")
    poisoned = _steps(nan_steps) if nan_steps else range(0)
    schedulers = []
    make_scheduler, train_step, sync_dir = trainer.cosine_scheduler, trainer.train_step, checkpoints._sync_dir

    def cosine_scheduler(*args, **kwargs):
        schedulers.append(make_scheduler(*args, **kwargs))
        return schedulers[-1]

    def faulty_train_step(objective, *args, **kwargs):
        step = schedulers[-1].last_epoch + 1  # the scheduler has stepped once per step done, resumed ones too
        if point == "step" and int(at) == step:
            _kill()
        if step not in poisoned:
            return train_step(objective, *args, **kwargs)
        handle = objective.register_forward_hook(lambda module, inputs, out: (out[0] * math.nan, out[1]))
        try:
            return train_step(objective, *args, **kwargs)
        finally:
            handle.remove()

    def faulty_sync_dir(path: Path) -> None:
        sync_dir(path)
        if point == "save" and Path(path).name == f".step-{at}.partial":
            _kill()

    atomic_write = run_log.atomic_write

    @contextlib.contextmanager
    def faulty_atomic_write(path):
        with atomic_write(path) as f:
            if point == "rewrite" and Path(path).name == at:
                yield _KilledAfterFirstLine(f)
            else:
                yield f

    trainer.cosine_scheduler, trainer.train_step, checkpoints._sync_dir, run_log.atomic_write = \
        cosine_scheduler, faulty_train_step, faulty_sync_dir, faulty_atomic_write


class _KilledAfterFirstLine:
    """A text file whose writer is killed once a first line of what it writes has reached the disk."""

    def __init__(self, f):
        self.f = f

    def write(self, text: str) -> None:
        self.f.write(text)
        if "\n" in text:
            self.f.flush()
            os.fsync(self.f.fileno())
            _kill()

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)


if __name__ == "__main__":
    install(os.environ.get("TSARANK_KILL_AT", ""), os.environ.get("TSARANK_NAN_STEPS", ""))
    cli.run()
