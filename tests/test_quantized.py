"""Quantized weights in the runtime: the native kernel over llama.cpp's q8_0 and q4_0 blocks against float64
arithmetic on the dequantized weights (the `gguf` package's own dequantizer), and models that hold blocks, loaded
straight from a GGUF file's blocks or quantized at load, computing what the same weights dequantized compute."""
import mindspore as ms  # noqa: TID253
import numpy as np
import pytest
from numpy_glm2 import NumpyGLM2
from test_gguf import read_gguf

from converters.source import Source
from glm2_core.dtypes import to_float32
from glm2_core.errors import UserError
from glm2_core.names import Layout
from glm2_core.quants import KINDS, dequantize, quantize, row_bytes
from glm2_ms import kernels
from glm2_ms.api import from_pretrained, open_model
from glm2_ms.generation import Decoder, describe
from glm2_ms.model import block_holders, linears

ms.set_device("CPU")
# (m, n, k): rows of x up to 8 (decoding, a server's batch: the direct pass, a pair of rows at a time and the odd
# one) and 9+ (a prompt: the staged path, its tiles of 3 and their rest), columns in passes of 4 and their rest, k
# in blocks of 32 within and across the 512-value stage
SHAPES = [(1, 1, 32), (1, 5, 96), (2, 13, 544), (3, 4, 1056), (4, 7, 64), (7, 9, 32), (5, 6, 512), (9, 4, 1056),
          (11, 7, 544), (10, 5, 64)]
# with q8_0 activations a prompt over q8_0 (9+ rows) takes the laid-out pass: tiles of 8 columns and their rest,
# chunks of 32 blocks and their rest, rows 4 at a time and the rest (q4_0 too from 128 rows with VNNI); over q4_0
# other rows go 8 at a time, then the rest in one pass, over 8 columns at a time and their rest; decoding over q8_0
# one row 8 columns at a time, more rows in groups of 4, 2, 1
Q8_SHAPES = [*SHAPES, (12, 17, 1056), (13, 8, 2080), (1, 19, 1056), (1, 8, 32), (8, 17, 1056), (6, 16, 544),
             (3, 9, 2080), (130, 9, 1056)]
PROMPT = np.array([[64790, 64792, 790, 30951, 517, 30910, 30940, 30996]], np.int32)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_the_kernel_is_float32_arithmetic_on_the_dequantized_blocks(m, n, k, kind, kernel_isa):
    op = kernels.native_linear()
    assert op is not None, kernels.why_not()
    rng = np.random.default_rng(k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    blocks = quantize(rng.standard_normal((n, k)).astype(np.float32), "float32", kind)
    assert blocks.shape == (n, row_bytes(kind, k))
    got = op(ms.Tensor(x), ms.Tensor(blocks)).asnumpy()
    w = dequantize(blocks, kind).astype(np.float64)
    exact = x.astype(np.float64) @ w.T
    bound = np.abs(x).astype(np.float64) @ np.abs(w).T * k * np.finfo(np.float32).eps
    assert got.dtype == np.float32 and got.shape == (m, n)
    assert (np.abs(got - exact) <= bound).all()


def q8_round_trip(x) -> np.ndarray:
    """x (float32) as the q8_0 blocks of llama.cpp's activations stand for it: the `gguf` package's quantizer and
    dequantizer, row by row."""
    x32 = np.asarray(x, np.float32)
    rows = x32.reshape(-1, x32.shape[-1])
    return dequantize(quantize(rows, "float32", "q8_0"), "q8_0").reshape(x32.shape).astype(np.float64)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("m,n,k", Q8_SHAPES)
def test_q8_activations_are_llama_cpps_arithmetic(m, n, k, kind, kernel_isa):
    """LinearQ8: x quantized to q8_0 blocks exactly as the `gguf` package quantizes them, then float64-exact
    products within float32 rounding of the sums; and not the float32 product."""
    op = kernels.native_linear_q8()
    rng = np.random.default_rng(k + n)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    blocks = quantize(rng.standard_normal((n, k)).astype(np.float32), "float32", kind)
    got = op(ms.Tensor(x), ms.Tensor(blocks)).asnumpy()
    xq, w = q8_round_trip(x), dequantize(blocks, kind).astype(np.float64)
    bound = np.abs(xq) @ np.abs(w).T * k * np.finfo(np.float32).eps
    assert got.dtype == np.float32 and got.shape == (m, n)
    assert (np.abs(got - xq @ w.T) <= bound).all()
    assert (np.abs(got - x.astype(np.float64) @ w.T) > bound).any()


@pytest.mark.parametrize("kind", list(KINDS))
def test_q8_activations_are_the_gguf_packages_blocks_value_for_value(kind, kernel_isa):
    """Weights that pick one input each (an identity in blocks) give back x as its q8_0 blocks stand for it, within
    the rounding of one product per output: every value the `gguf` package's quantizer gives, including the halves
    that round away from zero (blocks whose scale is 0.5 and whose values fall on a half step)."""
    op = kernels.native_linear_q8()
    rng = np.random.default_rng(5)
    k = 256
    x = (rng.standard_normal((3, k)) * 2).astype(np.float32)
    x[1, :32] = np.r_[63.5, rng.integers(-127, 128, 31) / 2 + 0.25].astype(np.float32)  # scale 0.5: t = j + 0.5
    x[2, 32:64] = np.r_[-63.5, -np.arange(31) / 2 - 0.25].astype(np.float32)
    eye = quantize(np.eye(k, dtype=np.float32), "float32", kind)
    want = q8_round_trip(x) * np.diag(dequantize(eye, kind).astype(np.float64))
    for rows in (slice(0, 3), slice(1, 2), slice(2, 3)):  # a prompt's rows and a decoding step's one
        np.testing.assert_allclose(op(ms.Tensor(x[rows]), ms.Tensor(eye)).asnumpy(), want[rows], rtol=3e-7, atol=0)


def test_q8_activations_keep_zero_and_nan_rows_and_refuse_16_bit_weights(kernel_isa):
    op = kernels.native_linear_q8()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    x[1], x[2, 40], x[3, 3] = 0, np.nan, np.inf
    got = op(ms.Tensor(x), ms.Tensor(quantize(rng.standard_normal((5, 96)).astype(np.float32), "float32",
                                                "q4_0"))).asnumpy()
    assert np.isfinite(got[0]).all() and (got[1] == 0).all() and np.isnan(got[2:]).all()
    w = quantize(rng.standard_normal((9, 96)).astype(np.float32), "float32", "q4_0")
    assert np.isnan(op(ms.Tensor(x[2:3]), ms.Tensor(w)).asnumpy()).all()  # one row, 8 columns at a time
    with pytest.raises(RuntimeError):
        op(ms.Tensor(x), ms.Tensor(rng.standard_normal((5, 96)).astype(np.float16))).asnumpy()


@pytest.mark.parametrize("kind", list(KINDS))
def test_q8_activations_compute_the_model_as_llama_cpp_does(gguf_files, kind):
    """A model loaded with activations="q8_0" against the float64 forward of the file's dequantized weights with
    every weight product's input quantized first, as llama.cpp quantizes it: ten times closer to it than the exact
    model is; the exact model is the closer one to the float64 forward without that step."""
    with Source.open(gguf_files[kind]) as src:
        groups, _ = src.groups(Layout("gguf"))
        weights = {g.source.canonical: to_float32(*src.canonical(g)) for g in groups}
        cfg = src.cfg
    prompt = np.concatenate([PROMPT, PROMPT[:, 2:]], axis=1)  # 14 rows: a prompt's pass, past decoding's 8
    want = NumpyGLM2(weights, cfg, inputs=q8_round_trip).logits(prompt[0].tolist())
    float_want = NumpyGLM2(weights, cfg).logits(prompt[0].tolist())
    fast = from_pretrained(gguf_files[kind], dtype="float32", activations="q8_0")
    exact = from_pretrained(gguf_files[kind], dtype="float32")
    assert all(c.q8 for c in linears(fast)) and not any(c.q8 for c in linears(exact))
    got, plain = fast(ms.Tensor(prompt)).asnumpy()[0], exact(ms.Tensor(prompt)).asnumpy()[0]
    assert np.abs(got - want).max() * 10 < np.abs(plain - want).max()
    assert np.abs(plain - float_want).max() * 10 < np.abs(got - float_want).max()
    dec = Decoder(fast)
    tokens = dec.generate(PROMPT, max_new_tokens=6)
    assert "weights through the native kernel with q8_0 activations" in describe(dec.timings)
    np.testing.assert_array_equal(tokens, fast.generate(PROMPT, max_new_tokens=6))


def test_q8_activations_need_weights_in_blocks(hf_tiny):
    with pytest.raises(UserError, match="activations q8_0 go with weights in q8_0/q4_0 blocks, and this model has "
                                        "none"):
        from_pretrained(hf_tiny("safetensors", "float16"), activations="q8_0")
    with pytest.raises(UserError, match="unknown activations 'int4'"):
        from_pretrained(hf_tiny("safetensors", "float16"), quantize="q4_0", activations="int4")


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_embedding_lookup_gives_the_dequantized_rows(kind, kernel_isa):
    op = kernels.native_embedding(kind)
    table = quantize(np.random.default_rng(1).standard_normal((50, 96)).astype(np.float32), "float32", kind)
    ids = np.array([[0, 49, 7], [7, 3, 0]], np.int32)
    got = op(ms.Tensor(ids), ms.Tensor(table)).asnumpy()
    assert got.shape == (2, 3, 96) and np.array_equal(got, dequantize(table, kind)[ids])
    with pytest.raises(RuntimeError):
        op(ms.Tensor(np.array([[3, 50]], np.int32)), ms.Tensor(table)).asnumpy()


def blocks_of(model) -> dict[str, tuple[str, np.ndarray]]:
    return {name: (cell.blocks, weight.asnumpy()) for name, (cell, weight) in block_holders(model).items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_gguf_files_blocks_are_held_as_stored(gguf_files, kind):
    """Every weight matrix holds the file's bytes (none dequantized and quantized again), the embedding's too."""
    _, stored = read_gguf(gguf_files[kind])
    model = from_pretrained(gguf_files[kind])
    held = blocks_of(model)
    with Source.open(gguf_files[kind]) as src:
        groups, _ = src.groups(Layout("mindformers"))
        gguf_name = {name: src.as_stored(g).name for g in groups for name, _ in g.dst()}
    assert len(held) == 4 * model.config.num_layers + 2
    for name, (held_kind, data) in held.items():
        file_tensor = stored[gguf_name[name]]
        assert held_kind == {int(t): n for n, t in KINDS.items()}[int(file_tensor.tensor_type)]
        assert data.tobytes() == file_tensor.data.tobytes(), name
    assert model.transformer.output_layer.blocks == "q8_0"  # under q4_0 too (glm2_core.quants.block_kind)


@pytest.mark.parametrize("kind", list(KINDS))
def test_blocks_compute_what_the_dequantized_weights_compute(gguf_files, kind, monkeypatch):
    """Same greedy tokens, logits within float32 rounding, as the float32 model of the same file dequantized
    (what a machine without the native kernel loads)."""
    quantized = from_pretrained(gguf_files[kind], dtype="float32")
    assert blocks_of(quantized)
    dec = Decoder(quantized)
    got = dec.generate(PROMPT, max_new_tokens=12)
    assert {"q8_0": "; q8_0 weights", "q4_0": "; q4_0 and q8_0 weights"}[kind] + " through the native float32 kernel" \
        in describe(dec.timings)
    logits = quantized(ms.Tensor(PROMPT)).asnumpy()
    monkeypatch.setenv(kernels.SWITCH, "0")
    kernels._build_with.cache_clear()
    try:
        plain = from_pretrained(gguf_files[kind], dtype="float32")
    finally:
        monkeypatch.delenv(kernels.SWITCH)
        kernels._build_with.cache_clear()
    assert not blocks_of(plain)
    np.testing.assert_array_equal(got, plain.generate(PROMPT, max_new_tokens=12))
    want = plain(ms.Tensor(PROMPT)).asnumpy()
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("kind", list(KINDS))
def test_quantize_at_load_gives_the_blocks_to_gguf_writes(hf_tiny, gguf_files, kind):
    """quantize= on a float folder: the same bytes as the GGUF file of the same kind, by the same rule."""
    _, stored = read_gguf(gguf_files[kind])
    held = blocks_of(from_pretrained(hf_tiny("safetensors", "float16"), quantize=kind))
    from_file = blocks_of(from_pretrained(gguf_files[kind]))
    assert held.keys() == from_file.keys()
    for name, (held_kind, data) in held.items():
        assert held_kind == from_file[name][0] and data.tobytes() == from_file[name][1].tobytes(), name


def test_what_cannot_be_quantized_is_refused_in_one_line(hf_tiny, gguf_files, no_native_kernels):
    with pytest.raises(UserError, match="unknown quantization 'q5_k'"):
        from_pretrained(hf_tiny("safetensors", "float16"), quantize="q5_k")
    with pytest.raises(UserError, match="needs the native kernel, which cannot be built here: GLM2_NATIVE_KERNELS=0"):
        from_pretrained(hf_tiny("safetensors", "float16"), quantize="q8_0")
    assert not blocks_of(from_pretrained(gguf_files["q8_0"]))  # read as the float weights it stands for


def test_quantized_weights_compute_in_float32(hf_tiny):
    with pytest.raises(UserError, match="quantized weights compute in float32, not float16"):
        from_pretrained(hf_tiny("safetensors", "float16"), quantize="q8_0", compute_dtype="float16")


def test_a_model_loaded_for_training_holds_floats(gguf_files):
    """Training needs MindSpore's MatMul and its backward: a q4_0 file is read as the float weights it stands for."""
    with open_model(gguf_files["q4_0"]) as folder:
        model = folder.load("float32", "float32", training=True)
        assert not blocks_of(model)
        with pytest.raises(UserError, match="a quantized model cannot be trained"):
            folder.load("float32", "float32", quantize="q8_0", training=True)
        with pytest.raises(UserError, match="activations q8_0 go with weights in q8_0/q4_0 blocks"):
            folder.load("float32", "float32", training=True, activations="q8_0")


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_decoding_row_is_its_row_in_a_batch_to_the_bit(kind, kernel_isa):
    """LinearQ8's decoding passes (up to 8 rows of x: one request, or a server's batch) give each row the bits it
    gets alone, at widths with a remainder and batches whose rows go in groups of 4, 2 and 1: a request decodes the
    same alone and batched beside others. Over q4_0 a prompt's rows take the same tiles, 8 at a time (below
    linear.cc's kQ4LaidOutRows, 128 with VNNI)."""
    op = kernels.native_linear_q8()
    rng = np.random.default_rng(7)
    prompts = ((17, 13), (9, 21)) if kind == "q4_0" else ()
    for n, m in ((3, 3), (8, 2), (19, 7), (67, 8), (40, 5), *prompts):
        x = rng.standard_normal((m, 1056)).astype(np.float32)
        w = ms.Tensor(quantize(rng.standard_normal((n, 1056)).astype(np.float32), "float32", kind))
        batch = op(ms.Tensor(x), w).asnumpy()
        for r in range(m):
            np.testing.assert_array_equal(op(ms.Tensor(x[r:r + 1]), w).asnumpy()[0], batch[r])


def test_q4_0_gives_the_same_bits_in_every_build(monkeypatch):
    """Over q4_0 the AVX-512 build (with VNNI, one instruction for 4 products) and the AVX2 build (maddubs' pairs in
    16 bits) sum the same integers: a row, a batch and a prompt (below linear.cc's kQ4LaidOutRows) give the same bits
    whichever the CPU builds. (Where the CPU has no AVX-512, both sides are the AVX2 build.)"""
    monkeypatch.delenv(kernels.SWITCH, raising=False)
    wide = kernels.native_linear_q8()  # the build this CPU picks: AVX-512 where it has it
    monkeypatch.setenv(kernels.SWITCH, "avx2")
    narrow = kernels.native_linear_q8()  # (the builds are cached by the switch's value)
    rng = np.random.default_rng(11)
    for n, m in ((19, 1), (67, 8), (40, 5), (17, 13), (9, 21)):
        x = ms.Tensor(rng.standard_normal((m, 1056)).astype(np.float32))
        w = ms.Tensor(quantize(rng.standard_normal((n, 1056)).astype(np.float32), "float32", "q4_0"))
        np.testing.assert_array_equal(wide(x, w).asnumpy(), narrow(x, w).asnumpy())
