"""tsarank-engine: training and scoring LLM text rankers (RankingGPT's two-stage recipe).

The public surface: `Ranker` (rank/ranker.py: scoring, reranking), `load_model` and `export_model`
(model/loading.py, model/export.py: Hugging Face checkpoints in and out), `train` (training/trainer.py: a
recipe's run). Each is imported on first use, so that the command line answers `--help` without loading
torch. The rooms and what each may import: DESIGN.md, "Layout".
"""

__version__ = "0.1.0"

_PUBLIC = {"Ranker": "rank.ranker", "load_model": "model.loading", "export_model": "model.export",
           "train": "training.trainer"}


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'tsarank_engine' has no attribute {name!r}")
