"""Native CPU kernels, built on first use by the machine's C++ compiler into the user's cache folder.

`native_linear()` is MindSpore's "aot" custom operator y = x · Wᵀ for float32 x and a W in float16, bfloat16 or
GGUF's q8_0 or q4_0 blocks, in float32 arithmetic, without a float32 copy of W (linear.cc says why). It is None
where it cannot be built here (no compiler, a CPU without AVX2, FMA and F16C, a failed build, or
GLM2_NATIVE_KERNELS=0): the runtime then casts 16-bit weights where used, cannot hold quantized ones, and
`why_not()` says why.
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

SOURCE = Path(__file__).with_name("linear.cc")
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
    """The shared library (built once per source and flags), or None and the reason."""
    if os.environ.get(SWITCH) == "0":
        return None, f"{SWITCH}=0"
    missing = CPU_FLAGS - _cpu_flags()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None, "no C++ compiler (g++) on PATH"
    flags = FLAGS + [f"-m{f}" for f in sorted(AVX512)] if isa() == "avx512" else FLAGS
    if isa() == "avx512" and VNNI in _cpu_flags():
        flags = [*flags, "-mavx512vnni"]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    lib = cache_dir() / f"linear-{digest}.so"
    if lib.exists():
        return lib, ""
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        built = Path(tmp) / lib.name
        run = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE)], capture_output=True, text=True,
                             check=False)
        if run.returncode:
            return None, f"{Path(compiler).name} failed: {run.stderr.strip().splitlines()[-1:]}"
        os.replace(built, lib)  # whole or not at all, also with another process building beside this one
    return lib, ""


@functools.cache
def _native_linear(entry: str = "Linear"):
    lib, why = _build()
    if lib is None:
        return None, why
    from mindspore import ops

    def shape(x, w):
        return (x[0], w[0])

    return ops.Custom(f"{lib}:{entry}", out_shape=shape, out_dtype=_float32, func_type="aot"), ""


def native_embedding(kind: str):
    """The lookup `op(ids int32 [...], blocks uint8 [vocab, row bytes])` → [..., hidden] float32 of an embedding held
    in `kind`'s blocks (q8_0 or q4_0; rows dequantized as `glm2_core.quants.dequantize` does; an id out of range
    is an error); or None where the kernel cannot be built."""
    lib, _ = _build()
    return None if lib is None else _embedding_op(str(lib), kind)


@functools.cache
def _embedding_op(lib: str, kind: str):
    from mindspore import ops

    per_row = row_bytes(kind, BLOCK)

    def shape(ids, w):
        return (*ids, w[1] // per_row * BLOCK)

    return ops.Custom(f"{lib}:Embed{kind.capitalize()}", out_shape=shape, out_dtype=_float32, func_type="aot")


def _float32(*inputs):
    """Both operators' output dtype, whatever their inputs'."""
    import mindspore as ms

    return ms.float32


def native_linear():
    """The operator: `op(x [m, k] float32, w)` → [m, n] float32, w float16|bfloat16 [n, k] or uint8 blocks
    [n, k/32 · bytes per block] (`glm2_core.quants`); or None."""
    return _native_linear()[0]


def native_linear_q8():
    """The operator with the same signature over q8_0/q4_0 blocks only, x quantized to q8_0 blocks first as
    llama.cpp quantizes activations (linear.cc's `LinearQ8`); or None."""
    return _native_linear("LinearQ8")[0]


def why_not() -> str:
    """Why `native_linear()` is None ("" when it is not)."""
    return _native_linear()[1]
