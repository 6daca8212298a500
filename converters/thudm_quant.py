"""THUDM's quantized releases (chatglm2-6b-int4, ChatGLM3's int4/int8 loads): a config.json with `quantization_bit` 4
or 8, and each query_key_value, dense, dense_h_to_4h and dense_4h_to_h weight stored as int8 [out, in·bits/8]
beside a per-row `weight_scale` [out] in the model's float dtype. Read here as the float model they stand for:

    w[i, j] = q[i, j] · scale[i]

as THUDM's kernels compute it (`extract_int{4,8}_weight_to_float`, `…_to_half`): for int4 each byte holds two
signed nibbles, the high one the even column. The weight is that product in the scale's dtype: computed exactly in
float32 (a small integer times the scale always fits), then rounded once to nearest even, which is what multiplying
in the scale's dtype gives (THUDM's GPU kernel). `--dtype float32` widens that value; THUDM's CPU kernel, on a model
made float32 first, uses the exact product, which differs from it by at most half a float16 step.
"""
from __future__ import annotations

import numpy as np

from glm2_core.dtypes import BY_NAME, cast, to_float32
from glm2_core.errors import CheckpointError
from glm2_core.names import MLP_DOWN, MLP_UP, QKV_WEIGHT, L, layer_template
from glm2_core.quants import BLOCK, row_bytes

from .formats.base import TensorRef

BITS = (4, 8)
BLOCKS = {8: "q8_0", 4: "q4_0"}  # the block kind that holds each exactly (the runtime computes with them)
SCALE = "_scale"  # a quantized `….weight` has its `….weight_scale`
QUANTIZED = (QKV_WEIGHT, L + "self_attention.dense.weight", MLP_UP, MLP_DOWN)  # the THUDM names quantized


def quantization(config) -> int | None:
    """The bits of a THUDM quantized config (None: a float model); another value is refused."""
    bits = config.get("quantization_bit") if isinstance(config, dict) else None
    if bits in (None, 0, False):
        return None
    if type(bits) is not int or bits not in BITS:
        raise CheckpointError(f"quantization_bit {bits!r:.40}: THUDM's quantized releases have 4 or 8")
    return bits


def describe(bits: int) -> str:
    return f"THUDM int{bits} (quantization_bit {bits})"


def dequantize(tensors: dict[str, TensorRef], bits: int, where: str) -> dict[str, TensorRef]:
    """The tensors with each quantized weight and its scale replaced by one reference to the float weight (read,
    like every tensor, only when asked for)."""
    out = {}
    for name, ref in tensors.items():
        if name.endswith(".weight" + SCALE):
            continue
        scale = tensors.get(name + SCALE)
        if scale is None:
            if layer_template(name)[0] in QUANTIZED and ref.dtype == "int8":
                raise CheckpointError(f"{where}: tensor {name!r} is int8 but has no {name + SCALE!r}")
            out[name] = ref
            continue
        out[name] = _float_weight(name, ref, scale, bits, where)
    stray = [n for n in tensors if n.endswith(".weight" + SCALE) and n[:-len(SCALE)] not in tensors]
    if stray:
        raise CheckpointError(f"{where}: {stray[0]!r} scales no weight")
    return out


def _float_weight(name: str, q: TensorRef, scale: TensorRef, bits: int, where: str) -> TensorRef:
    """Checks the packing against the scale, before anything is read."""
    if layer_template(name)[0] not in QUANTIZED:
        raise CheckpointError(f"{where}: {name!r} has a weight_scale, but THUDM quantizes only query_key_value, "
                              f"dense, dense_h_to_4h and dense_4h_to_h")
    if q.dtype != "int8" or len(q.shape) != 2:
        raise CheckpointError(f"{where}: {name!r} is {q.dtype} {list(q.shape)}; a quantized weight is a 2-D int8 "
                              f"matrix")
    rows, packed = q.shape
    if scale.shape != (rows,) or not BY_NAME[scale.dtype].is_float:
        raise CheckpointError(f"{where}: {name + SCALE!r} is {scale.dtype} {list(scale.shape)}; it must be one "
                              f"float per row of {name!r} ({rows})")
    dtype = scale.dtype

    def reader(make):
        """A reader of `make(integers, scales)`, which lets go of both once read."""
        def read() -> np.ndarray:
            out = make(q.read(), scale.read())
            q.release()
            scale.release()
            return out
        return read

    def product(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
        return cast(_unpacked(values, bits).astype(np.float32) * to_float32(scales, dtype)[:, None], "float32", dtype)

    exact = dtype == "float16" and packed * 8 // bits % BLOCK == 0  # a block's scale is float16
    blocks = reader(lambda values, scales: _as_blocks(values, scales, bits))
    return TensorRef(name, (rows, packed * 8 // bits), dtype, q.file, reader(product),
                     blocks=(BLOCKS[bits], blocks) if exact else None)


def _as_blocks(q: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """The same weights as llama.cpp's blocks, exactly: every block of a row takes the row's scale, int8 values
    stay as they are (q8_0), int4 values v become the nibbles v + 8 (q4_0), its bytes holding weights j and j + 16."""
    values = _unpacked(q, bits)
    rows, k = values.shape
    out = np.empty((rows, k // BLOCK, row_bytes(BLOCKS[bits], BLOCK)), np.uint8)
    out[:, :, :2] = scale.astype("<f2").view(np.uint8).reshape(rows, 1, 2)
    if bits == 8:
        out[:, :, 2:] = values.view(np.uint8).reshape(rows, -1, BLOCK)
    else:
        nibbles = (values + 8).astype(np.uint8).reshape(rows, -1, BLOCK)
        out[:, :, 2:] = nibbles[:, :, :BLOCK // 2] | (nibbles[:, :, BLOCK // 2:] << 4)
    return out.reshape(rows, -1)


def _unpacked(q: np.ndarray, bits: int) -> np.ndarray:
    """int8 [rows, m] → the signed values [rows, m·8/bits]: int4's high nibble first (arithmetic shifts, as the
    C kernel's `(char)b >> 4` and `(char)(b << 4) >> 4`)."""
    if bits == 8:
        return q
    out = np.empty((q.shape[0], q.shape[1] * 2), np.int8)
    out[:, 0::2] = q >> 4
    out[:, 1::2] = np.left_shift(q, 4) >> 4
    return out
