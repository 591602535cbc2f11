"""Faults during training on a tiny LLaMA: SIGKILLs at random moments then --resume, non-finite steps, and a
checkpoint write that fails for lack of space. Each run goes through the CLI in a subprocess."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from tsarank_engine.training.checkpoints import complete_checkpoints, export_checkpoint

from test_trainer import CPT, metrics, recipe, run_cli, weights

pytestmark = pytest.mark.slow

# Six steps, a checkpoint after each (all kept): many moments at which a kill lands in a step or a save.
EVERY_STEP = CPT.replace("max_steps = 4", "max_steps = 6").replace("every_steps = 2", "every_steps = 1") \
    .replace("keep_last = 2", "keep_last = 10")


def checkpoint_weights(ckpt, tmp_path):
    out = tmp_path / "exported" / f"{ckpt.parent.parent.name}-{ckpt.name}"
    if not out.exists():
        export_checkpoint(ckpt, out)
    return weights(out)


def test_random_sigkills_then_resume_end_bit_identical(tmp_path, tiny_llama_dir):
    straight = recipe(tmp_path, EVERY_STEP, tiny_llama_dir, "straight")
    run_cli("train", str(straight), "--device", "cpu")
    expected = {c.name: c for c in complete_checkpoints(tmp_path / "straight")}
    assert sorted(expected) == [f"step-{i}" for i in range(1, 7)]
    saved = [(expected[f"step-{i}"] / "trainer_state.json").stat().st_mtime for i in range(1, 7)]
    per_step = (saved[-1] - saved[0]) / 5

    # Each kill follows the resumed run's own progress rather than a clock: its start-up varies between runs by
    # more than the few steps of this tiny model take (the first run of a session starts a second slower), so
    # timed kills often found the run finished. The moment: once the run has logged a random number of the
    # steps left (none to all but the last), a random fraction of a step later.
    killed = recipe(tmp_path, EVERY_STEP, tiny_llama_dir, "killed")
    metrics_file = tmp_path / "killed" / "metrics.jsonl"
    rng = random.Random(0)
    landed = 0
    for _ in range(5):  # five kills in a row, each at a random moment of a resumed run
        done = len(complete_checkpoints(tmp_path / "killed"))
        logged_before_kill = done + rng.randrange(6 - done)
        proc = subprocess.Popen([sys.executable, "-m", "tsarank_engine.cli", "train", str(killed), "--device", "cpu",
                                 "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            lines = metrics_file.read_text().count("\n") if metrics_file.is_file() else 0
            if lines >= logged_before_kill:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 1.0) * per_step)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        landed += proc.returncode == -signal.SIGKILL
        assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
        # whatever the moment, every checkpoint that counts as complete holds exactly the straight run's state
        for ckpt in complete_checkpoints(tmp_path / "killed"):
            a, b = checkpoint_weights(ckpt, tmp_path), checkpoint_weights(expected[ckpt.name], tmp_path)
            assert all(torch.equal(a[k], b[k]) for k in b), ckpt
    assert landed >= 3  # most kills hit a running job, not one that had already finished
    run_cli("train", str(killed), "--device", "cpu", "--resume")

    m_straight, m_killed = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert [m["loss"] for m in m_killed] == [m["loss"] for m in m_straight]
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "killed" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_steps_are_not_applied_and_too_many_stop_the_run(tmp_path, tiny_llama_dir):
    once = recipe(tmp_path, EVERY_STEP, tiny_llama_dir, "once")
    proc = run_cli("train", str(once), "--device", "cpu", env={"TSARANK_NAN_STEPS": "3"})
    assert "step 3: loss or gradients not finite" in proc.stderr and "1 in a row" in proc.stderr
    assert [m["skipped"] for m in metrics(tmp_path / "once")] == [False, False, True, False, False, False]
    ckpts = {c.name: c for c in complete_checkpoints(tmp_path / "once")}
    after_2, after_3, after_4 = (checkpoint_weights(ckpts[f"step-{i}"], tmp_path) for i in (2, 3, 4))
    assert all(torch.equal(after_3[k], after_2[k]) for k in after_2)  # the skipped step changed nothing
    assert any(not torch.equal(after_4[k], after_3[k]) for k in after_3)  # the next one trained again
    assert json.loads((ckpts["step-6"] / "trainer_state.json").read_text())["skipped_steps"] == 1

    stop = recipe(tmp_path, CPT, tiny_llama_dir, "stop")
    proc = run_cli("train", str(stop), "--device", "cpu", "--set", "train.max_bad_steps=2",
                   env={"TSARANK_NAN_STEPS": "3-4"}, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "step 4: 2 steps in a row with a non-finite loss or gradient (train.max_bad_steps = 2)" in proc.stderr
    assert "step-2, is untouched" in proc.stderr
    assert [c.name for c in complete_checkpoints(tmp_path / "stop")] == ["step-2"]
    assert not (tmp_path / "stop" / "final").exists()
    assert [m["skipped"] for m in metrics(tmp_path / "stop")] == [False, False, True, True]


def _no_bigger_files_than(limit):
    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_writes


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_llama_dir):
    """A checkpoint write that runs out of room (simulated by a per-file size limit, so that the model's shard
    cannot be written) fails with a message naming the intact previous checkpoint, leaves nothing half-written,
    and the run resumes from that checkpoint to the same result as an uninterrupted one."""
    straight = recipe(tmp_path, CPT, tiny_llama_dir, "straight")
    run_cli("train", str(straight), "--device", "cpu")
    shard = max((p.stat().st_size for p in (tmp_path / "straight" / "checkpoints" / "step-2").iterdir()))

    run = recipe(tmp_path, CPT, tiny_llama_dir, "full")
    killed = run_cli("train", str(run), "--device", "cpu", env={"TSARANK_KILL_AT": "step:3"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    proc = subprocess.run([sys.executable, "-m", "tsarank_engine.cli", "train", str(run), "--device", "cpu",
                           "--resume"], capture_output=True, text=True, preexec_fn=_no_bigger_files_than(shard // 2),
                          env=dict(os.environ), timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "saving the checkpoint of step 4 failed (File too large)" in proc.stderr
    assert f"the previous checkpoint {tmp_path / 'full' / 'checkpoints' / 'step-2'} is intact" in proc.stderr
    assert [p.name for p in (tmp_path / "full" / "checkpoints").iterdir()] == ["step-2"]  # no partial left

    run_cli("train", str(run), "--device", "cpu", "--resume")
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "full" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_during_the_metrics_rewrite_leaves_a_whole_file(tmp_path, tiny_llama_dir):
    """A resumed run rewrites metrics.jsonl without the steps it redoes. Killed once a first line of the new file
    is on disk (a fault hook in tests/faulty_cli.py), the run's metrics.jsonl is the old file or the new one,
    whole; a torn last line (a kill during an append) is dropped; the next resume finishes as a straight run."""
    straight = recipe(tmp_path, CPT, tiny_llama_dir, "straight")
    run_cli("train", str(straight), "--device", "cpu")
    run = recipe(tmp_path, CPT, tiny_llama_dir, "killed")
    assert run_cli("train", str(run), "--device", "cpu", env={"TSARANK_KILL_AT": "step:4"},
                   check=False).returncode == -signal.SIGKILL
    path = tmp_path / "killed" / "metrics.jsonl"
    before = path.read_text()
    assert [m["step"] for m in metrics(tmp_path / "killed")] == [1, 2, 3]  # the checkpoint is step 2's
    path.write_text(before + '{"step": 4, "lo')  # as a kill during an append would leave it

    killed = run_cli("train", str(run), "--device", "cpu", "--resume",
                     env={"TSARANK_KILL_AT": "rewrite:metrics.jsonl"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert path.read_text() == before + '{"step": 4, "lo'  # the old file, whole: the new one was never in place
    assert list(path.parent.glob(".metrics.jsonl.*"))  # the temporary file the kill left

    run_cli("train", str(run), "--device", "cpu", "--resume")
    assert not list(path.parent.glob(".metrics.jsonl.*"))
    assert [m["loss"] for m in metrics(tmp_path / "killed")] == [m["loss"] for m in metrics(tmp_path / "straight")]
    path.write_text(path.read_text().replace("\n", "\nnot json\n", 1))
    proc = run_cli("train", str(run), "--device", "cpu", "--resume", check=False)
    assert proc.returncode == 1 and f"{path}, line 2: not a metrics record" in proc.stderr, proc.stderr[-2000:]
