"""`tsarank-engine serve` as its users call it: the official cohere SDK (v1 and v2 clients) and plain HTTP, on
127.0.0.1 only. Scores equal Ranker's (the same prompt and truncation) to 1e-5; every malformed request gets a
4xx naming its field; a flood of mixed requests from many threads is answered request by request; a full queue
answers 503, a client that goes away has its pairs dropped, SIGTERM finishes what is in flight and exits 0."""

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from tsarank_engine.data.prompting import PromptBuilder
from tsarank_engine.data.tokenization import Tokenizer
from tsarank_engine.model.loading import load_model
from tsarank_engine.rank.ranker import Ranker
from tsarank_engine.rank.scoring import score_pairs

from conftest import msmarco_groups

httpx = pytest.importorskip("httpx")  # the dev extra's clients and the serve extra (no registry on the GPU machine)
uvicorn = pytest.importorskip("uvicorn")
cohere = pytest.importorskip("cohere")
from tsarank_engine.serving.app import ServeSettings, build_app  # noqa: E402

GROUPS = msmarco_groups()[:6]
QUERY = GROUPS[0]["query"]
DOCS = [p["text"] for p in GROUPS[0]["positive_passages"][:1] + GROUPS[0]["negative_passages"][:7]]


@contextmanager
def running(app):
    """`app` on uvicorn in a thread, on a free port of 127.0.0.1; yields its URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def ranker(tiny_llama_dir):
    return Ranker(load_model(tiny_llama_dir), Tokenizer.from_dir(tiny_llama_dir))


def make_app(ranker, **settings):
    return build_app(ranker.model, PromptBuilder(ranker.tokenizer), ServeSettings("tiny", **{"max_batch_tokens": 512,
                                                                                              **settings}))


@pytest.fixture(scope="module")
def url(ranker):
    with running(make_app(ranker, api_key=None)) as address:
        yield address


def post(url, path, body, **kwargs):
    return httpx.post(url + path, json=body, timeout=60, **kwargs)


def expected_order(scores):
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rerank_over_http_equals_the_ranker(url, ranker, path):
    scores = ranker.score(QUERY, DOCS)
    answer = post(url, path, {"model": "tiny", "query": QUERY, "documents": DOCS, "top_n": 5,
                              "return_documents": True, "some_future_field": 1})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [r["index"] for r in body["results"]] == expected_order(scores)[:5]
    for r in body["results"]:
        assert abs(r["mean_logprob"] - scores[r["index"]]) < 1e-5
        assert r["relevance_score"] == pytest.approx(math.exp(r["mean_logprob"]), rel=1e-12)
        assert r["document"] == {"text": DOCS[r["index"]]}
    prompts = ranker.prompts.build_many(QUERY, DOCS)
    assert body["usage"]["total_tokens"] == sum(len(p.input_ids) for p in prompts)
    assert body["model"] == "tiny" and body["meta"]["billed_units"]["search_units"] == 1 and body["id"]
    everything = post(url, path, {"query": QUERY, "documents": DOCS, "top_n": 100}).json()["results"]
    assert len(everything) == len(DOCS) and all("document" not in r for r in everything)


def test_the_cohere_sdk_v2_and_v1_clients(url, ranker):
    scores = ranker.score(QUERY, DOCS)
    v2 = cohere.ClientV2(api_key="unused", base_url=url).rerank(model="tiny", query=QUERY, documents=DOCS, top_n=3)
    assert [r.index for r in v2.results] == expected_order(scores)[:3]
    assert all(abs(math.log(r.relevance_score) - scores[r.index]) < 1e-5 for r in v2.results)
    documents = [{"text": d} for d in DOCS]  # v1 also takes objects
    v1 = cohere.Client(api_key="unused", base_url=url).rerank(query=QUERY, documents=documents, top_n=4,
                                                              return_documents=True)
    assert [r.index for r in v1.results] == expected_order(scores)[:4]
    assert [r.document.text for r in v1.results] == [DOCS[i] for i in expected_order(scores)[:4]]


def test_max_tokens_per_doc_and_empty_documents_score_as_the_ranker(url, ranker):
    builder = PromptBuilder(ranker.tokenizer, max_doc_tokens=5)
    expected = score_pairs(ranker.model, builder.build_many(QUERY, DOCS))
    got = post(url, "/v2/rerank", {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 5}).json()["results"]
    assert all(abs(r["mean_logprob"] - expected[r["index"]]) < 1e-5 for r in got)
    empty = ranker.score(QUERY, ["", "   "])
    got = post(url, "/v2/rerank", {"query": QUERY, "documents": ["", "   "]}).json()["results"]
    assert all(abs(r["mean_logprob"] - empty[r["index"]]) < 1e-5 for r in got)


def test_score_health_models_and_metrics(url, ranker):
    got = post(url, "/score", {"model": "tiny", "text_1": QUERY, "text_2": DOCS[:3]}).json()
    scores = ranker.score(QUERY, DOCS[:3])
    assert [d["index"] for d in got["data"]] == [0, 1, 2]
    assert all(abs(math.log(d["score"]) - s) < 1e-5 for d, s in zip(got["data"], scores))
    assert post(url, "/score", {"text_1": QUERY, "text_2": DOCS[0]}).json()["data"][0]["index"] == 0
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    post(url, "/v2/rerank", {"query": ""})
    metrics = httpx.get(url + "/metrics").text
    assert re.search(r'tsarank_requests_total\{endpoint="score",status="200"\} [1-9]', metrics)
    assert re.search(r'tsarank_requests_total\{endpoint="rerank",status="400"\} [1-9]', metrics)
    for name in ("tsarank_request_seconds_bucket", "tsarank_documents_total", "tsarank_tokens_total",
                 "tsarank_queue_depth 0.0", "tsarank_batch_fill_bucket"):
        assert name in metrics


MALFORMED = [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"content": b"query=x", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415, "Content-Type"),
    ({"json": ["a list"]}, 400, "JSON object"),
    ({"json": {"documents": ["d"]}}, 400, "query: required"),
    ({"json": {"query": "  ", "documents": ["d"]}}, 400, "query: must not be empty"),
    ({"json": {"query": 3, "documents": ["d"]}}, 400, "query: must be a string"),
    ({"json": {"query": "q"}}, 400, "documents: required"),
    ({"json": {"query": "q", "documents": []}}, 400, "documents: must not be empty"),
    ({"json": {"query": "q", "documents": "d"}}, 400, "documents: must be a list"),
    ({"json": {"query": "q", "documents": ["d", 7]}}, 400, r"documents\[1\]: must be a string"),
    ({"json": {"query": "q", "documents": ["d"], "top_n": 0}}, 400, "top_n: must be an integer of at least 1"),
    ({"json": {"query": "q", "documents": ["d"], "top_n": "3"}}, 400, "top_n: must be an integer"),
    ({"json": {"query": "q", "documents": ["d"] * 51}}, 413, "--max-documents 50"),
    ({"json": {"query": "q", "documents": ["d"], "return_documents": "yes"}}, 400, "return_documents"),
    ({"json": {"query": "word " * 600, "documents": ["d"]}}, 400, "query: .*no room for the document"),
    ({"content": b"x" * 70000, "headers": {"content-type": "application/json"}}, 413, "over this server's limit"),
]


@pytest.fixture(scope="module")
def small_url(ranker):
    with running(make_app(ranker, max_documents=50, max_body_bytes=65536)) as address:
        yield address


@pytest.mark.parametrize("request_, status, message", MALFORMED, ids=[m[2] for m in MALFORMED])
def test_malformed_requests_get_a_4xx_naming_the_field(small_url, request_, status, message):
    answer = httpx.post(small_url + "/v2/rerank", timeout=60, **request_)
    assert answer.status_code == status and re.search(message, answer.json()["message"]), answer.text
    assert httpx.get(small_url + "/health").status_code == 200


def test_unknown_paths_and_methods(url):
    assert httpx.get(url + "/v2/rerank").status_code == 405 and "message" in httpx.get(url + "/v2/rerank").json()
    assert httpx.get(url + "/nope").status_code == 404


def test_api_key(ranker):
    with running(make_app(ranker, api_key="s3cret")) as address:
        body = {"query": QUERY, "documents": DOCS[:2]}
        assert post(address, "/v2/rerank", body).status_code == 401
        assert post(address, "/v2/rerank", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(address, "/v2/rerank", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(address + "/v1/models").status_code == 401
        assert httpx.get(address + "/health").status_code == 200
        answer = cohere.ClientV2(api_key="s3cret", base_url=address).rerank(model="tiny", query=QUERY, documents=DOCS)
        assert len(answer.results) == len(DOCS)


class Gate(torch.nn.Module):
    """The model behind a gate the test opens: requests wait in the scheduler for as long as the test needs."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.lm_head, self.open = model, model.lm_head, threading.Event()

    def forward(self, *args, **kwargs):
        assert self.open.wait(60)
        return self.inner(*args, **kwargs)


def test_a_full_queue_answers_503_and_a_gone_client_is_dropped(ranker):
    gated = Gate(ranker.model)
    app = build_app(gated, PromptBuilder(ranker.tokenizer), ServeSettings("tiny", 512, max_queue=2))
    scheduler = app.state.scheduler
    body = {"query": QUERY, "documents": DOCS[:2]}
    with running(app) as address, ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(post, address, "/v2/rerank", body) for _ in range(2)]
        deadline = time.monotonic() + 30
        while scheduler.depth < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        full = post(address, "/v2/rerank", body)
        assert full.status_code == 503 and full.headers["Retry-After"] == "1" and "--max-queue 2" in full.text
        gated.open.set()
        assert [w.result().status_code for w in waiting] == [200, 200]
        gated.open.clear()
        # a client that goes away (its connection closed) while its job waits: the job leaves the queue unscored
        gone = pool.submit(lambda: httpx.post(address + "/v2/rerank", json=body, timeout=1.0))
        while scheduler.depth < 1:
            assert time.monotonic() < deadline + 30
            time.sleep(0.01)
        with pytest.raises(httpx.ReadTimeout):
            gone.result()
        while scheduler.depth:  # the disconnect reached the handler, which dropped the job
            assert time.monotonic() < deadline + 60
            time.sleep(0.01)
        gated.open.set()
        assert re.search(r'tsarank_requests_total\{endpoint="rerank",status="499"\} 1', httpx.get(
            address + "/metrics").text)


def test_a_mixed_flood_is_answered_request_by_request(ranker):
    """12 threads, 120 requests: valid ones of different queries and sizes, malformed, oversized, and clients that
    hang up early; each valid answer equals its sequential scores, each refusal names its reason."""
    expected = {g["query_id"]: ranker.score(g["query"], [p["text"] for p in g["negative_passages"][:12]])
                for g in GROUPS}

    def one(k):
        g = GROUPS[k % len(GROUPS)]
        docs = [p["text"] for p in g["negative_passages"][:12]]
        kind = k % 5
        if kind == 3:
            answer = post(address, "/v2/rerank", {"query": g["query"], "documents": [1, 2]})
            return kind, answer.status_code == 400 and "documents[0]" in answer.json()["message"]
        if kind == 4 and k % 10 == 4:
            answer = post(address, "/v2/rerank", {"query": g["query"], "documents": ["d"] * 51})
            return kind, answer.status_code == 413
        if kind == 4:
            try:
                httpx.post(address + "/v2/rerank", json={"query": g["query"], "documents": docs}, timeout=0.05)
            except httpx.TimeoutException:
                pass
            return kind, True
        answer = post(address, "/v1/rerank" if kind == 1 else "/v2/rerank", {"query": g["query"], "documents": docs})
        if answer.status_code != 200:
            return kind, False
        got = {r["index"]: r["mean_logprob"] for r in answer.json()["results"]}
        return kind, all(abs(got[i] - s) < 1e-5 for i, s in enumerate(expected[g["query_id"]]))

    app = make_app(ranker, max_documents=50, max_queue=200)
    with running(app) as address, ThreadPoolExecutor(12) as pool:
        start = time.monotonic()
        results = list(pool.map(one, range(120)))
        assert time.monotonic() - start < 300
        assert all(ok for _, ok in results), [k for k, (_, ok) in enumerate(results) if not ok]
        deadline = time.monotonic() + 30
        while app.state.scheduler.depth:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(address + "/health").status_code == 200


def test_the_cli_serves_and_sigterm_finishes_what_is_in_flight(tmp_path, tiny_llama_dir):
    proc = subprocess.Popen([sys.executable, "-m", "tsarank_engine.cli", "serve", str(tiny_llama_dir), "--port", "0",
                             "--device", "cpu", "--served-model-name", "ranker", "--max-batch-tokens", "128"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("serving" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(proc.stderr.readline())
        address = re.search(r"on (http://127\.0\.0\.1:\d+)", lines[-1]).group(1)
        docs = [p["text"] for g in GROUPS for p in g["negative_passages"][:40]]
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post, address, "/v2/rerank", {"model": "other", "query": QUERY, "documents": docs})
            time.sleep(0.3)  # accepted, and scoring in batches of 128 tokens for a few seconds
            proc.send_signal(signal.SIGTERM)
            answer = in_flight.result()
        assert answer.status_code == 200 and len(answer.json()["results"]) == len(docs)
        assert proc.wait(60) == 0
        log = "".join(lines) + proc.stderr.read()
        assert "request names model 'other'; serving 'ranker'" in log
        took = re.search(rf"POST /v2/rerank 200 documents={len(docs)} tokens=\d+ ([\d.]+)ms", log)
        assert float(took.group(1)) > 300  # it was in flight when SIGTERM came
    finally:
        proc.kill()
        proc.wait()


def test_serve_refuses_an_unset_api_key_variable(tiny_llama_dir):
    proc = subprocess.run([sys.executable, "-m", "tsarank_engine.cli", "serve", str(tiny_llama_dir),
                           "--api-key-env", "TSARANK_TEST_NO_SUCH_VAR"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "TSARANK_TEST_NO_SUCH_VAR"})
    assert proc.returncode == 1 and "TSARANK_TEST_NO_SUCH_VAR: the environment variable is not set" in proc.stderr
