"""Convert a checkpoint of the real ChatGLM2-6B shapes (12.5 GB fp16) both ways, against `cp -r` of the same bytes.

    python benchmarks/convert_6b.py [--workdir bench-work] [--layers 28] [--naive-layers 2,8,14] [--cache cold,hot]

Each step runs in its own process under /usr/bin/time -v (wall time, peak RSS), with the page cache dropped
before it when we are allowed to (root), and `sync` inside the timed command so that write-back is counted.
`--cache hot` reads the step's source back into the page cache after the drop, as right after a download or
a previous step wrote it; cold and hot rows are measured in turn.
Each conversion's anchor is `cp -r` of its own source (the HF folder for hf2ms, the MindSpore folder for
ms2hf). The disk of a shared VM varies from minute to minute, so the copies and conversions run in turn
--repeat times and the best time of each is reported.
The naive recipe users follow today (load the whole state dict, then mindspore.save_checkpoint) runs at the
sizes given by --naive-layers. Needs about 40 GB of free disk for the full size.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from measure import drop_caches, print_machine, size_of, timed

NAIVE = """
import sys, glob, torch, mindspore as ms, numpy as np
src, dst = sys.argv[1], sys.argv[2]
state = {}
for f in sorted(glob.glob(src + "/pytorch_model*.bin")):
    state.update(torch.load(f, map_location="cpu", weights_only=True))
params = []
for name, t in state.items():
    a = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    params.append({"name": name.replace("word_embeddings.weight", "embedding_weight"), "data": ms.Tensor(a)})
ms.save_checkpoint(params, dst)
"""


def measure_round_trip(cli: str, work: Path, src: Path, fmt: str, cache: str, repeat: int) -> tuple:
    """hf2ms and ms2hf of `src`, each against `cp -r` of its own source, best of `repeat`, then verified."""
    gb = size_of(src) / 1e9
    ms_dir, back, copy = work / f"ms-from-{fmt}", work / f"hf-back-{fmt}", work / "cp-copy"

    def hot(path: Path) -> tuple[Path, ...]:
        return (path,) if cache == "hot" else ()
    runs = []
    for _ in range(repeat):
        for d in (ms_dir, back, copy):
            shutil.rmtree(d, ignore_errors=True)
        cp = timed(f"cp -r {src} {copy}", hot(src))  # the anchor of hf2ms: its source's bytes
        shutil.rmtree(copy)
        hf2ms = timed(f"{cli} hf2ms {src} {ms_dir} --quiet", hot(src))
        cp_ms = timed(f"cp -r {ms_dir} {copy}", hot(ms_dir))  # the anchor of ms2hf: its source's bytes
        shutil.rmtree(copy)
        runs.append((cp, hf2ms, cp_ms, timed(f"{cli} ms2hf {ms_dir} {back} --format {fmt} --quiet", hot(ms_dir))))
    (cp_wall, _), (h_wall, h_rss), (cpm_wall, _), (m_wall, m_rss) = [
        (min(r[k][0] for r in runs), max(r[k][1] for r in runs)) for k in range(4)]
    print(f"{fmt}, {cache} cache: {gb:.2f} GB  cp -r {cp_wall:.1f} s | hf2ms {h_wall:.1f} s ({h_wall / cp_wall:.2f}x "
          f"cp), peak RSS {h_rss:.0f} MB | cp -r of the MindSpore folder {cpm_wall:.1f} s | ms2hf {m_wall:.1f} s "
          f"({m_wall / cpm_wall:.2f}x that cp), peak RSS {m_rss:.0f} MB", flush=True)
    verdict = subprocess.run([*cli.split(), "verify", str(src), str(back)], capture_output=True, text=True)
    print(f"   verify {src.name} vs {back.name}: {verdict.stdout.strip()}", flush=True)
    shutil.rmtree(back)
    shutil.rmtree(ms_dir)
    return fmt, cache, gb, cp_wall, h_wall, h_rss, cpm_wall, m_wall, m_rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--naive-layers", default="2,8,14")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--formats", default="bin,safetensors")
    ap.add_argument("--cache", default="cold,hot", help="cold: page cache dropped; hot: the source read back in")
    args = ap.parse_args()
    work, py, cli = args.workdir, sys.executable, f"{sys.executable} -m converters"
    work.mkdir(parents=True, exist_ok=True)
    print_machine()
    print(f"page cache dropped before each step: {drop_caches()}")
    rows = []
    for fmt in [f for f in args.formats.split(",") if f]:  # --formats "" runs the naive recipe alone
        src = work / f"hf-6b-{fmt}"
        if not src.exists():
            subprocess.run([*cli.split(), "synth", str(src), "--preset", "6b", "--num-layers", str(args.layers),
                            "--dtype", "float16", "--format", fmt], check=True)
        for cache in args.cache.split(","):
            rows.append(measure_round_trip(cli, work, src, fmt, cache, args.repeat))
    print("\n| source | cache | size | cp -r HF | hf2ms | ratio | peak RSS | cp -r MS | ms2hf | ratio | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for fmt, cache, gb, cp_wall, h_wall, h_rss, cpm_wall, m_wall, m_rss in rows:
        print(f"| {fmt} | {cache} | {gb:.2f} GB | {cp_wall:.1f} s | {h_wall:.1f} s | {h_wall / cp_wall:.2f}x "
              f"| {h_rss:.0f} MB | {cpm_wall:.1f} s | {m_wall:.1f} s | {m_wall / cpm_wall:.2f}x | {m_rss:.0f} MB |")

    print("\nnaive recipe (torch.load everything, then mindspore.save_checkpoint):")
    print("| layers | checkpoint | naive wall | naive peak RSS | RSS / checkpoint | hf2ms wall | hf2ms peak RSS |")
    print("|---|---|---|---|---|---|---|")
    script = work / "naive.py"
    script.write_text(NAIVE)
    for n in [int(x) for x in args.naive_layers.split(",") if x]:
        src = work / f"hf-naive-{n}"
        if not src.exists():
            subprocess.run([*cli.split(), "synth", str(src), "--preset", "6b", "--num-layers", str(n),
                            "--dtype", "float16", "--format", "bin"], check=True)
        gb = size_of(src) / 1e9
        out = work / "naive.ckpt"
        n_wall, n_rss = timed(f"{py} {script} {src} {out}")
        out.unlink()
        shutil.rmtree(work / "ours", ignore_errors=True)
        o_wall, o_rss = timed(f"{cli} hf2ms {src} {work}/ours --quiet")
        shutil.rmtree(work / "ours")
        print(f"| {n} | {gb:.2f} GB | {n_wall:.1f} s | {n_rss:.0f} MB | {n_rss / 1e3 / gb:.2f} | {o_wall:.1f} s "
              f"| {o_rss:.0f} MB |", flush=True)
        shutil.rmtree(src)


if __name__ == "__main__":
    main()
