"""The Python API (tsarank_engine.Ranker) against the `score` command on the same pairs, and its errors."""

import json

import pytest
import torch
from click.testing import CliRunner

from tsarank_engine import Ranker
from tsarank_engine.cli import main
from tsarank_engine.errors import TsarankError

from conftest import sample_pairs


@pytest.fixture(scope="module")
def command_scores(tiny_llama_dir, tmp_path_factory):
    """What `tsarank-engine score` writes for 24 sample pairs, with a document limit that cuts some."""
    tmp = tmp_path_factory.mktemp("score")
    rows = sample_pairs(24)
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["score", "--model", str(tiny_llama_dir), "--pairs", str(tmp / "pairs.jsonl"),
                                       "--out", str(tmp / "scores.jsonl"), "--device", "cpu", "--max-doc-tokens", "60",
                                       "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    return rows, [json.loads(line)["score"] for line in (tmp / "scores.jsonl").read_text().splitlines()]


def test_score_rerank_and_score_pairs_equal_the_score_command(tiny_llama_dir, command_scores):
    rows, expected = command_scores
    ranker = Ranker.load(tiny_llama_dir, device="cpu", dtype="float32", max_doc_tokens=60)
    assert ranker.device.type == "cpu" and ranker.dtype == torch.float32
    streamed = list(ranker.score_pairs((r["query"], r["document"]) for r in rows))
    torch.testing.assert_close(torch.tensor(streamed), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    by_query: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_query.setdefault(r["query"], []).append(i)
    for query, indices in by_query.items():
        documents = [rows[i]["document"] for i in indices]
        scores = ranker.score(query, documents)
        torch.testing.assert_close(torch.tensor(scores), torch.tensor([expected[i] for i in indices]),
                                   rtol=1e-5, atol=1e-5)
        ranked = ranker.rerank(query, documents, top_k=1)
        assert len(ranked) == 1 and ranked[0] == max(enumerate(scores), key=lambda item: (item[1], -item[0]))
        assert [i for i, _ in ranker.rerank(query, documents)] == sorted(range(len(documents)),
                                                                         key=lambda i: (-scores[i], i))
    assert ranker.score("a query", []) == []


def test_bad_arguments_are_named(tiny_llama_dir, tmp_path):
    with pytest.raises(TsarankError, match="float16 runs on CUDA only"):
        Ranker.load(tiny_llama_dir, device="cpu", dtype="float16")
    with pytest.raises(TsarankError, match="unknown dtype 'half'"):
        Ranker.load(tiny_llama_dir, device="cpu", dtype="half")
    with pytest.raises(TsarankError, match="model directory does not exist|no config.json|tokenizer missing"):
        Ranker.load(tmp_path / "nothing", device="cpu")
    with pytest.raises(TsarankError, match="unknown builtin model"):
        Ranker.load("builtin:gpt-5", device="cpu")
    with pytest.raises(TsarankError, match="unknown dtype 'int8'"):
        Ranker.load(tiny_llama_dir, device="cpu", dtype=torch.int8)
    with pytest.raises(TsarankError, match="unknown device 'tpu'"):
        Ranker.load(tiny_llama_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TsarankError, match="no CUDA device"):
            Ranker.load(tiny_llama_dir, device=torch.device("cuda", 0))


def test_torch_devices_and_dtypes_are_taken_as_python_users_pass_them(tiny_llama_dir):
    by_name = Ranker.load(tiny_llama_dir, device="cpu", dtype="bfloat16")
    by_object = Ranker.load(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert by_object.device == by_name.device and by_object.dtype == by_name.dtype == torch.bfloat16
    assert Ranker.load(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32).dtype == torch.float32
    query, documents = "what is a rope", ["RoPE rotates queries and keys.", "A rope is a bundle of fibres."]
    assert by_object.score(query, documents) == by_name.score(query, documents)
