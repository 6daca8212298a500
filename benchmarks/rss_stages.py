"""Where a generation's resident memory comes from, stage by stage, on one model file.

    python benchmarks/rss_stages.py MODEL [--activations float32|q8_0] [--prompt 200] [--new 8] [--op-by-op]
                                         [--threads 2]

Printed after each stage (importing the runtime, loading, the prompt and first token, the second token — the
first decoding step, where the step compiles —, the rest, and glibc's malloc_trim): resident MiB, anonymous and
file-backed, and the mappings that grew by 5 MiB or more ([heap]: the C heap; the model file: its pages the
arithmetic has read). `--op-by-op` runs the decoding step without compiling it. The peak (VmHWM) closes the list,
with the step's median seconds.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import statistics
from pathlib import Path

import numpy as np
from measure import set_ms_threads


def mappings() -> collections.Counter:
    """Resident MiB of each mapping of this process, by the file it maps ([heap], [anon] for the rest)."""
    out, name = collections.Counter(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if ":" not in head[0] and "-" in head[0]:
            name = Path(head[5]).name if len(head) > 5 else "[anon]"
        elif head[0] == "Rss:":
            out[name] += int(head[1]) / 1024
    return out


def status() -> dict:
    fields = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(line.split()[1]) // 1024 for line in lines for k in fields if line.startswith(k + ":")}


class Stages:
    def __init__(self):
        self.before = mappings()

    def mark(self, stage: str) -> None:
        now = mappings()
        grew = {k: round(now[k] - self.before[k]) for k in now if abs(now[k] - self.before[k]) >= 5}
        s = status()
        print(f"| {stage} | {s['VmRSS']} | {s['RssAnon']} | {s['RssFile']} | "
              f"{', '.join(f'{k} {v:+d}' for k, v in grew.items()) or '-'} |", flush=True)
        self.before = now


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--activations", default="float32")
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--op-by-op", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_ms_threads(args.threads)
    print("| stage | RSS MiB | anonymous | file-backed | mappings that grew (MiB) |\n|---|---|---|---|---|")
    stages = Stages()
    from glm2_ms.api import from_pretrained
    from glm2_ms.generation import Decoder
    stages.mark("import the runtime")
    model = from_pretrained(args.model, compute_dtype="float32", activations=args.activations)
    stages.mark("load")
    dec = Decoder(model, jit=False if args.op_by_op else None)
    prompt = np.random.default_rng(0).integers(100, 60000, (1, args.prompt)).astype(np.int32)
    tokens = dec.stream(prompt, max_new_tokens=args.new, eos_token_id=-1)
    next(tokens)
    stages.mark("prompt, first token")
    next(tokens)
    stages.mark("second token (the step compiles)" if dec.compiled else "second token")
    for _ in tokens:
        pass
    stages.mark("the rest")
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
        stages.mark("malloc_trim(0)")
    steps = dec.timings["decode_s"][1:]
    print(f"\npeak {status()['VmHWM']} MiB; a decoding step's median {statistics.median(steps) * 1e3:.0f} ms over "
          f"{len(steps)} ({'op by op' if not dec.compiled else 'compiled'})")


if __name__ == "__main__":
    main()
