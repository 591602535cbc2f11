"""Readers, the paper's stage-1/stage-2 construction, group sampling and packing."""

import json
import random
from dataclasses import replace

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from tsarank_engine.errors import TsarankError
from tsarank_engine.data.packing import Packer
from tsarank_engine.data.readers import (DataError, QueryGroup, Passage, SkipCounter, TextPair, read_query_groups,
                                    read_text_pairs)
from tsarank_engine.recipe import DataSettings, Recipe, RunSettings, SftSettings, TrainSettings
from tsarank_engine.data.sequences import (CandidateGroup, CptBuilder, GroupBuilder, TokenSequence, group_rng,
                                      sample_candidates)
from tsarank_engine.data.tokenization import Tokenizer

from conftest import DATA_DIR as SAMPLE_DIR
from paper_reference import paper_sequences


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_sample_files_read():
    pairs = list(read_text_pairs(SAMPLE_DIR / "text_pairs.jsonl"))
    groups = list(read_query_groups(SAMPLE_DIR / "msmarco_groups.jsonl"))
    assert len(pairs) == 10 and pairs[0].source.startswith("Document: ") and pairs[0].source.endswith(" Query:")
    assert len(groups) == 100 and all(g.positives and g.negatives for g in groups)
    assert groups[0].query_id == "958784"  # numeric ids are read as strings


def test_plain_pair_form(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"document": "d text", "query": "q?"}])
    assert list(read_text_pairs(path)) == [TextPair("Document: d text Query:", "q?")]


GOOD_GROUP = {"query_id": "1", "query": "q", "positive_passages": [{"docid": "a", "text": "x"}],
              "negative_passages": [{"docid": "b", "text": "y"}]}


@pytest.mark.parametrize("line,message", [
    ("{not json", "malformed JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ({**GOOD_GROUP, "query": 3}, "field 'query' must be a string, got int"),
    ({**GOOD_GROUP, "query": "  "}, "field 'query' is empty"),
    ({k: v for k, v in GOOD_GROUP.items() if k != "query_id"}, "missing field 'query_id'"),
    ({**GOOD_GROUP, "positive_passages": []}, "query 1 has no positive passage"),
    ({**GOOD_GROUP, "negative_passages": [{"docid": "b"}]}, "missing field 'text' in negative_passages\\[0\\]"),
    ({**GOOD_GROUP, "positive_passages": "x"}, "field 'positive_passages' must be a list"),
    ({**GOOD_GROUP, "negative_passages": [{"docid": "b", "text": "y", "score": True}]},
     "field 'score' in negative_passages\\[0\\] must be a finite number, got True"),
    ({**GOOD_GROUP, "positive_passages": [{"docid": "a", "text": "x", "score": "0.5"}]},
     "field 'score' in positive_passages\\[0\\] must be a finite number, got '0.5'"),
    ('{"query_id": "1", "query": "q", "positive_passages": [{"docid": "a", "text": "x", "score": NaN}], '
     '"negative_passages": [{"docid": "b", "text": "y"}]}',
     "field 'score' in positive_passages\\[0\\] must be a finite number, got nan"),
])
def test_bad_group_rows_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "g.jsonl", [GOOD_GROUP, "", line])
    with pytest.raises(DataError, match=f"g.jsonl:3: {message}"):
        list(read_query_groups(path))


def test_teacher_scores_are_read_and_required_only_for_distillation(tmp_path):
    scored = {**GOOD_GROUP, "positive_passages": [{"docid": "a", "text": "x", "score": 3}],
              "negative_passages": [{"docid": "b", "text": "y", "score": -1.5}]}
    path = write_lines(tmp_path / "g.jsonl", [scored, GOOD_GROUP])
    first, second = read_query_groups(path)
    assert first.positives[0].score == 3.0 and first.negatives[0].score == -1.5 and second.positives[0].score is None
    with pytest.raises(DataError, match="g.jsonl:2: missing field 'score' in positive_passages\\[0\\]: distillation "
                                        "\\(sft.w_kd > 0\\) needs a teacher score on every passage"):
        list(read_query_groups(path, scores=True))
    skips = SkipCounter()
    assert len(list(read_query_groups(path, skips, scores=True))) == 1 and skips.reasons == {"missing 'score'": 1}


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"query": "Document: a Query:", "response": "q"}, "{bad",
                                              {"query": "x"}, "{bad", {"document": "d", "query": "q2"}])
    skips = SkipCounter()
    assert [p.response for p in read_text_pairs(path, skips)] == ["q", "q2"]
    assert skips.skipped == 3
    assert skips.report().startswith("3 rows skipped: 2 x malformed JSON (first: ") and "p.jsonl:2:" in skips.report()


def test_reading_streams(tmp_path):
    """The reader yields the first row before it reaches a bad line at the end."""
    path = write_lines(tmp_path / "p.jsonl", [{"document": "d", "query": "q"}] * 3 + ["{bad"])
    rows = read_text_pairs(path)
    assert next(rows).response == "q"
    with pytest.raises(DataError, match="p.jsonl:4"):
        list(rows)


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir), transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.slow
def test_cpt_sequences_match_transformers(smollm2_tokenizers):
    ours, hf = smollm2_tokenizers
    for pair in read_text_pairs(SAMPLE_DIR / "text_pairs.jsonl"):
        seq = CptBuilder(ours).build(pair)
        ids = hf(pair.source + pair.response)["input_ids"] + [hf.eos_token_id]
        assert list(seq.input_ids) == ids
        assert seq.target_start == len(hf(pair.source)["input_ids"])


@pytest.mark.slow
def test_group_candidates_match_the_paper_construction(smollm2_tokenizers):
    ours, hf = smollm2_tokenizers
    group = next(read_query_groups(SAMPLE_DIR / "msmarco_groups.jsonl"))
    rng = group_rng(0, 0, 0)
    built = GroupBuilder(ours, group_size=8).build(group, rng)
    passages = sample_candidates(group, 8, group_rng(0, 0, 0))  # the same draw
    rows = [{"query": group.query, "document": p.text} for p in passages]
    expected = paper_sequences(hf, rows, max_query_tokens=32, max_doc_tokens=128)
    assert [(list(c.input_ids), c.target_start) for c in built.candidates] == expected


def test_sampling_is_seeded_and_replaces_only_when_short():
    negatives = tuple(Passage(str(i), f"n{i}") for i in range(10))
    group = QueryGroup("q", "query", (Passage("p1", "a"), Passage("p2", "b")), negatives)
    draw = lambda seed, size: [p.docid for p in sample_candidates(group, size, group_rng(seed, 0, 3))]  # noqa: E731
    assert draw(1, 8) == draw(1, 8) and draw(1, 8) != draw(2, 8)
    first, *rest = draw(1, 11)
    assert first in ("p1", "p2") and len(set(rest)) == 10  # enough negatives: no repeats
    many = draw(1, 30)[1:]
    assert len(many) == 29 and set(many) <= {n.docid for n in negatives}  # too few: with replacement
    with pytest.raises(Exception, match="at least 2 candidates"):
        sample_candidates(group, 1, random.Random(0))


@pytest.mark.parametrize("positives", ["one", "all"])
def test_candidates_carry_their_teacher_scores_into_the_layout(bpe_tokenizer_dir, positives):
    group = QueryGroup("q", "what digs", (Passage("p1", "the aardvark", score=-0.5), Passage("p2", "moles", score=2)),
                       tuple(Passage(f"n{i}", f"negative {i}", score=-float(i)) for i in range(6)))
    tok = Tokenizer.from_dir(bpe_tokenizer_dir)
    builder = GroupBuilder(tok, group_size=5, positives=positives, teacher_scores=True)
    built = [builder.build(group, group_rng(3, 0, i)) for i in range(2)]
    for i, unit in enumerate(built):
        drawn = sample_candidates(group, 5, group_rng(3, 0, i), positives)  # the same draw
        assert unit.teacher == tuple(p.score for p in drawn)
    row = Packer(4096).pack_groups(built)[0].to("cpu")
    assert row.group.teacher.tolist() == [s for unit in built for s in unit.teacher]  # candidate order
    plain = GroupBuilder(tok, group_size=5).build(group, group_rng(3, 0, 0))  # scores are read only when asked for
    assert plain.teacher is None and Packer(4096).pack_groups([plain])[0].group.teacher is None
    with pytest.raises(TsarankError, match="query q has no teacher scores, unlike the groups packed with it"):
        Packer(4096).pack_groups([built[0], plain])
    unscored = QueryGroup("q", "what digs", group.positives, (Passage("n0", "negative 0"),))  # read without scores
    with pytest.raises(TsarankError, match="query q: a sampled passage has no teacher score"):
        builder.build(unscored, group_rng(3, 0, 0))


def _groups_from_lengths(lengths_per_group, vocab=50, teacher=False):
    rng = random.Random(0)
    groups = []
    for q, lengths in enumerate(lengths_per_group):
        cands = []
        for n in lengths:
            ids = tuple(rng.randrange(vocab) for _ in range(n))
            cands.append(TokenSequence(ids, rng.randrange(1, n) if n > 1 else 1))
        scores = tuple(rng.uniform(-9, 0) for _ in lengths) if teacher else None
        groups.append(CandidateGroup(str(q), tuple(cands), teacher=scores))
    return groups


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(2, 40), min_size=2, max_size=6), min_size=1, max_size=12),
       st.integers(80, 300), st.booleans())
def test_group_packing_properties(lengths_per_group, max_tokens, teacher):
    """No token lost or duplicated, no row over budget, targets/masks/layout consistent with the sequences,
    teacher scores (when the groups carry them) in candidate order."""
    groups = _groups_from_lengths(lengths_per_group, teacher=teacher)
    if max(g.num_tokens for g in groups) > max_tokens:
        with pytest.raises(Exception, match="raise max_tokens"):
            Packer(max_tokens).pack_groups(groups)
        return
    rows = Packer(max_tokens).pack_groups(groups)
    seen = []
    for row in rows:
        assert row.num_tokens <= max_tokens
        cu = row.cu_seqlens.tolist()
        layout = row.group
        offsets = layout.group_offsets.tolist()
        cand_tokens = layout.token_candidate
        seqs = [row.input_ids[a:b].tolist() for a, b in zip(cu[:-1], cu[1:])]
        for c, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            assert row.position_ids[a:b].tolist() == list(range(b - a))
            assert row.targets[a:b - 1].tolist() == seqs[c][1:] and int(row.targets[b - 1]) == -1
        assert (layout.teacher is not None) == teacher
        for q, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            group = next(g for g in groups if [list(x.input_ids) for x in g.candidates] == seqs[lo:hi])
            seen.append(group.query_id)
            if teacher:
                assert layout.teacher.dtype == torch.float32
                assert layout.teacher[lo:hi].tolist() == pytest.approx(group.teacher, rel=1e-6)
            for c, cand in zip(range(lo, hi), group.candidates):
                a, b = cu[c], cu[c + 1]
                want = [c if a + j + 1 >= a + cand.target_start and j < b - a - 1 else -1 for j in range(b - a)]
                assert cand_tokens[a:b].tolist() == want
                assert row.gen_weight[a:b].tolist() == [float(c == lo and j < b - a - 1) for j in range(b - a)]
        assert row.kl_weight.tolist() == [1.0] * row.num_tokens
        row.ranking_batch()  # a valid layout for the listwise loss
    assert sorted(seen, key=int) == [g.query_id for g in groups]  # every group exactly once


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=30), st.integers(2, 80))
def test_sequence_packing_properties(lengths, max_tokens):
    seqs = [TokenSequence(tuple(range(i, i + n)), n // 2) for i, n in enumerate(lengths)]
    packer = Packer(max_tokens)
    rows = packer.pack_sequences(seqs)
    assert packer.truncated == sum(n > max_tokens for n in lengths)
    got = sorted(tuple(r.input_ids[a:b].tolist()) for r in rows
                 for a, b in zip(r.cu_seqlens.tolist()[:-1], r.cu_seqlens.tolist()[1:]))
    assert got == sorted(s.input_ids[:max_tokens] for s in seqs)
    for r in rows:
        assert r.num_tokens <= max_tokens and r.input_ids.dtype == torch.int64
        cu = r.cu_seqlens.tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            start = next(s.target_start for s in seqs if s.input_ids[: b - a] == tuple(r.input_ids[a:b].tolist()))
            assert r.loss_mask[a:b].tolist() == [j + 1 >= start and j < b - a - 1 for j in range(b - a)]
        assert torch.equal(r.loss_weight, r.loss_mask.float())


def test_rerank_inputs_from_a_run(tmp_path):
    from tsarank_engine.data.readers import rerank_pairs_from_run

    run = write_lines(tmp_path / "run.txt", ["q1 Q0 d2 1 9.5 bm25", "q1 Q0 d1 2 8.0 bm25", "q2 Q0 d3 1 3 bm25"])
    queries = write_lines(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}])
    corpus = write_lines(tmp_path / "corpus.jsonl", [{"_id": "d1", "text": "one", "title": "T"},
                                                     {"_id": "d2", "text": "two"}, {"_id": "d3", "text": "three"},
                                                     {"_id": "d4", "text": "unused"}])
    pairs = rerank_pairs_from_run(run, queries, corpus, top_k=1)
    assert [(p.qid, p.docid, p.query, p.passage) for p in pairs] == [("q1", "d2", "first", "two"),
                                                                     ("q2", "d3", "second", "three")]
    assert rerank_pairs_from_run(run, queries, corpus)[1].passage == "T one"  # title, space, text
    write_lines(corpus, [{"_id": "d1", "text": "one"}, {"_id": "d3", "text": "three"}])
    with pytest.raises(DataError, match=r"run.txt:1: document d2 is not in .*corpus.jsonl"):
        rerank_pairs_from_run(run, queries, corpus)


@pytest.mark.parametrize("lines,message", [
    ([], "the run is empty"),
    (["q1 Q0 d1 1 2.0"], "run.txt:1: a TREC run line has 6 fields"),
    (["q1 Q0 d1 1 2.0 t", "q1 Q0 d2 2 high t"], "run.txt:2: score 'high' is not a number"),
])
def test_bad_runs_are_named(tmp_path, lines, message):
    from tsarank_engine.data.readers import read_trec_run

    with pytest.raises(DataError, match=message):
        read_trec_run(write_lines(tmp_path / "run.txt", lines))


def test_files_with_a_byte_order_mark_are_read(tmp_path):
    from tsarank_engine.data.readers import read_qrels

    pairs = tmp_path / "p.jsonl"
    pairs.write_bytes(b"\xef\xbb\xbf" + json.dumps({"document": "d", "query": "q"}).encode() + b"\n")
    assert list(read_text_pairs(pairs)) == [TextPair("Document: d Query:", "q")]
    qrels = tmp_path / "q.txt"
    qrels.write_bytes(b"\xef\xbb\xbf" + b"17 0 d1 1\n")
    assert read_qrels(qrels) == {"17": {"d1": 1}}
    pairs.write_bytes(b'{"document": "d", "query": "\xff"}\n')
    with pytest.raises(DataError, match="p.jsonl:1: not valid UTF-8"):
        list(read_text_pairs(pairs))


def test_qrels_and_eval_lines(tmp_path):
    from tsarank_engine.data.readers import read_eval_lines, read_qrels

    qrels = read_qrels(SAMPLE_DIR / "dl19_qrels.txt")
    assert len(qrels) == 43 and all(isinstance(r, int) for q in qrels.values() for r in q.values())
    with pytest.raises(DataError, match="q.txt:2: relevance 'x' is not an integer"):
        read_qrels(write_lines(tmp_path / "q.txt", ["1 0 d 1", "1 0 e x"]))
    path = write_lines(tmp_path / "top.jsonl", [{"qid": 1, "pid": 7, "query": "q", "passage": "p"},
                                                {"qid": 1, "pid": 8, "query": "q"}])
    rows = read_eval_lines(path)
    assert next(rows).docid == "7"
    with pytest.raises(DataError, match="top.jsonl:2: missing field 'passage'"):
        next(rows)


def _rows_equal(a, b):
    def teacher(row):
        return row.group.teacher if row.group is not None and row.group.teacher is not None else torch.zeros(0)

    return all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.cu_seqlens, y.cu_seqlens)
               and torch.equal(x.loss_mask, y.loss_mask) and torch.equal(teacher(x), teacher(y))
               for x, y in zip(a, b)) and len(a) == len(b)


def scored_groups(lines, seed=0):
    """Sample group lines with a random teacher score on every passage."""
    rng = random.Random(seed)
    out = []
    for line in lines:
        group = json.loads(line)
        for key in ("positive_passages", "negative_passages"):
            group[key] = [{**p, "score": rng.uniform(-8, 0)} for p in group[key]]
        out.append(json.dumps(group))
    return out


@pytest.mark.parametrize("kind", ["cpt", "sft", "sft-kd"])
def test_stream_order_is_seeded_and_resumes_exactly(kind, bpe_tokenizer_dir, tmp_path):
    from tsarank_engine.data.stream import PackedStream

    def take(stream, n):  # the next n rows
        return [row for _, row in zip(range(n), stream)]

    tok = Tokenizer.from_dir(bpe_tokenizer_dir)
    source = SAMPLE_DIR / ("text_pairs.jsonl" if kind == "cpt" else "msmarco_groups.jsonl")
    path = tmp_path / "data.jsonl"
    lines = source.read_text().splitlines()[:12]
    lines = scored_groups(lines) if kind == "sft-kd" else lines
    path.write_text("\n".join(lines[:5] + ["", "   "] + lines[5:]) + "\n")  # blank lines are ignored
    units = CptBuilder(tok, 300) if kind == "cpt" else GroupBuilder(tok, group_size=4, teacher_scores=kind == "sft-kd")
    make = lambda seed: PackedStream(path, units, Packer(300 if kind == "cpt" else 4096), seed=seed,  # noqa: E731
                                     window=4)
    full = take(iter(make(0)), 12)  # crosses windows and epochs
    assert _rows_equal(full, take(iter(make(0)), 12))
    assert not _rows_equal(full, take(iter(make(1)), 12))
    first = make(0)
    stream = iter(first)
    take(stream, 5)
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint would store
    resumed = make(0)
    resumed.load_state_dict(saved)
    assert _rows_equal(take(iter(resumed), 7), full[5:])
    if kind != "cpt":
        counts = [r.group.group_offsets.numel() - 1 for r in full]
        assert all(c >= 1 for c in counts) and all(int(r.group.group_offsets[1]) == 4 for r in full)
        assert all((r.group.teacher is not None) == (kind == "sft-kd") for r in full)


def test_a_distilling_recipe_needs_a_score_on_every_passage(bpe_tokenizer_dir, tmp_path):
    from tsarank_engine.training.stream import recipe_stream

    lines = (SAMPLE_DIR / "msmarco_groups.jsonl").read_text().splitlines()[:4]
    path = write_lines(tmp_path / "groups.jsonl", scored_groups(lines[:2]) + lines[2:3] + scored_groups(lines[3:]))
    recipe = Recipe(run=RunSettings(stage="sft"), data=DataSettings(path=str(path)),
                    train=TrainSettings(batch_size=4, lr=1e-4), sft=SftSettings(group_size=4, w_kd=0.5))
    tok = Tokenizer.from_dir(bpe_tokenizer_dir)
    with pytest.raises(DataError, match=f"{path}:3: missing field 'score' in positive_passages\\[0\\]"):
        recipe_stream(recipe, tok, "llama").next_step()
    plain = recipe_stream(replace(recipe, sft=SftSettings(group_size=4)), tok, "llama")
    rows = plain.next_step().rows  # w_kd = 0: the scores are neither needed nor used
    assert all(row.group.teacher is None for row in rows)


@pytest.mark.parametrize("kind", ["cpt", "sft"])
def test_the_prefetcher_gives_the_streams_steps_and_state(kind, bpe_tokenizer_dir, tmp_path):
    from tsarank_engine.data.stream import PackedStream, Prefetcher

    tok = Tokenizer.from_dir(bpe_tokenizer_dir)
    source = SAMPLE_DIR / ("text_pairs.jsonl" if kind == "cpt" else "msmarco_groups.jsonl")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(source.read_text().splitlines()[:7]) + "\n")
    units = GroupBuilder(tok, group_size=4) if kind == "sft" else CptBuilder(tok, 300)
    make = lambda: PackedStream(path, units, Packer(4096 if kind == "sft" else 300), seed=3, window=3)  # noqa: E731
    plain, states = make(), []
    expected = []
    for _ in range(5):  # crosses an epoch
        expected.append(plain.next_step(2, 1))  # the second of two ranks
        states.append(plain.state_dict())
    stream = make()
    with Prefetcher(stream, 2, 1, count=5, depth=2) as prefetcher:
        assert prefetcher.state_dict() == make().state_dict()
        for want, state in zip(expected[:3], states):
            got = prefetcher.next_step(2, 1)
            assert _rows_equal(got.rows, want.rows) and got.rows_each == want.rows_each
            assert prefetcher.state_dict() == state  # the steps taken, not those made ahead
    assert stream.state_dict() == states[2]  # closed: the stream where the steps taken left it
    assert _rows_equal(stream.next_step(2, 1).rows, expected[3].rows)


def test_a_bad_line_met_ahead_is_raised_at_its_step_with_file_and_line(bpe_tokenizer_dir, tmp_path):
    from tsarank_engine.data.stream import PackedStream, Prefetcher

    lines = (SAMPLE_DIR / "text_pairs.jsonl").read_text().splitlines()[:4]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines[:3] + ['{"query": "no document"}']) + "\n")  # line 4 is bad
    stream = PackedStream(path, CptBuilder(Tokenizer.from_dir(bpe_tokenizer_dir), 300), Packer(300), window=1)
    order = stream.order(0).tolist()
    with Prefetcher(stream, 1, 0, count=4) as prefetcher:
        for _ in range(order.index(3)):
            prefetcher.next_step(1, 0)  # the steps before the bad line's arrive
        with pytest.raises(DataError, match=f"{path}:4"):
            prefetcher.next_step(1, 0)


def test_the_data_layer_does_not_import_the_loss_kernels():
    import subprocess
    import sys

    code = ("import sys, tsarank_engine.data.stream; "
            "print(sorted(m for m in sys.modules if m.startswith('tsarank_kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['tsarank_kernels', 'tsarank_kernels.layout']"
