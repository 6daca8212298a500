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

// Twelve independent chains, each started from its own value: chains that start alike are one chain to the
// compiler (an earlier version of this loop was compiled to a single FMA per step).
#ifdef __AVX512F__
typedef __m512 vec;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define LANES 16
#else
typedef __m256 vec;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define LANES 8
#endif

double fma_flops(long steps, int threads) {
    double total = 0.0;
    #pragma omp parallel num_threads(threads) reduction(+:total)
    {
        vec a[12];
        for (int i = 0; i < 12; i++) a[i] = SET1(1.0f + 0.01f * i);
        const vec b = SET1(0.999999f), c = SET1(1e-6f);
        for (long i = 0; i < steps; i++) {
            a[0] = FMA(a[0], b, c); a[1] = FMA(a[1], b, c); a[2] = FMA(a[2], b, c); a[3] = FMA(a[3], b, c);
            a[4] = FMA(a[4], b, c); a[5] = FMA(a[5], b, c); a[6] = FMA(a[6], b, c); a[7] = FMA(a[7], b, c);
            a[8] = FMA(a[8], b, c); a[9] = FMA(a[9], b, c); a[10] = FMA(a[10], b, c); a[11] = FMA(a[11], b, c);
        }
        float lanes[LANES];
        for (int i = 1; i < 12; i++) a[0] = FMA(a[i], b, a[0]);
        __builtin_memcpy(lanes, &a[0], sizeof lanes);
        for (int k = 0; k < LANES; k++) total += lanes[k];
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
    """GFLOP/s of float32 multiply-adds by `threads` threads, each with twelve independent chains (enough to hide
    the latency), 8 lanes wide and, where the CPU has AVX-512, 16: the faster width's median of `repeat` runs.
    The rate a prompt's matrix products can approach."""
    widths = {8: ("-mavx2", "-mfma")}
    if "avx512f" in Path("/proc/cpuinfo").read_text():
        widths[16] = ("-mavx512f",)
    best = 0.0
    for lanes, flags in widths.items():
        fn = _compiled(FMA_SOURCE, "fma_flops", flags)
        fn.restype = ctypes.c_double
        fn.argtypes = [ctypes.c_long, ctypes.c_int]
        steps, rates = 20_000_000, []
        for _ in range(repeat):
            started = time.perf_counter()
            fn(steps, threads)
            rates.append(steps * 12 * lanes * 2 * threads / (time.perf_counter() - started) / 1e9)
        best = max(best, float(np.median(rates)))
    return best


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
