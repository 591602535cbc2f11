"""Writing a file or a folder whole or not at all. atomic_write is the one way whole-file outputs are written
(scores, groups, pairs, runs, records, a run's recipe.json and its metrics.jsonl when a resumed run trims it,
best/eval.json); staged_dir the one way a folder is (an exported model, best/, the converted builtin model).
Files that grow line by line (metrics.jsonl during a run, a rerank's partial run) are appended to instead;
their readers drop a torn last line. A training checkpoint, which every process writes into at once between
barriers, is staged and renamed by training/checkpoints.py on the same principle."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import TsarankError


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[IO[str]]:
    """A text file (UTF-8) that replaces `path` when the block ends without an error; on an error the temporary
    file is removed and `path` stays as it was. The temporary file sits beside `path` (same file system, so the
    rename is atomic), hidden by a leading dot and named by stale_temporaries; a killed process leaves it
    behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise TsarankError(f"{path}: cannot write the output there ({e.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def stale_temporaries(path: str | Path) -> list[Path]:
    """The temporary files a killed atomic_write of `path` left beside it."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*")) if path.parent.is_dir() else []


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A folder built beside `out` (hidden by a leading dot, on the same file system) that takes `out`'s place,
    replacing what was there, when the block ends without an error; on an error it is removed and `out` stays
    as it was. A kill leaves the old `out` whole, or the new one (under the staging name, if the kill falls
    between the old one's removal and the rename)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise TsarankError(f"{out}: cannot write the output there ({e.strerror})") from None
    try:
        yield staging
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
