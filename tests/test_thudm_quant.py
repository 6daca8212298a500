"""THUDM's int4/int8 releases in: a folder quantized as THUDM's `quantize` does it (per-row scale, round, int4
packed two a byte) is read as the float model, each weight the product THUDM's CPU kernel computes, decoded here
independently of the reader; malformed packing is one line."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms  # noqa: TID253
import numpy as np
import pytest
from helpers import optional, tensors

from converters.checkpoint import open_checkpoint
from converters.convert import convert
from converters.source import Source
from converters.thudm_quant import QUANTIZED
from glm2_core.dtypes import to_float32
from glm2_core.files import CONFIG
from glm2_core.names import Layout, layer_template
from glm2_core.quants import dequantize
from glm2_ms.api import from_pretrained
from glm2_ms.model import linears

BIN = Path(sys.executable).parent


def quantized_release(src: Path, dst: Path, bits: int) -> dict[str, np.ndarray]:
    """`src` (a float16 HF folder) as THUDM publishes an int{bits} release: one model.safetensors, config.json with
    quantization_bit; returns the signed integer values of each quantized weight (unpacked), for the oracle."""
    numpy_st = optional("safetensors.numpy")
    with open_checkpoint(src) as c:
        stored = {n: (t.read(), t.dtype) for n, t in c.tensors.items()}
    out, values = {}, {}
    for name, (arr, dtype) in stored.items():
        if layer_template(name)[0] not in QUANTIZED:
            out[name] = arr
            continue
        w = to_float32(arr, dtype)
        scale = (np.abs(w).max(axis=1) / (2 ** (bits - 1) - 1)).astype(np.float16)
        q = np.round(w / scale.astype(np.float32)[:, None]).astype(np.int8)
        values[name] = q
        if bits == 4:
            q = ((q[:, 0::2].astype(np.uint8) << 4) | (q[:, 1::2].astype(np.uint8) & 15)).view(np.int8)
        out[name], out[name + "_scale"] = q, scale
    dst.mkdir()
    numpy_st.save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / CONFIG).read_text())
    (dst / CONFIG).write_text(json.dumps({**config, "quantization_bit": bits}))
    shutil.copy(src / "tokenizer.model", dst)
    return values


def decoded(folder: Path, name: str, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored integers and scale of one weight, the nibbles decoded by arithmetic (high nibble: even column)."""
    stored = optional("safetensors.numpy").load_file(str(folder / "model.safetensors"))  # not our reader
    raw, scale = stored[name], stored[name + "_scale"]
    if bits == 4:
        u = raw.view(np.uint8).astype(np.int16)
        hi, lo = u >> 4, u & 15
        q = np.empty((u.shape[0], u.shape[1] * 2), np.int16)
        q[:, 0::2], q[:, 1::2] = np.where(hi > 7, hi - 16, hi), np.where(lo > 7, lo - 16, lo)
        return q, scale
    return raw.astype(np.int16), scale


@pytest.fixture(scope="module", params=[4, 8])
def release(request, hf_tiny, tmp_path_factory):
    dst = tmp_path_factory.mktemp(f"int{request.param}") / "chatglm2-6b-int4"
    values = quantized_release(hf_tiny("safetensors", "float16"), dst, request.param)
    return dst, request.param, values


@pytest.mark.parametrize("dtype", ["keep", "float32"])
def test_the_weights_are_thudms_products(release, tmp_path, dtype):
    """The product in the scale's dtype (float16: the exact product rounded once); --dtype float32 widens it."""
    src, bits, values = release
    convert(src, tmp_path / "ms", target=Layout("mindformers"), dtype=dtype, progress=False)
    convert(tmp_path / "ms", tmp_path / "hf", target=Layout("chatglm"), progress=False)
    got = tensors(tmp_path / "hf")
    for name, q in values.items():
        stored, scale = decoded(src, name, bits)
        assert np.array_equal(stored, q), name  # the packing is what the oracle decodes
        exact = stored.astype(np.float64) * scale.astype(np.float64)[:, None]
        want = exact.astype(np.float16) if dtype == "keep" else exact.astype(np.float16).astype(np.float32)
        assert got[name].dtype == want.dtype and np.array_equal(got[name], want), name


def test_inspect_says_what_the_weights_are(release):
    src, bits, _ = release
    r = subprocess.run([BIN / "glm2-convert", "inspect", src], capture_output=True, text=True)
    assert r.returncode == 0 and f"THUDM int{bits} (quantization_bit {bits})" in r.stdout, r.stderr


def test_without_the_native_kernel_the_runtime_loads_the_float_model(release, tmp_path, no_native_kernels):
    src, _, _ = release
    convert(src, tmp_path / "float", target=Layout("chatglm"), progress=False)
    ids = ms.Tensor([[64790, 64792, 36474, 54591]], ms.int32)
    a = from_pretrained(src, dtype="float32")(ids).asnumpy()
    b = from_pretrained(tmp_path / "float", dtype="float32")(ids).asnumpy()
    assert np.array_equal(a, b)


def test_the_runtime_holds_thudms_integers_as_blocks(release):
    """int8 as q8_0, int4 as q4_0, each block scaled by its row's scale: the exact products, nothing rounded."""
    src, bits, values = release
    model = from_pretrained(src, dtype="float32")
    held = {c.weight.name: c for c in linears(model) if c.blocks}
    assert len(held) == 4 * model.config.num_layers  # the four THUDM quantizes; the output layer stays float
    with Source.open(src) as source:
        groups, _ = source.groups(Layout("mindformers"))
        thudm = {name: source.as_stored(g).name for g in groups for name, _ in g.dst()}
    for name, cell in held.items():
        stored, scale = decoded(src, thudm[name], bits)
        exact = stored.astype(np.float64) * scale.astype(np.float64)[:, None]
        assert cell.blocks == f"q{bits}_0"
        assert np.array_equal(dequantize(cell.weight.asnumpy(), cell.blocks), exact.astype(np.float32)), name


QKV = "transformer.encoder.layers.0.self_attention.query_key_value.weight"


@pytest.mark.parametrize("damage, said", [
    ("scale_rows", "one float per row"),
    ("row_length", "shape"),
    ("no_scale", "has no"),
    ("bits", "4 or 8"),
    ("float_scaled", "2-D int8"),
])
def test_malformed_packing_is_one_line(hf_tiny, tmp_path, damage, said):
    src = tmp_path / "int4"
    quantized_release(hf_tiny("safetensors", "float16"), src, 4)
    numpy_st = optional("safetensors.numpy")
    data = numpy_st.load_file(str(src / "model.safetensors"))
    if damage == "scale_rows":
        data[QKV + "_scale"] = data[QKV + "_scale"][:-1]
    elif damage == "row_length":
        data[QKV] = data[QKV][:, :-1].copy()
    elif damage == "no_scale":
        del data[QKV + "_scale"]
    elif damage == "float_scaled":
        data[QKV] = data[QKV].astype(np.float16)
    numpy_st.save_file(data, str(src / "model.safetensors"))
    if damage == "bits":
        config = json.loads((src / CONFIG).read_text())
        (src / CONFIG).write_text(json.dumps({**config, "quantization_bit": 3}))
    r = subprocess.run([BIN / "glm2-convert", "hf2ms", src, tmp_path / "out"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and said in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and not (tmp_path / "out").exists()
