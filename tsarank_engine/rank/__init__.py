"""The ranking room: scores, reranking and evaluation of a model (and the Python API).

Holds the query-likelihood score on packed rows (scoring.py), resumable reranking of runs (reranking.py),
evaluation with ir_measures (evaluation.py) and the `Ranker` API (ranker.py). It may import the model and
data rooms, the foundation and `distributed`; not the recipe or training.
"""
