"""Native CPU kernels, built on first use by the machine's C++ compiler into the user's cache folder.

`linear16()` is MindSpore's "aot" custom operator y = x · Wᵀ for float32 x and float16 or bfloat16 W, in float32
arithmetic, without a float32 copy of W (linear16.cc says why). It is None where it cannot be built here (no
compiler, a CPU without AVX2, FMA and F16C, a failed build, or GLM2_NATIVE_KERNELS=0): the runtime then casts each
weight as before, and `why_not()` says why.
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

SOURCE = Path(__file__).with_name("linear16.cc")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
CPU_FLAGS = {"avx2", "fma", "f16c"}
SWITCH = "GLM2_NATIVE_KERNELS"  # "0": never use them


def cache_dir() -> Path:
    return package_cache() / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


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
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    lib = cache_dir() / f"linear16-{digest}.so"
    if lib.exists():
        return lib, ""
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        built = Path(tmp) / lib.name
        run = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True,
                             check=False)
        if run.returncode:
            return None, f"{Path(compiler).name} failed: {run.stderr.strip().splitlines()[-1:]}"
        os.replace(built, lib)  # whole or not at all, also with another process building beside this one
    return lib, ""


@functools.cache
def _linear16():
    lib, why = _build()
    if lib is None:
        return None, why
    import mindspore as ms
    from mindspore import ops

    def shape(x, w):
        return (x[0], w[0])

    def dtype(x, w):
        return ms.float32

    return ops.Custom(f"{lib}:Linear16", out_shape=shape, out_dtype=dtype, func_type="aot"), ""


def linear16():
    """The operator: `op(x [m, k] float32, w [n, k] float16|bfloat16)` → [m, n] float32; or None."""
    return _linear16()[0]


def why_not() -> str:
    """Why `linear16()` is None ("" when it is not)."""
    return _linear16()[1]
