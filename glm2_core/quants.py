"""llama.cpp's block quantizations q8_0 and q4_0 as the toolkit uses them: which weights take them, what a row of
blocks weighs, and any tensor quantized a slice of rows at a time (the `gguf` package's quantizers), so that no
tensor is ever whole in float32.

A block holds 32 consecutive weights of a row: a float16 scale d and 32 int8 q (q8_0: w = d·q) or 16 bytes of
4-bit values (q4_0: byte j holds weight j in its low nibble and weight j + 16 in its high one, w = d·(nibble − 8)).
"""
from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np

from .dtypes import GGUF_QUANTS, to_float32

KINDS = {name: gguf.GGMLQuantizationType[name.upper()] for name in GGUF_QUANTS}
BLOCK = 32  # weights per block, in both kinds
CHUNK_VALUES = 1 << 22  # values quantized at a time


def row_bytes(kind: str, k: int) -> int:
    """Bytes of one row of `k` weights in `kind` (k a multiple of BLOCK)."""
    return k // BLOCK * gguf.GGML_QUANT_SIZES[KINDS[kind]][1]


def block_kind(want: str, shape: tuple[int, ...], output_layer: bool) -> str | None:
    """The kind a weight matrix of `shape` takes when `want` is asked, or None where its rows are not whole blocks
    (llama.cpp keeps such a matrix in float16). The output layer of a q4_0 model is q8_0 (llama-quantize gives it
    Q6_K, which the `gguf` package cannot write; q8_0 is the nearest it can)."""
    if len(shape) != 2 or shape[-1] % BLOCK:
        return None
    return "q8_0" if output_layer and want == "q4_0" else want


def quantized_slices(arr: np.ndarray, dtype: str, kind: str) -> Iterator[np.ndarray]:
    """The blocks of `arr` (storage dtype `dtype`, rows of whole blocks) as uint8 [rows, row_bytes], a slice of rows
    at a time."""
    rows = arr.reshape(-1, arr.shape[-1])
    step = max(1, CHUNK_VALUES // rows.shape[1])
    for a in range(0, rows.shape[0], step):
        yield gguf.quants.quantize(to_float32(rows[a:a + step], dtype), KINDS[kind])


def quantize(arr: np.ndarray, dtype: str, kind: str) -> np.ndarray:
    """The whole matrix `arr` as blocks, uint8 [rows, row_bytes] (float32 only a slice at a time)."""
    out = np.empty((arr.shape[0], row_bytes(kind, arr.shape[-1])), np.uint8)
    at = 0
    for part in quantized_slices(arr, dtype, kind):
        out[at:at + len(part)] = part
        at += len(part)
    return out


def dequantize(blocks: np.ndarray, kind: str) -> np.ndarray:
    """float32 weights of uint8 blocks [rows, row_bytes]."""
    return gguf.quants.dequantize(blocks, KINDS[kind])
