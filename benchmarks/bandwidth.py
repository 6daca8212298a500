"""The machine's memory read bandwidth: the physical limit of batch-1 decoding, which reads every weight once a token.

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


def _kernel():
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("no C compiler: the bandwidth anchor needs gcc")
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "bandwidth.c", Path(tmp) / "bandwidth.so"
        src.write_text(SOURCE)
        subprocess.run([compiler, "-O3", "-mavx2", "-fopenmp", "-shared", "-fPIC", "-o", str(lib), str(src)],
                       check=True)
        fn = ctypes.CDLL(str(lib)).read_sum  # loaded before the folder goes: the mapping outlives the file
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


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
              f"GB/s (runs {r['min']:.1f}–{r['max']:.1f}, {r['runs']} runs)")


if __name__ == "__main__":
    main()
