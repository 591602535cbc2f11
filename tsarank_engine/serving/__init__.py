"""The serving room: a trained ranker behind the reranking APIs RAG stacks call (`tsarank-engine serve`).

Holds the APIs' requests and answers (api.py), the cross-request batching scheduler and its model thread
(scheduler.py), and the Starlette app on uvicorn with its limits, key check, log and metrics (app.py). It may
import the foundation, model/, data/ and rank/; Starlette, uvicorn and prometheus_client come with the `serve`
extra and are imported only here.
"""
