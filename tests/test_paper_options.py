"""Each place where the engine may compute otherwise than the paper's released code, both ways (DESIGN.md,
"Deviations from the paper's code"): stage-1 truncation and EOS, the stage-2 KL positions, the loss
averaging, and the check that a resumed run keeps its recipe. The losses are compared with plain
computations written here: each sequence alone through transformers, full log-softmax, the means taken as
the paper's trainer or the engine takes them."""

import logging
import math
import random
import re
from dataclasses import asdict, replace

import pytest
import torch
import transformers

from tsarank_kernels.ranking_head import LossSettings
from tsarank_engine.training.stream import recipe_stream
from tsarank_engine.errors import TsarankError
from tsarank_engine.training.objectives import TrainingObjective, row_shares, train_top_blocks
from tsarank_engine.data.packing import Packer
from tsarank_engine.data.readers import Passage, QueryGroup, TextPair
from tsarank_engine.recipe import load_recipe
from tsarank_engine.data.sequences import CptBuilder, GroupBuilder, TokenSequence, cpt_eos, group_rng, sample_candidates
from tsarank_engine.data.tokenization import Tokenizer
from tsarank_engine.training.run_dir import recipe_changes
from tsarank_engine.model.loading import load_model

from conftest import DATA_DIR, save_tiny_model, tiny_config
from test_objectives import random_groups
from test_trainer import CPT, SFT, metrics, recipe, run_cli

TAU, W_GEN, W_DP = 0.001, 0.7, 1.3
DOCUMENT = ("The Manhattan Project was a research and development undertaking during World War II that produced "
            "the first nuclear weapons, led by the United States with the support of the United Kingdom and Canada.")
QUERY = " what was the manhattan project"


# --- stage 1: truncation and EOS ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(bpe_tokenizer_dir):
    return Tokenizer.from_dir(bpe_tokenizer_dir)


def full_ids(tok, source, response, eos=True):
    return tok.encode(source + response) + ([tok.eos_id] if eos else [])


@pytest.mark.parametrize("too_long_by", [3, 200])
def test_document_truncation_keeps_the_marker_query_and_eos(tok, too_long_by):
    document = DOCUMENT * (1 + too_long_by // 20)
    pair = TextPair(f"Document: {document} Query:", QUERY)
    whole = full_ids(tok, pair.source, pair.response)
    limit = len(whole) - too_long_by
    builder = CptBuilder(tok, limit)
    seq = builder.build(pair)
    assert len(seq) <= limit and builder.documents_cut == 1 and builder.queries_cut == 0
    # query + EOS whole at the end, after a source that is the prompt around the start of the document
    assert list(seq.input_ids[seq.target_start:]) == tok.encode(QUERY, add_special_tokens=False) + [tok.eos_id]
    source = tok.decode(list(seq.input_ids[1:seq.target_start]))  # [0] is the BOS
    assert source.startswith("Document: ") and source.endswith(" Query:")
    kept = source[len("Document: "):-len(" Query:")]
    assert document.startswith(kept) and len(kept) < len(document)
    assert seq.target_start == len(tok.encode(source))
    lost = len(tok.encode(document, add_special_tokens=False)) - len(tok.encode(kept, add_special_tokens=False))
    assert too_long_by <= lost <= too_long_by + 3  # no more of the document than needed (re-tokenized edges)


def test_document_truncation_cuts_the_query_when_nothing_else_fits(tok, caplog):
    long_query = QUERY * 40
    pair = TextPair(f"Document: {DOCUMENT} Query:", long_query)
    builder = CptBuilder(tok, 50)
    with caplog.at_level(logging.WARNING, logger="tsarank_engine.data.sequences"):
        seqs = [builder.build(pair) for _ in range(3)]
    assert builder.queries_cut == 3 and len([r for r in caplog.records if "does not fit" in r.message]) == 1
    empty_source = "Document:  Query:"
    want = full_ids(tok, empty_source, long_query)[:50]
    assert all(list(s.input_ids) == want and s.target_start == len(tok.encode(empty_source)) for s in seqs)
    assert "query's end" in builder.report()


@pytest.mark.parametrize("too_long_by", [3, 200])
def test_right_truncation_is_the_papers(tok, too_long_by):
    document = DOCUMENT * (1 + too_long_by // 20)
    pair = TextPair(f"Document: {document} Query:", QUERY)
    whole = full_ids(tok, pair.source, pair.response)
    limit = len(whole) - too_long_by
    builder = CptBuilder(tok, limit, truncation="right")
    seq = builder.build(pair)
    assert list(seq.input_ids) == whole[:limit]  # the plain cut of the whole sequence
    assert seq.target_start == min(len(tok.encode(pair.source)), limit) and builder.queries_cut == 1
    if too_long_by > 20:  # the query is pushed out: nothing left to learn, as in the paper
        assert seq.target_start == len(seq)
        row = Packer(4096).pack_sequences([seq, TokenSequence((1, 2, 3, 4), 2)])[0]
        assert int(row.loss_mask.sum()) == 2  # only the other sequence's positions count


def test_short_pairs_are_untouched_in_both_modes(tok):
    pair = TextPair(f"Document: {DOCUMENT} Query:", QUERY)
    for truncation in ("document", "right"):
        seq = CptBuilder(tok, 4096, truncation).build(pair)
        assert list(seq.input_ids) == full_ids(tok, pair.source, pair.response)


def test_append_eos_key_and_the_papers_auto_rule(tok, tmp_path):
    pair = TextPair(f"Document: {DOCUMENT} Query:", QUERY)
    assert CptBuilder(tok, append_eos=False).build(pair).input_ids[-1] != tok.eos_id
    assert CptBuilder(tok, append_eos=True).build(pair).input_ids[-1] == tok.eos_id
    assert [cpt_eos(f, "auto") for f in ("llama", "mistral", "qwen2", "qwen3")] == [True, True, False, False]
    assert cpt_eos("qwen2", True) and not cpt_eos("llama", False)
    path = tmp_path / "r.toml"
    path.write_text(CPT.format(out=tmp_path / "out", model="m", data=DATA_DIR))
    assert load_recipe(path).data.append_eos == "auto"
    assert load_recipe(path, ["data.append_eos=false"]).data.append_eos is False
    with pytest.raises(TsarankError, match="data.append_eos must be one of auto, true, false, got 'yes'"):
        load_recipe(path, ["data.append_eos=yes"])
    with pytest.raises(TsarankError, match="data.append_eos must be bool or str, got int 1"):
        load_recipe(path, ["data.append_eos=1"])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_the_stream_of_a_qwen_checkpoint_has_no_eos(tmp_path, bpe_tokenizer_dir, family):
    model_dir = tmp_path / family
    save_tiny_model(tiny_config(family), model_dir, bpe_tokenizer_dir)
    path = tmp_path / "r.toml"
    path.write_text(CPT.format(out=tmp_path / "out", model=model_dir, data=DATA_DIR))
    tokenizer = Tokenizer.from_dir(model_dir)
    stream = recipe_stream(load_recipe(path), tokenizer, load_model(model_dir).config.family)
    ends = {seq.input_ids[-1] for seq in stream.next_window_units()}
    assert (ends == {tokenizer.eos_id}) == (family == "llama")


# --- stage 2: KL positions and loss averaging, against the plain computation ---------------------------------

@pytest.fixture(scope="module")
def qwen2_pair(tmp_path_factory):
    model_dir, ref_dir = tmp_path_factory.mktemp("model"), tmp_path_factory.mktemp("ref")
    config = tiny_config("qwen2", num_hidden_layers=2)
    save_tiny_model(config, model_dir, seed=0)
    save_tiny_model(config, ref_dir, seed=1)
    return model_dir, ref_dir


def plain_group_parts(hf, hf_ref, group, kl_last_position):
    """(L_rank of the group, -logp of the positives' positions, KL of each candidate's counted positions), each
    candidate alone through transformers. The paper's collator feeds input_ids[:-1]: no KL at the last
    position. Several positives: L_rank is minus the log of their summed probability."""
    scores, kls, gen = [], [], []
    for i, cand in enumerate(group.candidates):
        ids = torch.tensor([cand.input_ids])
        logprobs = torch.log_softmax(hf(input_ids=ids).logits[0].float(), -1)
        with torch.no_grad():
            ref = torch.log_softmax(hf_ref(input_ids=ids).logits[0].float(), -1)
        picked = logprobs[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
        scores.append(picked[cand.target_start - 1:].mean())
        if i < group.num_positives:
            gen.append(-picked)
        kl = (ref.exp() * (ref - logprobs)).sum(-1)
        kls.append(kl if kl_last_position else kl[:-1])
    log_probs = torch.log_softmax(torch.exp(torch.stack(scores)) / TAU, 0)
    return -torch.logsumexp(log_probs[:group.num_positives], 0), torch.cat(gen), torch.cat(kls)


def plain_stage2_loss(hf, hf_ref, groups, loss_average, kl_last_position):
    parts = [plain_group_parts(hf, hf_ref, g, kl_last_position) for g in groups]
    ranks = torch.stack([r for r, _, _ in parts])
    if loss_average == "paper":  # each group's means, then the mean over groups
        return torch.stack([r + W_GEN * g.mean() + W_DP * k.mean() for r, g, k in parts]).mean()
    return ranks.mean() + W_GEN * torch.cat([g for _, g, _ in parts]).mean() + W_DP * torch.cat([k for _, _, k in parts]).mean()


def engine_step(objective, rows, stage):
    total = 0
    for row, share in zip(rows, row_shares(rows, stage)):
        loss, _ = objective(row, share)
        loss.backward()
        total = total + loss.detach()
    return total


def assert_stage2_equals_the_plain_computation(qwen2_pair, groups, rows, loss_average, kl_last_position):
    """The engine's step over `rows` (the top block trained) against plain_stage2_loss of `groups`: loss and
    gradients. Returns the transformers model, its reference and the plain loss."""
    model_dir, ref_dir = qwen2_pair
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    hf.requires_grad_(False)
    hf.model.layers[-1].requires_grad_(True)
    want = plain_stage2_loss(hf, hf_ref, groups, loss_average, kl_last_position)
    want.backward()
    model, reference = load_model(model_dir), load_model(ref_dir)
    trainable = train_top_blocks(model, 1)
    reference.requires_grad_(False)
    got = engine_step(TrainingObjective(model, "sft", reference, LossSettings(TAU, W_GEN, W_DP)), rows, "sft")
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item())), (got.item(), want.item())
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        if name in trainable:
            torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-4, atol=1e-6)
    return hf, hf_ref, want


@pytest.mark.parametrize("loss_average", ["tokens", "paper"])
@pytest.mark.parametrize("kl_last_position", [True, False])
def test_stage2_kl_positions_and_loss_average_equal_the_plain_computation(qwen2_pair, loss_average,
                                                                          kl_last_position):
    groups = random_groups([2, 6, 3], seed=11)  # uneven groups, split over rows of 70 tokens
    rows = Packer(70, loss_average=loss_average, kl_last_position=kl_last_position).pack_groups(groups)
    assert len(rows) > 1
    hf, hf_ref, want = assert_stage2_equals_the_plain_computation(qwen2_pair, groups, rows, loss_average,
                                                                  kl_last_position)
    # the options change the value: the four combinations differ pairwise on these groups
    other = plain_stage2_loss(hf, hf_ref, groups, "tokens" if loss_average == "paper" else "paper", kl_last_position)
    assert abs(other.item() - want.item()) > 1e-3


@pytest.mark.parametrize("loss_average", ["tokens", "paper"])
def test_stage2_with_several_positives_equals_the_plain_computation(qwen2_pair, loss_average):
    """sft.positives = "all": groups holding 1, 3 and 2 positives (first), L_rank the multi-positive softmax
    cross-entropy and L_gen over every positive, packed over several rows; loss and gradients."""
    groups = [replace(g, num_positives=k) for g, k in zip(random_groups([3, 6, 4], seed=13), (1, 3, 2))]
    rows = Packer(70, loss_average=loss_average).pack_groups(groups)
    assert len(rows) > 1 and sorted(int(k) for r in rows for k in r.group.positives) == [1, 2, 3]
    hf, hf_ref, want = assert_stage2_equals_the_plain_computation(qwen2_pair, groups, rows, loss_average, True)
    one = [replace(g, num_positives=1) for g in groups]  # the same candidates with one positive: another loss
    assert abs(plain_stage2_loss(hf, hf_ref, one, loss_average, True).item() - want.item()) > 1e-3


def test_groups_with_every_positive(tok):
    group = QueryGroup("q1", "what digs", (Passage("p1", "the aardvark digs"), Passage("p2", "moles dig too")),
                       tuple(Passage(f"n{i}", f"negative passage {i}") for i in range(5)))
    rng = group_rng(0, 0, 0)
    assert [p.docid for p in sample_candidates(group, 4, rng, "all")][:2] == ["p1", "p2"]
    assert len(sample_candidates(group, 4, group_rng(0, 0, 0), "all")) == 4  # 2 positives + 2 negatives
    assert len(sample_candidates(group, 2, group_rng(0, 0, 0), "all")) == 3  # at least one negative
    one = sample_candidates(group, 4, group_rng(0, 0, 0), "one")
    assert len(one) == 4 and one[0].docid in ("p1", "p2") and all(p.docid[0] == "n" for p in one[1:])
    built = GroupBuilder(tok, 4, positives="all").build(group, group_rng(0, 0, 0))
    assert built.num_positives == 2 and len(built.candidates) == 4
    row = Packer(4096).pack_groups([built])[0]
    cu = row.cu_seqlens.tolist()
    in_positive = torch.zeros(row.num_tokens, dtype=torch.bool)
    in_positive[:cu[2]] = True  # the first two sequences
    assert row.group.positives.tolist() == [2] and bool((row.gen_weight[~in_positive] == 0).all())
    assert bool((row.gen_weight[:cu[1] - 1] > 0).all()) and bool((row.gen_weight[cu[1]:cu[2] - 1] > 0).all())
    with pytest.raises(TsarankError, match="unknown positives setting 'some'; choose one or all"):
        sample_candidates(group, 4, rng, "some")


@pytest.mark.slow
def test_training_with_every_positive_from_the_recipe(tmp_path, tiny_llama_dir):
    """The sample's queries with two positives put both in their groups; the run trains."""
    path = recipe(tmp_path, SFT, tiny_llama_dir, "all")
    run_cli("train", str(path), "--device", "cpu", "--set", "sft.positives=all", "--set", "train.max_steps=2")
    steps = metrics(tmp_path / "all")
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) and s["l_rank"] > 0 for s in steps)
    bad = run_cli("train", str(path), "--device", "cpu", "--overwrite", "--set", "sft.positives=some", check=False)
    assert bad.returncode == 1 and "sft.positives must be one of one, all, got 'some'" in bad.stderr


@pytest.mark.parametrize("loss_average", ["tokens", "paper"])
def test_stage1_loss_average_equals_the_plain_computation(qwen2_pair, loss_average):
    model_dir, _ = qwen2_pair
    rng = random.Random(7)
    shapes = ((30, 4), (8, 6), (12, 3), (9, 7), (25, 5))  # (length, target start): uneven response counts
    seqs = [TokenSequence(tuple(rng.randrange(400) for _ in range(n)), start) for n, start in shapes]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    nll = []
    for s in seqs:
        ids = torch.tensor([s.input_ids])
        logits = hf(input_ids=ids).logits[0, :-1].float()
        nll.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[s.target_start - 1:])
    if loss_average == "paper":  # micro-batches of 2 pairs in the order given: [0, 1], [2, 3], [4]
        want = torch.stack([torch.cat(nll[i:i + 2]).mean() for i in range(0, len(nll), 2)]).mean()
    else:
        want = torch.cat(nll).mean()
    want.backward()

    rows = Packer(40, loss_average=loss_average, paper_micro_batch=2).pack_sequences(seqs)
    assert len(rows) > 1
    model = load_model(model_dir)
    got = engine_step(TrainingObjective(model, "cpt"), rows, "cpt")
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        if name != "lm_head.weight":  # tied to the embeddings (one tensor in both models)
            torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-4, atol=1e-6)


# --- runs that cannot silently mix ---------------------------------------------------------------------------

def test_recipe_changes_name_each_refused_key_and_pass_safe_ones(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(CPT.format(out=tmp_path / "out", model="m", data=DATA_DIR))
    stored = asdict(load_recipe(path))
    safe = load_recipe(path, ["checkpoint.every_steps=1", "checkpoint.keep_last=5", "train.max_bad_steps=3",
                              "data.max_tokens=320", "model.attention=sdpa", "train.activation_checkpointing=true"])
    assert recipe_changes(stored, safe) == []
    changed = load_recipe(path, ["train.lr=1e-4", "run.seed=3", "train.batch_size=2", "data.truncation=right"])
    assert recipe_changes(stored, changed) == ["run.seed: 0 -> 3", "data.truncation: 'document' -> 'right'",
                                               "train.batch_size: 4 -> 2", "train.lr: 0.001 -> 0.0001"]
    older = {s: {k: v for k, v in keys.items() if k != "loss_average"} for s, keys in stored.items()}
    assert recipe_changes(older, safe) == []  # a key an older version did not record: today's default
    assert recipe_changes(older, replace(safe, train=replace(safe.train, loss_average="paper"))) == [
        "train.loss_average: 'tokens' -> 'paper'"]


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe_and_accepts_safe_changes(tmp_path, tiny_llama_dir):
    path = recipe(tmp_path, CPT.replace("max_steps = 4", "max_steps = 2"), tiny_llama_dir, "run")
    first = run_cli("train", str(path), "--device", "cpu")
    # stderr is no terminal here: progress comes as lines, the first and the last step at least
    assert re.search(r"step 1/2 loss \d+\.\d{4} [\d,]+ tok/s eta \d:\d\d:\d\d\n", first.stderr), first.stderr
    assert re.search(r"step 2/2 loss \d+\.\d{4} [\d,]+ tok/s eta 0:00:00\n", first.stderr), first.stderr
    refused = run_cli("train", str(path), "--device", "cpu", "--resume", "--set", "train.lr=2e-3",
                      "--set", "sft.group_size=8", "--set", "checkpoint.keep_last=4", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "train.lr: 0.001 -> 0.002" in refused.stderr and "sft.group_size: 48 -> 8" in refused.stderr
    assert "keep_last" not in refused.stderr
    accepted = run_cli("train", str(path), "--device", "cpu", "--resume", "--set", "checkpoint.keep_last=4",
                       "--set", "train.max_bad_steps=2")
    assert "resuming from" in accepted.stderr
