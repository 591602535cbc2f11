"""The decoder against transformers on tiny random LLaMA/Mistral/Qwen2/Qwen3 checkpoints."""

import pytest
import torch
import transformers

from tsarank_engine.model.decoder import rope_inv_freq
from tsarank_engine.errors import TsarankError
from tsarank_engine.model.config import ModelConfig
from tsarank_engine.model.loading import load_model

from conftest import DEVICES, save_tiny_model, tiny_config

FAMILIES = ["llama", "llama3", "llama_linear", "mistral", "qwen2", "qwen3"]
LENGTHS = [29, 1, 17, 101]  # a 1-token document, and one past llama3's original context of 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    # qwen3 is saved sharded, so the index path is exercised against transformers too
    save_kwargs = {"max_shard_size": "60KB"} if request.param == "qwen3" else {}
    hf = save_tiny_model(tiny_config(request.param), out, **save_kwargs)
    if request.param == "qwen3":
        assert (out / "model.safetensors.index.json").is_file()
    return request.param, out, hf


def docs(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 400, (n,), generator=g) for n in LENGTHS]


@pytest.mark.parametrize("device", DEVICES)
def test_padded_batch_matches_transformers(checkpoint, device):
    _, path, hf = checkpoint
    hf = hf.to(device)
    ours = load_model(path, device=device)
    seqs = docs()
    width = max(LENGTHS)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours.logits(ours(ids, attention_mask=mask))
    real = mask.bool()
    assert rel_err(got[real], ref[real]) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_packed_row_matches_each_document_alone(checkpoint, device):
    _, path, hf = checkpoint
    hf = hf.to(device)
    ours = load_model(path, device=device)
    seqs = [s.to(device) for s in docs(seed=2)]
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(device)
    with torch.no_grad():
        packed = ours.logits(ours(torch.cat(seqs), cu_seqlens=cu))
        for i, s in enumerate(seqs):
            alone = ours.logits(ours(s[None]))[0]
            reference = hf(input_ids=s[None]).logits[0]
            part = packed[cu[i] : cu[i + 1]]
            assert rel_err(part, alone) < 1e-5, f"document {i} sees another document"
            assert rel_err(part, reference) < 1e-5


def test_left_and_right_padding_agree(checkpoint):
    _, path, _ = checkpoint
    ours = load_model(path)
    s = docs()[0]
    ids = torch.zeros(2, len(s) + 4, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, : len(s)], mask[0, : len(s)] = s, 1  # right-padded
    ids[1, 4:], mask[1, 4:] = s, 1  # left-padded
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
    assert rel_err(out[1, 4:], out[0, : len(s)]) < 1e-5
    assert out[0, len(s) :].abs().max() == 0 and out[1, :4].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_error_no_worse_than_transformers_bf16(checkpoint, device):
    _, path, hf = checkpoint
    hf = hf.to(device)
    ours = load_model(path, dtype=torch.bfloat16, device=device)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    s = docs()[3][None].to(device)
    with torch.no_grad():
        exact = hf(input_ids=s).logits
        err_hf = rel_err(hf16(input_ids=s).logits, exact)
        err_ours = rel_err(ours.logits(ours(s)), exact)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert err_ours <= 2 * err_hf + 1e-3, (err_ours, err_hf)


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = tiny_config("llama3")
    ours = ModelConfig.from_dict(hf_config.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    got = rope_inv_freq(ours.rope, ours.head_dim)
    torch.testing.assert_close(got, hf_inv_freq, rtol=1e-6, atol=0)
    default = rope_inv_freq(ModelConfig.from_dict(tiny_config("llama").to_dict() | {
        "architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}
    }).rope, ours.head_dim)
    assert not torch.allclose(got, default)  # the scaling changes something at these sizes


def test_bad_packed_inputs_are_named(checkpoint):
    _, path, _ = checkpoint
    ours = load_model(path)
    ids = torch.randint(0, 400, (10,))
    with pytest.raises(TsarankError, match=r"cu_seqlens must rise strictly from 0 to the number of tokens \(10\)"):
        ours(ids, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(TsarankError, match="cu_seqlens must rise strictly"):
        ours(ids, cu_seqlens=torch.tensor([0, 4, 4, 10]))
    with pytest.raises(TsarankError, match="attention_mask row 1 has padding between real tokens"):
        ours(ids.view(2, 5), attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]]))
    with pytest.raises(TsarankError, match="attention_mask row 0 has no real token"):
        ours(ids.view(2, 5), attention_mask=torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 0]]))


def test_sliding_window_longer_documents_are_refused(tmp_path):
    hf = save_tiny_model(tiny_config("mistral", sliding_window=16), tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 400, (1, 16))
    with torch.no_grad():  # within the window attention is exact
        assert rel_err(ours.logits(ours(ids)), hf(input_ids=ids).logits) < 1e-5
        with pytest.raises(TsarankError, match=r"a document of 17 tokens exceeds the checkpoint's sliding window \(16\)"):
            ours(torch.randint(0, 400, (1, 17)))
