"""tsarank-engine: training and scoring LLM text rankers (RankingGPT's two-stage recipe)."""

__version__ = "0.1.0"
