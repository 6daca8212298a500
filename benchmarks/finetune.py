"""Finetuning speed and memory: this MindSpore trainer against torch (+ PEFT for LoRA) on the same model, data and
batch, each run in its own process under /usr/bin/time -v.

    python benchmarks/finetune.py [--configs small,medium] [--steps 6] [--batch 4] [--optimizers adamw,fused-adamw]
                                  [--skip medium:full:adamw:off] [--num-layers N]
                                  [--repeats 3]

Both sides: real ADGEN lines, the recipe's preprocessing (64 + 64 + 1 tokens here), float32, AdamW
(0.9, 0.95, 1e-8, weight decay 0.1), gradient clipping at 1.0, LoRA r 8 / alpha 32 / dropout 0.1 on
query_key_value. tokens/s counts every position of every sequence, after two warm-up steps (compilation).
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import (
    CONFIGS,
    RATIO,
    backward_shapes,
    kernel_anchors,
    kernel_ratio,
    print_anchors,
    print_machine,
    projection_shapes,
    set_ms_threads,
    set_threads,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "validation" / "assets" / "adgen_train_head200.json"
WARMUP = 2
SOURCE = TARGET = 64  # prompt and answer tokens: rows of SOURCE + TARGET + 1


def ms_trainer(model: Path, method: str, steps: int, batch: int, optimizer: str, out: str, recompute: bool = True):
    """The MindSpore trainer of these runs (the caller has chosen the device and threads)."""
    from glm2_ms.train import Trainer
    from glm2_ms.train_config import TrainConfig

    cfg = TrainConfig(method=method, max_steps=steps, batch_size=batch, max_source_length=SOURCE,
                      max_target_length=TARGET, learning_rate=1e-4, optimizer=optimizer,
                      recompute=recompute)
    return Trainer(model, DATA, out, cfg, progress=False)


def child_ms(model: Path, method: str, steps: int, batch: int, optimizer: str, threads: int,
             recompute: bool) -> dict:
    set_ms_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        trainer = ms_trainer(model, method, steps + WARMUP, batch, optimizer, out, recompute)
        stamps = []
        orig = trainer._record

        def record(loss, seconds, log, bar):
            stamps.append(seconds)
            orig(loss, seconds, log, bar)
        trainer._record = record
        trainer.train()
    return {"seconds": sum(stamps[WARMUP:]), "tokens": steps * batch * trainer.seq, "loss": trainer.state.losses[-1]}


def torch_trainer(model: Path, method: str, batch: int):
    """torch (+ PEFT) on the same data: (a function running one step on the next batch → its loss, the batches)."""
    import numpy as np
    import torch

    from glm2_ms.data import Lengths, TrainData, read_jsonl
    from glm2_ms.tokenizer import GLM2Tokenizer
    from validation.torch_reference import load_reference

    torch.manual_seed(0)
    net = load_reference(model, "float32").train()
    if method == "lora":
        import peft

        net = peft.get_peft_model(net, peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                                                       target_modules=["query_key_value"]))
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    data = TrainData(GLM2Tokenizer(), read_jsonl(DATA), Lengths(SOURCE, TARGET))

    def step(ids, labels) -> float:
        ids, labels = (torch.as_tensor(np.asarray(x)).long() for x in (ids, labels))
        logits = net(ids)[0]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()
    return step, data.batches(batch, seed=0)


def child_torch(model: Path, method: str, steps: int, batch: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    step, batches = torch_trainer(model, method, batch)
    seconds = 0.0
    for i in range(steps + WARMUP):
        ids, labels = next(batches)
        t = time.perf_counter()
        loss = step(ids, labels)
        if i >= WARMUP:
            seconds += time.perf_counter() - t
    return {"seconds": seconds, "tokens": steps * batch * (SOURCE + TARGET + 1), "loss": loss}


def config(name: str, layers: int | None):
    """The config `name` of measure.CONFIGS, with `layers` layers when given."""
    from glm2_core.config import GLM2Config

    return GLM2Config.preset("tiny", **CONFIGS[name] | ({"num_layers": layers} if layers else {}))


def training_anchors(name: str, batch: int, layers: int | None, methods: list[str]) -> dict[str, float]:
    """The kernel anchors at a training step's GEMMs, {method: weighted ratio}: every token of the batch through
    each layer's projections, the output layer on the answer windows (TARGET + 1 positions a row, as the trainer
    runs it; torch's side runs it on every position), and the backward pass's products of those: dx = dy W for
    both methods, dW = dyᵀ x for the full finetune (LoRA's rank-8 factors are left out: a few percent)."""
    forward = projection_shapes(config(name, layers), batch * (SOURCE + TARGET + 1), batch * (TARGET + 1))
    rows = kernel_anchors(forward + backward_shapes(forward, trained="full" in methods))
    print_anchors(f"{name}, training step (batch {batch})", rows)
    ratios = {"lora": kernel_ratio([r for r in rows if r["layout"] != "tn"]), "full": kernel_ratio(rows)}
    print(f"forward and dx (a LoRA step's GEMMs): {ratios['lora']:.2f}x"
          + (f"; with dW (a full step's): {ratios['full']:.2f}x" if "full" in methods else ""), flush=True)
    return ratios


def measure(args: list[str]) -> tuple[dict, float]:
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child failed: {args}\n{proc.stderr[-3000:]}")
    out = json.loads(re.search(r"RESULT (.*)", proc.stdout).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    return out, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="small,medium")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of runs, torch's then each MindSpore row's")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--num-layers", type=int, help="the configs' widths with this many layers (memory per layer)")
    ap.add_argument("--optimizers", default="adamw,fused-adamw",
                    help="MindSpore's: adamw (experimental.optim.AdamW) and/or fused-adamw")
    ap.add_argument("--skip", default="", help="config:method:optimizer[:recompute] rows not to run (e.g. known to "
                    "exceed RAM; without :recompute, every recompute setting)")
    ap.add_argument("--recompute", default="on",
                    help="MindSpore's backward: on (block by block, the default), off (one graph), or on,off")
    ap.add_argument("--child", nargs=4, metavar=("SIDE", "METHOD", "MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, method, model, optimizer = args.child
        res = child_ms(Path(model), method, args.steps, args.batch, optimizer, args.threads,
                       args.recompute == "on") if side == "ms" else \
            child_torch(Path(model), method, args.steps, args.batch, args.threads)
        print("RESULT " + json.dumps(res))
        return
    from converters.synth import synthesize

    set_threads(args.threads)  # this process's anchors; each child sets its own side's
    print_machine(args.threads)
    methods = args.methods.split(",")
    kernels = {name: training_anchors(name, args.batch, args.num_layers, methods)
               for name in args.configs.split(",")}
    print(f"\nbatch {args.batch} x {SOURCE + TARGET + 1} tokens, {args.steps} timed steps after {WARMUP} warm-up, "
          f"float32, {args.threads} threads each side; {args.repeats} rounds, each process alone (torch, then each "
          f"MindSpore row): tok/s the median, the ratio the median of the rounds' ratios (their range); peak RSS "
          f"the highest; {RATIO}; kernel ratio: the GEMM anchors above\n")
    print("| config | method | MindSpore optimizer | recompute | MindSpore tok/s | torch tok/s | ratio | "
          "GEMM kernel ratio | ratio / kernel ratio | MindSpore peak RSS | torch peak RSS | ratio | "
          "last loss MindSpore / torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    skip = set(args.skip.split(","))
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "hf"
            synthesize(model, config(name, args.num_layers), "float32", "safetensors", seed=0)
            for method in methods:
                common = ["--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)]
                rows = list(itertools.product(args.optimizers.split(","), args.recompute.split(",")))
                run = [r for r in rows if not {f"{name}:{method}:{r[0]}", f"{name}:{method}:{r[0]}:{r[1]}"} & skip]
                rounds = alternate_rounds(model, method, run, common, args.repeats)
                pt = rounds.pop("torch")
                for optimizer, recompute in rows:
                    print_row(name, method, optimizer, recompute, pt, rounds.get((optimizer, recompute)),
                              kernels[name][method])


def alternate_rounds(model: Path, method: str, rows: list, common: list[str], repeats: int) -> dict:
    """`repeats` rounds of torch's run then each MindSpore row's, every run its own process: each MindSpore run
    is timed next to a torch run of its own round, so a machine whose speed drifts moves both sides alike."""
    out = {"torch": []} | {row: [] for row in rows}
    for _ in range(repeats):
        out["torch"].append(measure(["--child", "torch", method, str(model), "-", *common]))
        for optimizer, recompute in rows:
            out[(optimizer, recompute)].append(measure(["--child", "ms", method, str(model), optimizer, *common,
                                                        "--recompute", recompute]))
    return out


def rate(run: tuple[dict, float]) -> float:
    return run[0]["tokens"] / run[0]["seconds"]


def print_row(name: str, method: str, optimizer: str, recompute: str, pt: list, ms: list | None,
              kernel: float) -> None:
    """One table row: medians over the rounds; the speed ratio is the median of each round's own ratio (its range
    beside it), peak RSS the highest of the rounds."""
    pt_rate, pt_rss = statistics.median(map(rate, pt)), max(rss for _, rss in pt)
    if ms is None:
        print(f"| {name} | {method} | {optimizer} | {recompute} | not run (--skip) | {pt_rate:.0f} | | "
              f"{kernel:.2f}x | | | {pt_rss:.0f} MB | | |", flush=True)
        return
    ratios = [rate(m) / rate(t) for m, t in zip(ms, pt, strict=True)]
    ratio, ms_rss = statistics.median(ratios), max(rss for _, rss in ms)
    spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
    print(f"| {name} | {method} | {optimizer} | {recompute} | {statistics.median(map(rate, ms)):.0f} | "
          f"{pt_rate:.0f} | {ratio:.2f}x{spread} | {kernel:.2f}x | {ratio / kernel:.2f} | {ms_rss:.0f} MB | "
          f"{pt_rss:.0f} MB | {ms_rss / pt_rss:.2f}x | {ms[-1][0]['loss']:.4f} / {pt[-1][0]['loss']:.4f} |",
          flush=True)


if __name__ == "__main__":
    main()
