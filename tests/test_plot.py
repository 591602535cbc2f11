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
    distilled = [{**r, "l_kd": 0.4 - 0.01 * r["step"]} for r in stage2_records()]  # a run with sft.w_kd > 0
    write_metrics(run, distilled)
    assert plot_run(run, tmp_path / "kd.png")[:5] == ["loss", "l_rank", "l_gen", "l_dp", "l_kd"]


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


@pytest.mark.slow
def test_tensorboard_events_hold_each_step_and_a_resume_redoes_its_steps(tmp_path, tiny_llama_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_trainer import CPT, recipe, run_cli

    path = recipe(tmp_path, CPT, tiny_llama_dir, "run")
    killed = run_cli("train", str(path), "--device", "cpu", "--set", "run.tensorboard=true",
                     env={"TSARANK_KILL_AT": "step:4"}, check=False)
    assert killed.returncode != 0  # killed in step 4, after the checkpoint of step 2 and step 3's events
    run_cli("train", str(path), "--device", "cpu", "--set", "run.tensorboard=true", "--resume")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm", "tokens", "step_time_s"} <= set(events.Tags()["scalars"])
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == [1, 2, 3, 4]  # step 3, redone after the resume, once
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged, rel=1e-6)
