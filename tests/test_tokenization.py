"""Tokenizer and the paper's prompt construction against transformers' tokenizer on the same files."""

import json

import pytest
import transformers

from tsarank_engine.errors import TsarankError
from tsarank_engine.data.prompting import PromptBuilder
from tsarank_engine.data.tokenization import Tokenizer

from conftest import msmarco_groups
from paper_reference import paper_sequences

TRICKY = ["it 's fine , isn't it ? yes !", "Query:what", "  leading spaces", "ünïcödé — [PAD] tokens", "a\n\nb"]
# What a failure against another transformers release may mean: the reference itself moved.
REFERENCE_CHANGES = (f"(transformers {transformers.__version__}: releases 5.0-5.6 applied clean_up_tokenization_spaces "
                     "to BPE tokenizers' decode, 'it 's' -> 'it's'; 5.7 and later skip it, as the engine does)")


def all_pairs():
    """Every query with its first positive and up to two negatives, from the 100 sample groups."""
    return [{"query": g["query"], "document": p["text"]}
            for g in msmarco_groups() for p in g["positive_passages"][:1] + g["negative_passages"][:2]]


def _check_tokenizer(model_dir):
    ours, hf = Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    for text in TRICKY + [p["document"] for p in all_pairs()[:30]]:
        assert ours.encode(text) == hf(text)["input_ids"]
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids), REFERENCE_CHANGES
    assert ours.eos_id == hf.eos_token_id


class SentencePieceReference:
    """The paper's LLaMA tokenizer (transformers 4's slow LlamaTokenizer): SentencePiece plus a BOS."""

    def __init__(self, model_dir):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))

    def encode(self, text, add_special_tokens=True):
        return ([self.sp.bos_id()] if add_special_tokens else []) + self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(ids)

    def __call__(self, text):
        return {"input_ids": self.encode(text)}


def _check_prompts(model_dir, reference=None, **limits):
    ours = PromptBuilder(Tokenizer.from_dir(model_dir), **limits)
    reference = reference or transformers.AutoTokenizer.from_pretrained(model_dir)
    pairs = all_pairs()
    expected = paper_sequences(reference, pairs, **limits)
    for pair, (ids, source_len) in zip(pairs, expected):
        got = ours.build(pair["query"], pair["document"])
        assert (got.input_ids, got.source_len) == (ids, source_len), REFERENCE_CHANGES  # the reference cuts by decode


def test_bpe_tokenizer_with_bos_matches_transformers(bpe_tokenizer_dir):
    _check_tokenizer(bpe_tokenizer_dir)
    ours = Tokenizer.from_dir(bpe_tokenizer_dir)
    assert ours.encode("x")[0] == ours.backend.token_to_id("<s>")
    # clean_up_tokenization_spaces is set, but transformers >= 5.7 skips it for BPE models
    assert ours.decode(ours.encode("a , b", add_special_tokens=False)) == "a , b"


def test_forced_cleanup_matches_transformers(tmp_path, bpe_tokenizer_dir):
    (tmp_path / "tokenizer.json").write_bytes((bpe_tokenizer_dir / "tokenizer.json").read_bytes())
    config = json.loads((bpe_tokenizer_dir / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    _check_tokenizer(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.decode(ours.encode("a , b", add_special_tokens=False)) == "a, b"


@pytest.mark.parametrize("limits", [{}, {"max_query_tokens": 32, "max_doc_tokens": 128}, {"max_doc_tokens": 5}])
def test_prompts_match_the_paper_with_bpe_tokenizer(bpe_tokenizer_dir, limits):
    _check_prompts(bpe_tokenizer_dir, **limits)


def test_llama_sentencepiece_tokenizer_matches_sentencepiece(spm_tokenizer_dir):
    ours, reference = Tokenizer.from_dir(spm_tokenizer_dir), SentencePieceReference(spm_tokenizer_dir)
    texts = TRICKY + [g["query"] for g in msmarco_groups()] + [p["text"] for g in msmarco_groups()
                                                               for p in g["negative_passages"]]
    assert sum(t != t.lstrip() for t in texts) > 5  # texts with leading whitespace, where transformers 5 differs
    for text in texts:
        ids = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text) == reference.encode(text)
        assert ours.encode(text, add_special_tokens=False) == ids
        assert ours.decode(ids) == reference.decode(ids)
    assert ours.eos_id == reference.sp.eos_id()


@pytest.mark.parametrize("limits", [{}, {"max_query_tokens": 32, "max_doc_tokens": 128}])
def test_prompts_match_the_paper_with_llama_sentencepiece(spm_tokenizer_dir, limits):
    _check_prompts(spm_tokenizer_dir, SentencePieceReference(spm_tokenizer_dir), **limits)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2_dir):
    _check_tokenizer(smollm2_dir)


@pytest.mark.slow
@pytest.mark.parametrize("limits", [{}, {"max_query_tokens": 32, "max_doc_tokens": 128}])
def test_prompts_match_the_paper_with_smollm2_tokenizer(smollm2_dir, limits):
    _check_prompts(smollm2_dir, **limits)


def test_prompt_shape_and_errors(bpe_tokenizer_dir):
    tok = Tokenizer.from_dir(bpe_tokenizer_dir)
    pair = PromptBuilder(tok).build("what is x", "x is y")
    assert tok.decode(pair.input_ids[1 : pair.source_len]) == "Document: x is y Query:"  # [0] is the BOS
    assert tok.decode(pair.input_ids[pair.source_len :]) == "what is x"  # no space after "Query:"
    with pytest.raises(TsarankError, match="leaving no room for the document in the 512-token budget"):
        PromptBuilder(tok).build("word " * 600, "doc")
    with pytest.raises(TsarankError, match="max_doc_tokens must be at least 1, got 0"):
        PromptBuilder(tok, max_doc_tokens=0)


def test_tokenizer_errors(tmp_path, bpe_tokenizer_dir):
    with pytest.raises(TsarankError, match=f"{tmp_path}/tokenizer.json: tokenizer missing"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TsarankError, match="tokenizer.json: cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((bpe_tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TsarankError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path)
