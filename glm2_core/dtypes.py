"""Element types across numpy, safetensors, MindSpore .ckpt and torch, with bfloat16 carried as raw uint16 bits.

numpy has no bfloat16 without MindSpore's registration, so arrays of bf16 tensors hold the bit patterns as uint16;
everything that only moves bytes (renames, row splits, writing) never needs the real type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str          # our canonical name, as torch spells it without the prefix
    storage: np.dtype  # what numpy arrays of this type hold
    safetensors: str
    ckpt: str          # MindSpore TensorProto.tensor_type
    torch_storage: str | None = None  # the typed-storage class torch.save pickles for it

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @property
    def is_float(self) -> bool:
        return self.name in FLOATS


_TABLE = [
    DType("float32", np.dtype("<f4"), "F32", "Float32", "FloatStorage"),
    DType("float16", np.dtype("<f2"), "F16", "Float16", "HalfStorage"),
    DType("bfloat16", np.dtype("<u2"), "BF16", "BFloat16", "BFloat16Storage"),
    DType("float64", np.dtype("<f8"), "F64", "Float64", "DoubleStorage"),
    DType("int8", np.dtype("i1"), "I8", "Int8", "CharStorage"),
    DType("uint8", np.dtype("u1"), "U8", "UInt8", "ByteStorage"),
    DType("int16", np.dtype("<i2"), "I16", "Int16", "ShortStorage"),
    DType("uint16", np.dtype("<u2"), "U16", "UInt16"),
    DType("int32", np.dtype("<i4"), "I32", "Int32", "IntStorage"),
    DType("uint32", np.dtype("<u4"), "U32", "UInt32"),
    DType("int64", np.dtype("<i8"), "I64", "Int64", "LongStorage"),
    DType("uint64", np.dtype("<u8"), "U64", "UInt64"),
    DType("bool", np.dtype("?"), "BOOL", "Bool", "BoolStorage"),
]
FLOATS = ("float32", "float16", "bfloat16", "float64")
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")  # what ChatGLM2 weights are stored in
DTYPES = ("keep", *WEIGHT_DTYPES)  # what an output's weights may be (keep: as stored)
GGUF_QUANTS = ("q8_0", "q4_0")  # llama.cpp's block quantizations, which a GGUF output may take too
ACTIVATIONS = ("float32", "q8_0")  # what the native kernel multiplies weights in blocks with (exact, or llama.cpp's)
COMPUTE_DTYPES = ("float32", "float16")  # the runtimes' arithmetic (MindSpore on CPU has no bfloat16 matmul)


def weights_for(compute: str) -> str | None:
    """The dtype a runtime keeps the weights in to compute in `compute`: float32 arithmetic runs over the weights as
    stored (None; every stored dtype widens to float32 exactly, cast per layer as it runs, so a 16-bit model holds
    half the memory of a float32 copy), float16 arithmetic over float16 weights."""
    return None if compute == "float32" else compute

BY_NAME = {d.name: d for d in _TABLE}
BY_SAFETENSORS = {d.safetensors: d for d in _TABLE}
BY_CKPT = {d.ckpt: d for d in _TABLE}
BY_TORCH_STORAGE = {d.torch_storage: d for d in _TABLE if d.torch_storage}


def nbytes(shape, dtype: str) -> int:
    """The bytes of a tensor of `shape` stored as `dtype`."""
    return math.prod(shape) * BY_NAME[dtype].itemsize


def stored(a: np.ndarray) -> tuple[np.ndarray, str]:
    """An array as this module stores it, with its dtype's name: bfloat16 (MindSpore registers one with numpy)
    as its uint16 bits."""
    if a.dtype.name == "bfloat16":
        return a.view(np.uint16), "bfloat16"
    return a, a.dtype.name


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch and MindSpore do; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def to_float32(a: np.ndarray, src: str) -> np.ndarray:
    return _bf16_to_f32(a) if src == "bfloat16" else a.astype(np.float32, copy=False)


def cast(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast storage arrays between dtypes; identity (no copy) when they agree."""
    if src == dst:
        return a
    with np.errstate(over="ignore"):  # overflow to inf was either refused before or asked for
        return _cast(a, src, dst)


def _cast(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    if dst == "bfloat16":
        return _f32_to_bf16(to_float32(a, src))
    return to_float32(a, src).astype(BY_NAME[dst].storage) if src == "bfloat16" else a.astype(BY_NAME[dst].storage)


_EXPONENT_MASK = {"float16": (np.uint16, 0x7C00), "bfloat16": (np.uint16, 0x7F80), "float32": (np.uint32, 0x7F800000),
                  "float64": (np.uint64, 0x7FF0000000000000)}


def count_nonfinite(a: np.ndarray, name: str) -> int:
    """NaN/Inf count from the exponent bits alone: one pass, no float conversion."""
    if name not in _EXPONENT_MASK:
        return 0
    view, mask = _EXPONENT_MASK[name]
    bits, mask = a.reshape(-1).view(view), view(mask)
    step = 1 << 18  # blocks that stay in cache: the temporaries never grow with the tensor
    tmp = np.empty(min(step, bits.size), view)
    count = 0
    for start in range(0, bits.size, step):
        block = bits[start:start + step]
        t = np.bitwise_and(block, mask, out=tmp[:block.size])
        if t.max() == mask:  # rare: count only where there is something to count
            count += int(np.count_nonzero(t == mask))
    return count


FLOAT16_MAX = 65504.0
FLOAT16_MAX_ROUNDING = 65520.0  # values that round to 65504 still fit; the first that rounds to Inf is this


def float16_overflow(a: np.ndarray, src: str) -> float | None:
    """The largest finite magnitude that would become Inf in float16, or None when all values fit."""
    if src not in ("float32", "bfloat16", "float64"):
        return None
    f = to_float32(a, src) if src == "bfloat16" else a
    finite = np.isfinite(f)
    peak = max(float(f.max(where=finite, initial=0.0)), -float(f.min(where=finite, initial=0.0)))
    return peak if peak >= FLOAT16_MAX_ROUNDING else None


def float16_overflow_count(a: np.ndarray, src: str) -> int:
    """How many finite values become Inf in float16."""
    f = to_float32(a, src) if src == "bfloat16" else a
    with np.errstate(invalid="ignore"):
        return int(np.count_nonzero(np.isfinite(f) & (np.abs(f) >= FLOAT16_MAX_ROUNDING)))
