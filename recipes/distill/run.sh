#!/usr/bin/env bash
# Distillation from teacher scores (README.md, "Distillation from teacher scores") on the embedded sample data:
# a teacher scores each candidate, `groups --teacher-scores` puts its scores on the stage-2 groups, and stage 2
# trains on them with sft.w_kd > 0 (recipes/distill/sft.toml). The teacher is any checkpoint, by default the
# stage-2 model recipes/sft.toml writes (train recipes/cpt.toml and recipes/sft.toml first).
#
#     recipes/distill/run.sh [TEACHER_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
teacher=${1:-runs/sft/final}
work=runs/distill
mkdir -p "$work"

# The sample's 100 MS MARCO groups as a collection (bench/quality.py's: BEIR queries and corpus, per split TREC
# qrels and a run of each query's candidates) and, to score, the training queries' positives and first 16
# candidates of the run (what `groups --depth 16` draws its negatives from).
python3 - "$work" <<'PY'
import json, sys
from pathlib import Path

sys.path.insert(0, "bench")
from quality import write_collection

work = Path(sys.argv[1])
write_collection(work)
queries = {q["_id"]: q["text"] for q in map(json.loads, open(work / "queries.jsonl"))}
corpus = {d["_id"]: d["text"] for d in map(json.loads, open(work / "corpus.jsonl"))}
wanted = {(qid, docid) for qid, _, docid, _ in map(str.split, open(work / "train.qrels"))}
wanted |= {(qid, docid) for qid, _, docid, rank, *_ in map(str.split, open(work / "train.run")) if int(rank) <= 16}
with open(work / "pairs.jsonl", "w") as out:
    for qid, docid in sorted(wanted):
        out.write(json.dumps({"qid": qid, "docid": docid, "query": queries[qid], "document": corpus[docid]}) + "\n")
PY

# 1. the teacher's score of every candidate
tsarank-engine score --model "$teacher" --pairs "$work/pairs.jsonl" --out "$work/teacher.jsonl"
# 2. stage-2 groups (7 hard negatives each) carrying those scores
tsarank-engine groups --qrels "$work/train.qrels" --run "$work/train.run" --queries "$work/queries.jsonl" \
    --corpus "$work/corpus.jsonl" --negatives 7 --depth 16 --teacher-scores "$work/teacher.jsonl" \
    --out "$work/groups.jsonl"
# 3. stage 2 of the embedded default with L_kd
tsarank-engine train recipes/distill/sft.toml --overwrite
