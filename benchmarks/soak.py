"""Memory of a long run: `Decoder.generate` over many prompts of distinct lengths, RSS sampled after each.

    python benchmarks/soak.py --out soak.json [--layers 2] [--prompts 300] [--first-length 12] [--new-tokens 2]
                              [--order increasing|shuffled] [--dtype float16] [--warmup 30]
                              [--per-length] [--stop-above GIB] [--op-by-op] [--speed 20,70,130]
    python benchmarks/soak.py --out eval.json --watch PREDICTIONS_FILE -- glm2-eval MODEL --data dev.json ...
    python benchmarks/soak.py --out soak-rss.png --plot before.json after.json ...

A model of ChatGLM2-6B's widths (hidden 4096, ffn 13696, 32 heads, 2 kv groups, vocab 65024) with --layers
layers and random weights, built in this process (no checkpoint on disk). Prompt i has --first-length + i random
tokens (--order: as they come, or shuffled with a fixed seed). Each prompt's row in --out: its index, length,
prefill seconds, the process's RSS (VmRSS) after it and MindSpore's count of compiled graphs. Prints RSS at the
start (after building the model), after --warmup prompts and at the end, and the growth after warm-up.

--per-length compiles a prefill graph per prompt length (the toolkit before open shapes, `Decoder`); --op-by-op
runs the prompts op by op (as above 1B parameters) at any size; --stop-above ends the soak once RSS passes that
many GiB. --speed: instead of the soak, the prefill time at those lengths with a graph of the prompt's own shape
and with the open graph: a first call of each (compiling what it needs), then the median of 5 calls, the two
alternating and their order reversed every other round; and whether their greedy tokens agree.
--watch: instead, run the command after `--` and sample its RSS every second beside the number of lines in
PREDICTIONS_FILE (glm2-eval's predictions.jsonl, a line per example). --plot: instead, draw RSS against the
prompt index of earlier --out files into --out.

Run it in a scratch folder: MindSpore writes rank_*/ and kernel_meta/ into the working directory.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import mindspore as ms  # noqa: TID253
import numpy as np

from glm2_core.config import GLM2Config
from glm2_ms.generation import Decoder
from glm2_ms.model import GLM2Network

DTYPES = {"float16": (ms.float16, np.float16), "float32": (ms.float32, np.float32)}


def memory_gib(pid: str = "self") -> dict:
    """A process's resident memory, GiB: all of it (VmRSS) and its anonymous and file-backed parts (RssAnon,
    RssFile), which tell memory the process allocated from libraries and files mapped in."""
    fields = {"VmRSS:": "rss_gib", "RssAnon:": "anon_gib", "RssFile:": "file_gib"}
    words = (line.split() for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    out = {fields[w[0]]: int(w[1]) / 2**20 for w in words if w and w[0] in fields}
    if "rss_gib" not in out:
        raise RuntimeError(f"no VmRSS in /proc/{pid}/status")
    return out


def rss_gib(pid: str = "self") -> float:
    """A process's resident memory (VmRSS), GiB."""
    return memory_gib(pid)["rss_gib"]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def compiled_graphs() -> int:
    """How many graphs MindSpore's jit has compiled in this process (and keeps)."""
    from mindspore.graph.api import ms_compile_cache

    return len(ms_compile_cache)


def random_model(layers: int, dtype: str, seed: int = 0) -> GLM2Network:
    """The 6B widths with `layers` layers and random weights, one parameter in flight at a time."""
    ms_dtype, np_dtype = DTYPES[dtype]
    model = GLM2Network(GLM2Config.preset("6b", num_layers=layers), ms_dtype)
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        if p.name.endswith("layernorm.weight"):
            values = np.ones(p.shape, np_dtype)
        else:
            values = (rng.standard_normal(p.shape, np.float32) * 0.02).astype(np_dtype)
        p.set_data(ms.Tensor(values))
        del values
    model.set_train(False)
    return model


def lengths(first: int, count: int, order: str, seed: int = 0) -> list[int]:
    """`count` distinct prompt lengths from `first`, increasing or shuffled."""
    out = list(range(first, first + count))
    if order == "shuffled":
        np.random.default_rng(seed).shuffle(out)
    return out


def soak(decoder: Decoder, prompt_lengths: list[int], new_tokens: int, stop_above: float, seed: int = 0) -> list[dict]:
    """One greedy generation per length; a row per prompt with its RSS after it."""
    rng = np.random.default_rng(seed)
    vocab = decoder.model.config.padded_vocab_size
    rows = []
    for i, n in enumerate(prompt_lengths):
        ids = rng.integers(3, vocab, (1, n), dtype=np.int32)
        clock = time.perf_counter()
        decoder.generate(ids, max_new_tokens=new_tokens, eos_token_id=-1)
        rows.append({"index": i, "length": n, "prefill_s": decoder.timings["prefill_s"],
                     "total_s": time.perf_counter() - clock, **memory_gib(), "graphs": compiled_graphs()})
        print(json.dumps(rows[-1]), flush=True)
        if rows[-1]["rss_gib"] > stop_above:
            print(f"stopped: RSS above {stop_above} GiB", flush=True)
            break
    return rows


def prefill_seconds(decoders: list[Decoder], n: int, repeats: int = 5) -> tuple[list[float], list[float], bool]:
    """Each decoder's prefill time of one prompt of `n` tokens: its first call (compiling the shapes it needs) and
    the median of `repeats` calls after it, the decoders alternating (in reverse order every other round); and
    whether they chose the same greedy tokens."""
    ids = np.random.default_rng(n).integers(3, decoders[0].model.config.padded_vocab_size, (1, n), dtype=np.int32)
    times, tokens = [[] for _ in decoders], [[] for _ in decoders]
    for r in range(repeats + 1):
        for i in range(len(decoders)) if r % 2 == 0 else reversed(range(len(decoders))):
            tokens[i].append(decoders[i].generate(ids, max_new_tokens=2, eos_token_id=-1))
            times[i].append(decoders[i].timings["prefill_s"])
    same = all(np.array_equal(a, tokens[0][0]) for run in tokens for a in run)
    return [t[0] for t in times], [float(np.median(t[1:])) for t in times], same


def speed(model: GLM2Network, prompt_lengths: list[int]) -> list[dict]:
    """Prefill seconds at each length: with a graph of its own shape and with the open graph; their ratio."""
    decoders = [Decoder(model, open_shapes=False), Decoder(model)]
    rows = []
    for n in prompt_lengths:
        first, (own, open_), same = prefill_seconds(decoders, n)
        rows.append({"length": n, "own_first_s": first[0], "open_first_s": first[1], "own_s": own, "open_s": open_,
                     "ratio": open_ / own, "same_tokens": same})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def watch(command: list[str], predictions: Path) -> list[dict]:
    """Run `command`; a row per second with the predictions written so far and its RSS."""
    rows, clock = [], time.perf_counter()
    with subprocess.Popen(command) as proc:
        while proc.poll() is None:
            done = len(predictions.read_text().splitlines()) if predictions.is_file() else 0
            try:
                rows.append({"seconds": time.perf_counter() - clock, "index": done, **memory_gib(proc.pid)})
            except (FileNotFoundError, RuntimeError):  # it has just ended
                break
            time.sleep(1)
    if proc.returncode:
        raise SystemExit(f"{command[0]} failed (exit {proc.returncode})")
    return rows


def summary(rows: list[dict], start: float, warmup: int) -> dict:
    """RSS at the start, after warm-up and at the end; growth after warm-up in % of the warmed-up RSS."""
    warm, end = rows[warmup - 1]["rss_gib"], rows[-1]["rss_gib"]
    return {"rss_start_gib": start, "rss_after_warmup_gib": warm, "rss_end_gib": end,
            "rss_max_gib": max(r["rss_gib"] for r in rows), "growth_after_warmup_pct": 100 * (end - warm) / warm,
            "graphs_end": rows[-1]["graphs"], "seconds": sum(r["total_s"] for r in rows)}


def plot(files: list[Path], out: Path) -> None:
    """RSS against prompt index, a line per result file (labelled by its name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for f in files:
        rows = json.loads(f.read_text())["rows"]
        ax.plot([r["index"] for r in rows], [r["rss_gib"] for r in rows], label=f.stem)
    ax.set(xlabel="prompt index", ylabel="RSS (GiB)", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--first-length", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=2)
    ap.add_argument("--order", choices=("increasing", "shuffled"), default="increasing")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float16")
    ap.add_argument("--warmup", type=int, default=30, help="prompts before the growth is counted")
    ap.add_argument("--per-length", action="store_true", help="compile a prefill graph per prompt length")
    ap.add_argument("--stop-above", type=float, default=16.0, help="GiB of RSS that end the soak")
    ap.add_argument("--op-by-op", action="store_true", help="run prompts op by op, as a large model does")
    ap.add_argument("--speed", help="comma-separated prompt lengths: measure prefill time instead of soaking")
    ap.add_argument("--watch", type=Path, help="sample the command after -- (its predictions file given)")
    ap.add_argument("command", nargs="*", help="with --watch: the command to run")
    ap.add_argument("--plot", type=Path, nargs="+", help="result files to draw into --out")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot, args.out)
    if args.watch:
        result = {"machine": cpu_model(), "command": args.command, "rows": watch(args.command, args.watch)}
        args.out.write_text(json.dumps(result, indent=1))
        return
    ms.set_device("CPU")
    clock = time.perf_counter()
    model = random_model(args.layers, args.dtype)
    start = rss_gib()
    print(f"model built in {time.perf_counter() - clock:.0f} s, RSS {start:.2f} GiB", flush=True)
    result = {"machine": cpu_model(), "args": {k: str(v) for k, v in vars(args).items()}}
    if args.speed:
        result["speed"] = speed(model, [int(n) for n in args.speed.split(",")])
    else:
        decoder = Decoder(model, open_shapes=not args.per_length)
        if args.op_by_op:
            decoder.prefill_step = decoder.step
        print(f"prompts {'compiled' if decoder.compiled_prefill else 'op by op'}", flush=True)
        rows = soak(decoder, lengths(args.first_length, args.prompts, args.order), args.new_tokens, args.stop_above)
        result.update(summary=summary(rows, start, args.warmup), rows=rows)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result.get("summary", result.get("speed")), indent=1))


if __name__ == "__main__":
    main()
