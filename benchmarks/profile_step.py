"""Where a small step's time goes: per-op times of MindSpore's prefill, decoding and training steps beside torch's.

    python benchmarks/profile_step.py [--configs small] [--prompt 128] [--batch 4] [--steps 3] [--threads 2]
                                      [--what prefill,decode,train] [--method lora] [--top 14]

The same steps as benchmarks/decode.py (prefill of a prompt into the static cache; one decoding step after it,
the next token against the prompt's cache) and benchmarks/finetune.py (one optimizer step, fused AdamW), after a
warm-up step that compiles. MindSpore's side is timed by its own profiler
(mindspore.profiler.profile with the CPU activity: each kernel's host time, read from its cpu_op_type_info csv);
torch's by torch.profiler (self CPU time of each aten op). Each side's wall time per step is measured around the
same profiled steps; "outside the ops" is the wall time no op accounts for (Python, dispatch, graph launch). Op
times on one side are not comparable op by op with the other's (different op sets); the matmul / other split is.
Both sides run in this process, one after the other, on `--threads` threads each.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
from decode import config, models, prefills, prompt_ids
from finetune import ms_trainer, torch_trainer
from measure import print_machine, set_threads

from converters.synth import synthesize
from glm2_ms.generation import Decoder, cache_length

MS_MATMUL = {"MatMul", "BatchMatMul"}
PT_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def ms_ops(run, steps: int) -> tuple[dict, float]:
    """{op type: (calls, ms) per step} of `steps` calls of `run` under MindSpore's profiler, and the wall ms/step."""
    import mindspore as ms
    from mindspore.profiler import ProfilerActivity

    with tempfile.TemporaryDirectory() as out:
        with ms.profiler.profile(activities=[ProfilerActivity.CPU],
                                 on_trace_ready=ms.profiler.tensorboard_trace_handler(out)) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                run()
                prof.step()
            wall = (time.perf_counter() - t) / steps * 1e3
        table = next(Path(out).rglob("cpu_op_type_info_*.csv"))
        with table.open() as f:
            ops = {r["op_type"]: (int(r["type_occurrences"]) / steps, float(r["total_compute_time"]) / steps)
                   for r in csv.DictReader(f)}
    return ops, wall


def pt_ops(run, steps: int) -> tuple[dict, float]:
    """The same for torch: self CPU time of each aten op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            run()
        wall = (time.perf_counter() - t) / steps * 1e3
    ops = {e.key: (e.count / steps, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()
           if e.self_cpu_time_total > 0}
    return ops, wall


def summary(ops: dict, wall: float, matmul: set) -> str:
    mm = sum(ms for op, (_, ms) in ops.items() if op in matmul)
    other = sum(ms for op, (_, ms) in ops.items() if op not in matmul)
    return (f"wall {wall:.1f} ms/step: matmul ops {mm:.1f} ms, other ops {other:.1f} ms, outside the ops "
            f"{wall - mm - other:.1f} ms")


def report(title: str, ms_side: tuple, pt_side: tuple, top: int) -> None:
    print(f"\n{title}\nMindSpore: {summary(*ms_side, MS_MATMUL)}\ntorch:     {summary(*pt_side, PT_MATMUL)}\n")
    rows = [sorted(side[0].items(), key=lambda kv: -kv[1][1])[:top] for side in (ms_side, pt_side)]
    print("| MindSpore op | calls/step | ms/step | torch op | calls/step | ms/step |\n|---|---|---|---|---|---|")
    for i in range(max(map(len, rows))):
        cells = [f"{op} | {n:.0f} | {t:.2f}" if i < len(side) else " | | " for side in rows
                 for op, (n, t) in [side[i] if i < len(side) else ("", (0, 0))]]
        print(f"| {cells[0]} | {cells[1]} |", flush=True)


def profile_prefill(name: str, prompt: int, steps: int, top: int) -> None:
    ms_model, pt_model = models(name)
    runs = prefills(Decoder(ms_model), pt_model, prompt_ids(prompt), 64)
    for run in runs.values():
        run()  # compile / warm up
    report(f"prefill, {name} config, {prompt} tokens", ms_ops(runs["ms"], steps), pt_ops(runs["pt"], steps), top)


def profile_decode(name: str, prompt: int, steps: int, top: int) -> None:
    """One decoding step after the prompt, repeated into the same cache slot (each call the same work)."""
    import torch

    ms_model, pt_model = models(name)
    dec, ids = Decoder(ms_model), prompt_ids(prompt)
    valid = np.ones((1, cache_length(prompt + 1)), np.int32)
    _, caches = dec.forward(ids, np.arange(prompt, dtype=np.int32)[None], valid, 0, dec.new_cache(1, valid.shape[1]))
    token, mask = ids[:, -1:], torch.ones(1, prompt + 1, dtype=torch.long)
    with torch.no_grad():
        _, past, _ = pt_model(torch.as_tensor(ids).long(), mask[:, :-1], last_only=True)

    def pt_step():
        with torch.no_grad():
            pt_model(torch.as_tensor(token).long(), mask, past=past, last_only=True)
    runs = {"ms": lambda: dec.forward(token, np.array([[prompt]], np.int32), valid, prompt, caches), "pt": pt_step}
    for run in runs.values():
        run()  # compile / warm up
    report(f"decoding step, {name} config, after {prompt} tokens", ms_ops(runs["ms"], steps),
           pt_ops(runs["pt"], steps), top)


def profile_train(name: str, method: str, batch: int, steps: int, top: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "hf"
        synthesize(model, config(name), "float32", "safetensors", seed=0)
        trainer = ms_trainer(model, method, steps + 1, batch, "fused-adamw", str(Path(tmp) / "out"))
        ms_batches = trainer.data.batches(batch, seed=0)
        pt_step, pt_batches = torch_trainer(model, method, batch)
        ms_run, pt_run = (lambda: trainer._one_step(ms_batches)), (lambda: pt_step(*next(pt_batches)))
        ms_run(), pt_run()  # compile / warm up
        report(f"training step, {name} config, {method}, batch {batch}", ms_ops(ms_run, steps),
               pt_ops(pt_run, steps), top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="small", help="names from measure.CONFIGS, comma-separated")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--method", default="lora", help="lora or full (the training step)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps of each side (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--what", default="prefill,decode,train")
    ap.add_argument("--top", type=int, default=14, help="ops listed per side")
    args = ap.parse_args()
    set_threads(args.threads)
    print_machine(args.threads)
    for name in args.configs.split(","):
        if "prefill" in args.what:
            profile_prefill(name, args.prompt, args.steps, args.top)
        if "decode" in args.what:
            profile_decode(name, args.prompt, args.steps, args.top)
        if "train" in args.what:
            profile_train(name, args.method, args.batch, args.steps, args.top)


if __name__ == "__main__":
    main()
