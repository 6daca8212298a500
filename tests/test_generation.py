"""Converted checkpoints load into the runtime and generate; the cache, padding and sampling behave."""
import ctypes

import mindspore as ms  # noqa: TID253
import numpy as np
import psutil
import pytest

from converters.convert import convert
from glm2_core.names import Layout
from glm2_ms import generation
from glm2_ms.api import from_pretrained
from glm2_ms.generation import Decoder, SamplingConfig, describe
from glm2_ms.tokenizer import GLM2Tokenizer

ms.set_device("CPU")
LAYOUTS = [Layout("mindformers"), Layout("mindformers-legacy"), Layout("mindformers", True, True, True)]


@pytest.fixture(scope="module")
def tiny(ms_tiny):
    return from_pretrained(ms_tiny("float32"))


@pytest.fixture(scope="module")
def dec(tiny):
    return Decoder(tiny)  # one compiled step for the module: shapes seen once are not compiled again


@pytest.fixture(scope="module")
def tok():
    return GLM2Tokenizer()


def test_every_layout_loads_to_identical_logits(hf_tiny, tmp_path, tok):
    ids = ms.Tensor([tok.build_chat_input("你好")], ms.int32)
    src = hf_tiny(dtype="bfloat16")
    reference = from_pretrained(src, dtype="float32")(ids).asnumpy()  # straight from the HF folder
    for i, layout in enumerate(LAYOUTS):
        convert(src, tmp_path / f"m{i}", target=layout, fmt="ckpt" if i % 2 else "safetensors", progress=False)
        got = from_pretrained(tmp_path / f"m{i}", dtype="float32")(ids).asnumpy()
        np.testing.assert_array_equal(got, reference, err_msg=layout.describe())


def test_bf16_weights_stay_bf16_and_compute_in_fp32(hf_tiny, tok):
    model = from_pretrained(hf_tiny(dtype="bfloat16"))
    assert model.transformer.embedding.embedding_weight.dtype == ms.bfloat16
    assert model.compute_dtype == ms.float32
    assert model(ms.Tensor([tok.encode("你好")], ms.int32)).shape == (1, 4, 65024)


def test_cached_steps_equal_recomputing_the_whole_sequence(tiny, dec, tok):
    prompt = np.array([tok.build_chat_input("晚上睡不着应该怎么办")], np.int32)
    out = dec.generate(prompt, max_new_tokens=6)
    n = prompt.shape[1]
    full = tiny(ms.Tensor(out, ms.int32)).asnumpy()[0]
    # every generated token is the argmax of the uncached logits one position earlier
    assert (full[n - 1:-1].argmax(-1) == out[0, n:]).all()
    valid = np.zeros((1, 64), np.int32)
    valid[0, :n] = 1
    logits, caches = dec.forward(prompt, np.arange(n, dtype=np.int32)[None], valid, 0, dec.new_cache(1, 64))
    np.testing.assert_allclose(logits[0], full[n - 1], atol=1e-5)
    for t in range(3):
        valid[0, n + t] = 1
        logits, caches = dec.forward(out[:, n + t:n + t + 1], np.array([[n + t]], np.int32), valid, n + t, caches)
        np.testing.assert_allclose(logits[0], full[n + t], atol=1e-5)


def test_left_padded_batch_equals_each_prompt_alone(tiny, dec, tok):
    prompts = [tok.build_chat_input("你好"), tok.build_chat_input("请介绍一下华为"), tok.encode("Hello world")]
    batch = tok.batch(prompts)
    together = dec.generate(batch.input_ids, batch.attention_mask, max_new_tokens=5)
    width = batch.input_ids.shape[1]
    for row, p in enumerate(prompts):
        alone = dec.generate(np.array([p], np.int32), max_new_tokens=5)
        assert together[row, width:].tolist() == alone[0, len(p):].tolist()
    unpadded = [tiny(ms.Tensor([p], ms.int32)).asnumpy()[0, -1] for p in prompts]
    padded = tiny(ms.Tensor(batch.input_ids), ms.Tensor(batch.attention_mask)).asnumpy()[:, -1]
    np.testing.assert_allclose(padded, np.stack(unpadded), atol=1e-5)


def test_greedy_is_deterministic_and_sampling_reproducible(dec, tok):
    prompt = np.array([tok.build_chat_input("你好")], np.int32)
    assert (dec.generate(prompt, max_new_tokens=6) == dec.generate(prompt, max_new_tokens=6)).all()
    cfg = dict(greedy=False, temperature=1.5, top_k=50, top_p=0.9)
    a = dec.generate(prompt, max_new_tokens=8, sampling=SamplingConfig(**cfg, seed=1))
    b = dec.generate(prompt, max_new_tokens=8, sampling=SamplingConfig(**cfg, seed=1))
    c = dec.generate(prompt, max_new_tokens=8, sampling=SamplingConfig(**cfg, seed=2))
    assert (a == b).all() and not (a == c).all()


def test_stops_on_eos_and_respects_max_length(dec, tok):
    prompt = np.array([tok.build_chat_input("你好")], np.int32)
    first = dec.generate(prompt, max_new_tokens=1)[0, -1]
    out = dec.generate(prompt, max_new_tokens=10, eos_token_id=int(first))
    assert out.shape[1] == prompt.shape[1] + 1
    assert dec.generate(prompt, max_new_tokens=50, max_length=prompt.shape[1] + 3).shape[1] == prompt.shape[1] + 3


@pytest.mark.parametrize("native", [True, False], ids=["native kernel", "cast"])
def test_float32_compute_over_float16_weights_equals_float32_model_on_rounded_weights(hf_tiny, tok, native,
                                                                                       request):
    """Weights kept in float16 (half the memory), computing in float32: the numbers of the float32 model on the
    float16-rounded weights, forward and greedy generation (its jit step and static KV cache included). Cast where
    used, the same bits; through the native kernel, the same tokens and float32 rounding apart."""
    if not native:
        request.getfixturevalue("no_native_kernels")
    src = hf_tiny(dtype="float16")
    stored = from_pretrained(src, compute_dtype="float32")
    widened = from_pretrained(src, dtype="float32")
    assert stored.transformer.output_layer.weight.dtype == ms.float16 and stored.compute_dtype == ms.float32
    assert stored.transformer.output_layer.native == native
    ids = np.array([tok.build_chat_input("晚上睡不着应该怎么办")], np.int32)
    got, want = stored(ms.Tensor(ids)).asnumpy(), widened(ms.Tensor(ids)).asnumpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 if native else 0)
    np.testing.assert_array_equal(Decoder(stored).generate(ids, max_new_tokens=8),
                                  Decoder(widened).generate(ids, max_new_tokens=8))


def test_the_step_runs_op_by_op_when_its_compiled_copies_would_not_fit(hf_tiny, tok, monkeypatch, no_native_kernels):
    """Without the native kernel, Decoder picks the compiled step unless the float32 copies the graph keeps of
    16-bit weights would not fit in the memory available; op by op it gives the same tokens."""
    model = from_pretrained(hf_tiny(dtype="float16"), compute_dtype="float32")
    ids = np.array([tok.build_chat_input("你好")], np.int32)
    compiled = Decoder(model)
    assert compiled.compiled
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Mem", (), {"available": 1 << 20})())
    op_by_op = Decoder(model)
    assert not op_by_op.compiled
    np.testing.assert_array_equal(op_by_op.generate(ids, max_new_tokens=6), compiled.generate(ids, max_new_tokens=6))


def test_a_large_models_prompt_runs_op_by_op_beside_the_compiled_decoding_step(tiny, tok, monkeypatch):
    """Above PREFILL_COMPILED_UP_TO parameters the prefill is not compiled (the graph's float32 copies of the
    weights would not fit); the decoding step still is, and the tokens are the same."""
    ids = np.array([tok.build_chat_input("晚上睡不着应该怎么办")], np.int32)
    compiled = Decoder(tiny, jit=True)
    monkeypatch.setattr(generation, "PREFILL_COMPILED_UP_TO", 0)
    large = Decoder(tiny, jit=True)
    assert compiled.compiled_prefill and large.compiled and not large.compiled_prefill
    np.testing.assert_array_equal(large.generate(ids, max_new_tokens=6), compiled.generate(ids, max_new_tokens=6))
    assert "op by op" in describe(large.timings) and "compile included" in describe(compiled.timings)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def test_a_decoder_keeps_freed_large_blocks_out_of_the_c_heap():
    """Once `give_back_freed_blocks` ran (every Decoder runs it), a block the C heap cannot hold is mapped from the
    system and unmapped when freed, also after a larger one was freed: glibc's default raises its threshold to
    that block's size, after which blocks below it grow the heap, and a prompt's freed intermediates stayed there."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc 2.33 or later")
    libc.mallinfo2.restype, libc.malloc.restype, libc.malloc.argtypes = MallInfo2, ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert generation.give_back_freed_blocks()
    libc.free(libc.malloc(24 << 20))  # mapped, and by default the threshold from now on
    before = libc.mallinfo2().hblks
    block = libc.malloc(16 << 20)  # more than the heap keeps free
    try:
        assert libc.mallinfo2().hblks == before + 1
    finally:
        libc.free(block)
    assert libc.mallinfo2().hblks == before
