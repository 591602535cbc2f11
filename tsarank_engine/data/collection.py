"""Training data from a retrieval collection: a BEIR corpus.jsonl and queries.jsonl, TREC qrels and a TREC run.

Stage 2 (build_groups): per judged query, its judged-relevant documents as positives and hard negatives drawn
from the run's top ranks, as Tevatron rows {"query_id", "query", "positive_passages", "negative_passages"}; given
a teacher's scores (what `score` writes), each passage carries its "score", for distillation.
Stage 1 (build_qrels_pairs, build_title_pairs): {"document", "query"} rows, from judged positives or from a
corpus's titles (the paper's weak supervision: a document's text -> its title).

A passage is written as {"docid", "text"} with the title joined into "text" (readers.passage_text): the trainer's
prompt reads only "text" (sequences.py), and with no "title" key a Tevatron-style reader that joins title and
text itself cannot add the title twice.

Each builder returns its rows as an iterator with a Summary that is complete once the iterator is exhausted. The
corpus is streamed through `track` (e.g. a progress bar), keeping only the documents the rows need; a bad line of
any input is a DataError naming file and line. Documents or queries the rows cannot use (missing from the corpus,
empty) are skipped and counted, since real qrels name documents outside a corpus subset.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .readers import (DataError, Passage, RunEntry, iter_beir_corpus, passage_text, read_beir_queries, read_qrels,
                      read_teacher_scores, read_trec_run)

Row = dict[str, Any]
Track = Callable[[Iterator[Any]], Iterator[Any]]  # wraps the corpus stream, one item per line


def _untracked(items: Iterator[Any]) -> Iterator[Any]:
    return items


@dataclass
class Summary:
    """Rows written and the queries and documents skipped, by reason, the first example of each kept."""

    written: int = 0
    queries: Counter = field(default_factory=Counter)
    documents: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip_query(self, reason: str, qid: str) -> None:
        self.queries[reason] += 1
        self.examples.setdefault(reason, qid)

    def skip_document(self, reason: str, docid: str) -> None:
        self.documents[reason] += 1
        self.examples.setdefault(reason, docid)

    def report(self, noun: str) -> str:
        """One line, e.g. "wrote 3 groups; skipped 1 query: 1 x not in the run (first: q9)" (`noun` a plural)."""
        parts = [f"wrote {self.written} {noun if self.written != 1 else noun.removesuffix('s')}"]
        for one, many, counts in (("query", "queries", self.queries), ("document", "documents", self.documents)):
            if counts:
                total = sum(counts.values())
                reasons = ", ".join(f"{n} x {reason} (first: {self.examples[reason]})"
                                    for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
                parts.append(f"skipped {total} {one if total == 1 else many}: {reasons}")
        return "; ".join(parts)


def run_ranking(entries: list[RunEntry]) -> list[str]:
    """A query's run documents best first, ties by docid (as reranking.ranking_lines writes runs, so the order
    does not depend on the file's), a document named twice kept once at its best score."""
    return list(dict.fromkeys(e.docid for e in sorted(entries, key=lambda e: (-e.score, e.docid))))


def draw_negatives(candidates: list[str], k: int, seed: int, qid: str) -> list[str]:
    """Up to k of `candidates` sampled without replacement, seeded by (seed, qid) alone so that a query's draw
    does not depend on the other queries or file order; returned in `candidates`' order."""
    if len(candidates) <= k:
        return list(candidates)
    rng = random.Random(f"{seed}:{qid}")  # a str seed is hashed with SHA-512: the same in every process
    return [candidates[i] for i in sorted(rng.sample(range(len(candidates)), k))]


def _positives(judged: dict[str, int], min_relevance: int) -> list[str]:
    """The documents judged at or above min_relevance, highest grade first, then by docid."""
    return sorted((d for d, grade in judged.items() if grade >= min_relevance), key=lambda d: (-judged[d], d))


def _read_corpus(path: str | Path, wanted: set[str], track: Track) -> dict[str, Passage]:
    return {p.docid: p for p in track(iter_beir_corpus(path, wanted)) if p is not None}


def _usable(docids: list[str], corpus: dict[str, Passage], missing: str, summary: Summary) -> list[Row]:
    """{"docid", "text"} of the documents the corpus holds with some text; the others counted."""
    out = []
    for docid in docids:
        passage = corpus.get(docid)
        if passage is None:
            summary.skip_document(missing, docid)
        elif not passage_text(passage).strip():  # the trainer refuses an empty passage
            summary.skip_document("empty", docid)
        else:
            out.append({"docid": docid, "text": passage_text(passage)})
    return out


def build_groups(qrels_path: str | Path, run_path: str | Path, queries_path: str | Path, corpus_path: str | Path,
                 *, negatives: int = 30, depth: int = 100, skip_top: int = 0, min_relevance: int = 1, seed: int = 0,
                 track: Track = _untracked, teacher_scores: str | Path | None = None) -> tuple[Iterator[Row], Summary]:
    """Stage-2 groups, one per judged query (qrels order) that has a usable positive and negative.

    Positives: the documents judged >= min_relevance. Negatives: up to `negatives` drawn (draw_negatives) from
    the run's ranks skip_top+1..depth (run_ranking) less the documents judged >= min_relevance, written in run
    order. skip_top drops the first ranks, where unjudged relevant documents hide. With teacher_scores (a file
    `score` wrote) every passage written gets its (qid, docid)'s "score"; one the file lacks is an error. The
    inputs are read here; the groups are assembled as the iterator is consumed.
    """
    qrels = read_qrels(qrels_path)
    run = read_trec_run(run_path)
    queries = read_beir_queries(queries_path, set(qrels))
    teacher = read_teacher_scores(teacher_scores) if teacher_scores is not None else None
    positives = {qid: _positives(judged, min_relevance) for qid, judged in qrels.items()}
    # The negative candidates (an unjudged document counts as not relevant) before the corpus is read, so that
    # only the documents a group can use are kept.
    windows = {qid: [d for d in run_ranking(run[qid])[skip_top:depth]
                     if qrels[qid].get(d, min_relevance - 1) < min_relevance]
               for qid in qrels if qid in run}
    needed = [qid for qid in qrels if qid in queries and positives[qid] and qid in run]
    corpus = _read_corpus(corpus_path, {d for qid in needed for d in (*positives[qid], *windows[qid])}, track)
    summary = Summary()

    def groups() -> Iterator[Row]:
        for qid in qrels:
            if qid not in queries:
                summary.skip_query("not in the queries file", qid)
                continue
            if not positives[qid]:
                summary.skip_query(f"no positive judged >= {min_relevance}", qid)
                continue
            if qid not in run:
                summary.skip_query("not in the run", qid)
                continue
            found = _usable(positives[qid], corpus, "positive not in the corpus", summary)
            if not found:
                summary.skip_query("no positive in the corpus", qid)
                continue
            candidates = _usable(windows[qid], corpus, "run document not in the corpus", summary)
            if not candidates:
                summary.skip_query("no negative left", qid)
                continue
            # Drawn among the usable candidates: a document missing from the corpus does not take a place.
            chosen = set(draw_negatives([c["docid"] for c in candidates], negatives, seed, qid))
            drawn = [c for c in candidates if c["docid"] in chosen]
            if teacher is not None:
                found, drawn = (_scored(passages, qid, teacher, teacher_scores) for passages in (found, drawn))
            summary.written += 1
            yield {"query_id": qid, "query": queries[qid], "positive_passages": found, "negative_passages": drawn}

    return groups(), summary


def _scored(passages: list[Row], qid: str, teacher: dict[tuple[str, str], float], path: str | Path) -> list[Row]:
    """The passages with their teacher scores."""
    for p in passages:
        if (qid, p["docid"]) not in teacher:
            raise DataError(f"{path}: no teacher score for query {qid}, document {p['docid']}")
    return [{**p, "score": teacher[qid, p["docid"]]} for p in passages]


def build_qrels_pairs(qrels_path: str | Path, queries_path: str | Path, corpus_path: str | Path, *,
                      min_relevance: int = 1, track: Track = _untracked) -> tuple[Iterator[Row], Summary]:
    """Stage-1 pairs {"document", "query"}: each document judged >= min_relevance with its query, in qrels order
    of queries, a query's documents highest grade first."""
    qrels = read_qrels(qrels_path)
    queries = read_beir_queries(queries_path, set(qrels))
    positives = {qid: _positives(judged, min_relevance) for qid, judged in qrels.items()}
    corpus = _read_corpus(corpus_path, {d for qid in qrels if qid in queries for d in positives[qid]}, track)
    summary = Summary()

    def pairs() -> Iterator[Row]:
        for qid in qrels:
            if qid not in queries:
                summary.skip_query("not in the queries file", qid)
                continue
            if not positives[qid]:
                summary.skip_query(f"no positive judged >= {min_relevance}", qid)
                continue
            found = _usable(positives[qid], corpus, "positive not in the corpus", summary)
            if not found:
                summary.skip_query("no positive in the corpus", qid)
            for passage in found:
                summary.written += 1
                yield {"document": passage["text"], "query": queries[qid]}

    return pairs(), summary


def build_title_pairs(corpus_path: str | Path, track: Track = _untracked) -> tuple[Iterator[Row], Summary]:
    """Stage-1 pairs {"document": text, "query": title} of a corpus with titles, in corpus order, streamed (the
    corpus is read as the iterator is consumed); a document without a title or a text is skipped and counted."""
    summary = Summary()

    def pairs() -> Iterator[Row]:
        for passage in track(iter_beir_corpus(corpus_path)):
            if not passage.title.strip():
                summary.skip_document("no title", passage.docid)
            elif not passage.text.strip():
                summary.skip_document("title but no text", passage.docid)
            else:
                summary.written += 1
                yield {"document": passage.text, "query": passage.title}

    return pairs(), summary
