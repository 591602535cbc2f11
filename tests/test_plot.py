"""`tsarank-engine plot`: a run's curves drawn from its metrics.jsonl, each series in the image."""

import json

import matplotlib.image
import pytest
from click.testing import CliRunner

from tsarank_engine.cli import main
from tsarank_engine.plotting import plot_run


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def stage2_records():
    records = []
    for step in range(1, 9):
        r = {"step": step, "lr": 1e-4 * step / 8, "loss": 3.0 - 0.2 * step, "l_rank": 1.0 - 0.05 * step,
             "l_gen": 1.5, "l_dp": 0.01 * step, "tokens": 3000, "step_time_s": 10.0 + step, "skipped": step == 3}
        if step % 4 == 0:
            r["eval_nDCG@10"] = 0.3 + 0.05 * step
        records.append(r)
    records[2]["loss"] = float("nan")  # the skipped step
    return records


def test_plot_draws_every_series_into_a_png(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, stage2_records())
    result = CliRunner().invoke(main, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert "loss, l_rank, l_gen, l_dp, lr, tokens_per_s, eval_nDCG@10" in result.output
    image = matplotlib.image.imread(run / "curves.png")
    assert image.shape[0] > 4 * 250  # four panels (losses, lr, tokens/s, the eval metric), one above another
    assert (image[..., :3] < 0.5).any() and (image[..., :3] > 0.9).any()  # drawn on a white background


def test_stage1_runs_have_no_stage2_losses_and_errors_are_named(tmp_path):
    run = tmp_path / "cpt"
    write_metrics(run, [{"step": s, "lr": 1e-4, "loss": 2.0 / s, "tokens": 100, "step_time_s": 1.0, "skipped": False}
                        for s in (2, 1)])
    assert plot_run(run, tmp_path / "c.svg") == ["loss", "lr", "tokens_per_s"]
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    missing = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert missing.exit_code == 1 and "no metrics" in missing.output
    (run / "metrics.jsonl").write_text('{"step": 1}\n{bad\n')
    bad = CliRunner().invoke(main, ["plot", str(run)])
    assert bad.exit_code == 1 and "metrics.jsonl:2: malformed JSON" in bad.output
