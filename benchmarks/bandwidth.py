"""The machine's memory read bandwidth: the physical limit of batch-1 decoding, which reads every weight once a token;
and its float32 multiply-add rate, the limit of a prompt's matrix products (`fma_peak`).

    python benchmarks/bandwidth.py [--threads 2] [--gib 1] [--repeat 9]

A streaming read of a buffer far larger than the caches, by as many OpenMP threads as the runtime uses, each with
AVX2 loads into eight independent accumulators (so that the loads, not the adds, set the pace), built on the spot
by the machine's C compiler. Single runs vary from one to the next on these shared machines: the median of
`--repeat` is what `read_bandwidth` returns and decode.py divides by.
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import print_machine

SOURCE = r"""
#include <immintrin.h>
#include <stddef.h>

double read_sum(const float *x, size_t n, int threads) {
    double total = 0.0;
    #pragma omp parallel num_threads(threads) reduction(+:total)
    {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        #pragma omp for schedule(static)
        for (size_t i = 0; i < n / 64; i++) {
            const float *p = x + i * 64;
            a0 = _mm256_add_ps(a0, _mm256_load_ps(p));
            a1 = _mm256_add_ps(a1, _mm256_load_ps(p + 8));
            a2 = _mm256_add_ps(a2, _mm256_load_ps(p + 16));
            a3 = _mm256_add_ps(a3, _mm256_load_ps(p + 24));
            a4 = _mm256_add_ps(a4, _mm256_load_ps(p + 32));
            a5 = _mm256_add_ps(a5, _mm256_load_ps(p + 40));
            a6 = _mm256_add_ps(a6, _mm256_load_ps(p + 48));
            a7 = _mm256_add_ps(a7, _mm256_load_ps(p + 56));
        }
        __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                 _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
        float lanes[8];
        _mm256_storeu_ps(lanes, s);
        for (int k = 0; k < 8; k++) total += lanes[k];
    }
    return total;
}
"""


FMA_SOURCE = r"""
#include <immintrin.h>

double fma_flops(long steps, int threads) {
    double total = 0.0;
    #pragma omp parallel num_threads(threads) reduction(+:total)
    {
        __m256 a0 = _mm256_set1_ps(1.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        __m256 a8 = a0, a9 = a0, a10 = a0, a11 = a0;
        const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-6f);
        for (long i = 0; i < steps; i++) {
            a0 = _mm256_fmadd_ps(a0, b, c); a1 = _mm256_fmadd_ps(a1, b, c); a2 = _mm256_fmadd_ps(a2, b, c);
            a3 = _mm256_fmadd_ps(a3, b, c); a4 = _mm256_fmadd_ps(a4, b, c); a5 = _mm256_fmadd_ps(a5, b, c);
            a6 = _mm256_fmadd_ps(a6, b, c); a7 = _mm256_fmadd_ps(a7, b, c); a8 = _mm256_fmadd_ps(a8, b, c);
            a9 = _mm256_fmadd_ps(a9, b, c); a10 = _mm256_fmadd_ps(a10, b, c); a11 = _mm256_fmadd_ps(a11, b, c);
        }
        __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                 _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
        s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
        float lanes[8];
        _mm256_storeu_ps(lanes, s);
        for (int k = 0; k < 8; k++) total += lanes[k];
    }
    return total;
}
"""


def _compiled(source: str, name: str, flags: tuple[str, ...] = ("-mavx2",)):
    """The function `name` of C `source`, built by the machine's compiler into a temporary folder."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("no C compiler: the machine's limits are measured by code built here (gcc)")
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        subprocess.run([compiler, "-O3", *flags, "-fopenmp", "-shared", "-fPIC", "-o", str(lib), str(src)],
                       check=True)
        return getattr(ctypes.CDLL(str(lib)), name)  # loaded before the folder goes: the mapping outlives the file


def _kernel():
    fn = _compiled(SOURCE, "read_sum")
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def fma_peak(threads: int = 2, repeat: int = 5) -> float:
    """GFLOP/s of float32 multiply-adds by `threads` threads, each with twelve independent 8-wide chains (enough to
    hide the latency): the median of `repeat` runs. The rate a prompt's matrix products can approach."""
    fn = _compiled(FMA_SOURCE, "fma_flops", ("-mavx2", "-mfma"))
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_long, ctypes.c_int]
    steps, rates = 50_000_000, []
    for _ in range(repeat):
        started = time.perf_counter()
        fn(steps, threads)
        rates.append(steps * 12 * 8 * 2 * threads / (time.perf_counter() - started) / 1e9)
    return float(np.median(rates))


def read_bandwidth(threads: int = 2, gib: float = 1.0, repeat: int = 9) -> dict:
    """GB/s of a streaming read by `threads` threads: the median, lowest and highest of `repeat` runs."""
    fn = _kernel()
    n = int(gib * (1 << 30)) // 4 // 64 * 64
    raw = np.ones(n + 16, np.float32)  # written once: every page is mapped before the timing
    offset = (-raw.ctypes.data % 32) // 4  # 32-byte aligned for the aligned loads
    x = raw[offset:offset + n]
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        total = fn(x.ctypes.data, n, threads)
        rates.append(x.nbytes / (time.perf_counter() - started) / 1e9)
        if n // 64 // threads < 1 << 24:  # each float32 lane counts its ones exactly: every value was read
            assert total == n, total
    return {"median": float(np.median(rates)), "min": min(rates), "max": max(rates), "threads": threads,
            "bytes": x.nbytes, "runs": repeat}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    print_machine(args.threads)
    for threads in sorted({1, args.threads}):
        r = read_bandwidth(threads, args.gib, args.repeat)
        print(f"read bandwidth, {threads} thread(s), {r['bytes'] / 2**30:.1f} GiB buffer: median {r['median']:.1f} "
              f"GB/s (runs {r['min']:.1f}–{r['max']:.1f}, {r['runs']} runs); float32 FMA rate "
              f"{fma_peak(threads):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
