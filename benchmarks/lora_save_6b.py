"""A LoRA run's save at the ChatGLM2-6B shapes: its size and time, against `cp` of the same bytes and against the
layout before (the frozen base saved twice, counted from the same model).

    python benchmarks/lora_save_6b.py [--layers 28] [--workdir DIR]

synth (float16 safetensors, `glm2-convert synth --preset 6b`) → one glm2-finetune LoRA step (batch 1, 16 + 16
tokens of real ADGEN lines) in this process, whose save is timed → `cp` of the saved files → a second save
timed → glm2-merge-shards of the run (the adapter folded into the base it recorded). Prints a markdown table
with the CPU; the workdir (a temporary folder by default) is removed at the end, also on failure.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import print_machine, size_of

from converters.formats.ckpt import CkptFile
from converters.runs import record_path, trainable_path
from converters.strategy import ParamLayout, strategy_bytes
from glm2_ms.checkpointing import latest
from glm2_ms.train import Trainer
from glm2_ms.train_checkpoint import network_state
from glm2_ms.train_config import TrainConfig

BIN = Path(sys.executable).parent
TRAIN = Path(__file__).resolve().parents[1] / "tests" / "data" / "adgen_train_head200.json"


def synth(folder: Path, layers: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([BIN / "glm2-convert", "synth", folder, "--preset", "6b", "--num-layers", str(layers), "--dtype",
                    "float16", "--format", "safetensors"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def timed_saves(trainer) -> list[float]:
    """The trainer's saves, each timed (the first one writes the run's config and tokenizer too)."""
    times, save = [], trainer.checkpoints.save

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        path = save(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        return path

    trainer.checkpoints.save = timed
    return times


def old_layout_bytes(trainer) -> int:
    """What the layout before wrote per save: the whole network in the training file and again in the network
    file, plus the moments and counters (as now)."""
    network = sum(a.nbytes for a in network_state(trainer.model).values())
    trained = sum(p.asnumpy().nbytes for p in trainer.train_step.weights)
    return 2 * network + 2 * trained + 16


def cp_seconds(files: list[Path], into: Path) -> float:
    into.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, files), str(into)], check=True)
    subprocess.run(["sync", *(str(into / f.name) for f in files)], check=True)  # as a save fsyncs its files
    return time.perf_counter() - t0


def run(work: Path, layers: int) -> dict:
    found = {"synth_s": synth(work / "hf", layers)}
    cfg = TrainConfig.load(None, method="lora", max_steps=2, save_steps=1, batch_size=1, max_source_length=16,
                           max_target_length=16, seed=0)
    t0 = time.perf_counter()
    trainer = Trainer(work / "hf", TRAIN, work / "run", cfg, progress=False)
    found["load_s"] = time.perf_counter() - t0
    saves = timed_saves(trainer)
    t0 = time.perf_counter()
    trainer.train()
    found["train_s"] = time.perf_counter() - t0
    newest = latest(work / "run", 0)
    files = [newest, record_path(newest), trainable_path(work / "run", 0)]
    found.update(saves_s=saves, save_bytes=sum(p.stat().st_size for p in files), old_bytes=old_layout_bytes(trainer),
                 adapter_bytes=sum(p.asnumpy().nbytes for p in trainer.train_step.weights),
                 cp_s=cp_seconds(files, work / "cp"),
                 peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                 base_bytes=size_of(work / "hf"))
    t0 = time.perf_counter()
    merged = subprocess.run([BIN / "glm2-merge-shards", work / "run", "--strategy", _strategy(work), work / "merged",
                             "--quiet"], capture_output=True, text=True)
    found["merge_s"] = time.perf_counter() - t0
    if merged.returncode:
        raise SystemExit(merged.stderr)
    return found


def _strategy(work: Path) -> Path:
    """One process's rank files: every tensor whole on rank 0."""
    with CkptFile(latest(work / "run", 0)) as f:
        layouts = {n: ParamLayout((1,), (-1,) * len(t.shape)) for n, t in f.tensors.items() if t.shape}
    (work / "strategy.ckpt").write_bytes(strategy_bytes(layouts))
    return work / "strategy.ckpt"


def report(found: dict, layers: int) -> None:
    print(f"\nChatGLM2-6B shapes, {layers} layers, float16 base of {found['base_bytes'] / 1e9:.2f} GB; LoRA r=8 on "
          f"query_key_value ({found['adapter_bytes'] / 1e6:.2f} MB of factors, float32)\n")
    print("| what | value |\n|---|---|")
    rows = [("one save, on disk (training file + trainable file + record)", f"{found['save_bytes'] / 1e6:.1f} MB"),
            ("the layout before, same model (base twice + moments)", f"{found['old_bytes'] / 1e9:.2f} GB"),
            ("ratio before / now", f"{found['old_bytes'] / found['save_bytes']:,.0f}×"),
            ("save time (first, with config + tokenizer; second)", " / ".join(f"{s:.3f} s" for s in
                                                                               found["saves_s"])),
            ("cp of the same files, each synced (anchor)", f"{found['cp_s']:.3f} s"),
            ("second save ÷ cp", f"{found['saves_s'][-1] / found['cp_s']:.2f}"),
            ("model load + LoRA, then 2 steps with 2 saves", f"{found['load_s']:.0f} s, {found['train_s']:.0f} s"),
            ("peak RSS of the run", f"{found['peak_rss_gb']:.1f} GiB"),
            ("glm2-merge-shards RUN (adapter folded into the recorded base)", f"{found['merge_s']:.0f} s")]
    for what, value in rows:
        print(f"| {what} | {value} |")
    print("\n" + json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--workdir", type=Path)
    opts = parser.parse_args()
    print_machine()
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="lora-save-6b-"))
    try:
        report(run(work, opts.layers), opts.layers)
    finally:
        if opts.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
