"""`tsarank-engine score` against the paper's scoring done with transformers, and its input errors."""

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

from tsarank_engine.cli import main
from tsarank_engine.data.prompting import PromptBuilder
from tsarank_engine.rank.scoring import pack_by_length, score_pairs, score_row
from tsarank_engine.data.tokenization import Tokenizer
from tsarank_engine.model.loading import load_model
from tsarank_kernels import dense

from conftest import DEVICES, onednn_calls, sample_pairs
from paper_reference import paper_scores, paper_sequences


def run_score(model_dir, rows, tmp_path, *extra):
    """`score` on rows, in float32 unless `extra` names a dtype (auto may pick bfloat16 on this CPU)."""
    if "--dtype" not in extra:
        extra = (*extra, "--dtype", "float32")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(main, ["score", "--model", str(model_dir), "--pairs", str(pairs),
                                       "--out", str(out), *extra])
    return result, out


def reference_scores(model_dir, rows, **limits):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return paper_scores(model, paper_sequences(tokenizer, rows, **limits))


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "score" in result.output


@pytest.mark.parametrize("extra,limits", [
    ([], {}),
    (["--batch-tokens", "300", "--max-query-tokens", "4", "--max-doc-tokens", "40"],
     {"max_query_tokens": 4, "max_doc_tokens": 40}),
    (["--batch-tokens", "1"], {}),  # every sequence in a row of its own
])
def test_scores_match_the_paper_on_a_tiny_model(tiny_llama_dir, tmp_path, extra, limits):
    rows = sample_pairs(24)
    result, out = run_score(tiny_llama_dir, rows, tmp_path, "--device", "cpu", *extra)
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in w.items() if k != "score"} for w in written] == rows  # input order kept
    expected = reference_scores(tiny_llama_dir, rows, **limits)
    got = torch.tensor([w["score"] for w in written], dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_scores_stay_close(tiny_llama_dir, tmp_path, device):
    rows = sample_pairs(8)
    # on CUDA the default dtype is bfloat16
    extra = ["--device", "cuda"] if device == "cuda" else ["--device", "cpu", "--dtype", "bfloat16"]
    result, out = run_score(tiny_llama_dir, rows, tmp_path, *extra)
    assert result.exit_code == 0, result.output
    assert f"scoring on {device} in bfloat16" in result.output
    got = torch.tensor([json.loads(line)["score"] for line in out.read_text().splitlines()])
    expected = torch.tensor(reference_scores(tiny_llama_dir, rows))
    # measured on the CPU: 0.0106 = 0.0016 of max |score| (the bf16 decoder's rounding; the head adds ~1e-6)
    assert (got - expected).abs().max() < 0.004 * expected.abs().max()


def head_errors(model_dir, rows) -> tuple[float, float]:
    """Max errors of half-precision scores against the exact (float64) head on the same bf16 final hidden
    states: (the engine's score_row, logits rounded to bf16 before an fp32 log-softmax as transformers does)."""
    builder = PromptBuilder(Tokenizer.from_dir(model_dir))
    pairs = [builder.build(r["query"], r["document"]) for r in rows]
    model = load_model(model_dir, dtype=torch.bfloat16).eval()
    got = score_row(model, pairs).double()
    with torch.inference_mode():  # the row score_row runs (bf16: no oneDNN filler), so the same hidden states
        ids = torch.tensor([t for p in pairs for t in p.input_ids])
        cu_seqlens = torch.tensor([0] + [len(p.input_ids) for p in pairs]).cumsum(0)
        hidden, weight = model(ids, cu_seqlens=cu_seqlens), model.lm_head.weight
        exact, rounded = [], []
        for p, start in zip(pairs, cu_seqlens.tolist()):
            positions = torch.arange(start + p.source_len - 1, start + len(p.input_ids) - 1)
            query = ids[positions + 1, None]
            for out, logits in ((exact, hidden[positions].double() @ weight.double().T),
                                (rounded, (hidden[positions] @ weight.T).float())):
                out.append(torch.log_softmax(logits, -1).gather(1, query).double().mean().item())
    exact = torch.tensor(exact, dtype=torch.float64)
    return (got - exact).abs().max().item(), (torch.tensor(rounded, dtype=torch.float64) - exact).abs().max().item()


def test_bfloat16_scores_take_fp32_logits(tiny_llama_dir):
    engine, rounded = head_errors(tiny_llama_dir, sample_pairs(6))
    assert engine < 1e-5 and rounded > 1e-4  # measured 9.5e-7 and 7.3e-4


@pytest.mark.parametrize("batch_tokens", [None, 150])
def test_cpu_rows_are_filled_for_onednn_and_scores_unchanged(tiny_llama_dir, batch_tokens):
    """On the CPU each packed row is filled to a multiple of INFERENCE_ROW_QUANTUM, so the decoder's linears run
    on oneDNN (and the LM head's chunks at the query positions, padded to ROW_QUANTUM rows); the filler changes
    no score (rows of 150 tokens leave a different filler per row)."""
    if not dense.onednn_applies(torch.ones(1, 1), torch.ones(1, 1)):
        pytest.skip("this torch build has no oneDNN")
    rows = sample_pairs(24)
    builder = PromptBuilder(Tokenizer.from_dir(tiny_llama_dir))
    prompted = [builder.build(r["query"], r["document"]) for r in rows]
    model = load_model(tiny_llama_dir).eval()
    scores, calls = onednn_calls(lambda: score_pairs(model, prompted, batch_tokens), with_weights=True)
    vocab = model.config.vocab_size
    decoder, head = [n for n, v in calls if v != vocab], [n for n, v in calls if v == vocab]
    linears_per_row = 7 * model.config.num_layers
    assert decoder and len(decoder) % linears_per_row == 0
    assert all(n % dense.INFERENCE_ROW_QUANTUM == 0 for n in decoder)
    assert len(head) >= len(decoder) // linears_per_row and all(n % dense.ROW_QUANTUM == 0 for n in head)
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64),
                               torch.tensor(reference_scores(tiny_llama_dir, rows), dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_pack_by_length_respects_the_budget(bpe_tokenizer_dir):
    builder = PromptBuilder(Tokenizer.from_dir(bpe_tokenizer_dir), max_doc_tokens=60)
    pairs = [builder.build(r["query"], r["document"]) for r in sample_pairs(30)]
    rows = pack_by_length(pairs, 400)
    assert sorted(i for row in rows for i in row) == list(range(30))
    for row in rows:
        assert len(row) == 1 or sum(len(pairs[i].input_ids) for i in row) <= 400


GOOD = {"qid": "1", "docid": "d1", "query": "what is x", "document": "x is y"}


@pytest.mark.parametrize("lines,message", [
    (["{bad json"], ":2: malformed JSON"),
    (['["a list"]'], ":2: expected a JSON object"),
    ([json.dumps({k: v for k, v in GOOD.items() if k != "query"})], ":2: missing field 'query'"),
    ([json.dumps(GOOD | {"document": 7})], ":2: field 'document' must be a string, got int"),
    ([json.dumps(GOOD | {"query": "  "})], ":2: field 'query' is empty"),
    ([json.dumps(GOOD | {"qid": None})], ":2: field 'qid' must be a string, got NoneType"),
    ([json.dumps(GOOD | {"query": "word " * 600})], ":2: the query has"),
])
def test_bad_rows_are_named_and_nothing_is_written(tiny_llama_dir, tmp_path, lines, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(GOOD) + "\n" + "\n".join(lines) + "\n")
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(main, ["score", "--model", str(tiny_llama_dir), "--pairs", str(pairs), "--out", str(out)])
    assert result.exit_code == 1
    assert f"error: {pairs}{message}" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]


def test_non_utf8_line_and_unwritable_output(tiny_llama_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"qid": "\xff"}\n')
    args = ["score", "--model", str(tiny_llama_dir), "--pairs", str(pairs), "--out", str(tmp_path / "o.jsonl")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and f"error: {pairs}:2: not valid UTF-8" in result.output
    pairs.write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "afile").write_text("")
    args[-1] = str(tmp_path / "afile" / "o.jsonl")  # the output's parent is a file
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and f"error: {tmp_path}/afile/o.jsonl: cannot write the output there" in result.output
    assert "Traceback" not in result.output


def test_empty_pairs_file_is_refused(tiny_llama_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n")
    result = CliRunner().invoke(main, ["score", "--model", str(tiny_llama_dir), "--pairs", str(pairs),
                                       "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 1 and f"error: {pairs}: no pairs to score" in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_model_directory_and_debug_flag(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(GOOD) + "\n")
    args = ["score", "--model", str(tmp_path / "none"), "--pairs", str(pairs), "--out", str(tmp_path / "o.jsonl")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and f"Directory '{tmp_path}/none' does not exist" in result.output
    args[2] = str(tmp_path)  # exists, but holds no checkpoint
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output.strip() == f"error: {tmp_path}/tokenizer.json: tokenizer missing (a tokenizer.json, or a SentencePiece tokenizer.model, is required)"
    result = CliRunner().invoke(main, ["--debug", *args])
    assert result.exit_code == 1 and "tokenizer missing" in str(result.exception)  # raised, not swallowed


def test_attention_backends_agree_and_auto_logs_its_choice(tiny_llama_dir, tmp_path):
    from tsarank_engine.model import attention

    rows = sample_pairs(6)
    attention.auto_backend_name.cache_clear()
    result, _ = run_score(tiny_llama_dir, rows, tmp_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("attention backend for cpu float32: sdpa") == 1
    # Triton runs compiled on CUDA, or in the interpreter without a GPU (conftest)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores = {}
    for backend in ("sdpa", "triton"):
        result, out = run_score(tiny_llama_dir, rows, tmp_path, "--device", device, "--dtype", "float32",
                                "--attention", backend)
        assert result.exit_code == 0, result.output
        scores[backend] = torch.tensor([json.loads(line)["score"] for line in out.read_text().splitlines()])
    torch.testing.assert_close(scores["triton"], scores["sdpa"], rtol=1e-5, atol=1e-5)
