"""The runtime against llama.cpp on the same GGUF files at the ChatGLM2-6B shapes: f16, q8_0 and q4_0, batch 1.

    python benchmarks/side_by_side_6b.py [--workdir bench-work] [--layers 28] [--kinds f16,q8_0,q4_0]
                                         [--prompt 200] [--new 32] [--repeat 2] [--threads 2]
                                         [--activations float32|q8_0]

One synthetic 6B-shaped checkpoint (`--layers` for quick runs) written by to-gguf in each kind; each side then runs
in a process of its own on the same file, the sides alternating, the page cache dropped before each (a cold start):
load, the prompt (random ids, the same for both), `--new` greedy tokens. Printed per kind: cold start to the first
token (load + prefill), prefill and decode tokens/s, decode as a fraction of the machine's limit (read bandwidth,
measured just before each run, median over the kind's runs, ÷ the bytes a step reads: the weights as stored and
the KV cache), peak RSS against the file, and how many greedy tokens the two sides share. Our side is
`from_pretrained(file)`: its weights held as the file stores them (16-bit through the native kernel, blocks through
its q8_0/q4_0 paths), float32 arithmetic; `--activations q8_0` quantizes the activations of the q8_0/q4_0 files'
products as llama.cpp does (the f16 file keeps float32).
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bandwidth import fma_peak, read_bandwidth
from kernel_ab import warm_up
from measure import drop_caches, largest_cache, print_machine, uncached

from glm2_core.dtypes import ACTIVATIONS

KINDS = {"f16": "float16", "q8_0": "q8_0", "q4_0": "q4_0"}  # this script's name → to-gguf's --dtype


def prompt_ids(n: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(0).integers(100, 60000, n)]


def activations_for(kind: str, activations: str) -> str:
    return "float32" if kind == "f16" else activations


def run_ours(path: Path, prompt: list[int], new: int, threads: int, activations: str) -> dict:
    from measure import set_ms_threads

    set_ms_threads(threads)
    from glm2_ms.api import from_pretrained
    from glm2_ms.generation import Decoder

    clock = time.perf_counter()
    model = from_pretrained(path, compute_dtype="float32", activations=activations)
    load = time.perf_counter() - clock
    dec = Decoder(model)
    tokens = [int(t[0]) for t in dec.stream(np.array([prompt], np.int32), max_new_tokens=new, eos_token_id=-1)]
    t = dec.timings
    steps = t["decode_s"][1:]  # the first step compiles
    return {"load": load, "prefill": t["prefill_s"], "decode": len(steps) / sum(steps), "tokens": tokens,
            "weights": t["weights"]}


def run_llama(path: Path, prompt: list[int], new: int, threads: int, activations: str) -> dict:
    """llama.cpp's own greedy generation: its prefill is the time to its first token."""
    import llama_cpp

    clock = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new + 16, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load = time.perf_counter() - clock
    tokens, stamps = [], [time.perf_counter()]
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        tokens.append(int(token))
        stamps.append(time.perf_counter())
        if len(tokens) == new:
            break
    steps = np.diff(stamps)[2:]  # after the prefill and the first step
    return {"load": load, "prefill": stamps[1] - stamps[0], "decode": len(steps) / steps.sum(), "tokens": tokens}


def run_kernels(kinds: list[str], prompt: int, threads: int, activations: str) -> dict:
    """The native kernel alone on each matrix of a 6B layer and the output layer, random weights in each kind (the
    operator `activations` chooses for blocks): seconds of one decoding row (median of 5) and of the prompt's rows
    (median of 2), each call on a copy of the matrix out of the cache (measure.uncached)."""
    import mindspore as ms
    from measure import set_ms_threads

    from glm2_core.config import GLM2Config
    from glm2_core.quants import block_kind, quantize
    from glm2_ms.kernels import native_linear, native_linear_q8

    set_ms_threads(threads)
    ms.runtime.launch_blocking()
    cfg, rng, cache = GLM2Config.preset("6b"), np.random.default_rng(0), largest_cache()
    h = cfg.hidden_size
    shapes = {"qkv": (cfg.q_rows + 2 * cfg.kv_rows, h), "dense": (h, cfg.q_rows),
              "h_to_4h": (2 * cfg.ffn_hidden_size, h), "4h_to_h": (h, cfg.ffn_hidden_size),
              "output": (cfg.padded_vocab_size, h)}
    out = {}
    for kind in kinds:
        for name, (n, k) in shapes.items():
            w = rng.standard_normal((n, k), np.float32)
            # (a q4_0 file's output layer is q8_0, as llama.cpp's rules make it: timed as the file holds it)
            held = kind if kind == "f16" else block_kind(kind, (n, k), name == "output")
            w = ms.Tensor(w.astype(np.float16) if held == "f16" else quantize(w, "float32", held))
            op = native_linear_q8() if activations_for(kind, activations) == "q8_0" else native_linear()
            ones = ms.Tensor(np.ones((1, k), np.float32))
            warm_up([op], w, ones)
            # every timed call on a copy out of the cache
            copies, times = itertools.cycle(uncached(w, cache, op, ones)), {}
            for m, runs in ((1, 5), (prompt, 2)):
                x = ms.Tensor(rng.standard_normal((m, k), np.float32))
                op(x, next(copies)).asnumpy()
                times[m] = statistics.median(_seconds(op, x, next(copies)) for _ in range(runs))
            out[f"{kind} {name}"] = {"bytes": w.nbytes, "flops": 2 * n * k, "decode": times[1],
                                     "prefill": times[prompt]}
    return out


def _seconds(op, x, w) -> float:
    clock = time.perf_counter()
    op(x, w).asnumpy()
    return time.perf_counter() - clock


SIDES = {"ours": run_ours, "llama": run_llama}


def child(side: str, path: Path, args) -> None:
    if side == "kernels":
        return print("RESULT " + json.dumps(run_kernels(str(path).split(","), args.prompt, args.threads,
                                                        args.activations)))
    out = SIDES[side](path, prompt_ids(args.prompt), args.new, args.threads, args.activations)
    out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))


def side_run(side: str, path: Path, args, activations: str) -> dict:
    drop_caches()
    proc = subprocess.run([sys.executable, __file__, "--child", side, "--file", str(path), "--prompt", str(args.prompt),
                           "--new", str(args.new), "--threads", str(args.threads), "--activations", activations],
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{side} on {path.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def bytes_per_step(cfg, path: Path, position: int) -> int:
    """What a decode step reads: every tensor of the file but the embedding (one row of it), and the KV cache up to
    `position` in float32 (ours; llama.cpp's is float16, half of that)."""
    import gguf

    from converters.formats.gguf_io import scan

    _, table = scan(path, RuntimeError)
    weights = 0
    for t in table:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.type)]
        weights += 0 if t.name == "token_embd.weight" else int(np.prod(t.shape)) // block * size
    return weights + 2 * cfg.num_layers * cfg.multi_query_group_num * cfg.kv_channels * position * 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--activations", choices=ACTIVATIONS, default="float32")
    ap.add_argument("--child", choices=(*SIDES, "kernels"))
    ap.add_argument("--file", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.file, args)
    from converters.gguf_out import to_gguf
    from converters.synth import synthesize
    from glm2_core.config import GLM2Config

    print_machine(args.threads)
    print(f"read bandwidth: measured beside each run, {args.threads} threads; page cache dropped before each run: "
          f"{drop_caches()}", flush=True)
    cfg = GLM2Config.preset("6b", num_layers=args.layers)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"hf-6b-{args.layers}l"
    if not src.exists():
        synthesize(src, cfg, "float16", "safetensors", seed=0)
    rows = []
    for kind in args.kinds.split(","):
        path = work / f"6b-{args.layers}l-{kind}.gguf"
        if not path.exists():
            to_gguf(src, path, dtype=KINDS[kind], progress=False)
        runs, rates = {side: [] for side in SIDES}, []
        for i in range(args.repeat):
            for side in (SIDES if i % 2 == 0 else reversed(SIDES)):
                rates.append(read_bandwidth(args.threads, repeat=5)["median"])  # the anchor just before the run
                runs[side].append(side_run(side, path, args, activations_for(kind, args.activations)))
        rows.append(summary(kind, path, runs, bytes_per_step(cfg, path, args.prompt + args.new // 2), rates, args))
        print(json.dumps(rows[-1]), flush=True)
    print_tables(rows, args)
    kernels = side_run("kernels", Path(args.kinds), args, args.activations)  # per kind in run_kernels
    bw = statistics.median(r for row in rows for r in row["bandwidth"])
    print_profile(rows, kernels, cfg, bw, fma_peak(args.threads), args)


def print_profile(rows: list[dict], kernels: dict, cfg, bw: float, peak: float, args) -> None:
    """Where our time goes: the native kernel alone on the model's matrices (decode: one row; prefill: the prompt's
    rows), against the same step end to end; the rest is everything around the matmuls (attention, norms, RoPE,
    the cache, MindSpore's op dispatch)."""
    print(f"\nthe native kernel alone at the 6B shapes ({cfg.num_layers} layers in the sums below; float32 FMA rate "
          f"{peak:.0f} GFLOP/s and read bandwidth {bw:.1f} GB/s, both measured in this run)\n")
    print("| weights | matrix | decode row: ms | GB/s (/ bandwidth) | prompt rows: ms | GFLOP/s (/ FMA rate) |")
    print("|---|---|---|---|---|---|")
    for key, k in kernels.items():
        kind, name = key.split()
        gbs, gflops = k["bytes"] / k["decode"] / 1e9, k["flops"] * args.prompt / k["prefill"] / 1e9
        print(f"| {kind} | {name} | {k['decode'] * 1e3:.2f} | {gbs:.1f} ({gbs / bw:.2f}) | {k['prefill'] * 1e3:.0f} | "
              f"{gflops:.0f} ({gflops / peak:.2f}) |")
    print("\n| weights | decode step: kernels alone ms | end to end ms | share in the kernels | "
          "prompt: kernels alone s | end to end s | share in the kernels |")
    print("|---|---|---|---|---|---|---|")
    layers = cfg.num_layers
    for r in rows:
        mats = {key.split()[1]: v for key, v in kernels.items() if key.split()[0] == r["kind"]}
        per_layer = [v for name, v in mats.items() if name != "output"]
        dec = layers * sum(v["decode"] for v in per_layer) + mats["output"]["decode"]
        pre = layers * sum(v["prefill"] for v in per_layer) + mats["output"]["decode"]  # the last position only
        step, prompt = 1 / r["ours_decode"], r["ours_prefill"]
        print(f"| {r['kind']} | {dec * 1e3:.0f} | {step * 1e3:.0f} | {dec / step:.2f} | {pre:.1f} | {prompt:.1f} | "
              f"{pre / prompt:.2f} |")


def summary(kind: str, path: Path, runs: dict, step_bytes: int, rates: list[float], args) -> dict:
    """Medians over the runs of each side, and their ratios; the limit from the median of the read bandwidths
    measured beside the runs (`rates`, GB/s: on a shared machine one measurement can be a third off)."""
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("load", "prefill", "decode", "rss")}
           for side, rs in runs.items()}
    same = sum(a == b for a, b in zip(runs["ours"][0]["tokens"], runs["llama"][0]["tokens"], strict=True))
    limit = statistics.median(rates) * 1e9 / step_bytes
    return {"kind": kind, "file_gb": path.stat().st_size / 1e9, "step_gb": step_bytes / 1e9, "limit": limit,
            "bandwidth": rates,
            **{f"{s}_{k}": v for s, m in med.items() for k, v in m.items()},
            "same_tokens": f"{same}/{args.new}", "weights": runs["ours"][0]["weights"]}


def print_tables(rows: list[dict], args) -> None:
    print(f"\nChatGLM2-6B shapes, {args.layers} layers; prompt {args.prompt} tokens, {args.new} new, greedy, "
          f"{args.threads} threads each side; median of {args.repeat} cold runs per side, alternating\n")
    print("| weights | file | read GB/s: median (range) beside the runs | decode limit tok/s | "
          "ours decode tok/s (/ limit) | llama.cpp (/ limit) | ours / llama.cpp | prefill tok/s ours | llama.cpp | "
          "ours / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pre_o, pre_l = args.prompt / r["ours_prefill"], args.prompt / r["llama_prefill"]
        rates = r["bandwidth"]
        print(f"| {r['kind']} | {r['file_gb']:.2f} GB | {statistics.median(rates):.1f} ({min(rates):.1f}–"
              f"{max(rates):.1f}) | {r['limit']:.2f} | {r['ours_decode']:.2f} "
              f"({r['ours_decode'] / r['limit']:.2f}) | {r['llama_decode']:.2f} ({r['llama_decode'] / r['limit']:.2f}) "
              f"| {r['ours_decode'] / r['llama_decode']:.2f}x | {pre_o:.1f} | {pre_l:.1f} | {pre_o / pre_l:.2f}x |")
    print("\n| weights | cold start to first token: ours (load + prefill) | llama.cpp | ours / llama.cpp | "
          "peak RSS ours (/ file) | llama.cpp (/ file) | same greedy tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        first_o, first_l = r["ours_load"] + r["ours_prefill"], r["llama_load"] + r["llama_prefill"]
        gb = r["file_gb"] * 1e9
        print(f"| {r['kind']} | {first_o:.1f} s ({r['ours_load']:.1f} + {r['ours_prefill']:.1f}) | {first_l:.1f} s "
              f"({r['llama_load']:.1f} + {r['llama_prefill']:.1f}) | {first_o / first_l:.2f}x | "
              f"{r['ours_rss'] / 1e9:.2f} GB ({r['ours_rss'] / gb:.2f}) | {r['llama_rss'] / 1e9:.2f} GB "
              f"({r['llama_rss'] / gb:.2f}) | {r['same_tokens']} |")


if __name__ == "__main__":
    main()
