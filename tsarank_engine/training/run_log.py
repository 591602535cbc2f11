"""What a run writes as it goes: metrics.jsonl (a record per step), TensorBoard events when asked, and the
progress shown: a bar on a terminal; in a log file (stderr not a terminal, where click draws nothing after the
label) a line at most every LOG_EVERY_S seconds and at the last step, with the same figures."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..errors import TsarankError
from ..files import atomic_write

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOG_EVERY_S = 30.0


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop the records of steps after the checkpoint a resumed run restarts from (they will be redone), and a
    last line a kill tore while it was appended; the file is replaced whole (a kill leaves the old or the new)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):
                break  # torn by a kill during its append: its step is redone
            raise TsarankError(f"{path}, line {number}: not a metrics record; fix or remove the line") from None
        if step <= last_step:
            kept.append(line)
    with atomic_write(path) as f:
        f.writelines(line + "\n" for line in kept)


def tensorboard_writer(out: Path, resumed_at: int) -> Any:
    """A TensorBoard writer of <out>/tensorboard; a resumed run drops the events after its checkpoint's step
    (they are redone), as it trims metrics.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TsarankError("run.tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from None
    return SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=resumed_at + 1 if resumed_at else None)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class RunLog:
    """The run's records and progress from `step` (a resumed run's) to `max_steps`; only the main process writes
    or shows anything. Use it as a context manager: the files are closed however the run ends."""

    def __init__(self, out: Path, stage: str, step: int, max_steps: int, tensorboard: bool, progress: bool,
                 is_main: bool):
        self.stage, self.max_steps, self.start_step = stage, max_steps, step
        self.file = open(out / METRICS_FILE, "a") if is_main else None
        self.events = tensorboard_writer(out, step) if tensorboard and is_main else None
        self.bar = click.progressbar(length=max_steps, label=f"training ({stage})", file=sys.stderr,
                                     hidden=not (progress and is_main), show_pos=True)
        self.bar.update(step)
        self.log_lines = progress and is_main and not sys.stderr.isatty()
        self.started, self.logged = time.perf_counter(), -LOG_EVERY_S  # the first step is logged

    def record(self, record: dict[str, Any]) -> None:
        """A step's record into metrics.jsonl and TensorBoard."""
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.events:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.events.add_scalar(name, value, record["step"])

    def show(self, record: dict[str, Any], evaluated: str) -> None:
        """A step's figures on the bar, or as a line in a log file (`evaluated`: the last evaluation's)."""
        step = record["step"]
        figures = f"loss {record['loss']:.4f} {record['tokens'] / record['step_time_s']:,.0f} tok/s{evaluated}"
        self.bar.label = f"training ({self.stage}) {figures}"
        self.bar.update(1)
        elapsed = time.perf_counter() - self.started
        if self.log_lines and (elapsed - self.logged >= LOG_EVERY_S or step == self.max_steps):
            eta = elapsed / (step - self.start_step) * (self.max_steps - step)
            click.echo(f"step {step}/{self.max_steps} {figures} eta {_clock(eta)}", err=True)
            self.logged = elapsed

    def __enter__(self) -> "RunLog":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)
        if self.file:
            self.file.close()
        if self.events:
            self.events.close()
