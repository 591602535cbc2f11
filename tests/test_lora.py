"""LoRA ([lora]): the adapters start from the base model exactly, their gradients equal a plain computation
(A and B as explicit matrices on a transformers model), the base model is the stage-2 reference without a
second copy, runs shard, checkpoint and resume as full training does, and the export is a merged model plus
the adapter in PEFT's layout that `peft` loads."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tsarank_kernels.ranking_head import LossSettings
from tsarank_engine.model.lora import add_adapters, adapters, adapters_off, init_adapters
from tsarank_engine.training.objectives import TrainingObjective, trained_blocks
from tsarank_engine.data.packing import Packer
from tsarank_engine.recipe import LoraSettings, load_recipe
from tsarank_engine.model.loading import load_model

from conftest import save_tiny_model, tiny_config
from test_objectives import random_groups
from test_paper_options import TAU, W_DP, W_GEN, engine_step, plain_stage2_loss, qwen2_pair  # noqa: F401
from test_trainer import CPT, SFT, assert_same_run, metrics, recipe, run_cli

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = "\n[lora]\nrank = 4\nalpha = 8.0\ndropout = {dropout}\n"
SFT_LORA = SFT + LORA.format(dropout=0.0)


def hidden(model, ids):
    return model(ids, cu_seqlens=torch.tensor([0, 7, ids.numel()]))


def test_zero_b_starts_from_the_base_model_exactly(tiny_llama_dir):
    base, model = load_model(tiny_llama_dir), load_model(tiny_llama_dir)
    names = add_adapters(model, LoraSettings(rank=3, dropout=0.5), trained_blocks(model, None))
    init_adapters(model, seed=0, device="cpu")
    assert len(names) == 2 * len(PROJECTIONS) * len(model.model.layers)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names  # only the adapters train
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in names)
    ids = torch.randint(0, model.config.vocab_size, (19,))
    assert torch.equal(hidden(model, ids), hidden(base, ids))  # dropout on, B = 0: the same numbers
    for _, m in adapters(model):  # A drawn as PEFT draws it, within 1 / sqrt(in)
        assert m.lora_A.abs().max() <= m.in_features**-0.5 and m.lora_A.std() > 0 and not m.lora_B.any()
    for _, m in adapters(model):
        m.lora_B.data.normal_()
    assert not torch.equal(hidden(model, ids), hidden(base, ids))
    with adapters_off(model):
        assert torch.equal(hidden(model, ids), hidden(base, ids))


def test_refuses_bad_settings(tmp_path, tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    with pytest.raises(Exception, match="trainable_top_blocks must be between 1 and the 2"):
        trained_blocks(model, 3)
    path = tmp_path / "r.toml"
    path.write_text(SFT.format(out=tmp_path, model=tiny_llama_dir, data=tmp_path) + '[lora]\ntargets = ["q", "qq"]\n')
    with pytest.raises(Exception, match="r.toml: lora.targets: unknown name 'qq'"):
        load_recipe(path)
    path.write_text(SFT.format(out=tmp_path, model=tiny_llama_dir, data=tmp_path) + '[lora]\nrank = 8\n')
    with pytest.raises(Exception, match="lora.targets names 'q' twice"):
        load_recipe(path, ['lora.targets=["q", "q"]'])
    assert load_recipe(path, ['lora.targets=["v", "down"]']).lora.targets == ["v", "down"]


def lora_hooks(hf, adapted, scale):
    """Forward hooks adding scale * x A^T B^T to the output of each projection in `adapted` (name -> (A, B))."""
    handles = []
    for name, (a, b) in adapted.items():
        module = hf.get_submodule(name)
        handles.append(module.register_forward_hook(
            lambda mod, args, out, a=a, b=b: out + scale * (args[0] @ a.t() @ b.t())))
    return handles


def test_adapter_gradients_equal_a_plain_computation(qwen2_pair):
    """Stage 2 with adapters on the top block: the base (adapters off) is the reference; loss and the gradients
    of every A and B against transformers with the same A, B as explicit matrices (B random, so that both get a
    gradient), fp32."""
    model_dir, _ = qwen2_pair
    settings = LoraSettings(rank=3, alpha=5.0, dropout=0.0)
    model = load_model(model_dir)
    top = len(model.model.layers) - 1
    add_adapters(model, settings, [top])
    init_adapters(model, seed=1, device="cpu")
    generator = torch.Generator().manual_seed(2)
    for _, m in adapters(model):
        m.lora_B.data = 0.05 * torch.randn(m.lora_B.shape, generator=generator)
    adapted = {name: (m.lora_A.detach().clone().requires_grad_(), m.lora_B.detach().clone().requires_grad_())
               for name, m in adapters(model)}
    assert len(adapted) == len(PROJECTIONS)

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora_hooks(hf, adapted, settings.alpha / settings.rank)
    groups = random_groups([3, 5, 4], seed=5)
    want = plain_stage2_loss(hf, hf_ref, groups, "tokens", True)
    want.backward()

    rows = Packer(70).pack_groups(groups)
    assert len(rows) > 1
    objective = TrainingObjective(model, "sft", model, LossSettings(TAU, W_GEN, W_DP), shared_layers=top,
                                  share_head=True)
    got = engine_step(objective, rows, "sft")
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item())), (got.item(), want.item())
    for name, m in adapters(model):
        a, b = adapted[name]
        torch.testing.assert_close(m.lora_A.grad, a.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.lora_B.grad, b.grad, rtol=1e-5, atol=1e-6)
        assert m.lora_A.grad.abs().max() > 1e-4 and m.lora_B.grad.abs().max() > 1e-4
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def checkpoint_keys(step_dir):
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied head; tied head and q, k, v biases
def test_lora_stage2_run_exports_a_merged_model_and_a_peft_adapter(tmp_path, bpe_tokenizer_dir, family):
    """A LoRA stage-2 run: the base model is the reference (L_dp is 0 at the first step, before any update), the
    checkpoints hold only the adapters and their optimizer state, final/ is the merged model (transformers
    loads it; its logits equal the unmerged model's) and final/adapter/ the adapter that peft loads onto the
    base with the same logits."""
    import peft

    base_dir = tmp_path / family
    save_tiny_model(tiny_config(family), base_dir, bpe_tokenizer_dir)
    path = recipe(tmp_path, SFT_LORA, base_dir, "lora")
    run_cli("train", str(path), "--device", "cpu")
    out = tmp_path / "lora"
    records = metrics(out)
    assert records[0]["l_dp"] == 0.0 and records[-1]["l_dp"] > 0
    keys = checkpoint_keys(out / "checkpoints" / "step-4")
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all(".lora_" in k for k in model_keys), sorted(model_keys)[:5]
    assert all(".lora_" in k for k in keys if k.startswith("optim.state."))
    assert len(model_keys) == 2 * len(PROJECTIONS)  # the top block only (trainable_top_blocks = 1)

    final = out / "final"
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["layers_to_transform"] == [1]
    assert config["base_model_name_or_path"] == str(base_dir)
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    unmerged = load_model(base_dir)
    add_adapters(unmerged, LoraSettings(rank=4, alpha=8.0), [1])
    unmerged.eval()  # no dropout
    for name, m in adapters(unmerged):
        m.lora_A.data = adapter[f"base_model.model.{name}.lora_A.weight"]
        m.lora_B.data = adapter[f"base_model.model.{name}.lora_B.weight"]
    assert any(m.lora_B.abs().max() > 0 for _, m in adapters(unmerged))  # it trained

    ids = torch.randint(0, unmerged.config.vocab_size, (2, 11))
    with torch.no_grad():
        want = unmerged.logits(unmerged(ids))
        merged = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, final / "adapter")
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("template", [CPT + LORA.format(dropout=0.0), SFT_LORA], ids=["cpt", "sft"])
def test_lora_two_processes_with_checkpointing_equal_one(tmp_path, tiny_llama_dir, template):
    """FSDP2 over 2 gloo processes with activation checkpointing trains the adapters as one process does."""
    one, two = recipe(tmp_path, template, tiny_llama_dir, "one"), recipe(tmp_path, template, tiny_llama_dir, "two")
    run_cli("train", str(one), "--device", "cpu")
    run_cli("train", str(two), "--device", "cpu", "--set", "train.activation_checkpointing=true", nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two", ("l_rank", "l_gen", "l_dp") if template is SFT_LORA else ())


@pytest.mark.slow
def test_lora_resume_is_bit_identical_with_dropout(tmp_path, tiny_llama_dir):
    """Killed during step 3 and resumed from step 2's adapters-only checkpoint: the same metrics and the same
    merged model as the straight run (dropout on: the RNG state comes back too)."""
    template = SFT + LORA.format(dropout=0.1)
    straight, killed = recipe(tmp_path, template, tiny_llama_dir, "straight"), recipe(tmp_path, template,
                                                                                      tiny_llama_dir, "killed")
    run_cli("train", str(straight), "--device", "cpu")
    proc = run_cli("train", str(killed), "--device", "cpu", env={"TSARANK_KILL_AT": "step:3"}, check=False)
    assert proc.returncode != 0
    run_cli("train", str(killed), "--device", "cpu", "--resume")
    drop = ("step_time_s", "peak_mem_mb")
    assert [{k: v for k, v in m.items() if k not in drop} for m in metrics(tmp_path / "killed")] == \
        [{k: v for k, v in m.items() if k not in drop} for m in metrics(tmp_path / "straight")]
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(tmp_path / run / "final" / "adapter" / "adapter_model.safetensors") for run in ("straight", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lora_checkpoint_refuses_a_base_model_whose_weights_changed(tmp_path, tiny_llama_dir):
    """The checkpoint records its base model's fingerprint: export and --resume refuse the base folder once it
    holds other weights (one element changed), and export works again when the weights are back."""
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    path = recipe(tmp_path, SFT_LORA, base, "lora")
    run_cli("train", str(path), "--device", "cpu")
    checkpoint = tmp_path / "lora" / "checkpoints" / "step-4"
    original = load_file(base / "model.safetensors")
    changed = {k: v.clone() for k, v in original.items()}
    changed["model.layers.0.mlp.up_proj.weight"][3, 2] += 1
    save_file(changed, base / "model.safetensors", metadata={"format": "pt"})

    proc = run_cli("export", str(checkpoint), str(tmp_path / "exported"), check=False)
    assert proc.returncode == 1 and f"base model {base}" in proc.stderr and "other weights" in proc.stderr, proc.stderr
    assert not (tmp_path / "exported").exists()
    proc = run_cli("train", str(path), "--device", "cpu", "--resume", check=False)
    assert proc.returncode == 1 and f"other base weights than {base}" in proc.stderr, proc.stderr

    save_file(original, base / "model.safetensors", metadata={"format": "pt"})
    run_cli("export", str(checkpoint), str(tmp_path / "exported"))
    exported, final = (load_file(tmp_path / d / "model.safetensors") for d in ("exported", "lora/final"))
    assert all(torch.equal(exported[k], final[k]) for k in final)


@pytest.mark.slow
def test_lora_in_bfloat16_keeps_the_base_in_bfloat16_and_the_adapters_in_float32(tmp_path, tiny_llama_dir):
    path = recipe(tmp_path, SFT_LORA, tiny_llama_dir, "bf16")
    script = tmp_path / "build.py"
    script.write_text(f"""
import torch
from tsarank_engine.distributed import start_processes, stop_processes
from tsarank_engine.recipe import load_recipe
from tsarank_engine.training.build import build_objective, make_optimizer
processes = start_processes("cpu")
recipe = load_recipe({str(path)!r}, ["model.dtype=bfloat16"])
objective, shared = build_objective(recipe, processes, torch.bfloat16)
assert objective._reference[0] is objective.lm and shared == 1, shared  # the base is the reference
dtypes = {{(".lora_" in n, p.dtype, p.requires_grad) for n, p in objective.lm.named_parameters()}}
assert dtypes == {{(True, torch.float32, True), (False, torch.bfloat16, False)}}, dtypes
optimized = {{id(p) for g in make_optimizer(objective, recipe).param_groups for p in g["params"]}}
assert optimized == {{id(p) for n, p in objective.lm.named_parameters() if ".lora_" in n}}
stop_processes()
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # and it trains: FSDP2's mixed precision over a block of bf16 base weights and fp32 adapters
    fp32 = recipe(tmp_path, SFT_LORA, tiny_llama_dir, "fp32")
    run_cli("train", str(fp32), "--device", "cpu")
    run_cli("train", str(path), "--device", "cpu", "--set", "model.dtype=bfloat16")
    for a, b in zip(metrics(tmp_path / "fp32"), metrics(tmp_path / "bf16"), strict=True):
        assert not b["skipped"] and b["loss"] == pytest.approx(a["loss"], rel=2e-2), (a, b)
    assert metrics(tmp_path / "bf16")[-1]["l_dp"] > 0


@pytest.mark.slow
def test_lora_keep_best_exports_the_best_steps_merged_model_and_adapter(tmp_path, tiny_llama_dir):
    """With [eval] keep_best, best/ is the best step's model as `export` writes that step's checkpoint: merged,
    with its adapter beside."""
    from test_train_eval import EVAL, LEARNING, best_record, dev_set, evals, invoke

    dev_set(tmp_path / "dev")
    path = recipe(tmp_path, SFT_LORA + EVAL, tiny_llama_dir, "run")
    run_cli("train", str(path), "--device", "cpu", *LEARNING, "--set", "checkpoint.every_steps=1",
            "--set", "checkpoint.keep_last=4", "--set", "eval.every_steps=1", "--set", "eval.keep_best=true")
    out = tmp_path / "run"
    value = evals(out)
    best = max(value, key=lambda s: (value[s], -s))
    assert best_record(out)["step"] == best
    invoke("export", out / "checkpoints" / f"step-{best}", tmp_path / "exported")
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        exported, kept = load_file(tmp_path / "exported" / name), load_file(out / "best" / name)
        assert exported.keys() == kept.keys()
        for k in kept:
            torch.testing.assert_close(kept[k], exported[k], rtol=0, atol=1e-6)
