"""safetensors: a header-validating lazy reader and a streaming writer.

The `safetensors` library (used by the tests as the oracle) can neither write one tensor at a time nor hand
bfloat16 to numpy without torch or MindSpore; the format is small enough to frame here: an 8-byte little-endian
header length, a JSON header of dtype/shape/data_offsets, then the bytes.
"""
from __future__ import annotations

import json
import math
import struct
from itertools import pairwise
from typing import BinaryIO

import numpy as np

from glm2_core.dtypes import BY_NAME, BY_SAFETENSORS, nbytes
from glm2_core.errors import CheckpointError
from glm2_core.jsonio import parse_json

from .base import FileSpan, TensorRef, WeightsFile, read_exact, write_bytes

MAX_HEADER = 16 << 20  # the safetensors library allows 100 MB; a 6B model's header lists 200 tensors, and a 100 MB
# one takes seconds and gigabytes to parse (tests/fuzz/test_fuzz.py)


class SafetensorsFile(WeightsFile):
    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file ({why})")

    def _index(self) -> None:
        size = self.path.stat().st_size
        raw = self._f.read(8)
        if len(raw) < 8:
            raise self._bad("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise self._bad(f"a header of {n} bytes is larger than the {MAX_HEADER >> 20} MiB this reader accepts")
        if 8 + n > size:
            raise self._bad(f"header length {n} does not fit in a {size}-byte file")
        header = parse_json(self._f.read(n), f"{self.path}: safetensors header")
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._bad("__metadata__ is not an object of strings")
        base, spans = 8 + n, []
        for name, entry in header.items():
            try:
                dt = BY_SAFETENSORS[entry["dtype"]]
                shape, (begin, end) = _ints(entry["shape"]), _ints(entry["data_offsets"], 2)
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"entry {name!r} lacks a known dtype, a shape or two data_offsets") from None
            if end - begin != math.prod(shape) * dt.itemsize or begin < 0:
                raise self._bad(f"tensor {name!r}: data_offsets [{begin}, {end}] do not hold shape {list(shape)} "
                                f"of {dt.name}")
            if base + end > size:
                raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} ends at byte {base + end}, "
                                      f"the file has {size}")
            spans.append((begin, end, name))
            self.tensors[name] = TensorRef(name, shape, dt.name, self.path,
                                           lambda o=base + begin, s=shape, d=dt, k=name: self._read(o, s, d, k),
                                           offset=base + begin,
                                           rows=lambda a, b, o=base + begin, s=shape, d=dt, k=name: self._read(
                                               o + a * d.itemsize * math.prod(s[1:]), (b - a, *s[1:]), d, k))
        spans.sort()
        for (_, e1, a), (b2, _, b) in pairwise(spans):
            if b2 < e1:
                raise self._bad(f"tensors {a!r} and {b!r} overlap")
        # keep the file's own order of the data, which is the order writers meant
        self.tensors = {name: self.tensors[name] for _, _, name in spans}
        self.metadata = metadata

    def _read(self, offset: int, shape, dt, name: str) -> np.ndarray:
        arr = np.empty(shape, dt.storage)
        read_exact(self._f, offset, arr, self.path, name)
        return arr


def _ints(value, count: int | None = None) -> tuple[int, ...]:
    """A JSON list of non-negative integers below 2^63 (bools, floats and 1e400 are not sizes)."""
    if not isinstance(value, list) or count is not None and len(value) != count or len(value) > 64 \
            or not all(type(v) is int and 0 <= v < 1 << 63 for v in value):
        raise ValueError(value)
    return tuple(value)


class SafetensorsWriter:
    """Writes a planned list of tensors in order; the header is known up front from the plan."""

    def __init__(self, f: BinaryIO, plan: list[tuple[str, tuple[int, ...], str]], metadata: dict | None = None):
        self._f = f
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        at = 0
        self._expected = []
        for name, shape, dtype in plan:
            n = nbytes(shape, dtype)
            header[name] = {"dtype": BY_NAME[dtype].safetensors, "shape": list(shape), "data_offsets": [at, at + n]}
            self._expected.append((name, tuple(shape), dtype))
            at += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, data: np.ndarray | FileSpan, dtype: str) -> None:
        want = self._expected[self._next]
        if want != (name, tuple(data.shape), dtype):
            raise AssertionError(f"write order broken: got {name}, planned {want}")
        self._next += 1
        write_bytes(self._f, data)

    def finish(self) -> None:
        if self._next != len(self._expected):
            raise AssertionError("not every planned tensor was written")
