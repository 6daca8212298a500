"""`glm2-convert to-gguf` at the real ChatGLM2-6B shapes (12.5 GB fp16): time and peak RSS of each --dtype against
`cp -r` of the same source, then the f16 file read back into a MindSpore folder (GGUF in) and compared.

    python benchmarks/gguf_6b.py [--workdir bench-work] [--layers 28] [--dtypes float16,q8_0,q4_0]

Each step runs in its own process under /usr/bin/time -v, page cache dropped before it when allowed (root), `sync`
inside the timed command. Needs about 40 GB of free disk at the full size.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from measure import drop_caches, print_machine, size_of, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--dtypes", default="float16,q8_0,q4_0")
    args = ap.parse_args()
    work, cli = args.workdir, f"{sys.executable} -m converters"
    work.mkdir(parents=True, exist_ok=True)
    print_machine()
    print(f"page cache dropped before each step: {drop_caches()}")
    src = work / "hf-6b-safetensors"
    if not src.exists():
        subprocess.run([*cli.split(), "synth", str(src), "--preset", "6b", "--num-layers", str(args.layers),
                        "--dtype", "float16", "--format", "safetensors"], check=True)
    gb = size_of(src) / 1e9
    copy = work / "cp-copy"
    shutil.rmtree(copy, ignore_errors=True)
    cp_wall, _ = timed(f"cp -r {src} {copy}")
    shutil.rmtree(copy)
    print(f"source {gb:.2f} GB; cp -r {cp_wall:.1f} s", flush=True)
    print("\n| --dtype | GGUF size | to-gguf wall | ratio to cp -r | peak RSS |\n|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        out = work / f"6b-{dtype}.gguf"
        out.unlink(missing_ok=True)
        wall, rss = timed(f"{cli} to-gguf {src} {out} --dtype {dtype} --quiet")
        print(f"| {dtype} | {out.stat().st_size / 1e9:.2f} GB | {wall:.1f} s | {wall / cp_wall:.2f}x | {rss:.0f} MB |",
              flush=True)
        if dtype != "float16":
            out.unlink()
    f16 = work / "6b-float16.gguf"
    if f16.exists():
        back = work / "ms-from-gguf"
        shutil.rmtree(back, ignore_errors=True)
        wall, rss = timed(f"{cli} hf2ms {f16} {back} --quiet")
        verdict = subprocess.run([*cli.split(), "verify", str(src), str(back)], capture_output=True, text=True)
        print(f"\nGGUF in: hf2ms of the f16 file {wall:.1f} s, peak RSS {rss:.0f} MB; verify: {verdict.stdout.strip()}")
        shutil.rmtree(back)
        f16.unlink()


if __name__ == "__main__":
    main()
