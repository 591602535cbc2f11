"""Training curves of a run, drawn from its metrics.jsonl with matplotlib (the `plot` extra).

One panel per kind of figure against the step: the losses (loss, and L_rank, L_gen, L_dp, L_kd in stage 2), the
learning rate, throughput (tokens/s) and every eval_* metric the run logged. Skipped steps (a non-finite loss)
are left out of the loss panel rather than drawn as gaps of NaN.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TsarankError
from .training.run_log import METRICS_FILE

LOSSES = ("loss", "l_rank", "l_gen", "l_dp", "l_kd")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in step order; errors name the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise TsarankError(f"{path}: no metrics (is {run_dir} a training run's output_dir?)")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TsarankError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    if not records:
        raise TsarankError(f"{path}: no steps recorded yet")
    return sorted(records, key=lambda r: r["step"])


def plot_run(run_dir: str | Path, out: str | Path) -> list[str]:
    """Draw the run's curves into the image `out` (PNG, SVG or PDF by its suffix); returns the series drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise TsarankError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    records = read_metrics(run_dir)
    evals = sorted({k for r in records for k in r if k.startswith("eval_")})
    panels = [("loss", [k for k in LOSSES if any(k in r for r in records)]), ("learning rate", ["lr"]),
              ("tokens/s", ["tokens_per_s"])] + [(name, [name]) for name in evals]
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    drawn = []
    for ax, (title, series) in zip(axes[:, 0], panels):
        for name in series:
            points = [(r["step"], _value(r, name)) for r in records if _value(r, name) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
                drawn.append(name)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    figure.suptitle(str(Path(run_dir).resolve().name))
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return drawn


def _value(record: dict, name: str) -> float | None:
    """A record's value for a series: tokens/s is derived; skipped steps have no loss to draw."""
    if name == "tokens_per_s":
        return record["tokens"] / record["step_time_s"] if record.get("step_time_s") else None
    if name in LOSSES and record.get("skipped"):
        return None
    return record.get(name)
