"""Streaming readers of the training files: stage-1 text pairs and stage-2 query groups (Tevatron format).

Each reader yields one checked row at a time, so a file of ten million lines is never held in memory. A bad
row (malformed JSON, a missing or non-string field, a group without a positive, an empty text, a teacher
score that is not a number) is a DataError naming the file and line; with a SkipCounter the row is skipped
instead and counted, and the counter's report() says how many were skipped and why, once the reading is over.
"""

from __future__ import annotations

import functools
import json
import math
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..errors import TsarankError
from .prompting import PROMPT_TEMPLATE

Row = TypeVar("Row")


class DataError(TsarankError):
    """A bad row of an input file: the message starts with "file:line:"."""


@dataclass
class SkipCounter:
    """Counts the rows skipped instead of failing, by reason (the first example of each kept)."""

    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def add(self, error: DataError, reason: str) -> None:
        self.reasons[reason] += 1
        self.examples.setdefault(reason, str(error))

    def report(self) -> str:
        if not self.skipped:
            return "no rows skipped"
        parts = [f"{n} x {reason} (first: {self.examples[reason]})" for reason, n in self.reasons.most_common()]
        return f"{self.skipped} rows skipped: " + "; ".join(parts)


@dataclass(frozen=True)
class TextPair:
    """A stage-1 example: the model reads source + response; the loss covers the response."""

    source: str  # "Document: <d> Query:"
    response: str  # the query


@dataclass(frozen=True)
class Passage:
    docid: str
    text: str
    title: str = ""
    score: float | None = None  # a stage-2 passage's teacher score (its "score"), for distillation


@dataclass(frozen=True)
class QueryGroup:
    """A stage-2 example: a query with its positive and negative passages."""

    query_id: str
    query: str
    positives: tuple[Passage, ...]
    negatives: tuple[Passage, ...]


class _RowError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def read_jsonl(path: str | Path, parse: Callable[[dict[str, Any]], Row],
               skips: SkipCounter | None = None) -> Iterator[Row]:
    """Rows of a JSONL file through `parse`, blank lines ignored; errors name file and line."""
    return (row for _, row in read_numbered_jsonl(path, parse, skips))


def read_numbered_jsonl(path: str | Path, parse: Callable[[dict[str, Any]], Row],
                        skips: SkipCounter | None = None) -> Iterator[tuple[int, Row]]:
    """(line number, row) of a JSONL file through `parse`, blank lines ignored; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                row = parse_line(path, lineno, raw, parse, skips)
                if row is not _SKIPPED:
                    yield lineno, row


_SKIPPED = object()


def parse_line(path: Path, lineno: int, raw: bytes, parse: Callable[[dict[str, Any]], Row],
               skips: SkipCounter | None = None) -> Any:
    """One JSONL line through `parse`; a bad one raises DataError naming file and line, or with `skips` is
    counted and returns the module's skip marker."""
    try:
        try:
            obj = json.loads(raw.decode("utf-8-sig"))  # a byte-order mark, as some editors write, is no error
        except UnicodeDecodeError as err:
            raise _RowError("not UTF-8", f"not valid UTF-8 ({err})") from None
        except json.JSONDecodeError as err:
            raise _RowError("malformed JSON", f"malformed JSON ({err})") from None
        if not isinstance(obj, dict):
            raise _RowError("not an object", f"expected a JSON object, got {type(obj).__name__}")
        return parse(obj)
    except _RowError as err:
        error = DataError(f"{path}:{lineno}: {err}")
        if skips is None:
            raise error from None
        skips.add(error, err.reason)
        return _SKIPPED


def is_skipped(row: Any) -> bool:
    return row is _SKIPPED


def _text(obj: dict[str, Any], key: str, where: str = "") -> str:
    if key not in obj:
        raise _RowError(f"missing {key!r}", f"missing field {key!r}{where}")
    value = obj[key]
    if not isinstance(value, str):
        raise _RowError(f"non-string {key!r}", f"field {key!r}{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(f"empty {key!r}", f"field {key!r}{where} is empty")
    return value


def parse_text_pair(obj: dict[str, Any]) -> TextPair:
    """The paper's {"query": "Document: ... Query:", "response": q} or a plain {"document": d, "query": q}."""
    if "response" in obj:
        return TextPair(_text(obj, "query"), _text(obj, "response"))
    if "document" in obj:
        return TextPair(PROMPT_TEMPLATE.format(doc=_text(obj, "document")), _text(obj, "query"))
    raise _RowError("unknown form", 'expected {"query", "response"} (the paper\'s form) or {"document", "query"}')


def _identifier(obj: dict[str, Any], key: str, where: str = "") -> str:
    """An id field: a string, or a number (some exports write numeric ids) read as its decimal string."""
    value = obj.get(key)
    return _text({key: str(value)} if isinstance(value, int) else obj, key, where)


def _score(obj: dict[str, Any], key: str, where: str = "") -> float:
    """A finite number (a JSON int or float; true and false are not scores)."""
    if key not in obj:
        raise _RowError(f"missing {key!r}", f"missing field {key!r}{where}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _RowError(f"bad {key!r}", f"field {key!r}{where} must be a finite number, got {value!r}")
    return float(value)


def _passages(obj: dict[str, Any], key: str, scores: bool) -> tuple[Passage, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise _RowError(f"non-list {key!r}", f"field {key!r} must be a list of passages")
    out = []
    for i, p in enumerate(value):
        where = f" in {key}[{i}]"
        if not isinstance(p, dict):
            raise _RowError("passage not an object", f"{key}[{i}] must be an object with docid and text")
        title = p.get("title", "")
        if not isinstance(title, str):
            raise _RowError("non-string 'title'", f"field 'title'{where} must be a string")
        if scores and "score" not in p:
            raise _RowError("missing 'score'", f"missing field 'score'{where}: distillation (sft.w_kd > 0) needs "
                            "a teacher score on every passage")
        score = _score(p, "score", where) if "score" in p else None
        out.append(Passage(_identifier(p, "docid", where), _text(p, "text", where), title, score))
    return tuple(out)


def parse_query_group(obj: dict[str, Any], scores: bool = False) -> QueryGroup:
    """A Tevatron row: {"query_id", "query", "positive_passages", "negative_passages"}; a passage's "score" (a
    teacher's) is read when present and, with `scores`, required."""
    group = QueryGroup(
        _identifier(obj, "query_id"),
        _text(obj, "query"),
        _passages(obj, "positive_passages", scores),
        _passages(obj, "negative_passages", scores),
    )
    if not group.positives:
        raise _RowError("no positive", f"query {group.query_id} has no positive passage")
    if not group.negatives:
        raise _RowError("no negative", f"query {group.query_id} has no negative passage")
    return group


def read_text_pairs(path: str | Path, skips: SkipCounter | None = None) -> Iterator[TextPair]:
    return read_jsonl(path, parse_text_pair, skips)


def read_query_groups(path: str | Path, skips: SkipCounter | None = None,
                      scores: bool = False) -> Iterator[QueryGroup]:
    return read_jsonl(path, functools.partial(parse_query_group, scores=scores), skips)


# Reranking inputs: a first-stage TREC run with BEIR-style queries and corpus, or the paper's evaluation lines;
# TREC qrels for evaluation.


@dataclass(frozen=True)
class RunEntry:
    docid: str
    score: float
    line: int  # where the run names it, for errors found later (e.g. a document the corpus lacks)


@dataclass(frozen=True)
class RerankPair:
    """One (query, passage) to score, from the paper's evaluation lines or a run joined with its texts."""

    qid: str
    docid: str
    query: str
    passage: str


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig").strip()  # a byte-order mark is no error
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({err})") from None
            if text:
                yield lineno, text


def _columns(path: Path, kind: str, names: str, column: int, convert: Callable[[str], Any],
             meaning: str) -> Iterator[tuple[int, list[str], Any]]:
    """(line, fields, convert(fields[column])) of a whitespace-separated file whose lines hold `names`."""
    count = len(names.split())
    for lineno, text in _lines(path):
        fields = text.split()
        if len(fields) != count:
            raise DataError(f"{path}:{lineno}: a {kind} line has {count} fields ({names}), got {len(fields)}")
        try:
            value = convert(fields[column])
        except ValueError:
            raise DataError(f"{path}:{lineno}: {names.split()[column]} {fields[column]!r} is not {meaning}") from None
        yield lineno, fields, value


def read_trec_run(path: str | Path) -> dict[str, list[RunEntry]]:
    """{qid: entries in file order} from lines "qid Q0 docid rank score tag"."""
    path = Path(path)
    run: dict[str, list[RunEntry]] = {}
    for lineno, fields, score in _columns(path, "TREC run", "qid Q0 docid rank score tag", 4, float, "a number"):
        run.setdefault(fields[0], []).append(RunEntry(fields[2], score, lineno))
    if not run:
        raise DataError(f"{path}: the run is empty")
    return run


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """{qid: {docid: relevance}} from lines "qid iteration docid relevance"."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for _, fields, relevance in _columns(path, "qrels", "qid iteration docid relevance", 3, int, "an integer"):
        qrels.setdefault(fields[0], {})[fields[2]] = relevance
    if not qrels:
        raise DataError(f"{path}: the qrels file is empty")
    return qrels


def _beir_text(obj: dict[str, Any]) -> tuple[str, str]:
    return _identifier(obj, "_id"), _text(obj, "text")


def read_beir_queries(path: str | Path, wanted: set[str] | None = None) -> dict[str, str]:
    """{_id: text} of a BEIR queries.jsonl; with `wanted`, only those queries are kept and checked (the others
    need only an _id)."""

    def parse(obj: dict[str, Any]) -> tuple[str, str] | None:
        return _beir_text(obj) if wanted is None or _identifier(obj, "_id") in wanted else None

    return dict(row for row in read_jsonl(path, parse) if row is not None)


def iter_beir_corpus(path: str | Path, wanted: set[str] | None = None) -> Iterator[Passage | None]:
    """The documents of a BEIR corpus.jsonl (optional "title") one non-blank line at a time, None for an id not
    in `wanted` (so that a caller can show progress over lines it does not keep). Only the kept documents are
    checked beyond their _id, and their text may be empty: real corpora hold empty and title-only documents
    (Cranfield, BEIR's others)."""

    def parse(obj: dict[str, Any]) -> Passage | None:
        doc_id = _identifier(obj, "_id")
        if wanted is not None and doc_id not in wanted:
            return None
        if "text" not in obj:
            raise _RowError("missing 'text'", "missing field 'text'")
        text, title = obj["text"], obj.get("title", "")
        for key, value in (("text", text), ("title", title)):
            if not isinstance(value, str):
                raise _RowError(f"non-string {key!r}", f"field {key!r} must be a string, got {type(value).__name__}")
        return Passage(doc_id, text, title)

    return read_jsonl(path, parse)


def read_beir_corpus(path: str | Path, wanted: set[str] | None = None) -> dict[str, Passage]:
    """{_id: Passage} of a BEIR corpus.jsonl (see iter_beir_corpus), keeping only `wanted` ids when given, so
    that a large corpus is streamed rather than held."""
    return {p.docid: p for p in iter_beir_corpus(path, wanted) if p is not None}


def passage_text(passage: Passage) -> str:
    """What the model reads of a BEIR document: "<title> <text>", or whichever of the two is not blank."""
    if passage.title.strip() and passage.text.strip():
        return f"{passage.title} {passage.text}"
    return passage.title if passage.title.strip() else passage.text


def rerank_pairs_from_run(run_path: str | Path, queries_path: str | Path, corpus_path: str | Path,
                          top_k: int | None = None) -> list[RerankPair]:
    """The run's top_k candidates per query joined with their texts; a query or document missing from the
    queries or corpus file is an error naming the run's line. Only the queries and documents the run's top_k
    name are read beyond their ids; a document with an empty text gives an empty passage."""
    run = read_trec_run(run_path)
    run = {qid: sorted(entries, key=lambda e: -e.score)[:top_k] for qid, entries in run.items()}
    queries = read_beir_queries(queries_path, set(run))
    corpus = read_beir_corpus(corpus_path, {e.docid for entries in run.values() for e in entries})
    pairs = []
    for qid, entries in run.items():
        for e in entries:
            if qid not in queries:
                raise DataError(f"{run_path}:{e.line}: query {qid} is not in {queries_path}")
            if e.docid not in corpus:
                raise DataError(f"{run_path}:{e.line}: document {e.docid} is not in {corpus_path}")
            pairs.append(RerankPair(qid, e.docid, queries[qid], passage_text(corpus[e.docid])))
    return pairs


def parse_eval_line(obj: dict[str, Any]) -> RerankPair:
    """The paper's evaluation line {"qid", "pid", "query", "passage"} (ids may be numbers)."""
    return RerankPair(_identifier(obj, "qid"), _identifier(obj, "pid"), _text(obj, "query"), _text(obj, "passage"))


def parse_score_pair(obj: dict[str, Any]) -> dict[str, Any]:
    """A `score` input line {"qid", "docid", "query", "document"} (ids may be numbers), checked; the whole object
    is kept, as `score` writes it back with its score."""
    for key in ("qid", "docid"):
        _identifier(obj, key)
    for key in ("query", "document"):
        _text(obj, key)
    return obj


def read_teacher_scores(path: str | Path) -> dict[tuple[str, str], float]:
    """{(qid, docid): score} of what `score` writes (its input lines with "score"); a pair scored twice with
    different scores is an error naming the second line."""

    def parse(obj: dict[str, Any]) -> tuple[str, str, float]:
        parse_score_pair(obj)
        return _identifier(obj, "qid"), _identifier(obj, "docid"), _score(obj, "score")

    scores: dict[tuple[str, str], float] = {}
    for lineno, (qid, docid, score) in read_numbered_jsonl(path, parse):
        if scores.setdefault((qid, docid), score) != score:
            raise DataError(f"{path}:{lineno}: query {qid}, document {docid} scored again: {score} after "
                            f"{scores[qid, docid]}")
    return scores


def read_eval_lines(path: str | Path, skips: SkipCounter | None = None) -> Iterator[RerankPair]:
    return read_jsonl(path, parse_eval_line, skips)


class EvalLinesIndex:
    """The candidates of a file of the paper's evaluation lines, held as places in the file rather than texts.

    A first pass checks every line (a bad one fails before any model is loaded) and keeps, per query in
    first-seen order, the byte offsets of its first top_k lines of distinct documents in file order (a
    document named again for a query counts once). pairs() reads a few queries' lines back on demand, so a
    query's lines need not be contiguous and memory does not grow with the texts.
    """

    def __init__(self, path: str | Path, top_k: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        self._offsets: dict[str, array] = {}
        self._linenos: dict[str, array] = {}
        seen: dict[str, set[str]] = {}  # the documents of queries still short of top_k
        end = 0
        with open(self.path, "rb") as f:
            self._stamp = self._stat(f.fileno())  # taken first: a file growing during this pass is caught later
            for lineno, raw in enumerate(f, 1):
                start, end = end, end + len(raw)
                if not raw.strip():
                    continue
                pair = parse_line(self.path, lineno, raw, parse_eval_line)
                offsets = self._offsets.setdefault(pair.qid, array("q"))
                if top_k is not None and len(offsets) >= top_k:
                    continue
                docs = seen.setdefault(pair.qid, set())
                if pair.docid in docs:
                    continue
                docs.add(pair.docid)
                offsets.append(start)
                self._linenos.setdefault(pair.qid, array("q")).append(lineno)
                if len(offsets) == top_k:
                    del seen[pair.qid]
        self.counts: dict[str, int] = {qid: len(offsets) for qid, offsets in self._offsets.items()}

    @staticmethod
    def _stat(fd: int) -> tuple[int, int]:
        st = os.fstat(fd)
        return st.st_size, st.st_mtime_ns

    def pairs(self, qids: list[str]) -> dict[str, list[RerankPair]]:
        """{qid: its candidates in file order} for the queries asked for, read back from the file."""
        places = sorted((offset, lineno, qid) for qid in qids
                        for offset, lineno in zip(self._offsets[qid], self._linenos[qid]))
        out: dict[str, list[RerankPair]] = {qid: [] for qid in qids}
        with open(self.path, "rb") as f:
            if self._stat(f.fileno()) != self._stamp:
                raise DataError(f"{self.path}: the file changed while it was being reranked")
            for offset, lineno, qid in places:
                f.seek(offset)
                pair = parse_line(self.path, lineno, f.readline(), parse_eval_line)
                if pair.qid != qid:  # the size and mtime held, yet the line moved: say so rather than mix
                    raise DataError(f"{self.path}:{lineno}: the file changed while it was being reranked")
                out[qid].append(pair)
        return out
