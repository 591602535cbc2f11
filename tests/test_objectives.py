"""The stage objectives on packed rows against the plain computation with transformers (DESIGN.md, "The method"):
full logits per candidate, a separate reference model, the losses written out."""

import random

import pytest
import torch
import transformers

from tsarank_kernels.ranking_head import LossSettings
from tsarank_engine.training.objectives import cpt_loss, sft_losses, train_top_blocks
from tsarank_engine.data.packing import Packer
from tsarank_engine.data.sequences import CandidateGroup, TokenSequence
from tsarank_engine.model.loading import load_model

from conftest import save_tiny_model, tiny_config

TAU, W_GEN, W_DP, T_KD = 0.001, 0.7, 1.3, 0.5


def random_groups(sizes, seed=0, vocab=400, teacher=False):
    """Groups of random candidates (one positive each); with teacher, a random teacher score on each."""
    rng = random.Random(seed)
    groups = []
    for q, size in enumerate(sizes):
        cands = []
        for _ in range(size):
            n = rng.randrange(6, 14)
            cands.append(TokenSequence(tuple(rng.randrange(vocab) for _ in range(n)), rng.randrange(2, n - 1)))
        scores = tuple(rng.uniform(-6, 0) for _ in cands) if teacher else None
        groups.append(CandidateGroup(str(q), tuple(cands), teacher=scores))
    return groups


def in_row_order(groups, row):
    """The groups in the order the packer laid them in the row (it places the largest first)."""
    firsts = row.cu_seqlens[row.group.group_offsets[:-1]].tolist()
    ends = row.cu_seqlens[row.group.group_offsets[:-1] + 1].tolist()
    return [next(g for g in groups if g.candidates[0].input_ids == tuple(row.input_ids[a:b].tolist()))
            for a, b in zip(firsts, ends)]


def plain_stage2(hf, hf_ref, groups):
    """L_rank, L_gen, L_dp and L_kd (0 without teacher scores) the plain way: each candidate alone through
    transformers, full log-softmax."""
    ranks, kds, gen, kl_sum, kl_count = [], [], [], 0.0, 0
    for group in groups:
        scores = []
        for i, cand in enumerate(group.candidates):
            ids = torch.tensor([cand.input_ids])
            logprobs = torch.log_softmax(hf(input_ids=ids).logits[0].float(), -1)
            with torch.no_grad():
                ref = torch.log_softmax(hf_ref(input_ids=ids).logits[0].float(), -1)
            picked = logprobs[:-1].gather(1, ids[0, 1:, None]).squeeze(1)  # position j predicts token j + 1
            scores.append(picked[cand.target_start - 1:].mean())  # the query tokens
            if i == 0:
                gen.append(picked)  # the positive, every position with a next token
            kl_sum = kl_sum + (ref.exp() * (ref - logprobs)).sum()  # every real position
            kl_count += len(cand)
        log_model = torch.log_softmax(torch.exp(torch.stack(scores)) / TAU, 0)
        ranks.append(-log_model[0])
        if group.teacher is not None:
            teacher = torch.softmax(torch.tensor(group.teacher) / T_KD, 0)
            kds.append(torch.nn.functional.kl_div(log_model, teacher, reduction="sum"))
    l_kd = torch.stack(kds).mean() if kds else torch.zeros(())
    return torch.stack(ranks).mean(), -torch.cat(gen).mean(), kl_sum / kl_count, l_kd


@pytest.fixture(scope="module")
def qwen2_pair(tmp_path_factory):
    model_dir, ref_dir = tmp_path_factory.mktemp("qwen2_model"), tmp_path_factory.mktemp("qwen2_ref")
    config = tiny_config("qwen2", num_hidden_layers=3)
    save_tiny_model(config, model_dir, seed=0)
    save_tiny_model(config, ref_dir, seed=1)  # the "stage-1" reference differs from the model
    return model_dir, ref_dir


@pytest.mark.parametrize("impl", ["torch", "triton"])  # Triton runs in the interpreter without a GPU
@pytest.mark.parametrize("w_kd", [0.0, 0.8], ids=["paper", "distilled"])
def test_stage2_loss_and_gradients_equal_the_plain_computation(qwen2_pair, impl, w_kd):
    model_dir, ref_dir = qwen2_pair
    groups = random_groups([4, 3, 5], teacher=w_kd > 0)
    row = Packer(4096).pack_groups(groups)
    assert len(row) == 1
    row = row[0]

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    hf.requires_grad_(False)
    hf.model.layers[-1].requires_grad_(True)
    order = in_row_order(groups, row)
    l_rank, l_gen, l_dp, l_kd = plain_stage2(hf, hf_ref, order)
    (l_rank + W_GEN * l_gen + W_DP * l_dp + w_kd * l_kd).backward()

    model, reference = load_model(model_dir), load_model(ref_dir)
    trainable = train_top_blocks(model, 1)
    reference.requires_grad_(False)
    out = sft_losses(model, reference, row, LossSettings(TAU, W_GEN, W_DP, w_kd, T_KD), impl=impl)
    out.loss.backward()
    assert (row.group.teacher is not None) == (w_kd > 0) and (l_kd.item() > 0) == (w_kd > 0)
    for got, want in ((out.l_rank, l_rank), (out.l_gen, l_gen), (out.l_dp, l_dp), (out.l_kd, l_kd)):
        got, want = got.item(), want.item()
        assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (got, want)
    hf_params = dict(hf.named_parameters())
    assert trainable and all(name.startswith("model.layers.2.") for name in trainable)
    for name, p in model.named_parameters():
        if name in trainable:
            want = hf_params[name].grad
            assert ((p.grad - want).abs().max() / want.abs().max()) < 1e-4, name
        else:
            assert p.grad is None


def test_stage1_loss_equals_transformers_on_the_response(qwen2_pair):
    model_dir, _ = qwen2_pair
    rng = random.Random(3)
    seqs = [TokenSequence(tuple(rng.randrange(400) for _ in range(n)), start)
            for n, start in ((9, 4), (15, 10), (6, 5))]
    row = Packer(64).pack_sequences(seqs)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    losses = []
    for s in seqs:
        ids = torch.tensor([s.input_ids])
        labels = ids.clone()
        labels[0, : s.target_start] = -100  # the source is not learned
        logits = hf(input_ids=ids).logits[0, :-1].float()
        losses.append(torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="none")[labels[0, 1:] >= 0])
    want = torch.cat(losses).mean()
    got = cpt_loss(load_model(model_dir), row)
    assert abs(got.item() - want.item()) < 1e-5


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_shared_frozen_trunk_gives_the_same_losses_and_gradients(qwen2_pair, impl):
    from tsarank_engine.training.objectives import sharing_with_reference

    model_dir, _ = qwen2_pair
    row = Packer(4096).pack_groups(random_groups([4, 3], seed=5))[0]
    model, reference = load_model(model_dir), load_model(model_dir)  # stage 2 starts from the reference
    train_top_blocks(model, 1)
    reference.requires_grad_(False)
    with torch.no_grad():  # as if the model's top block had trained a while
        for p in model.model.layers[-1].parameters():
            p.add_(0.01 * torch.randn_like(p))
    mine, theirs = dict(model.named_parameters()), dict(reference.named_parameters())

    def equal(names):
        return all(torch.equal(mine[n], theirs[n]) for n in names)

    shared, share_head = sharing_with_reference(model, equal)
    assert (shared, share_head) == (2, True)  # the two frozen bottom blocks, equal in both
    results = []
    for layers in (0, shared):
        model.zero_grad()
        out = sft_losses(model, reference, row, LossSettings(w_gen=W_GEN, w_dp=W_DP), impl=impl, shared_layers=layers)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.model.layers[-1].parameters()]
        results.append([out.loss.detach(), out.l_dp.detach(), *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    train_top_blocks(model, 2)
    assert sharing_with_reference(model, equal) == (1, True)  # a trainable block cannot be shared
    with torch.no_grad():
        reference.model.layers[0].mlp.down_proj.weight[3, 1] += 1
    assert sharing_with_reference(model, equal) == (0, True)  # nor a block the two hold differently


@pytest.mark.slow
def test_stage2_on_smollm2_equals_the_plain_computation(smollm2_dir):
    """Real weights: the model is SmolLM2 with its top block moved a little (as after some training), the
    reference SmolLM2 itself."""
    groups = random_groups([3, 4], seed=7, vocab=49152)
    row = Packer(4096).pack_groups(groups)[0]
    order = in_row_order(groups, row)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model, reference = load_model(smollm2_dir), load_model(smollm2_dir)
    top = f"model.layers.{len(model.model.layers) - 1}."
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf_params = dict(hf.named_parameters())
        for name, p in model.named_parameters():
            if name.startswith(top):
                noise = 0.02 * torch.randn(p.shape, generator=g) * p.abs().mean()
                p.add_(noise)
                hf_params[name].add_(noise)
    hf.requires_grad_(False)
    hf.model.layers[-1].requires_grad_(True)
    l_rank, l_gen, l_dp, _ = plain_stage2(hf, hf_ref, order)
    (l_rank + W_GEN * l_gen + W_DP * l_dp).backward()
    trainable = train_top_blocks(model, 1)
    reference.requires_grad_(False)
    out = sft_losses(model, reference, row, LossSettings(tau=TAU, w_gen=W_GEN, w_dp=W_DP))
    out.loss.backward()
    for got, want in ((out.l_rank, l_rank), (out.l_gen, l_gen), (out.l_dp, l_dp)):
        got, want = got.item(), want.item()
        assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (got, want)
    # tau = 0.001 scales the rank loss's gradient by up to 1/tau: fp32 summation order alone (packed row vs one
    # candidate at a time, 30 blocks deep) moves it by ~1e-4 of its largest entry
    for name, p in model.named_parameters():
        if name in trainable:
            want = hf_params[name].grad
            assert ((p.grad - want).abs().max() / want.abs().max()) < 1e-3, name
