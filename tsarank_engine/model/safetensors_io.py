"""Reading safetensors files tensor by tensor, with every structural fault named.

The format (8-byte little-endian header length, a JSON header of dtype/shape/byte offsets, then the
raw little-endian bytes) is read with plain file I/O instead of mmap: a tensor's bytes go straight
into its final buffer (or through a small bounded chunk when the dtype changes), so resident memory
never holds a second copy of the model. Writing uses the safetensors library.

Why not the safetensors package's own reader (safe_open): its memory-mapped pages and each get_tensor copy
stay resident beside the parameters, about twice the peak growth of loading (`python bench/load_memory.py
--reader engine --reader safe_open`; BENCHMARKS.md, "Loading memory").
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import TsarankError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_HEADER_BYTES = 100 * 2**20
_CHUNK_BYTES = 16 * 2**20

if sys.byteorder != "little":  # the file format is little-endian and is read without byte swapping
    raise ImportError("tsarank_engine reads safetensors on little-endian machines only")


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise TsarankError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise TsarankError(
                    f"{path}: corrupt or truncated safetensors file (header claims {header_len} bytes, "
                    f"file has {size})"
                )
            raw_header = f.read(header_len)
    except OSError as e:
        raise TsarankError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw_header)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TsarankError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise TsarankError(f"{path}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise TsarankError(f"{path}: tensor {name!r} has a malformed header entry: {info!r}") from None
        if dtype not in DTYPES:
            raise TsarankError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise TsarankError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} of {dtype} needs {nbytes}"
            )
        if data_start + end > size:
            raise TsarankError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size}"
            )
        entries[name] = TensorEntry(path, name, dtype, shape, data_start + begin, data_start + end)
    # The format stores tensors back to back: spans must tile the data, or one tensor would alias another.
    position = data_start
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            raise TsarankError(
                f"{path}: corrupt safetensors header: tensor {entry.name!r} starts at byte {entry.start}, "
                f"expected {position} ({'overlapping' if entry.start < position else 'a gap before'} it)"
            )
        position = entry.end
    return entries


def conversion_buffer(entries: list[TensorEntry], dtype: torch.dtype) -> torch.Tensor:
    """One scratch buffer for read_tensor's dtype conversions of `entries`, reused across tensors:
    allocating one per tensor fragments the heap and leaves resident memory well above the model's size."""
    needed = [e.end - e.start for e in entries if DTYPES[e.dtype] != dtype]
    return torch.empty(min(max(needed, default=0), _CHUNK_BYTES), dtype=torch.uint8)


def read_tensor(f: BinaryIO, entry: TensorEntry, dtype: torch.dtype, buffer: torch.Tensor,
                rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor from the open file `f` into a new CPU tensor of `dtype`, or into `out` (a contiguous CPU
    tensor of that dtype and shape); with `rows` = (start, stop) only those rows of its first dimension
    (contiguous bytes in the file: a process's shard, read alone).

    A dtype change goes through `buffer` (see conversion_buffer) chunk by chunk, so it costs no more
    memory than the buffer.
    """
    src = DTYPES[entry.dtype]
    shape, offset = entry.shape, 0
    if rows is not None:
        start, stop = rows
        if not (entry.shape and 0 <= start <= stop <= entry.shape[0]):
            raise TsarankError(f"{entry.file}: rows {start}:{stop} of tensor {entry.name!r} of shape "
                               f"{list(entry.shape)}")
        row_bytes = math.prod(entry.shape[1:]) * src.itemsize
        shape, offset = (stop - start, *entry.shape[1:]), start * row_bytes
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.shape != shape or out.dtype != dtype or out.device.type != "cpu" or not out.is_contiguous():
        raise TsarankError(f"{entry.file}: tensor {entry.name!r} cannot be read into a {out.dtype} tensor of shape "
                           f"{list(out.shape)} on {out.device}")
    f.seek(entry.start + offset)
    if src == dtype:
        _read_exact(f, out.view(-1).view(torch.uint8).numpy(), entry)
        return out
    flat = out.view(-1)
    per_chunk = max(1, buffer.numel() // src.itemsize)
    for lo in range(0, flat.numel(), per_chunk):
        n = min(per_chunk, flat.numel() - lo)
        chunk = buffer[: n * src.itemsize]
        _read_exact(f, chunk.numpy(), entry)
        flat[lo : lo + n].copy_(chunk.view(src))
    return out


def _read_exact(f: BinaryIO, target, entry: TensorEntry) -> None:
    view = memoryview(target).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise TsarankError(f"{entry.file}: truncated while reading tensor {entry.name!r}")
        got += n
