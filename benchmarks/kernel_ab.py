"""The native kernel of this checkout against the kernel of an earlier revision, in one process, at the 6B shapes.

    python benchmarks/kernel_ab.py --base REV [--kind q4_0|q8_0|f16] [--rows 1] [--repeat 7] [--threads 2]
                                   [--entry LinearQ8|Linear] [--busy 0]

The kernel sources of git revision REV are built into a temporary folder beside this checkout's build; both
operators then run on the same random weights of each 6B matrix (qkv, dense, h_to_4h, 4h_to_h, the output layer),
`--rows` rows of x (1: a decoding step; 200: a prompt), the two sides alternating, and their outputs are compared
before anything is timed. Each call takes the next of several copies of a matrix smaller than the cache, so that
it reads the weights from memory, as a decoding step does (measure.uncached). Printed per matrix: the median ms of
each side and the weights' GB/s (one row) or the arithmetic's GFLOP/s (more rows); then a decoding step's (or a
prompt's) sum over 28 layers and the output layer, and the ratio. The machine's read bandwidth is measured in the
same run as the anchor. `--busy N` keeps N other processes spinning while both sides are timed: how each copes with
a core it shares.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from bandwidth import read_bandwidth
from measure import busy_cores, largest_cache, print_machine, set_ms_threads, uncached

ROOT = Path(__file__).resolve().parents[1]


def checkout_kernels(rev: str, folder: Path) -> list[Path]:
    """The kernel sources and headers of `rev`, written into `folder` under their own names."""
    from glm2_ms import kernels

    out = []
    for path in kernels.SOURCES + kernels.HEADERS:
        rel = path.relative_to(ROOT).as_posix()
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, check=True).stdout
        (folder / path.name).write_bytes(text)
        out.append(folder / path.name)
    return out


def build_base(rev: str, folder: Path) -> Path:
    from glm2_ms import kernels

    files = checkout_kernels(rev, folder)
    sources, headers = list(kernels.SOURCES), list(kernels.HEADERS)
    try:  # the build reads the module's lists: pointed at the revision's files for this one build
        kernels.SOURCES[:] = [f for f in files if f.suffix == ".cc"]
        kernels.HEADERS[:] = [f for f in files if f.suffix != ".cc"]
        lib, why = kernels._build_with(None, "g++", folder / "lib")
    finally:
        kernels.SOURCES[:], kernels.HEADERS[:] = sources, headers
    if lib is None:
        raise SystemExit(f"the kernels of {rev} did not build: {why}")
    return lib


def weights(kind: str, n: int, k: int, rng):
    import mindspore as ms

    from glm2_core.quants import quantize

    w = rng.standard_normal((n, k), np.float32)
    return ms.Tensor(w.astype(np.float16) if kind == "f16" else quantize(w, "float32", kind))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--kind", choices=("q4_0", "q8_0", "f16"), default="q4_0")
    ap.add_argument("--entry", choices=("LinearQ8", "Linear"), default="LinearQ8")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=0)
    args = ap.parse_args()
    set_ms_threads(args.threads)
    import mindspore as ms

    from glm2_core.config import GLM2Config
    from glm2_ms import kernels

    ms.set_device("CPU")
    ms.runtime.launch_blocking()
    print_machine(args.threads)
    print(f"read bandwidth, {args.threads} threads: median {read_bandwidth(args.threads)['median']:.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(args.base, Path(tmp))
        head, why = kernels._build()
        if head is None:
            raise SystemExit(f"this checkout's kernels did not build: {why}")
        ops = {args.base: kernels._custom(str(base), args.entry), "checkout": kernels._custom(str(head), args.entry)}
        with busy_cores(args.busy):
            compare(ops, args, GLM2Config.preset("6b"))


def warm_up(ops, w, x, calls: int = 12) -> None:
    """A process's first calls of an operator run slow (about 8 ms each here, whatever the shapes): made before any
    timing, on a small matrix."""
    for op in ops:
        for _ in range(calls):
            op(x, w).asnumpy()


def compare(ops: dict, args, cfg) -> None:
    import mindspore as ms

    h, rng, cache = cfg.hidden_size, np.random.default_rng(0), largest_cache()
    shapes = {"qkv": (cfg.q_rows + 2 * cfg.kv_rows, h), "dense": (h, cfg.q_rows),
              "h_to_4h": (2 * cfg.ffn_hidden_size, h), "4h_to_h": (h, cfg.ffn_hidden_size),
              "output": (cfg.padded_vocab_size, h)}
    sums = dict.fromkeys(ops, 0.0)
    warm_up(ops.values(), weights(args.kind, 64, h, rng), ms.Tensor(np.ones((args.rows, h), np.float32)))
    print(f"\n{args.entry} over {args.kind}, {args.rows} row(s) of x, median of {args.repeat} per side, alternating; "
          f"{args.busy} other process(es) spinning\n")
    rate = "GB/s" if args.rows == 1 else "GFLOP/s"  # of the weights read; of the arithmetic
    print("| matrix | " + " | ".join(f"{side}: ms ({rate})" for side in ops) + " |")
    print("|---|" + "---|" * len(ops))
    for name, (n, k) in shapes.items():
        w, x = weights(args.kind, n, k, rng), ms.Tensor(rng.standard_normal((args.rows, k), np.float32))
        outs = [op(x, w).asnumpy() for op in ops.values()]
        if not np.allclose(*outs, rtol=1e-4, atol=1e-3):
            raise SystemExit(f"{name}: the two kernels disagree")
        # every timed call, either side's, on a copy out of the cache
        copies = itertools.cycle(uncached(w, cache, next(iter(ops.values())), x))
        times = {side: [] for side in ops}
        for i in range(args.repeat):
            for side in (list(ops) if i % 2 == 0 else list(reversed(ops))):
                c = next(copies)
                clock = time.perf_counter()
                ops[side](x, c).asnumpy()
                times[side].append(time.perf_counter() - clock)
        med = {side: statistics.median(t) for side, t in times.items()}
        for side in ops:
            sums[side] += med[side] * (1 if name == "output" else cfg.num_layers)
        work = w.nbytes if args.rows == 1 else 2 * n * k * args.rows
        print(f"| {name} | " + " | ".join(f"{med[s] * 1e3:.2f} ({work / med[s] / 1e9:.1f})" for s in ops) + " |")
    base, head = sums.values()
    each = ", ".join(f"{side} {t * 1e3:.0f} ms" for side, t in sums.items())
    print(f"\n{cfg.num_layers} layers and the output layer: {each}; checkout / base {head / base:.2f}")


if __name__ == "__main__":
    main()
