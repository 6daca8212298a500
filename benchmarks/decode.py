"""Prefill and decode speed of the MindSpore runtime (jit + static KV cache) against the PyTorch reference.

    python benchmarks/decode.py [--configs small,medium] [--prompt 128] [--new 64] [--threads 2] [--repeat 5]
    python benchmarks/decode.py --load-6b bench-work/hf-6b-safetensors      # peak RSS of loading, one forward

The decode figures are also printed as fractions of the machine's limit, measured in the same run
(benchmarks/bandwidth.py): read bandwidth ÷ the bytes one decode step reads (the weights, the KV cache half-way).

Same weights (one synthetic checkpoint per config), same prompt, greedy, same thread count. Prints the machine,
tokens/s of both and the ratio beside the kernel anchors at the same shapes (measured in the same run), and the
decode time per token early and late in a long generation (flat = a static cache that does not recompile). The
6B mode runs in a fresh process under /usr/bin/time -v.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bandwidth import read_bandwidth
from measure import (
    CONFIGS,
    RATIO,
    alternating,
    kernel_anchors,
    print_anchors,
    print_machine,
    projection_shapes,
    set_threads,
)


def config(name: str):
    from glm2_core.config import GLM2Config

    return GLM2Config.preset("tiny", multi_query_group_num=2, **CONFIGS[name])


def models(name: str, folder: Path):
    """The MindSpore model and the PyTorch reference with the same synthetic weights, written to `folder`."""
    from converters.synth import synthesize
    from glm2_ms.api import from_pretrained
    from validation.torch_reference import load_reference

    synthesize(folder, config(name), "float32", "safetensors", seed=0)
    return from_pretrained(folder), load_reference(folder)


def llama_cpp_sides(folder: Path, ids: np.ndarray, new: int, threads: int) -> dict:
    """llama.cpp (llama-cpp-python) on the same weights: the folder written as a float32 GGUF file by to-gguf; its
    prefill of the prompt, and its greedy generation of `new` tokens (prefill included, as `generate` is timed)."""
    import llama_cpp

    from converters.gguf_out import to_gguf

    path = folder.with_suffix(".gguf")
    to_gguf(folder, path, progress=False)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ids.shape[1] + new + 16, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    prompt = [int(i) for i in ids[0]]

    def prefill():
        llm.reset()
        llm.eval(prompt)

    def generate():
        out = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            out.append(token)
            if len(out) == new:
                return out
        return out
    return {"prefill": prefill, "generate": generate}


def prefills(dec, pt_model, ids: np.ndarray, new: int) -> dict:
    """Each side's prefill of the prompt `ids` (logits of its last position), as its generate runs it."""
    import torch

    prompt = ids.shape[1]

    def ms_prefill():
        valid = np.ones((1, prompt + new + 64 - (prompt + new) % 64), np.int32)
        dec.forward(ids, np.arange(prompt, dtype=np.int32)[None], valid, 0, dec.new_cache(1, valid.shape[1]))

    def pt_prefill():
        with torch.no_grad():
            pt_model(torch.as_tensor(ids).long(), last_only=True)
    return {"ms": ms_prefill, "pt": pt_prefill}


def prompt_ids(prompt: int) -> np.ndarray:
    return np.random.default_rng(0).integers(100, 60000, (1, prompt)).astype(np.int32)


def bench_config(name: str, prompt: int, new: int, repeat: int, threads: int, llama: bool) -> dict:
    from glm2_core.names import canonical_shapes
    from glm2_ms.generation import Decoder

    params = sum(int(np.prod(s)) for s in canonical_shapes(config(name)).values())
    with tempfile.TemporaryDirectory() as tmp:
        ms_model, pt_model = models(name, Path(tmp) / "hf")
        ids = prompt_ids(prompt)
        llama_side = llama_cpp_sides(Path(tmp) / "hf", ids, new, threads) if llama else None
    dec = Decoder(ms_model)
    never = -1  # no eos: always generate `new` tokens
    gen = {"ms": lambda: dec.generate(ids, max_new_tokens=new, eos_token_id=never),
           "pt": lambda: pt_model.generate(ids, max_new_tokens=new, eos_token_id=never)}
    assert (gen["ms"]() == gen["pt"]()).all(), "the two runtimes generated different tokens"  # compiles both steps
    out = {"config": name, "params_M": params / 1e6}
    pre_sides = prefills(dec, pt_model, ids, new)
    if llama_side is not None:
        pre_sides["llama"], gen["llama"] = llama_side["prefill"], llama_side["generate"]
        same = np.asarray(gen["llama"]()) == np.asarray(gen["ms"]())[0, prompt:]
        out["llama_same_tokens"] = f"{int(same.sum())}/{same.size}"
    pre = alternating(pre_sides, repeat)
    total = alternating(gen, max(repeat // 2, 2))
    for side in gen:
        out[f"{side}_prefill"] = prompt / pre[side]
        out[f"{side}_decode"] = (new - 1) / max(total[side] - pre[side], 1e-9)
    # per-token decode time early vs late in a long generation (after one run that compiles its cache length)
    dec.generate(ids, max_new_tokens=8 * new, eos_token_id=never)
    stamps = []
    for _ in dec.stream(ids, max_new_tokens=8 * new, eos_token_id=never):
        stamps.append(time.perf_counter())
    steps = np.diff(stamps)
    out["early_ms"], out["late_ms"] = steps[:new // 2].mean() * 1e3, steps[-new // 2:].mean() * 1e3
    return out


def bytes_per_token(cfg, position: int, itemsize: int = 4) -> int:
    """What one decode step must read: every weight but the embedding (one row of it), and the KV cache up to
    `position`."""
    from glm2_core.names import EMBEDDING, canonical_shapes

    weights = sum(int(np.prod(s)) for n, s in canonical_shapes(cfg).items() if n != EMBEDDING) + cfg.hidden_size
    cache = 2 * cfg.num_layers * cfg.multi_query_group_num * cfg.kv_channels * position
    return (weights + cache) * itemsize


def with_anchors(name: str, prompt: int, new: int, repeat: int, threads: int, llama: bool) -> dict:
    """One config's speeds, then the kernel anchors at its shapes (its models freed by then): the prompt's GEMMs
    (the output layer on its last position only, as both sides run it), and the decode step's GEMVs."""
    out = bench_config(name, prompt, new, repeat, threads, llama)
    cfg = config(name)
    out["prefill_kernels"] = print_anchors(f"{name}, prefill ({prompt} tokens)",
                                           kernel_anchors(projection_shapes(cfg, prompt, 1)))
    out["decode_kernels"] = print_anchors(f"{name}, decode (1 token)", kernel_anchors(projection_shapes(cfg, 1, 1)))
    out["decode_bytes"] = bytes_per_token(cfg, prompt + new // 2)  # float32 weights, the cache half-way
    return out


def load_6b(path: str) -> None:
    """Child process: load with dtype=float16, then one short forward."""
    import mindspore as ms

    from glm2_ms.api import from_pretrained

    t = time.perf_counter()
    model = from_pretrained(path, dtype="float16")
    load_s = time.perf_counter() - t
    ids = ms.Tensor(np.array([[64790, 64792, 36474, 54591, 30910, 13, 13, 54761]], np.int32))
    t = time.perf_counter()
    logits = model(ids).asnumpy()
    print(f"LOAD {load_s:.1f} FORWARD {time.perf_counter() - t:.2f} FINITE {np.isfinite(logits).all()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="small,medium")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds of each side's prefill (decode: half)")
    ap.add_argument("--load-6b", help="a 6B-shaped HF folder (glm2-convert synth --preset 6b)")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="llama.cpp (llama-cpp-python) as a third side, on the same weights written by to-gguf")
    ap.add_argument("--child-load", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_load:
        return load_6b(args.child_load)
    if args.load_6b:
        proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, "--child-load", args.load_6b],
                              capture_output=True, text=True)
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
        size = sum(p.stat().st_size for p in Path(args.load_6b).glob("*.safetensors")) / 2**20
        line = re.search(r"LOAD .*", proc.stdout)
        print(f"6B fp16 load: {line.group(0) if line else proc.stderr[-800:]}; peak RSS {rss:.0f} MiB = "
              f"{rss / size:.2f}x the fp16 weights ({size:.0f} MiB)")
        return
    set_threads(args.threads)
    print_machine(args.threads)
    bw = read_bandwidth(args.threads)
    print(f"read bandwidth, {args.threads} threads: median {bw['median']:.1f} GB/s (runs {bw['min']:.1f}–"
          f"{bw['max']:.1f}); the decode limit of a config is that ÷ the bytes one step reads")
    rows = [with_anchors(name, args.prompt, args.new, args.repeat, args.threads, args.llama_cpp)
            for name in args.configs.split(",")]
    print(f"\nprompt {args.prompt} tokens, {args.new} new tokens, greedy, {args.threads} threads each side, "
          f"float32; the two sides alternating, median of {args.repeat}; {RATIO}; kernel ratio: the anchors above "
          "(all the products of one forward at this run's shapes)\n")
    print("| config | params | prefill tok/s MS | torch | ratio | GEMM kernel ratio | ratio / kernel ratio | decode "
          "tok/s MS | torch | ratio | GEMV kernel ratio | ratio / kernel ratio | decode ms/token early → late |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pre, dec = r["ms_prefill"] / r["pt_prefill"], r["ms_decode"] / r["pt_decode"]
        print(f"| {r['config']} | {r['params_M']:.0f}M | {r['ms_prefill']:.0f} | {r['pt_prefill']:.0f} | {pre:.2f}x | "
              f"{r['prefill_kernels']:.2f}x | {pre / r['prefill_kernels']:.2f} | {r['ms_decode']:.1f} | "
              f"{r['pt_decode']:.1f} | {dec:.2f}x | {r['decode_kernels']:.2f}x | {dec / r['decode_kernels']:.2f} | "
              f"{r['early_ms']:.1f} → {r['late_ms']:.1f} |", flush=True)
    print_limits(rows, bw["median"])


def print_limits(rows: list[dict], bandwidth: float) -> None:
    """Each config's decode against the machine's limit (bandwidth ÷ the bytes a step reads), and llama.cpp's
    speeds on the same weights where it ran."""
    sides = [s for s in ("ms", "pt", "llama") if f"{s}_decode" in rows[0]]
    print("\n| config | bytes a decode step reads | limit tok/s | " + " | ".join(
        f"{SIDES[s]} decode tok/s, / limit" for s in sides) + " |")
    print("|---|---|---|" + "---|" * len(sides))
    for r in rows:
        limit = bandwidth * 1e9 / r["decode_bytes"]
        print(f"| {r['config']} | {r['decode_bytes'] / 1e6:.1f} MB | {limit:.1f} | " + " | ".join(
            f"{r[f'{s}_decode']:.1f}, {r[f'{s}_decode'] / limit:.2f}" for s in sides) + " |")
    if "llama_decode" in rows[0]:
        print("\n| config | prefill tok/s MS | llama.cpp | MS / llama.cpp | decode MS / llama.cpp | "
              "same greedy tokens |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['config']} | {r['ms_prefill']:.0f} | {r['llama_prefill']:.0f} | "
                  f"{r['ms_prefill'] / r['llama_prefill']:.2f}x | {r['ms_decode'] / r['llama_decode']:.2f}x | "
                  f"{r['llama_same_tokens']} |")


SIDES = {"ms": "MindSpore", "pt": "torch", "llama": "llama.cpp (f32 GGUF)"}


if __name__ == "__main__":
    main()
