"""The paper's LLaMA checkpoints as its code wrote them: the [PAD] row added in stage 1 (data.add_pad_token), the
`</s>` BOS of stage 2 and evaluation (data.bos_token, and tokenizer files that declare it), the slow tokenizer's
files (tokenizer.model, added_tokens.json, no tokenizer.json) and pickled .bin weights (`tsarank-engine convert`).
The references are written here: transformers' resize and the paper's mean rows (pretrain.py's
smart_tokenizer_and_embedding_resize), the slow LlamaTokenizer as SentencePiece plus the declared BOS, and
eval.py's scoring (tests/paper_reference.py) in fp32."""

import json
import shutil
from fractions import Fraction

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tsarank_engine.data.prompting import PromptBuilder
from tsarank_engine.data.tokenization import PAD_TOKEN, Tokenizer, adds_pad_token
from tsarank_engine.errors import TsarankError
from tsarank_engine.model.conversion import convert_checkpoint
from tsarank_engine.model.loading import fill_weights, load_model, model_on_meta
from tsarank_engine.rank.scoring import score_pairs

from conftest import save_tiny_model, tiny_config
from paper_reference import paper_scores, paper_sequences
from test_tokenization import TRICKY, SentencePieceReference, all_pairs
from test_trainer import CPT, SFT, recipe, run_cli

VOCAB = 600  # the SentencePiece model of conftest's spm_tokenizer_dir


class SlowLlamaReference(SentencePieceReference):
    """transformers 4's slow LlamaTokenizer on a text without added tokens: SentencePiece after the declared BOS."""

    def __init__(self, model_dir, bos_id):
        super().__init__(model_dir)
        self.bos_id = bos_id

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_id] if add_special_tokens else []) + self.sp.encode(text)


def paper_resize(model, rows):
    """pretrain.py's smart_tokenizer_and_embedding_resize for one added token."""
    model.resize_token_embeddings(rows, mean_resizing=False)  # 4.28 drew the new rows at random
    with torch.no_grad():
        for embedding in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            embedding[-1:] = embedding[:-1].mean(dim=0, keepdim=True)


@pytest.fixture(scope="module")
def paper_llama_dir(tmp_path_factory, spm_tokenizer_dir):
    """A tiny LLaMA ranker as the paper's code saved it: stage 1 added [PAD] (V + 1 rows, the mean row), stage 2
    declared `</s>` the BOS; the slow tokenizer's files and the weights as pytorch_model.bin, in two shards.

    transformers 5 has neither the slow LlamaTokenizer nor .bin saving: its generic SentencePiece tokenizer writes
    the files (tokenizer.model, added_tokens.json, tokenizer_config.json), given the keys 4.28's LlamaTokenizer wrote
    as well (and LLaMA-2's clean_up_tokenization_spaces), and the state dict is written with torch.save, shard by
    shard with an index, as 4.28's save_pretrained(safe_serialization=False) did."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    out = tmp_path_factory.mktemp("paper_llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=VOCAB)).eval()
    tok = SentencePieceBackend(vocab_file=str(spm_tokenizer_dir / "tokenizer.model"), bos_token="<s>",
                               eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    paper_resize(model, len(tok))
    tok.add_special_tokens({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"})  # sft.py for "llama"
    tok.save_pretrained(out)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(
        settings | {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                    "clean_up_tokenization_spaces": False}))  # LLaMA-2's setting
    model.config.save_pretrained(out)
    state = model.state_dict()
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
    for file, part in shards.items():
        torch.save({n: state[n] for n in part}, out / file)
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert not (out / "tokenizer.json").exists() and (out / "added_tokens.json").is_file()
    return out


def test_a_paper_checkpoint_converts_and_scores_as_eval_py(tmp_path, paper_llama_dir):
    out = convert_checkpoint(paper_llama_dir, tmp_path / "converted")
    assert not list(out.glob("*.bin")) and (out / "model.safetensors.index.json").is_file()
    for f in ("tokenizer.model", "added_tokens.json", "tokenizer_config.json", "config.json"):
        assert (out / f).read_bytes() == (paper_llama_dir / f).read_bytes()
    tokenizer = Tokenizer.from_dir(out)
    assert tokenizer.size == VOCAB + 1 and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.backend.token_to_id(PAD_TOKEN) == VOCAB
    reference = SlowLlamaReference(out, bos_id=2)
    assert VOCAB in tokenizer.encode("a [PAD] b")  # an added token is split off the text, as the slow tokenizer does
    for text in [t for t in TRICKY if PAD_TOKEN not in t] + [p["document"] for p in all_pairs()[:40]]:
        assert tokenizer.encode(text) == reference.encode(text)  # starts with </s>, id 2
        ids = reference.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == reference.decode(ids)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    del settings["clean_up_tokenization_spaces"]
    (out / "tokenizer_config.json").write_text(json.dumps(settings))
    cleaned = Tokenizer.from_dir(out)  # transformers 4's default for a slow tokenizer: the clean-up on
    assert cleaned.decode(cleaned.encode("a , b", add_special_tokens=False)) == "a, b"
    (out / "tokenizer_config.json").write_bytes((paper_llama_dir / "tokenizer_config.json").read_bytes())

    pairs = all_pairs()[:24]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.get_input_embeddings().weight.shape[0] == VOCAB + 1
    expected = paper_scores(hf, paper_sequences(reference, pairs))
    model = load_model(out)
    builder = PromptBuilder(tokenizer)
    got = score_pairs(model, [builder.build(p["query"], p["document"]) for p in pairs])
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)


def test_convert_reads_a_single_bin_and_names_what_is_wrong(tmp_path, paper_llama_dir):
    single = tmp_path / "single"
    shutil.copytree(paper_llama_dir, single, ignore=shutil.ignore_patterns("pytorch_model*"))
    state = {}
    for f in sorted(paper_llama_dir.glob("pytorch_model-*.bin")):
        state |= torch.load(f, weights_only=True)
    torch.save(state, single / "pytorch_model.bin")
    out = convert_checkpoint(single, tmp_path / "out")
    assert set(load_file(out / "model.safetensors")) == set(state)

    with pytest.raises(TsarankError, match="already holds safetensors weights"):
        convert_checkpoint(out, tmp_path / "again")
    with pytest.raises(TsarankError, match="conversion target exists and is not an empty directory"):
        convert_checkpoint(single, out)
    torch.save({k: v for k, v in state.items() if "layers.1.mlp" not in k}, single / "pytorch_model.bin")
    with pytest.raises(TsarankError, match="its weights do not fit its config.json: .*lacks tensor"):
        convert_checkpoint(single, tmp_path / "short")
    assert not (tmp_path / "short").exists()

    torch.save({"x": Fraction(1, 2)}, single / "pytorch_model.bin")  # a global weights_only refuses to build
    with pytest.raises(TsarankError, match=r"pytorch_model.bin: not a weights file torch.load\(weights_only=True\)"):
        convert_checkpoint(single, tmp_path / "evil")
    (single / "pytorch_model.bin").unlink()
    with pytest.raises(TsarankError, match="no pytorch_model.bin or pytorch_model.bin.index.json to convert"):
        convert_checkpoint(single, tmp_path / "none")


def test_convert_cli(tmp_path, paper_llama_dir):
    proc = run_cli("convert", str(paper_llama_dir), str(tmp_path / "out"))
    assert f"converted {paper_llama_dir} -> {tmp_path / 'out'}" in proc.stderr
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == 2
    proc = run_cli("convert", str(paper_llama_dir), str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "conversion target exists" in proc.stderr


def test_added_rows_are_the_papers_mean_rows(tmp_path, spm_tokenizer_dir):
    save_tiny_model(tiny_config("llama", vocab_size=VOCAB), tmp_path, spm_tokenizer_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    paper_resize(hf, VOCAB + 1)
    lm, entries = model_on_meta(tmp_path, vocab_size=VOCAB + 1)
    fill_weights(lm, entries)
    assert lm.config.vocab_size == VOCAB + 1 and lm.config.raw["vocab_size"] == VOCAB + 1
    for ours, theirs in ((lm.model.embed_tokens.weight, hf.get_input_embeddings().weight),
                         (lm.lm_head.weight, hf.get_output_embeddings().weight)):
        assert ours.shape == theirs.shape
        assert torch.equal(ours[:VOCAB], theirs[:VOCAB])
        assert torch.allclose(ours[VOCAB:], theirs[VOCAB:], atol=1e-7, rtol=0)
    with pytest.raises(TsarankError, match="cannot shrink the vocabulary from 600 to 599"):
        model_on_meta(tmp_path, vocab_size=VOCAB - 1)


def test_the_papers_pad_rule(tmp_path, spm_tokenizer_dir, bpe_tokenizer_dir):
    tok = Tokenizer.from_dir(spm_tokenizer_dir)
    assert tok.pad_token is None
    assert adds_pad_token("auto", tok, "llama", VOCAB, "m") and not adds_pad_token("auto", tok, "qwen2", VOCAB, "m")
    assert not adds_pad_token(False, tok, "llama", VOCAB, "m") and adds_pad_token(True, tok, "qwen2", VOCAB, "m")
    with pytest.raises(TsarankError, match="m: data.add_pad_token: the tokenizer has 600 ids but the model 640"):
        adds_pad_token("auto", tok, "llama", 640, "m")
    smollm_like = tmp_path / "with_pad"
    shutil.copytree(bpe_tokenizer_dir, smollm_like)
    settings = json.loads((smollm_like / "tokenizer_config.json").read_text())
    (smollm_like / "tokenizer_config.json").write_text(json.dumps(settings | {"pad_token": "</s>"}))
    assert not adds_pad_token("auto", Tokenizer.from_dir(smollm_like), "llama", 400, "m")


@pytest.fixture(scope="module")
def tiny_spm_llama(tmp_path_factory, spm_tokenizer_dir):
    """A tiny LLaMA with the LLaMA-2 tokenizer layout (tokenizer.json and tokenizer.model, no pad token)."""
    out = tmp_path_factory.mktemp("tiny_spm_llama")
    save_tiny_model(tiny_config("llama", vocab_size=VOCAB), out, spm_tokenizer_dir)
    return out


def test_stage1_with_the_papers_pad_exports_what_transformers_loads(tmp_path, tiny_spm_llama):
    path = recipe(tmp_path, CPT.replace("lr = 1e-3", "lr = 0.0"), tiny_spm_llama, "cpt")
    run_cli("train", str(path), "--device", "cpu", "--set", "data.add_pad_token=auto", "--set", "train.max_steps=1")
    final = tmp_path / "cpt" / "final"
    assert json.loads((final / "config.json").read_text())["vocab_size"] == VOCAB + 1
    hf_tok = transformers.AutoTokenizer.from_pretrained(final)
    assert hf_tok.pad_token == PAD_TOKEN and hf_tok.convert_tokens_to_ids(PAD_TOKEN) == VOCAB
    assert Tokenizer.from_dir(final).pad_token == PAD_TOKEN
    resized = transformers.AutoModelForCausalLM.from_pretrained(tiny_spm_llama, dtype=torch.float32)
    paper_resize(resized, VOCAB + 1)  # lr 0: the export is the resized start
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    for name, p in resized.state_dict().items():
        assert torch.allclose(hf.state_dict()[name], p, atol=1e-7, rtol=0), name
    # stage 2 from it: the pad token is there now, so the paper's rule adds none
    sft = recipe(tmp_path, SFT, final, "sft")
    run_cli("train", str(sft), "--device", "cpu", "--set", "data.add_pad_token=auto", "--set", "train.max_steps=1")
    assert json.loads((tmp_path / "sft" / "final" / "config.json").read_text())["vocab_size"] == VOCAB + 1


def test_stage2_with_the_papers_bos_starts_every_sequence_with_eos_id(tmp_path, tiny_spm_llama):
    ours = Tokenizer.from_dir(tiny_spm_llama, bos_token="</s>")
    assert ours.encode("what is x")[0] == 2 and ours.encode("what is x")[1:] == Tokenizer.from_dir(
        tiny_spm_llama).encode("what is x")[1:]
    sft = recipe(tmp_path, SFT, tiny_spm_llama, "sft")
    run_cli("train", str(sft), "--device", "cpu", "--set", "data.bos_token=</s>", "--set", "train.max_steps=1")
    final = tmp_path / "sft" / "final"
    settings = json.loads((final / "tokenizer_config.json").read_text())
    assert settings["bos_token"] == "</s>"
    assert Tokenizer.from_dir(final).encode("what is x") == ours.encode("what is x")  # the files declare it
    assert transformers.AutoTokenizer.from_pretrained(final)("what is x")["input_ids"][0] == 2
    with pytest.raises(TsarankError, match="bos_token '<nope>' is not a token of the tokenizer"):
        Tokenizer.from_dir(tiny_spm_llama, bos_token="<nope>")


def test_lora_refuses_an_added_row(tmp_path, tiny_spm_llama):
    path = recipe(tmp_path, CPT, tiny_spm_llama, "cpt")
    proc = run_cli("train", str(path), "--device", "cpu", "--set", "data.add_pad_token=true", "--set", "lora.rank=4",
                   check=False)
    assert proc.returncode != 0 and "a LoRA adapter cannot carry" in proc.stderr
