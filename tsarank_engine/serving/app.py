"""The HTTP server: a Starlette app on uvicorn in front of the scheduler's model thread (`tsarank-engine serve`).

Each request is read (a JSON body under a size limit), checked (serving/api.py), prompted in a worker thread (the
paper's prompt and truncation, as `rerank` builds it) and handed to the scheduler; the handler then awaits its
scores or its client's disconnect, whichever comes first (a client gone has its pairs dropped). Every answer,
error or not, is logged as one line and counted in /metrics. uvicorn stops accepting on SIGTERM and waits for
the requests in flight; then the lifespan's end drains the scheduler and the process exits 0.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..data.prompting import PromptBuilder, PromptedPair
from ..errors import TsarankError
from ..model.decoder import CausalLM
from .api import BadRequest, models_answer, parse_rerank, parse_score, rerank_answer, score_answer
from .scheduler import QueueFull, Scheduler

log = logging.getLogger("tsarank_engine.serve")
CLIENT_GONE = 499  # nginx's "client closed request": logged and counted, received by nobody


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    max_batch_tokens: int
    max_documents: int = 1000
    max_queue: int = 64
    api_key: str | None = None
    batching: bool = True  # false: one request at a time (bench/serve.py's baseline)
    max_body_bytes: int = 16 * 2**20


class _ClientGone(Exception):
    pass


class _Metrics:
    """What /metrics reports, in a registry of this app's own."""

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        self.requests = Counter("tsarank_requests", "Requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("tsarank_request_seconds", "Time from request to answer, by endpoint", ["endpoint"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.documents = Counter("tsarank_documents", "Documents scored", registry=self.registry)
        self.tokens = Counter("tsarank_tokens", "Tokens scored", registry=self.registry)
        queue = Gauge("tsarank_queue_depth", "Requests waiting for scores", registry=self.registry)
        queue.set_function(lambda: scheduler.depth)
        self.batch_fill = Histogram("tsarank_batch_fill", "Tokens of a batch over --max-batch-tokens",
                                    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                                    registry=self.registry)

    def batch(self, pairs: int, tokens: int, fill: float) -> None:  # from the model thread
        self.documents.inc(pairs)
        self.tokens.inc(tokens)
        self.batch_fill.observe(fill)


# a handler's answer: (body, documents in the request, tokens scored)
Handler = Callable[[Request], Awaitable[tuple[dict[str, Any], int, int]]]


def build_app(model: CausalLM, prompts: PromptBuilder, settings: ServeSettings) -> Starlette:
    """The app serving `model`; its lifespan starts and drains the scheduler's model thread."""
    scheduler = Scheduler(model, settings.max_batch_tokens, settings.max_queue, settings.batching)
    metrics = _Metrics(scheduler)
    scheduler.on_batch = metrics.batch
    created = int(time.time())

    def endpoint(name: str, handler: Handler, open_: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """The handler with what every request gets: the key check, error bodies, the log line, the counts."""

        async def answer(request: Request) -> Response:
            start = time.perf_counter()
            documents = tokens = 0
            try:
                if settings.api_key is not None and not open_:
                    _check_key(request, settings.api_key)
                body, documents, tokens = await handler(request)
                response: Response = JSONResponse(body)
            except BadRequest as e:
                response = JSONResponse({"message": e.message}, status_code=e.status)
            except QueueFull as e:
                response = JSONResponse({"message": f"server busy: {e}; retry later"}, 503, {"Retry-After": "1"})
            except _ClientGone:
                response = Response(status_code=CLIENT_GONE)
            except Exception as e:  # answered and logged, never a traceback to the client; the server goes on
                log.exception("%s %s failed", request.method, request.url.path)
                response = JSONResponse({"message": f"internal error: {type(e).__name__}: {e}"}, 500)
            seconds = time.perf_counter() - start
            metrics.requests.labels(name, str(response.status_code)).inc()
            metrics.latency.labels(name).observe(seconds)
            log.info("%s %s %d documents=%d tokens=%d %.1fms", request.method, request.url.path,
                     response.status_code, documents, tokens, seconds * 1000)
            return response

        return answer

    async def scored(request: Request, query: str, documents: list[str], doc_limit: int | None,
                     model_name: str | None) -> tuple[list[float], int]:
        if model_name is not None and model_name != settings.model_name:
            log.warning("request names model %r; serving %r", model_name, settings.model_name)
        try:
            pairs: list[PromptedPair] = await run_in_threadpool(prompts.build_many, query, documents, doc_limit)
        except TsarankError as e:
            raise BadRequest(f"query: {e}") from None
        job = scheduler.submit(pairs)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # answered, or its client gone (or the handler cancelled): no pair of it is scored after this
            gone.cancel()
            if not job.future.done():
                scheduler.cancel(job)
        if not job.future.done():
            raise _ClientGone
        return job.future.result(), job.tokens

    async def rerank(request: Request, version: int) -> tuple[dict[str, Any], int, int]:
        parsed = parse_rerank(await _json_body(request, settings.max_body_bytes), version, settings.max_documents)
        scores, tokens = await scored(request, parsed.query, parsed.documents, parsed.max_tokens_per_doc,
                                      parsed.model)
        return rerank_answer(parsed, scores, tokens, settings.model_name), len(parsed.documents), tokens

    async def rerank_v1(request: Request) -> tuple[dict[str, Any], int, int]:
        return await rerank(request, 1)

    async def rerank_v2(request: Request) -> tuple[dict[str, Any], int, int]:
        return await rerank(request, 2)

    async def score(request: Request) -> tuple[dict[str, Any], int, int]:
        parsed = parse_score(await _json_body(request, settings.max_body_bytes), settings.max_documents)
        scores, tokens = await scored(request, parsed.query, parsed.documents, None, parsed.model)
        return score_answer(scores, tokens, settings.model_name), len(parsed.documents), tokens

    async def health(request: Request) -> tuple[dict[str, Any], int, int]:
        return {"status": "ok"}, 0, 0

    async def models(request: Request) -> tuple[dict[str, Any], int, int]:
        return models_answer(settings.model_name, created), 0, 0

    async def metrics_text(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: HTTPException) -> Response:  # unknown path, wrong method
        metrics.requests.labels("other", str(exc.status_code)).inc()
        log.info("%s %s %d documents=0 tokens=0 0.0ms", request.method, request.url.path, exc.status_code)
        return JSONResponse({"message": f"{request.method} {request.url.path}: {exc.detail}"}, exc.status_code,
                            getattr(exc, "headers", None))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    routes = [
        Route("/v1/rerank", endpoint("rerank", rerank_v1), methods=["POST"]),
        Route("/v2/rerank", endpoint("rerank", rerank_v2), methods=["POST"]),
        Route("/rerank", endpoint("rerank", rerank_v1), methods=["POST"]),
        Route("/score", endpoint("score", score), methods=["POST"]),
        Route("/v1/score", endpoint("score", score), methods=["POST"]),
        Route("/health", endpoint("health", health, open_=True), methods=["GET"]),
        Route("/v1/models", endpoint("models", models), methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.scheduler = scheduler
    return app


def _check_key(request: Request, key: str) -> None:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise BadRequest("missing or wrong API key (Authorization: Bearer <key>)", status=401)


async def _json_body(request: Request, limit: int) -> Any:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise BadRequest(f"Content-Type: the body must be JSON (application/json), got {kind!r}", status=415)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body has {declared} bytes, over this server's limit of {limit}", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"the request body is over this server's limit of {limit} bytes", status=413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read by then: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def run_server(app: Starlette, host: str, port: int, on_listening: Callable[[str], None]) -> None:
    """Serve `app` until SIGTERM or SIGINT (then uvicorn finishes the requests in flight); `on_listening` gets the
    address once the socket is bound (port 0: a free one)."""
    import signal

    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    bound_host, bound_port = sock.getsockname()[:2]
    on_listening(f"http://{bound_host}:{bound_port}")
    # uvicorn raises the signal it stopped on again once it has shut down gracefully; SIGTERM then ends here, so
    # that a stop asked for and carried out exits 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
