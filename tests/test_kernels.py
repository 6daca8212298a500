"""The native float32 kernel over 16-bit weights (glm2_ms/kernels): float32 arithmetic on the widened weights, built
once into the cache, used in inference only, and the cast path wherever it cannot be built."""
import subprocess

import mindspore as ms  # noqa: TID253
import numpy as np
import pytest

from glm2_ms import kernels
from glm2_ms.api import from_pretrained
from glm2_ms.generation import Decoder, describe
from glm2_ms.model import Linear, use_native_kernels

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


def test_a_failing_build_leaves_the_cast_path_and_says_why(tmp_path, monkeypatch, hf_tiny):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    kernels._native_linear.cache_clear()
    try:
        assert kernels.native_linear() is None and kernels.why_not().startswith("false failed")
        assert list((tmp_path / "glm2-toolkit" / "kernels").iterdir()) == []
        model = from_pretrained(hf_tiny(dtype="float16"), compute_dtype="float32")
        assert not model.transformer.output_layer.native
        dec = Decoder(model)
        dec.generate(np.array([[64790, 64792, 790]], np.int32), max_new_tokens=2)
        assert "cast to float32 at every step (no native kernel: false failed" in describe(dec.timings)
    finally:
        kernels._native_linear.cache_clear()


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
