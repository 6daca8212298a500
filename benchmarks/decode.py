"""Prefill and decode speed of the MindSpore runtime (jit + static KV cache) against the PyTorch reference.

    python benchmarks/decode.py [--configs small,medium] [--prompt 128] [--new 64] [--threads 2]
    python benchmarks/decode.py --load-6b bench-work/hf-6b-safetensors      # peak RSS of loading, one forward

Same weights (one synthetic checkpoint per config), same prompt, greedy, same thread count. Prints tokens/s of
both and the ratio, and the decode time per token early and late in a long generation (flat = a static cache
that does not recompile). The 6B mode runs in a fresh process under /usr/bin/time -v.
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

CONFIGS = {
    "small": dict(num_layers=4, hidden_size=512, ffn_hidden_size=1376, num_attention_heads=8, kv_channels=64),
    # about 0.5B parameters (0.27B of them in the embedding and output layer)
    "medium": dict(num_layers=6, hidden_size=2048, ffn_hidden_size=5504, num_attention_heads=16, kv_channels=128),
}


def best(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_config(name: str, prompt: int, new: int, threads: int) -> dict:
    import torch

    from converters.synth import synthesize
    from glm2_core.config import GLM2Config
    from glm2_core.names import canonical_shapes
    from glm2_ms.generation import Decoder
    from glm2_ms.loading import from_pretrained
    from validation.torch_reference import load_reference

    torch.set_num_threads(threads)
    cfg = GLM2Config.preset("tiny", multi_query_group_num=2, **CONFIGS[name])
    params = sum(int(np.prod(s)) for s in canonical_shapes(cfg).values())
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "hf", cfg, "float32", "safetensors", seed=0)
        ms_model = from_pretrained(Path(tmp) / "hf")
        pt_model = load_reference(Path(tmp) / "hf")
    dec = Decoder(ms_model)
    ids = np.random.default_rng(0).integers(100, 60000, (1, prompt)).astype(np.int32)
    never = -1  # no eos: always generate `new` tokens

    def ms_prefill():
        valid = np.ones((1, prompt + new + 64 - (prompt + new) % 64), np.int32)
        dec.forward(ids, np.arange(prompt, dtype=np.int32)[None], valid, 0, dec.new_cache(1, valid.shape[1]))

    def pt_prefill():
        with torch.no_grad():
            pt_model(torch.as_tensor(ids).long(), last_only=True)

    ms_gen = lambda: dec.generate(ids, max_new_tokens=new, eos_token_id=never)
    pt_gen = lambda: pt_model.generate(ids, max_new_tokens=new, eos_token_id=never)
    ms_gen()  # compile both step shapes once
    out = {"config": name, "params_M": params / 1e6}
    out["ms_prefill"], out["pt_prefill"] = prompt / best(ms_prefill), prompt / best(pt_prefill)
    ms_total, pt_total = best(ms_gen, 2), best(pt_gen, 2)
    out["ms_decode"] = (new - 1) / max(ms_total - prompt / out["ms_prefill"], 1e-9)
    out["pt_decode"] = (new - 1) / max(pt_total - prompt / out["pt_prefill"], 1e-9)
    assert (ms_gen() == pt_gen()).all(), "the two runtimes generated different tokens"

    # per-token decode time early vs late in a long generation (after one run that compiles its cache length)
    dec.generate(ids, max_new_tokens=8 * new, eos_token_id=never)
    stamps = []
    for _ in dec.stream(ids, max_new_tokens=8 * new, eos_token_id=never):
        stamps.append(time.perf_counter())
    steps = np.diff(stamps)
    out["early_ms"], out["late_ms"] = steps[:new // 2].mean() * 1e3, steps[-new // 2:].mean() * 1e3
    return out


def kernel_anchor(hidden: int, threads: int) -> float:
    """MindSpore's own MatMul against torch's on the decode step's largest product (the output layer,
    1 x hidden x 65024, float32): the ceiling a MindSpore runtime can reach on this CPU."""
    import mindspore as ms
    import torch
    from mindspore import Parameter, Tensor, nn, ops

    torch.set_num_threads(threads)
    x = np.random.default_rng(0).random((1, hidden), np.float32)
    w = np.random.default_rng(1).random((65024, hidden), np.float32)

    class MatMul(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w, self.mm = Parameter(Tensor(w)), ops.MatMul(transpose_b=True)

        def construct(self, a):
            return self.mm(a, self.w)

    cell = MatMul()
    cell.construct = ms.jit(cell.construct)
    xm, xt, wt = Tensor(x), torch.from_numpy(x), torch.from_numpy(w)
    cell(xm).asnumpy()
    ms_t = best(lambda: cell(xm).asnumpy(), 10)
    pt_t = best(lambda: (xt @ wt.T).numpy(), 10)
    return pt_t / ms_t


def load_6b(path: str) -> None:
    """Child process: load with dtype=float16, then one short forward."""
    import mindspore as ms

    from glm2_ms.loading import from_pretrained

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
    ap.add_argument("--load-6b", help="a 6B-shaped HF folder (glm2-convert synth --preset 6b)")
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
    print(f"prompt {args.prompt} tokens, {args.new} new tokens, greedy, {args.threads} threads, float32\n")
    print("| config | params | prefill tok/s MS | torch | ratio | decode tok/s MS | torch | ratio "
          "| decode ms/token early → late | MatMul kernel alone, MS/torch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        r = bench_config(name, args.prompt, args.new, args.threads)
        print(f"| {name} | {r['params_M']:.0f}M | {r['ms_prefill']:.0f} | {r['pt_prefill']:.0f} | "
              f"{r['ms_prefill'] / r['pt_prefill']:.2f}x | {r['ms_decode']:.1f} | {r['pt_decode']:.1f} | "
              f"{r['ms_decode'] / r['pt_decode']:.2f}x | {r['early_ms']:.1f} → {r['late_ms']:.1f} | "
              f"{kernel_anchor(CONFIGS[name]['hidden_size'], args.threads):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
