"""Native CPU kernels, built on first use by the machine's C++ compiler into the user's cache folder.

`native_linear()` is MindSpore's "aot" custom operator y = x · Wᵀ for float32 x and a W in float16, bfloat16 or
GGUF's q8_0 or q4_0 blocks, in float32 arithmetic, without a float32 copy of W (linear.cc says why). It is None
where it cannot be built here (no compiler, a CPU without AVX2, FMA and F16C, a failed build, or
GLM2_NATIVE_KERNELS=0): the runtime then casts 16-bit weights where used, cannot hold quantized ones, and
`why_not()` says why. The same library holds a layer's small steps each as one operator (`native_attention`,
`native_rms_norm`, `native_swiglu`: attention.cc and pointwise.cc say why), used where the layer's projections go
through the kernel, and a whole layer composed of them (`native_layer`, layer.cc), which a decoding step runs.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from glm2_core import cache_dir as package_cache
from glm2_core.quants import BLOCK, row_bytes

SOURCES = [Path(__file__).with_name(name) for name in ("linear.cc", "attention.cc", "pointwise.cc", "layer.cc")]
HEADERS = [Path(__file__).with_name("vector_math.h")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
CPU_FLAGS = {"avx2", "fma", "f16c"}
# the decoding paths' 16-wide build, chosen at run time where the CPU has these (linear.cc's __AVX512F__ parts)
AVX512 = {"avx512f", "avx512bw", "avx512vl"}
VNNI = "avx512_vnni"  # with AVX-512: int8 activations' dot products in one instruction (LinearQ8)
SWITCH = "GLM2_NATIVE_KERNELS"  # "0": never use them; "avx2": the AVX2 build even where AVX-512 is


def cache_dir() -> Path:
    return package_cache() / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def isa() -> str:
    """The instruction set the kernel is built for here: avx512 where the CPU has it (unless GLM2_NATIVE_KERNELS is
    avx2), else avx2."""
    return "avx512" if _cpu_flags() >= AVX512 and os.environ.get(SWITCH) != "avx2" else "avx2"


def _build() -> tuple[Path | None, str]:
    """The shared library (built once per source and flags), or None and the reason; tried once per setting of
    the switch, the compiler and the cache folder."""
    return _build_with(os.environ.get(SWITCH), os.environ.get("CXX", "g++"), cache_dir())


@functools.cache
def _build_with(switch: str | None, cxx: str, folder: Path) -> tuple[Path | None, str]:
    if switch == "0":
        return None, f"{SWITCH}=0"
    missing = CPU_FLAGS - _cpu_flags()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    compiler = shutil.which(cxx)
    if compiler is None:
        return None, "no C++ compiler (g++) on PATH"
    flags = FLAGS + [f"-m{f}" for f in sorted(AVX512)] if isa() == "avx512" else FLAGS
    if isa() == "avx512" and VNNI in _cpu_flags():
        flags = [*flags, "-mavx512vnni"]
    text = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    digest = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    lib = folder / f"kernels-{digest}.so"
    if lib.exists():
        return lib, ""
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        built = Path(tmp) / lib.name
        run = subprocess.run([compiler, *flags, "-o", str(built), *map(str, SOURCES)], capture_output=True, text=True,
                             check=False)
        if run.returncode:
            return None, f"{Path(compiler).name} failed: {run.stderr.strip().splitlines()[-1:]}"
        os.replace(built, lib)  # whole or not at all, also with another process building beside this one
    return lib, ""


def _product(x, w):
    return (x[0], w[0])


def _normed(x, weight, eps):
    return x


def _halved(x):
    return (x[0], x[1] // 2)


def _attended(qkv, cos, sin, mask, write, k, v):
    return ((*qkv[:2], qkv[2] - 2 * k[1] * k[3]), k, v)  # the queries' width: the projection's less k and v


def _layered(x, cos, sin, mask, write, k, v, *weights):
    return x


def _counted(*operands):
    return (len(operands),)


def _embedded(kind: str):
    per_row = row_bytes(kind, BLOCK)

    def shape(ids, w):
        return (*ids, w[1] // per_row * BLOCK)

    return shape


# each entry point of the library: its outputs' shapes from its inputs' shapes, how many outputs, and their dtype
ENTRIES = {"Linear": (_product, 1), "LinearQ8": (_product, 1), "RmsNorm": (_normed, 1), "SwiGlu": (_halved, 1),
           "Attend": (_attended, 3), "Layer": (_layered, 1), "LayerQ8": (_layered, 1),
           "Layers": (_layered, 1), "LayersQ8": (_layered, 1),
           "EmbedQ8_0": (_embedded("q8_0"), 1), "EmbedQ4_0": (_embedded("q4_0"), 1),
           "Addresses": (_counted, 1, "int64")}


def _operator(entry: str):
    """MindSpore's operator for `entry` of the library built here, or None where it cannot be built."""
    lib, _ = _build()
    return None if lib is None else _custom(str(lib), entry)


@functools.cache
def _custom(lib: str, entry: str):
    import mindspore as ms
    from mindspore import ops

    shape, outputs, *kind = ENTRIES[entry]
    out = getattr(ms, kind[0]) if kind else ms.float32

    def dtype(*inputs):
        return out if outputs == 1 else (out,) * outputs

    return ops.Custom(f"{lib}:{entry}", out_shape=shape, out_dtype=dtype, func_type="aot")


def native_linear():
    """The operator: `op(x [m, k] float32, w)` → [m, n] float32, w float16|bfloat16 [n, k] or uint8 blocks
    [n, k/32 · bytes per block] (`glm2_core.quants`); or None."""
    return _operator("Linear")


def native_linear_q8():
    """The operator with the same signature over q8_0/q4_0 blocks only, x quantized to q8_0 blocks first as
    llama.cpp quantizes activations (linear.cc's `LinearQ8`); or None."""
    return _operator("LinearQ8")


def native_embedding(kind: str):
    """The lookup `op(ids int32 [...], blocks uint8 [vocab, row bytes])` → [..., hidden] float32 of an embedding held
    in `kind`'s blocks (q8_0 or q4_0; rows dequantized as `glm2_core.quants.dequantize` does; an id out of range
    is an error); or None."""
    return _operator(f"Embed{kind.capitalize()}")


def native_attention():
    """The operator `op(qkv, cos, sin, mask, write, k, v)` → (context, k', v'): attention of new tokens against
    the KV cache in one call, float32 (attention.cc says what each operand holds); or None."""
    return _operator("Attend")


def native_layer(q8: bool = False):
    """The operator `op(x, cos, sin, mask, write, k, v, eps, norm, W_qkv, b_qkv, W_dense, norm, W_up, W_down
    [, norm, norm])` → x': a whole decoder layer against the KV cache in one call, each step the operator of its
    own above, in a Block's order (layer.cc says what each operand holds), the new tokens' k and v written into
    the caches k and v in place (tensors of their own, not views: MindSpore hands an operator a copy of a view);
    `q8`: weights in blocks take their input quantized to q8_0 first, as `native_linear_q8`. Or None."""
    return _operator("LayerQ8" if q8 else "Layer")


def native_layers(q8: bool = False):
    """The operator `op(x, cos, sin, mask, write, eps, *own)` → x': every layer of a model in turn, each as
    `native_layer` computes it, `own` being each layer's operands after the shared ones, in turn (k, v, norm, W_qkv,
    b_qkv, W_dense, norm, W_up, W_down[, norm, norm]): a decoding step's layers in one dispatch. Or None."""
    return _operator("LayersQ8" if q8 else "Layers")


def native_addresses():
    """The operator `op(*tensors)` → int64 [len(tensors)]: the address of each tensor's memory as an operator is
    handed it. Where it differs from the tensor's `data_ptr()`, MindSpore handed a copy, and `native_layer`'s
    in-place cache writes would be lost. Or None."""
    return _operator("Addresses")


def native_rms_norm():
    """The operator `op(x [m, k] float32, weight [k] float32|float16|bfloat16, eps [1] float32)` → [m, k]
    float32: RMSNorm in one call (pointwise.cc); or None."""
    return _operator("RmsNorm")


def native_swiglu():
    """The operator `op(x [m, 2f] float32)` → silu(x[:, :f]) · x[:, f:], [m, f] float32, in one call; or None."""
    return _operator("SwiGlu")


def why_not() -> str:
    """Why `native_linear()` is None ("" when it is not)."""
    return _build()[1]
