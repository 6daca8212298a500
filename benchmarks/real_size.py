"""The whole used-by loop at the real ChatGLM2-6B shapes, one command, every step measured.

    python benchmarks/real_size.py [--layers 28] [--hf-folder DIR] [--prompts 5] [--new-tokens 32] [--steps 3]
                                   [--workdir DIR] [--anchors-only]

synth (`glm2-convert synth --preset 6b`, float16, or --hf-folder: a given HF folder) → hf2ms → streamed parity
(the layer pass: --max-new-tokens 0) → generation parity (the same after each whole model's greedy tokens, each
in a process of its own, weights as stored, float32 compute) → glm2-generate --stats → LoRA finetune (batch 1 ×
the recipe's 193 tokens, real ADGEN lines) → merge-lora → ms2hf → streamed parity of the merged HF folder against
the merged MindSpore one.

First the kernel anchors of those steps, measured in the same run: each 6B projection on a 20-token prompt and on
one token, float32 in MindSpore and torch and float16 weights through the native kernel (`--anchors-only`: just
those). Each step is its own process; its wall time and peak RSS (the process tree's summed RSS, sampled every
0.1 s by psutil) are printed as a markdown table with the step's key numbers, with the CPU and its thread
count. Before the first parity, the page cache is dropped (root: /proc/sys/vm/drop_caches; else posix_fadvise
DONTNEED on the files) and both checkpoints are read once (`cat`): the cold-cache anchor of the streamed parity,
which runs cold too.
--workdir keeps the folders; by default they go to a temporary folder removed at the end, also on failure, and
each folder is removed once no later step reads it (the synthesized HF folder after the generation parity, the
finetune's checkpoints once it has written its adapter, the MindSpore model after merge-lora). Disk at 28 layers:
at most two or three 12.5 GB checkpoints (a LoRA run's saves hold its adapter alone); with --workdir, all of them
(≥ 50 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from measure import cpu_info, drop_caches, kernel_anchors, print_anchors, print_machine, projection_shapes, size_of

from glm2_core.config import GLM2Config
from validation.parity import DEFAULT_PROMPTS

ROOT = Path(__file__).resolve().parent.parent
ADGEN = ROOT / "validation" / "assets" / "adgen_train_head200.json"
BIN = Path(sys.executable).parent  # the venv's glm2-* commands


def evict(*folders: Path) -> str:
    """Empty the page cache of `folders`' files: all of it when allowed, else each file's pages."""
    if drop_caches():
        return "page cache dropped"
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    return "files evicted with posix_fadvise(DONTNEED)"


def run(name: str, cmd: list, log: Path, ok=(0,)) -> tuple[float, float, str]:
    """(wall s, peak RSS GB of the process tree, output) of one step; a failing step stops the loop."""
    print(f"--- {name}: {' '.join(map(str, cmd))}", flush=True)
    with log.open("w") as out:
        t = time.perf_counter()
        proc = psutil.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
        peak = 0
        while proc.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)
        wall = time.perf_counter() - t
    text = log.read_text(errors="replace")
    if proc.returncode not in ok:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{text[-3000:]}")
    return wall, peak / 1e9, text


def parity_numbers(report: Path) -> str:
    r = json.loads((report / "report.json").read_text())
    worst = max(s["rel"] for p in r["prompts"] for s in p["stages"][:-1])
    forward = {side: sum(p["seconds"][f"{side}_forward"] for p in r["prompts"]) for side in ("ms", "ref")}
    text = (f"{'PASS' if r['passed'] else 'FAIL'} ({r['mode']}), worst layer rel diff {worst:.1e}, logits max abs "
            f"{max(p['logits_max_abs'] for p in r['prompts']):.1e}; layer pass compute (reading excluded) MindSpore "
            f"{forward['ms']:.0f} s, torch {forward['ref']:.0f} s")
    if r["new_tokens"]:
        tokens = r["new_tokens"] * len(r["prompts"])
        seconds = {side: sum(p["seconds"][f"{side}_generate"] for p in r["prompts"]) for side in ("ms", "ref")}
        text += (f", greedy agreement {min(p['greedy_agreement'] for p in r['prompts']):.0%}; tokens/s MindSpore "
                 f"{tokens / seconds['ms']:.2f}, torch {tokens / seconds['ref']:.2f} (prefill included)")
    return text


def finetune_numbers(run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    later = rows[1:] or rows  # the first step compiles the graph
    tps = sorted(r["tokens_per_s"] for r in later)[len(later) // 2]
    return (f"{len(rows)} steps, loss {rows[0]['loss']:.3f} → {rows[-1]['loss']:.3f}; {193 / tps:.1f} s/step, "
            f"{tps:.1f} tokens/s (median after the first step)")


def anchors() -> None:
    """The products the loop's time is made of, timed here, alternating: each 6B projection on a 20-token prompt
    (the streamed parity's passes, a prefill) and on one token (a decoding step), in float32 in both libraries and
    over float16 weights through the native kernel."""
    cfg = GLM2Config.preset("6b")
    for title, rows in (("a 20-token prompt", 20), ("a decoding step", 1)):
        print_anchors(f"6B shapes, {title}", kernel_anchors(projection_shapes(cfg, rows, rows), native=True))


def supports(tool: str, flag: str) -> bool:
    return flag in subprocess.run([BIN / tool, "--help"], capture_output=True, text=True).stdout


def loop(args, work: Path) -> list[tuple]:
    rows = []

    def prune(*folders: Path) -> None:
        """Folders no later step reads, removed from a temporary work folder as soon as they are done with (the disk
        holds at most three 6B checkpoints at a time); --workdir keeps them."""
        if args.workdir is None:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)

    def step(name, cmd, numbers=lambda text: "", ok=(0,)):
        wall, peak, text = run(name, cmd, work / f"{name.split()[0]}-{len(rows)}.log", ok)
        rows.append((name, wall, peak, numbers(text)))
        print(f"    {wall:.1f} s, peak RSS {peak:.2f} GB  {rows[-1][3]}", flush=True)

    hf, ms_dir = args.hf_folder or work / "hf", work / "ms"
    if args.hf_folder is None:
        step("synth", [BIN / "glm2-convert", "synth", hf, "--preset", "6b", "--num-layers", args.layers,
                       "--dtype", "float16", "--format", "bin"], lambda _: f"{size_of(hf) / 1e9:.2f} GB")
    step("hf2ms", [BIN / "glm2-convert", "hf2ms", hf, ms_dir, "--quiet"], lambda _: f"{size_of(ms_dir) / 1e9:.2f} GB")
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(DEFAULT_PROMPTS[:args.prompts]) + "\n")
    parity = [BIN / "glm2-parity", "--streamed", "--prompts", prompts]
    print(f"cold cache: {evict(hf, ms_dir)}", flush=True)
    files = sorted(p for d in (hf, ms_dir) for p in d.rglob("*") if p.is_file())
    step("read both checkpoints once (cold)", ["sh", "-c", 'cat "$@" > /dev/null', "sh", *files])
    rows[-1] = rows[-1][:3] + (f"{(size_of(hf) + size_of(ms_dir)) / 1e9 / rows[-1][1]:.2f} GB/s",)
    evict(hf, ms_dir)
    step("streamed parity (cold)", [*parity, hf, ms_dir, "--max-new-tokens", 0, "--report", work / "p1"],
         lambda _: parity_numbers(work / "p1"), ok=(0, 1))
    step("generation parity", [*parity, hf, ms_dir, "--max-new-tokens", args.new_tokens, "--report", work / "p2"],
         lambda _: parity_numbers(work / "p2"), ok=(0, 1))
    if args.hf_folder is None:
        prune(hf)
    step("glm2-generate --stats", [BIN / "glm2-generate", ms_dir, "--prompt", DEFAULT_PROMPTS[2], "--chat",
                                   "--max-new-tokens", args.new_tokens, "--stats"],
         lambda text: " ".join(line.strip() for line in text.splitlines() if line.startswith("stats:")))
    recompute = ["--recompute"] if supports("glm2-finetune", "--recompute") else []
    step(f"LoRA finetune{' --recompute' if recompute else ''}",
         [BIN / "glm2-finetune", ms_dir, "--train-data", ADGEN, "--out", work / "lora", "--method", "lora",
          "--batch-size", 1, "--max-steps", args.steps, "--quiet", *recompute],
         lambda _: finetune_numbers(work / "lora"))
    checkpoints = [work / "lora" / d for d in ("checkpoint", "checkpoint_trainable")]
    print(f"    the run's checkpoints: {sum(size_of(d) for d in checkpoints if d.exists()) / 1e9:.2f} GB", flush=True)
    prune(*checkpoints)  # merge-lora reads the PEFT adapter
    step("merge-lora", [BIN / "glm2-convert", "merge-lora", ms_dir, work / "lora" / "adapter", work / "ms-merged",
                        "--quiet"])
    prune(ms_dir)
    step("ms2hf", [BIN / "glm2-convert", "ms2hf", work / "ms-merged", work / "hf-merged", "--quiet"])
    step("streamed parity, merged", [*parity, work / "hf-merged", work / "ms-merged", "--max-new-tokens", 0,
                                     "--report", work / "p3"], lambda _: parity_numbers(work / "p3"), ok=(0, 1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=28, help="layers of the synthesized model (6B widths)")
    ap.add_argument("--hf-folder", type=Path, help="a real HF ChatGLM2 folder instead of a synthesized one")
    ap.add_argument("--prompts", type=int, default=5, help="how many of the five default prompts")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--steps", type=int, default=3, help="LoRA finetune steps")
    ap.add_argument("--workdir", type=Path, help="keep the folders here (default: a temporary folder, removed)")
    ap.add_argument("--anchors-only", action="store_true", help="only the kernel anchors (printed first otherwise)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.anchors_only:
        return anchors()
    print_machine()
    # in a process of its own: this one stays small beside the steps
    print(subprocess.run([sys.executable, __file__, "--anchors-only"], capture_output=True, text=True,
                         check=True).stdout, flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="glm2-real-size-"))
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the temporary folder
    try:
        rows = loop(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    what = "a given HF folder" if args.hf_folder else f"6B shapes, {args.layers} layers, float16"
    print(f"\n{what}; {args.prompts} prompts; CPU: {cpu_info()[0]}, {len(os.sched_getaffinity(0))} cores\n")
    print("| step | wall s | peak RSS GB | key numbers |\n|---|---|---|---|")
    for name, wall, peak, numbers in rows:
        print(f"| {name} | {wall:.1f} | {peak:.2f} | {numbers} |")


if __name__ == "__main__":
    main()
