"""Training rows in a seeded, resumable order: read, sample, tokenize and pack, a window at a time.

The order of an epoch is a permutation of the file's lines drawn from (seed, epoch); the file is reached
through a LineIndex (one int64 byte offset per line), never held in memory. Units (a stage-1 sequence, a
stage-2 candidate group sampled from group_rng(seed, epoch, position)) are built for a window of lines and
packed first-fit decreasing into rows. Everything is a pure function of the seed and the position, so the
state (epoch, first line of the current window, rows of it already given out) is all a checkpoint needs:
a resumed stream rebuilds the window and skips what it had given out.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .packing import PackedRow, Packer, StepPart
from .readers import DataError, SkipCounter, is_skipped, parse_line, parse_query_group, parse_text_pair
from .sequences import CandidateGroup, CptBuilder, GroupBuilder, TokenSequence, group_rng

_SCAN_BYTES = 16 * 2**20


class LineIndex:
    """Byte offsets of a file's non-blank lines, found in one pass over 16 MB blocks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        starts, ends = [np.zeros(1, dtype=np.int64)], []
        size = 0
        with open(self.path, "rb") as f:
            while block := f.read(_SCAN_BYTES):
                newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10).astype(np.int64) + size
                ends.append(newlines)
                starts.append(newlines + 1)
                size += len(block)
        begin, end = np.concatenate(starts), np.concatenate(ends + [np.array([size], dtype=np.int64)])
        self._lineno = np.arange(1, begin.size + 1, dtype=np.int64)
        keep = end - begin > 0  # blank lines are dropped below, once read
        self._begin, self._end, self._lineno = begin[keep], end[keep], self._lineno[keep]

    def __len__(self) -> int:
        return self._begin.size

    def read(self, f, i: int) -> tuple[int, bytes]:
        """(line number, raw bytes) of the i-th non-empty line, from the open binary file f."""
        f.seek(int(self._begin[i]))
        return int(self._lineno[i]), f.read(int(self._end[i] - self._begin[i]))


@dataclass
class StreamState:
    epoch: int = 0
    window_start: int = 0  # position in the epoch's order of the current window's first line
    rows_given: int = 0  # rows of that window already given out


class PackedStream:
    """Packed rows of a JSONL training file, one epoch after another, in a seeded resumable order.

    `units` says what a line becomes: a CptBuilder, stage-1 text pairs (sequences); a GroupBuilder, stage-2
    query groups. `packer` lays them into rows and sets their loss weights.
    """

    def __init__(self, path: str | Path, units: CptBuilder | GroupBuilder, packer: Packer, seed: int = 0,
                 window: int = 256, skips: SkipCounter | None = None):
        self.index = LineIndex(path)
        if not len(self.index):
            raise DataError(f"{path}: no rows")
        self.kind = "cpt" if isinstance(units, CptBuilder) else "sft"
        self.units, self.packer, self.seed, self.window, self.skips = units, packer, seed, window, skips
        self.state = StreamState()
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:  # one permutation per epoch (80 MB for 10 million lines)
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.index)))
        return self._order[1]

    def _window_units(self, f, order: np.ndarray, epoch: int, start: int) -> list[TokenSequence | CandidateGroup]:
        """The stage-1 sequences or stage-2 groups of the window of lines starting at `start` in the order."""
        parse = (parse_text_pair if self.kind == "cpt"
                 else functools.partial(parse_query_group, scores=self.units.teacher_scores))
        units = []
        for position in range(start, min(start + self.window, len(order))):
            lineno, raw = self.index.read(f, int(order[position]))
            if not raw.strip():
                continue
            row = parse_line(self.index.path, lineno, raw, parse, self.skips)
            if is_skipped(row):
                continue
            if self.kind == "cpt":
                units.append(self.units.build(row))
            else:
                units.append(self.units.build(row, group_rng(self.seed, epoch, position)))
        return units

    def _pack(self, units: list[TokenSequence | CandidateGroup]) -> list[PackedRow]:
        return self.packer.pack_sequences(units) if self.kind == "cpt" else self.packer.pack_groups(units)

    def _window_rows(self, f, order: np.ndarray, epoch: int, start: int) -> list[PackedRow]:
        return self._pack(self._window_units(f, order, epoch, start))

    def epoch(self) -> Iterator[PackedRow]:
        """The rest of the current epoch's rows; the state advances as rows are given, and at the end points at
        the next epoch's start. Training takes steps (next_step); rows one by one are for reading a recipe's
        data as the engine packs it (bench/data_speed.py measures the pipeline this way)."""
        s = self.state
        order = self.order(s.epoch)
        with open(self.index.path, "rb") as f:
            while s.window_start < len(order):
                rows = self._window_rows(f, order, s.epoch, s.window_start)
                for row in rows[s.rows_given:]:
                    s.rows_given += 1
                    yield row
                s.window_start, s.rows_given = s.window_start + self.window, 0
        s.epoch, s.window_start = s.epoch + 1, 0

    def next_window_units(self) -> list[TokenSequence | CandidateGroup]:
        """The units of the next window of lines, unpacked, then the state points past it (the trainer's step:
        with the window set to the batch size, exactly batch-size units). Windows whose lines were all skipped
        are passed over; an epoch without any usable line is an error."""
        s = self.state
        empty_since = (s.epoch, s.window_start)
        with open(self.index.path, "rb") as f:
            while True:
                order = self.order(s.epoch)
                units = self._window_units(f, order, s.epoch, s.window_start)
                s.window_start, s.rows_given = s.window_start + self.window, 0
                if s.window_start >= len(order):
                    s.epoch, s.window_start = s.epoch + 1, 0
                if units:
                    return units
                if (s.epoch, s.window_start) == (empty_since[0] + 1, empty_since[1]):
                    raise DataError(f"{self.index.path}: a whole epoch without a usable row")

    def next_step(self, world: int = 1, rank: int = 0) -> StepPart:
        """Rank `rank`'s part of the next window, of `world` ranks (Packer.pack_step); the state points past it."""
        return self.packer.pack_step(self.next_window_units(), world, rank)

    def __iter__(self) -> Iterator[PackedRow]:
        """Rows from the current state on, epoch after epoch."""
        while True:
            yield from self.epoch()

    def state_dict(self) -> dict[str, int]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = StreamState(**state)


class Prefetcher:
    """A stream's next steps read, tokenized and packed in a background thread while the current step runs,
    at most `depth` ahead and `count` in all. `state_dict` is the stream's state after the last step taken (not
    after those made ahead), so a checkpoint resumes exactly; an error in the thread (a DataError naming file
    and line) is raised by the `next_step` call that would have returned that step. Close it (or use it as a
    context manager) to stop the thread."""

    def __init__(self, stream: PackedStream, world: int, rank: int, count: int, depth: int = 2):
        self.stream, self.world, self.rank, self.count = stream, world, rank, count
        self._state = stream.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="tsarank-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for _ in range(self.count):
                if self._stop.is_set():
                    return
                item = (self.stream.next_step(self.world, self.rank), self.stream.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, raised there
            self._queue.put((error, None))

    def next_step(self, world: int, rank: int) -> StepPart:
        if (world, rank) != (self.world, self.rank):
            raise ValueError(f"this prefetcher makes steps for rank {self.rank} of {self.world}, not {rank} of {world}")
        part, state = self._queue.get()
        if state is None:
            self.close()
            raise part
        self._state = state
        return part

    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self.stream.load_state_dict(self._state)  # the stream again where the steps taken left it

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


