"""Merge an 8-rank sharded checkpoint of the real ChatGLM2-6B shapes (fp16, dp 2 × mp 4, optimizer-sharded across
dp as MindFormers' parallel optimizer leaves it) with glm2-merge-shards, against `cp -r` of the same shards and
against `mindspore.transform_checkpoints`.

    python benchmarks/merge_6b.py [--workdir bench-work] [--layers 28] [--ms-layers 2,6]

The shards are built on disk here (synth → hf2ms → our split, the split itself timed too). MindSpore's transform
holds ~4× the model in memory, so it runs at the smaller --ms-layers sizes, where ours runs on the same shards.
Every step is its own process under /usr/bin/time -v with the page cache dropped first. Needs ~40 GB free disk.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from measure import drop_caches, print_machine, size_of, timed

from converters.checkpoint import open_checkpoint
from converters.strategy import ParamLayout, strategy_bytes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MS_MERGE = """
import sys, mindspore as ms
ms.transform_checkpoints(sys.argv[1], sys.argv[2], "merged", sys.argv[3], None)
"""


def megatron_layouts(names: list[str], dp: int, mp: int) -> dict:
    """Column-parallel qkv / h→4h, row-parallel dense / 4h→h, vocab-parallel embedding and output layer,
    replicated norms; the optimizer shards every weight across dp and the norms across all ranks."""
    out = {}
    for n in names:
        if "layernorm" in n:
            out[n] = ParamLayout((dp, mp), (-1,), (), 1, -1)
        elif n.endswith(".bias"):
            out[n] = ParamLayout((dp, mp), (0,), (), mp, dp)
        elif "dense_4h_to_h" in n or n.endswith("self_attention.dense.weight"):
            out[n] = ParamLayout((dp, mp), (-1, 0), (), mp, dp)
        else:
            out[n] = ParamLayout((dp, mp), (0, -1), (), mp, dp)
    return out


def build_shards(work: Path, layers: int, dp: int, mp: int) -> tuple[Path, Path, Path, tuple[float, float]]:
    """(HF source, shards folder, strategy file, split (wall, RSS))."""
    cli = f"{sys.executable} -m converters"
    hf = work / ("hf-6b-safetensors" if layers == 28 else f"hf-6b-{layers}l")
    if not hf.exists():
        subprocess.run([*cli.split(), "synth", str(hf), "--preset", "6b", "--num-layers", str(layers), "--dtype",
                        "float16", "--format", "safetensors"], check=True)
    full, shards, strategy = work / f"ms-full-{layers}l", work / f"shards-{layers}l", work / f"strategy-{layers}l.ckpt"
    if not shards.exists():
        shutil.rmtree(full, ignore_errors=True)
        subprocess.run([*cli.split(), "hf2ms", str(hf), str(full), "--quiet"], check=True)
        with open_checkpoint(full) as c:
            strategy.write_bytes(strategy_bytes(megatron_layouts(list(c.tensors), dp, mp)))
        split = timed(f"{Path(sys.executable).parent}/glm2-merge-shards split {full}/mindspore_model.ckpt {shards} "
                      f"--strategy {strategy} --quiet")
        shutil.rmtree(full)
    else:
        split = (float("nan"), float("nan"))
    return hf, shards, strategy, split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--ms-layers", default="2,6")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--mp", type=int, default=4)
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    merge = f"{Path(sys.executable).parent}/glm2-merge-shards"
    print_machine()
    print(f"page cache dropped before each step: {drop_caches()}")
    rows = []
    for layers in [int(x) for x in args.ms_layers.split(",") if x] + [args.layers]:
        hf, shards, strategy, split = build_shards(work, layers, args.dp, args.mp)
        gb = size_of(shards) / 1e9
        out = work / "merged"
        shutil.rmtree(work / "cp-copy", ignore_errors=True)
        cp = timed(f"cp -r {shards} {work}/cp-copy")
        shutil.rmtree(work / "cp-copy")
        shutil.rmtree(out, ignore_errors=True)
        ours = timed(f"{merge} {shards} --strategy {strategy} {out} --quiet")
        verdict = subprocess.run([sys.executable, "-m", "converters", "verify", str(hf), str(out)],
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
        shutil.rmtree(out)
        theirs = (float("nan"), float("nan"))
        if layers != args.layers:
            script = work / "ms_merge.py"
            script.write_text(MS_MERGE)
            shutil.rmtree(work / "ms-merged", ignore_errors=True)
            theirs = timed(f"{sys.executable} {script} {shards} {work}/ms-merged {strategy}")
            shutil.rmtree(work / "ms-merged")
            shutil.rmtree(shards)
        rows.append((layers, gb, cp, split, ours, theirs))
        print(f"{layers} layers, {gb:.2f} GB of shards: cp -r {cp[0]:.1f} s | split {split[0]:.1f} s, "
              f"{split[1]:.0f} MB | merge {ours[0]:.1f} s, {ours[1]:.0f} MB | transform_checkpoints "
              f"{theirs[0]:.1f} s, {theirs[1]:.0f} MB | verify: {verdict}", flush=True)
    print("\n| layers | shards | cp -r | our split (wall, RSS) | our merge | ratio to cp | peak RSS | "
          "MindSpore transform | ours / MindSpore wall | MindSpore RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layers, gb, cp, split, ours, theirs in rows:
        print(f"| {layers} | {gb:.2f} GB | {cp[0]:.1f} s | {split[0]:.1f} s, {split[1]:.0f} MB | {ours[0]:.1f} s | "
              f"{ours[0] / cp[0]:.2f}x | {ours[1]:.0f} MB | {theirs[0]:.1f} s | {ours[0] / theirs[0]:.2f}x | "
              f"{theirs[1]:.0f} MB |")


if __name__ == "__main__":
    main()
