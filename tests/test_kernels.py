"""The native kernels (glm2_ms/kernels): the float32 product over 16-bit weights (float32 arithmetic on the widened
weights), and a layer's fused steps (attention against the cache, RMSNorm, SwiGLU); built once into the cache, used
in inference only, and MindSpore's operators wherever they cannot be built."""
import shutil
import subprocess
import time

import mindspore as ms  # noqa: TID253
import numpy as np
import pytest

from glm2_core.config import GLM2Config
from glm2_ms import engine as engine_module
from glm2_ms import kernels
from glm2_ms import model as glm2_model
from glm2_ms.api import from_pretrained
from glm2_ms.engine import Engine, Job
from glm2_ms.generation import Decoder, cache_inputs, describe, op_by_op_because
from glm2_ms.model import MLP, Block, Encoder, GLM2Network, Linear, RMSNorm, SelfAttention, use_native_kernels
from glm2_ms.sampling import SamplingConfig

ms.set_device("CPU")
# (m, n, k): every remainder of the 8- and 16-wide loops, the column passes and the row tiles
SHAPES = [(1, 1, 8), (1, 5, 13), (2, 13, 520), (3, 4, 1030), (4, 7, 64), (7, 9, 8), (1, 6, 40), (2, 3, 1047),
          (17, 5, 40)]


def widened(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_16_bit_weights_are_float32_arithmetic_on_the_widened_weights(m, n, k, dtype, kernel_isa):
    op = kernels.native_linear()
    assert op is not None, kernels.why_not()
    rng = np.random.default_rng(k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bits = w.astype(np.float16).view(np.uint16) if dtype == "float16" else (w.view(np.uint32) >> 16).astype(np.uint16)
    weight = ms.Tensor(bits).view(ms.float16 if dtype == "float16" else ms.bfloat16)
    got = op(ms.Tensor(x), weight).asnumpy()
    exact = x.astype(np.float64) @ widened(bits, dtype).T
    bound = np.abs(x).astype(np.float64) @ np.abs(widened(bits, dtype)).T * k * np.finfo(np.float32).eps
    assert got.dtype == np.float32 and got.shape == (m, n)
    assert (np.abs(got - exact) <= bound).all()


def test_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib, why = kernels._build()
    assert why == "" and lib.parent == tmp_path / "glm2-toolkit" / "kernels" and lib.exists()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("built again"))
    assert kernels._build() == (lib, "")
    assert list(lib.parent.iterdir()) == [lib]  # the build folder is gone


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_the_built_library_keeps_the_decoding_passes_prefetches():
    """read_ahead's prefetches reach the machine code: g++ once dropped them without a word (as _mm_prefetch), and
    only the speed would have shown it."""
    lib, why = kernels._build()
    assert why == "", why
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                          check=True).stdout
    assert "prefetcht1" in code


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_the_built_library_keeps_the_sums_of_a_block_pass_in_registers():
    """in_two_sums and q4_block are inlined into the passes that use them: out of line, their sums go through memory
    at every block (g++ stopped inlining them once q4_0's tile came in 8 row counts, and only the speed showed it)."""
    lib, why = kernels._build()
    assert why == "", why
    symbols = subprocess.run(["nm", "-C", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "linear_q8" in symbols
    assert "in_two_sums" not in symbols and "q4_block" not in symbols


def test_a_failing_build_leaves_the_cast_path_and_says_why(tmp_path, monkeypatch, hf_tiny):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    kernels._build_with.cache_clear()
    try:
        assert kernels.native_linear() is None and kernels.why_not().startswith("false failed")
        assert list((tmp_path / "glm2-toolkit" / "kernels").iterdir()) == []
        model = from_pretrained(hf_tiny(dtype="float16"), compute_dtype="float32")
        assert not model.transformer.output_layer.native
        assert not any(c.native for _, c in model.cells_and_names() if isinstance(c, (SelfAttention, RMSNorm, MLP)))
        dec = Decoder(model)
        dec.generate(np.array([[64790, 64792, 790]], np.int32), max_new_tokens=2)
        assert "cast to float32 at every step (no native kernel: false failed" in describe(dec.timings)
    finally:
        kernels._build_with.cache_clear()


def test_training_takes_the_gradient_through_mindspores_matmul():
    """The kernel has no backward: a Linear in training mode casts its weight and multiplies as before."""
    layer = Linear(16, 8, False, ms.float16)
    layer.weight.set_data(ms.Tensor(np.random.default_rng(0).standard_normal((8, 16)), ms.float16))
    assert use_native_kernels(layer) and layer.native
    x = ms.Tensor(np.ones((2, 16), np.float32))
    layer.set_train(True)
    grad = ms.grad(lambda t: layer(t).sum())(x).asnumpy()
    np.testing.assert_allclose(grad, np.tile(layer.weight.asnumpy().astype(np.float32).sum(0), (2, 1)), rtol=1e-6)
    layer.set_train(False)
    np.testing.assert_allclose(layer(x).asnumpy(), x.asnumpy() @ layer.weight.asnumpy().astype(np.float32).T,
                               rtol=1e-6)


# ---- the fused steps: attention against the cache, RMSNorm, SwiGLU (attention.cc, pointwise.cc) ----------------

def attention_float64(qkv, cos, sin, mask, write, k, v):
    """What `Attend` computes, in float64 from its operands: RoPE on interleaved pairs of each head's first half,
    the new k/v into their one-hot slots, softmax(q·k/√d + mask) · v, query head j on kv group j / (h/g)."""
    qkv, cos, sin = (np.asarray(a, np.float64) for a in (qkv, cos, sin))
    b, s, width = qkv.shape
    g, length, d = k.shape[1:]
    h = width // d - 2 * g

    def rotated(x):  # x [b, s, heads, d]
        out, c, sn = x.copy(), cos, sin
        x0, x1 = x[..., 0:d // 2:2], x[..., 1:d // 2:2]
        out[..., 0:d // 2:2], out[..., 1:d // 2:2] = x0 * c - x1 * sn, x1 * c + x0 * sn
        return out

    q = rotated(qkv[..., :h * d].reshape(b, s, h, d))
    new_k = rotated(qkv[..., h * d:(h + g) * d].reshape(b, s, g, d))
    new_v = qkv[..., (h + g) * d:].reshape(b, s, g, d)
    k2, v2 = np.array(k, np.float64), np.array(v, np.float64)
    for bi, t, slot in zip(*np.nonzero(write), strict=True):
        k2[bi, :, slot], v2[bi, :, slot] = new_k[bi, t], new_v[bi, t]
    keys, values = np.repeat(k2, h // g, 1), np.repeat(v2, h // g, 1)  # [b, h, L, d]
    # the mask added in float32, as the model adds it: a row whose every position it hides gets scores that
    # differ by less than float32 can tell at that magnitude (a server's idle row)
    scores = ((np.einsum("bshd,bhld->bhsl", q, keys) / np.sqrt(d)).astype(np.float32) + mask[:, None]).astype(float)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhsl,bhld->bshd", probs, values).reshape(b, s, h * d), k2, v2


# (b, s, h, g, d, L, first slot (a row's own, or -1: writes nothing)): a dot's 16-, 8- and 1-wide parts, the
# softmax's 8-wide part and rest, several rows and tokens
ATTENTION_SHAPES = [(1, 1, 2, 1, 4, 1, [0]), (1, 1, 8, 2, 16, 67, [30]), (2, 3, 4, 2, 12, 9, [0, 5]),
                    (3, 1, 32, 2, 128, 64, [3, -1, 63]), (1, 5, 6, 3, 24, 16, [11])]


@pytest.mark.parametrize("b,s,h,g,d,length,starts", ATTENTION_SHAPES)
def test_attention_against_the_cache_is_its_float64_arithmetic(b, s, h, g, d, length, starts, kernel_isa):
    rng = np.random.default_rng(d * length)
    qkv = rng.standard_normal((b, s, (h + 2 * g) * d)).astype(np.float32)
    angles = rng.uniform(-7, 7, (b, s, 1, d // 4))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    valid = (rng.random((b, length)) < 0.8).astype(np.int32)
    valid[0] = 0  # row 0 sees its new tokens only
    for row, start in enumerate(starts * b if len(starts) == 1 else starts):
        valid[row, max(start, 0):max(start, 0) + s] = 1
    mask, write = cache_inputs(s, valid, np.array(starts) if len(starts) > 1 else starts[0])
    k, v = (rng.standard_normal((b, g, length, d)).astype(np.float32) for _ in range(2))
    got = kernels.native_attention()(*(ms.Tensor(a) for a in (qkv, cos, sin, mask, write, k, v)))
    for out, exact in zip(got, attention_float64(qkv, cos, sin, mask, write, k, v), strict=True):
        assert out.dtype == ms.float32 and out.shape == exact.shape
        np.testing.assert_allclose(out.asnumpy(), exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


def test_a_row_that_hides_every_position_attends_to_all_of_them():
    """As MindSpore's softmax does over float32 scores that the mask lowered to one value (a server's idle row):
    the mean of the values, not a skipped row's zeros."""
    rng = np.random.default_rng(1)
    qkv, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((1, 1, 6 * 8), (1, 1, 5, 8), (1, 1, 5, 8)))
    cos, sin = np.ones((1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 2), np.float32)
    mask, write = np.full((1, 1, 5), -1e9, np.float32), np.zeros((1, 1, 5), np.float32)
    ctx, _, _ = kernels.native_attention()(*(ms.Tensor(a) for a in (qkv, cos, sin, mask, write, k, v)))
    np.testing.assert_allclose(ctx.asnumpy(), np.tile(v[0, 0].mean(0), 4)[None, None], rtol=1e-5)


def silu_glu_float64(x):
    x = np.asarray(x, np.float64)
    gate, up = np.split(x, 2, -1)
    with np.errstate(over="ignore"):
        return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("m,f", [(1, 13696), (3, 13), (2, 8), (1, 1)])
def test_swiglu_is_its_float64_arithmetic(m, f, kernel_isa):
    x = np.random.default_rng(f).standard_normal((m, 2 * f)).astype(np.float32) * 4
    np.testing.assert_allclose(kernels.native_swiglu()(ms.Tensor(x)).asnumpy(), silu_glu_float64(x), rtol=2e-6,
                               atol=1e-30)


def test_swiglu_at_the_ends_of_the_exponential():
    """e^x's range reduction at its ends: a gate far below 0 gives 0 (times up), far above gives the gate, NaN
    stays NaN; and the exponential holds its 2-ulp error over its whole range."""
    gates = np.array([-1e30, -200, -103, -88.8, -87.4, -87.3, -20, -1e-30, 0, 1e-30, 0.3466, 20, 87, 88.8, 200, 1e30,
                      np.nan, np.inf, -np.inf, 1, 2, 3], np.float32)
    x = np.concatenate([gates, np.ones_like(gates)])[None]
    got = kernels.native_swiglu()(ms.Tensor(x)).asnumpy()[0]
    exact = silu_glu_float64(x)[0]
    finite = np.isfinite(gates)
    np.testing.assert_allclose(got[finite], exact[finite], rtol=3e-7, atol=1e-36)  # e^88.8 is inf in float32
    assert np.isnan(got[np.isnan(gates)]).all() and got[gates == np.inf] == np.inf
    sweep = np.linspace(-87, 88, 200_001, dtype=np.float32)
    got = kernels.native_swiglu()(ms.Tensor(np.concatenate([-sweep, np.ones_like(sweep)])[None])).asnumpy()[0]
    # silu(-x) = -x / (1 + e^x): the kernel's e^x against float64
    implied = -sweep / got - 1
    exact = np.exp(sweep.astype(np.float64))
    ok = implied > 1e-3  # where 1 + e^x still carries e^x's bits
    assert (np.abs(implied[ok] - exact[ok]) <= 4 * np.spacing(exact[ok].astype(np.float32)) + 2 * np.spacing(
        np.float32(1) + exact[ok].astype(np.float32))).all()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("m,k", [(1, 4096), (3, 13), (2, 16), (5, 1)])
def test_rms_norm_is_its_float64_arithmetic(m, k, dtype, kernel_isa):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    w = ms.Tensor(rng.standard_normal(k).astype(np.float32)).astype(getattr(ms, dtype))
    got = kernels.native_rms_norm()(ms.Tensor(x), w, ms.Tensor([1e-5], ms.float32)).asnumpy()
    weight = w.astype(ms.float32).asnumpy().astype(np.float64)
    exact = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())


def test_a_layers_steps_run_fused_where_its_projections_are_native(hf_tiny):
    """16-bit weights: every layer's attention against the cache, RMSNorms and SwiGLU run in one native operator
    each, and a batch of left-padded rows decodes as it does with those steps in MindSpore's operators (the same
    tokens; logits within float32 rounding). Float32 weights: nothing is fused, and the prefill stays compiled."""
    model = from_pretrained(hf_tiny(dtype="float16"), compute_dtype="float32")
    fused = [c for _, c in model.cells_and_names() if isinstance(c, (SelfAttention, RMSNorm, MLP, Block, Encoder))]
    assert all(c.native for c in fused if c is not model.transformer.encoder.final_layernorm)
    ids = np.array([[0, 64790, 64792, 790, 30951], [64790, 64792, 34607, 31123, 55448]], np.int32)
    mask = (ids != 0).astype(np.int32)
    runs = []
    for native in (True, False):
        for cell in fused:
            cell.native = native and cell is not model.transformer.encoder.final_layernorm
        dec = Decoder(model)
        assert not dec.compiled_prefill
        tokens = dec.generate(ids, mask, max_new_tokens=6)
        logits, _ = dec.forward(ids, np.maximum(np.cumsum(mask, 1) - 1, 0), np.pad(mask, ((0, 0), (0, 59))), 0,
                                dec.new_cache(2, 64))
        runs.append((tokens, logits))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-4 * np.abs(runs[1][1]).max())
    assert not np.array_equal(runs[0][1], runs[1][1])  # two arithmetics, not one graph twice
    plain = from_pretrained(hf_tiny(dtype="float32"))
    assert not any(c.native for _, c in plain.cells_and_names() if isinstance(c, (SelfAttention, RMSNorm, MLP)))
    assert Decoder(plain).compiled_prefill


def _random_model(dtype, **config) -> GLM2Network:
    """A tiny model of random 16-bit weights computing in float32, its native kernels installed."""
    model = GLM2Network(GLM2Config.preset("tiny", **config), dtype, ms.float32)
    rng = np.random.default_rng(3)
    for p in model.get_parameters():
        norm = p.ndim == 1 and "norm" in p.name
        p.set_data(ms.Tensor(rng.standard_normal(p.shape, np.float32) * (0.3 if p.ndim == 1 else 0.05) + norm, dtype))
    model.set_train(False)
    use_native_kernels(model)
    return model


def _counting(monkeypatch) -> dict:
    """Calls of each native operator of a layer, by name (the operators themselves run)."""
    calls = dict.fromkeys(glm2_model.NATIVE_OPS, 0)

    def counted(name, op):
        def call(*args):
            calls[name] += 1
            return op(*args)
        return call

    for name, op in list(glm2_model.NATIVE_OPS.items()):
        monkeypatch.setitem(glm2_model.NATIVE_OPS, name, counted(name, op))
    return calls


LAYER_CASES = {"float16": lambda hf, files: _random_model(ms.float16),
               "bfloat16": lambda hf, files: _random_model(ms.bfloat16),
               "no qkv bias": lambda hf, files: _random_model(ms.float16, add_qkv_bias=False),
               "GLM-4-0414 sandwich norms": lambda hf, files: _random_model(ms.float16, release="glm-4-9b-0414"),
               "q4_0 file": lambda hf, files: from_pretrained(files["q4_0"], compute_dtype="float32"),
               "q8_0 file, q8_0 activations": lambda hf, files: from_pretrained(files["q8_0"], compute_dtype="float32",
                                                                                activations="q8_0"),
               "quantize=q4_0, q8_0 activations": lambda hf, files: from_pretrained(
                   hf("safetensors", "float16"), quantize="q4_0", activations="q8_0")}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_a_whole_layer_in_one_operator_is_its_steps_to_the_bit(case, hf_tiny, gguf_files, monkeypatch, kernel_isa):
    """Against a cache, all layers run in one native operator (layer.cc's Layers), or each layer in one (Layer): a
    prompt of left-padded rows and a decoding step give the logits and caches of the layer's steps one operator
    each, bit for bit, for every kind of weight, with and without the qkv bias and GLM-4-0414's sandwich norms. The
    decoder runs such a model op by op."""
    model = LAYER_CASES[case](hf_tiny, gguf_files)
    blocks = [c for _, c in model.cells_and_names() if isinstance(c, Block)]
    encoder = model.transformer.encoder
    assert encoder.native and all(b.native for b in blocks)
    assert op_by_op_because(model) == "each layer one native operator"
    calls = _counting(monkeypatch)
    ids = np.array([[0, 0, 64790, 790, 30951], [64790, 64792, 34607, 31123, 55448]], np.int32)
    mask = (ids != 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    runs = []
    encoder.final_layernorm.native = True  # as with all layers in one operator, so the logits compare too
    for stacked, whole in ((True, True), (False, True), (False, False)):
        encoder.native = stacked
        for b in blocks:
            b.native = whole
        dec = Decoder(model, jit=False)  # (the counting wrappers would not compile)
        valid = np.pad(mask, ((0, 0), (0, 59)))
        logits, caches = dec.forward(ids, positions, valid, 0, dec.new_cache(2, 64))
        valid[:, 5] = 1
        step, caches = dec.forward(np.array([[8], [9]], np.int32), positions[:, -1:] + 1, valid, 5, caches)
        runs.append([logits, step, *(c.asnumpy() for c in caches)])
        layer = sum(n for name, n in calls.items() if name in ("Layer", "LayerQ8"))
        all_layers = sum(n for name, n in calls.items() if name in ("Layers", "LayersQ8"))
        assert (all_layers, layer) == ((2, 0) if stacked else (0, 2 * len(blocks) if whole else 0))
        calls.update(dict.fromkeys(calls, 0))
    for got, *others in zip(*runs, strict=True):
        for want in others:
            np.testing.assert_array_equal(got, want)


def test_the_whole_layer_refuses_operands_that_do_not_fit_it(kernel_isa):
    """The layer's operator checks its operands' ranks, dtypes and widths against each other before it computes:
    MindSpore raises, nothing is returned."""
    model = _random_model(ms.float16)
    block = model.transformer.encoder.layers[0]
    cfg = model.config
    x = ms.Tensor(np.ones((1, 1, cfg.hidden_size), np.float32))
    cache = ms.Tensor(np.zeros((1, cfg.multi_query_group_num, 64, cfg.kv_channels), np.float32))
    mask, write = cache_inputs(1, np.ones((1, 64), np.int32), 0)
    angles = ms.Tensor(np.zeros((1, 1, 1, cfg.kv_channels // 4), np.float32))
    block.fused(x, angles, angles, ms.Tensor(mask), (cache, cache), ms.Tensor(write))  # fits
    wrong = {"a narrower x": ms.Tensor(np.ones((1, 1, cfg.hidden_size - 8), np.float32)),
             "a float16 x": x.astype(ms.float16)}
    for why, bad in wrong.items():
        with pytest.raises(RuntimeError):
            block.fused(bad, angles, angles, ms.Tensor(mask), (cache, cache), ms.Tensor(write))
        print(why, "refused")
    flat = ms.Tensor(np.zeros((1, 64), np.float32))  # a cache of the wrong rank
    with pytest.raises(RuntimeError):
        block.fused(x, angles, angles, ms.Tensor(mask), (flat, flat), ms.Tensor(write))
    block.input_layernorm.weight.set_data(ms.Tensor(np.ones(cfg.hidden_size + 1, np.float16)))
    with pytest.raises(RuntimeError):
        block.fused(x, angles, angles, ms.Tensor(mask), (cache, cache), ms.Tensor(write))



def test_all_layers_in_one_operator_refuse_operands_that_do_not_fit(kernel_isa):
    """The operator of all layers checks how its operands divide into layers, and each layer's as the layer operator
    does, before it computes: MindSpore raises, nothing is returned."""
    model = _random_model(ms.float16)
    encoder, cfg = model.transformer.encoder, model.config
    x = ms.Tensor(np.ones((1, 1, cfg.hidden_size), np.float32))
    cache = np.zeros((1, cfg.multi_query_group_num, 64, cfg.kv_channels), np.float32)
    caches = [(ms.Tensor(cache), ms.Tensor(cache)) for _ in encoder.layers]
    mask, write = (ms.Tensor(a) for a in cache_inputs(1, np.ones((1, 64), np.int32), 0))
    angles = ms.Tensor(np.zeros((1, 1, 1, cfg.kv_channels // 4), np.float32))
    encoder.stacked(x, angles, angles, mask, caches, write)  # fits
    shared = (x, angles, angles, mask, write, encoder.layers[0].input_layernorm.eps_operand)
    own = [o for block, c in zip(encoder.layers, caches, strict=True) for o in block.own_operands(c)]
    with pytest.raises(RuntimeError):  # a layer's last weight missing (raised when the result is read)
        glm2_model.NATIVE_OPS["Layers"](*shared, *own[:-1]).asnumpy()
    encoder.layers[-1].post_attention_layernorm.weight.set_data(ms.Tensor(np.ones(cfg.hidden_size + 1, np.float16)))
    with pytest.raises(RuntimeError):  # the last layer's norm of the wrong width
        encoder.stacked(x, angles, angles, mask, caches, write)[0].asnumpy()

def test_whole_layers_compiled_decode_as_they_do_op_by_op():
    """The layer's operator also runs inside a compiled step (`Decoder(jit=True)`): the same tokens, the same
    logits, as the op-by-op step a model of whole layers takes by default."""
    model = _random_model(ms.float16, release="glm-4-9b-0414")
    ids = np.array([[0, 64790, 64792, 790, 30951]], np.int32)
    compiled, op_by_op = Decoder(model, jit=True), Decoder(model)
    assert compiled.compiled and not op_by_op.compiled
    np.testing.assert_array_equal(compiled.generate(ids, max_new_tokens=6), op_by_op.generate(ids, max_new_tokens=6))
    assert "op by op (each layer one native operator)" in describe(op_by_op.timings)


def test_whole_layers_write_the_cache_in_place_and_the_engine_keeps_it_whole(gguf_files, monkeypatch):
    """A step of whole layers hands back the very caches it was given, the new tokens written in them (the step holds
    the cache once). Caches MindSpore would hand the operator as copies (views of a larger tensor, a tensor a slice
    assignment covered whole), whose writes would be lost, are replaced by tensors of their own first. The serving
    engine grows and cuts its batch's caches (into views) as rows come and go: every request still decodes what it
    decodes alone."""
    model = from_pretrained(gguf_files["q4_0"], compute_dtype="float32")
    dec = model.decoder
    ids = np.array([[64790, 64792, 790, 30951]], np.int32)
    valid = np.pad(np.ones((1, 4), np.int32), ((0, 0), (0, 60)))

    def run(caches):
        return dec.forward(ids, np.arange(4, dtype=np.int32)[None], valid, 0, caches)

    caches = dec.new_cache(1, 64)
    logits, back = run(caches)
    assert all(a is b for a, b in zip(back, caches, strict=True))
    k = caches[0].asnumpy()
    assert np.abs(k[0, :, :4]).min() > 0 and not k[0, :, 4:].any()
    wide = [ms.Tensor(np.zeros((2, *c.shape[1:]), np.float32)) for c in caches]
    covered = []
    for c in caches:
        covered.append(ms.ops.zeros(c.shape, ms.float32))
        covered[-1][:, :, :64] = ms.Tensor(np.zeros((1, *c.shape[1:]), np.float32))
    for given in (tuple(w[1:] for w in wide), tuple(covered)):
        assert not all(dec._handed_as_they_are(given))
        got, back = run(given)
        np.testing.assert_array_equal(got, logits)
        for a, b in zip(back, caches, strict=True):
            np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())

    cuts = []
    resized = engine_module._resized

    def recorded(t, want):
        if want[0] < t.shape[0] or want[1] < t.shape[2]:
            cuts.append((t.shape, want))
        return resized(t, want)

    monkeypatch.setattr(engine_module, "_resized", recorded)
    asks = [([64790, 64792, *range(30000, 30000 + n)], new) for n, new in ((3, 12), (300, 2), (9, 10), (40, 3))]
    alone = [dec.generate(np.array([ids], np.int32), max_new_tokens=new, eos_token_id=-1)[0, len(ids):].tolist()
             for ids, new in asks]
    got = [[] for _ in asks]
    engine = Engine(model, slots=4, context=512, queue=8)
    for i, (ids, new) in enumerate(asks):
        engine.submit(Job(ids, new, SamplingConfig(greedy=True), frozenset(),
                          lambda token, end, i=i: got[i].append(token if end is None else end)))
    engine.start()
    deadline = time.monotonic() + 300
    while not all(g and g[-1] == "length" for g in got) and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.stop(10)
    assert [g[:-1] for g in got] == alone
    assert cuts, "the caches were never cut"
