"""tsarank-engine: training and scoring LLM text rankers (RankingGPT's two-stage recipe).

`from tsarank_engine import Ranker` is the Python API for scoring (ranker.py); it is imported on first use,
so that the command line answers `--help` without loading torch.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Ranker":
        from .ranker import Ranker

        return Ranker
    raise AttributeError(f"module 'tsarank_engine' has no attribute {name!r}")
