"""`tsarank-engine serve` under concurrent clients: cross-request batching against the same server one request at a
time, side by side in one run.

For each server mode (batching on, then --no-batching) the server is started as users start it, on 127.0.0.1 and a
free port; then, for each number of concurrent clients and documents per request, every client sends its requests
one after another (each a query of the MS MARCO sample with that many passages, its own first) and the run records
requests/s, pairs/s and the p50/p95/p99 latency. Every count and wait is bounded: a request that fails or takes
longer than --timeout ends the benchmark with an error. Prints a table and writes JSON records (--json).

    python bench/serve.py                                   # SmolLM2-135M, 1/4/16 clients x 20/100 documents
    python bench/serve.py --clients 16 --docs 20 --requests 4
    python bench/serve.py --in-process --device cuda         # the scheduler alone, without HTTP (the GPU machine)
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_common import SAMPLES, machine_name

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"


def start_server(model: str, batching: bool, device: str, max_batch_tokens: int | None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tsarank_engine.cli", "serve", model, "--port", "0", "--device", device,
               "--max-queue", "1000", "--batching" if batching else "--no-batching"]
    if max_batch_tokens:
        command += ["--max-batch-tokens", str(max_batch_tokens)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if match := re.search(r" on (http://\S+) ", line):
            # the server logs a line per request: read them away so that its pipe never fills
            drain = ThreadPoolExecutor(1)
            drain.submit(lambda: [None for _ in proc.stderr])
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError("the server did not start within 600 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        if proc.wait(120) != 0:
            raise RuntimeError(f"the server exited with {proc.returncode} on SIGTERM")
    finally:
        proc.kill()


def requests_for(groups: list[dict], docs: int) -> list[dict]:
    """One request per sample query: its query with its passages, then the next queries' passages, `docs` in all
    (a query of the sample holds at most 66)."""
    passages = [[p["text"] for p in g["positive_passages"] + g["negative_passages"]] for g in groups]
    out = []
    for k, g in enumerate(groups):
        documents: list[str] = []
        for j in range(len(groups)):
            documents += passages[(k + j) % len(groups)][: docs - len(documents)]
            if len(documents) == docs:
                break
        out.append({"query": g["query"], "documents": documents})
    return out


def load(url: str, bodies: list[dict], clients: int, per_client: int, timeout: float) -> dict:
    """`clients` threads, each sending `per_client` requests in turn; requests/s, pairs/s and latency percentiles."""
    import httpx  # the dev extra's; --in-process runs without it

    latencies: list[float] = []

    def client(c: int) -> None:
        with httpx.Client(timeout=timeout) as http:
            for k in range(per_client):
                body = bodies[(c * per_client + k) % len(bodies)]
                start = time.perf_counter()
                answer = http.post(url + "/v2/rerank", json=body)
                if answer.status_code != 200:
                    raise RuntimeError(f"status {answer.status_code}: {answer.text[:200]}")
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client, c) for c in range(clients)]:
            future.result()
    return summary(latencies, time.perf_counter() - start, len(bodies[0]["documents"]))


class InProcess:
    """The scheduler alone, in this process, without HTTP: for a machine without the serve extra (the lent GPU
    machine has no package registry). Clients are coroutines on one event loop, prompting in worker threads as
    the server does; the same load() numbers."""

    def __init__(self, model: str, batching: bool, device: str, max_batch_tokens: int | None):
        from tsarank_engine.rank.ranker import Ranker
        from tsarank_engine.rank.scoring import DEFAULT_BATCH_TOKENS
        from tsarank_engine.serving.scheduler import Scheduler

        self.ranker = Ranker.load(model, device=device)
        tokens = max_batch_tokens or DEFAULT_BATCH_TOKENS.get(self.ranker.device.type, 8192)
        self.scheduler = Scheduler(self.ranker.model, tokens, max_queue=1000, batching=batching)
        self.scheduler.start()

    def load(self, bodies: list[dict], clients: int, per_client: int) -> dict:
        import asyncio

        latencies: list[float] = []

        async def client(c: int) -> None:
            for k in range(per_client):
                body = bodies[(c * per_client + k) % len(bodies)]
                start = time.perf_counter()
                pairs = await asyncio.to_thread(self.ranker.prompts.build_many, body["query"], body["documents"])
                await self.scheduler.submit(pairs).future
                latencies.append(time.perf_counter() - start)

        async def everyone() -> None:
            await asyncio.gather(*(client(c) for c in range(clients)))

        start = time.perf_counter()
        asyncio.run(everyone())
        return summary(latencies, time.perf_counter() - start, len(bodies[0]["documents"]))

    def close(self) -> None:
        self.scheduler.stop()


def summary(latencies: list[float], seconds: float, docs: int) -> dict:
    count = len(latencies)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if count > 1 else latencies * 99
    return {"requests": count, "seconds": round(seconds, 3), "requests_per_s": round(count / seconds, 3),
            "pairs_per_s": round(count * docs / seconds, 2), "p50_ms": round(cuts[49] * 1000, 1),
            "p95_ms": round(cuts[94] * 1000, 1), "p99_ms": round(cuts[98] * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--shape", default=None, help="instead of --model, a random model of this shape "
                        "(bench/model_shapes.py: qwen2.5-0.5b, ...; the GPU machine has no SmolLM2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--docs", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per client (default: about 320 pairs per setting, at least one request each)")
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    parser.add_argument("--in-process", action="store_true",
                        help="drive the scheduler in this process, without HTTP (no serve extra needed)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if args.shape:
        from model_shapes import temporary_checkpoint

        args.model = temporary_checkpoint(args.shape)
    groups = [json.loads(line) for line in (SAMPLES / "msmarco_groups.jsonl").read_text().splitlines() if line]
    records = []
    for batching in (True, False):
        if args.in_process:
            server = InProcess(args.model, batching, args.device, args.max_batch_tokens)
        else:
            proc, url = start_server(args.model, batching, args.device, args.max_batch_tokens)
        try:
            for docs in args.docs:
                bodies = requests_for(groups, docs)
                for clients in args.clients:
                    per_client = args.requests or max(1, round(320 / (clients * docs)))
                    if args.in_process:
                        server.load(bodies[:1], 1, 1)  # warm-up
                        result = server.load(bodies, clients, per_client)
                    else:
                        load(url, bodies[:1], 1, 1, args.timeout)  # warm-up
                        result = load(url, bodies, clients, per_client, args.timeout)
                    record = {"server": "batching" if batching else "one at a time", "clients": clients,
                              "documents": docs, **result, "machine": machine_name(args.device),
                              "model": args.model, "transport": "in-process" if args.in_process else "http"}
                    records.append(record)
                    print(f"{record['server']:>14} {clients:>3} clients x {docs:>3} docs: "
                          f"{result['requests_per_s']:7.2f} req/s {result['pairs_per_s']:8.1f} pairs/s  "
                          f"p50 {result['p50_ms']:8.1f} p95 {result['p95_ms']:8.1f} p99 {result['p99_ms']:8.1f} ms",
                          flush=True)
        finally:
            server.close() if args.in_process else stop_server(proc)
    for on in records[: len(records) // 2]:
        off = next(r for r in records if r["server"] == "one at a time" and r["clients"] == on["clients"]
                   and r["documents"] == on["documents"])
        on["speedup_pairs_per_s"] = round(on["pairs_per_s"] / off["pairs_per_s"], 2)
        print(f"batching / one at a time, {on['clients']} clients x {on['documents']} docs: "
              f"{on['speedup_pairs_per_s']:.2f}x pairs/s")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
