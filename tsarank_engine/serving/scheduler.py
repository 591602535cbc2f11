"""Cross-request batching: one model thread scores the pending pairs of every waiting request together.

Requests become jobs in a FIFO. The model thread takes pairs from the jobs in arrival order, whole requests and the
start of the next one, until `max_batch_tokens` tokens are taken, and scores them as packed rows with the LM head
at query positions only (rank/scoring.py, as `score` and `rerank` do); a request larger than a batch is split
across batches. A job is answered, on the event loop that submitted it, as soon as its last pair is scored. With
batching off the model thread takes pairs from the oldest job only: one request at a time, the baseline
bench/serve.py compares against. The event loop only hands jobs over and waits on futures: it never scores.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..data.prompting import PromptedPair
from ..errors import TsarankError
from ..model.decoder import CausalLM
from ..rank.scoring import score_pairs


class QueueFull(TsarankError):
    """More requests wait than the server admits (--max-queue)."""


@dataclass(eq=False)
class Job:
    """One request's pairs, their scores as they come, and the future its handler awaits."""

    pairs: list[PromptedPair]
    future: asyncio.Future
    scores: list[float] = field(default_factory=list)
    taken: int = 0  # pairs handed to a batch so far
    done: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(p.input_ids) for p in self.pairs)


# (pairs scored, tokens scored, the batch's tokens / max_batch_tokens), reported after every batch
BatchReport = Callable[[int, int, float], None]


class Scheduler:
    """The model thread and the jobs it serves (submit from the event loop; start, then stop to drain)."""

    def __init__(self, model: CausalLM, max_batch_tokens: int, max_queue: int, batching: bool = True,
                 on_batch: BatchReport | None = None):
        self.model, self.max_batch_tokens, self.max_queue = model, max_batch_tokens, max_queue
        self.batching, self.on_batch = batching, on_batch
        self.jobs: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="tsarank-model", daemon=True)

    @property
    def depth(self) -> int:
        """Requests waiting for scores (the one being scored included)."""
        return len(self.jobs)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish every job already submitted, then end the model thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    def submit(self, pairs: list[PromptedPair]) -> Job:
        """A job for `pairs`, answered on the running event loop; QueueFull when --max-queue requests wait."""
        job = Job(pairs, asyncio.get_running_loop().create_future(), [0.0] * len(pairs))
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.jobs) >= self.max_queue:
                raise QueueFull(f"{len(self.jobs)} requests are waiting (--max-queue {self.max_queue})")
            self.jobs.append(job)
            self.cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job whose client went away: its pairs not yet taken are never scored."""
        with self.cond:
            if job in self.jobs:
                self.jobs.remove(job)

    def _take(self) -> list[tuple[Job, int]] | None:
        """The next batch: (job, pair index) up to max_batch_tokens tokens (at least one pair); None to stop."""
        with self.cond:
            while not any(job.taken < len(job.pairs) for job in self.jobs):
                if self.stopping:
                    return None
                self.cond.wait()
            batch, tokens = [], 0
            for job in list(self.jobs) if self.batching else [next(j for j in self.jobs if j.taken < len(j.pairs))]:
                while job.taken < len(job.pairs):
                    n = len(job.pairs[job.taken].input_ids)
                    if batch and tokens + n > self.max_batch_tokens:
                        return batch
                    batch.append((job, job.taken))
                    job.taken += 1
                    tokens += n
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            pairs = [job.pairs[i] for job, i in batch]
            try:
                scores = score_pairs(self.model, pairs, batch_tokens=self.max_batch_tokens)
            except Exception as e:  # the jobs of this batch fail with it; the server goes on
                for job in dict.fromkeys(job for job, _ in batch):
                    self.cancel(job)
                    _resolve(job, exception=e)
                continue
            finished = []
            with self.cond:
                for (job, i), score in zip(batch, scores):
                    job.scores[i] = score
                    job.done += 1
                    if job.done == len(job.pairs) and job in self.jobs:
                        self.jobs.remove(job)
                        finished.append(job)
            for job in finished:
                _resolve(job)
            if self.on_batch is not None:
                tokens = sum(len(p.input_ids) for p in pairs)
                self.on_batch(len(pairs), tokens, tokens / self.max_batch_tokens)


def _resolve(job: Job, exception: BaseException | None = None) -> None:
    """Answer the job on its event loop (from the model thread); a loop already closed has no one to answer."""

    def answer() -> None:
        if not job.future.done():
            if exception is None:
                job.future.set_result(job.scores)
            else:
                job.future.set_exception(exception)

    try:
        job.future.get_loop().call_soon_threadsafe(answer)
    except RuntimeError:
        pass
