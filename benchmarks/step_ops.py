"""Where a decoding step's time goes, native operator by native operator, on one model file.

    python benchmarks/step_ops.py MODEL [--activations float32|q8_0] [--prompt 20] [--new 40]
                                        [--run stacked|layers|steps] [--alternate RUN] [--threads 2]

Each native operator of the runtime (glm2_ms.model's NATIVE_OPS, the projections' LinearQ8/Linear, the embedding
lookups) is wrapped in a wall-clock timer. A generation runs once to warm up, then again, its `--new` decoding steps
timed (not the prompt's pass): printed are the step's mean, and per operator its calls, its milliseconds per token
and its microseconds per call. What no operator accounts for is Python and MindSpore around them. `--run` says
how a model whose layers run natively runs them: all in one operator (stacked, the runtime's way), one operator a
layer (layers), or each layer as its steps, one operator each (steps: attention, norms, SwiGLU, the four
projections); runs side by side say what each fusion saves. Operators run synchronously on the CPU, so a call's
wall time is its work. `--alternate RUN` times no operator: one generation's steps alternate between `--run` and
RUN, and the two medians and the median ratio of adjacent steps are printed (a comparison a noisy machine's drift
between processes does not blur).
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np
from measure import print_machine, set_ms_threads

RUNS = {"stacked": "all layers in one operator", "layers": "each layer one operator",
        "steps": "each layer as its steps"}


def timed(name: str, op, spent: collections.Counter, calls: collections.Counter):
    def call(*args):
        start = time.perf_counter()
        out = op(*args)
        spent[name] += time.perf_counter() - start
        calls[name] += 1
        return out
    return call


def wrap_operators(spent: collections.Counter, calls: collections.Counter) -> None:
    """Every native operator the model will call, timed (the module globals its cells read at each call)."""
    from glm2_ms import model as glm2_model

    for name, op in list(glm2_model.NATIVE_OPS.items()):
        if op is not None:
            glm2_model.NATIVE_OPS[name] = timed(name, op, spent, calls)
    for name in ("NATIVE_LINEAR", "NATIVE_LINEAR_Q8"):
        op = getattr(glm2_model, name)
        if op is not None:
            setattr(glm2_model, name, timed("LinearQ8" if name.endswith("Q8") else "Linear", op, spent, calls))
    for kind, op in list(glm2_model.NATIVE_EMBEDDING.items()):
        glm2_model.NATIVE_EMBEDDING[kind] = timed("Embed", op, spent, calls)


def runs_of(model):
    """A function that makes `model` run its layers as RUNS names (as far as they run natively when loaded)."""
    from glm2_ms.model import Block

    encoder = model.transformer.encoder
    blocks = [cell for _, cell in model.cells_and_names() if isinstance(cell, Block)]
    stacked, whole = encoder.native, [b.native for b in blocks]

    def run(name: str) -> None:
        encoder.native = stacked and name == "stacked"
        for block, native in zip(blocks, whole, strict=True):
            block.native = native and name != "steps"
    return run


def per_operator(dec, prompt, args) -> None:
    spent, calls = collections.Counter(), collections.Counter()
    wrap_operators(spent, calls)
    list(dec.stream(prompt, max_new_tokens=4, eos_token_id=-1))
    for i, _ in enumerate(dec.stream(prompt, max_new_tokens=args.new + 1, eos_token_id=-1)):
        if i == 0:  # the prompt's pass and its first token: not a decoding step
            spent.clear(), calls.clear()
    steps = dec.timings["decode_s"]
    per_token = {name: s / args.new for name, s in spent.items()}
    print(f"\n{args.model.name}: {RUNS[args.run]}; "
          f"prompt {args.prompt} tokens, {args.new} new; decoding step {np.mean(steps) * 1e3:.1f} ms "
          f"(the prompt and its first token: {dec.timings['prefill_s'] * 1e3:.0f} ms)\n")
    print("| operator | calls per token | ms per token | µs per call |")
    print("|---|---|---|---|")
    for name, seconds in sorted(per_token.items(), key=lambda kv: -kv[1]):
        each = spent[name] / calls[name]
        print(f"| {name} | {calls[name] / args.new:.1f} | {seconds * 1e3:.2f} | {each * 1e6:.0f} |")
    print(f"| (all of them) | | {sum(per_token.values()) * 1e3:.2f} | |")


def alternated(dec, prompt, run, args) -> None:
    """Steps of one generation alternately in `args.run` and `args.alternate` (the step after token i: the first
    when i is even)."""
    list(dec.stream(prompt, max_new_tokens=4, eos_token_id=-1))
    for i, _ in enumerate(dec.stream(prompt, max_new_tokens=args.new + 1, eos_token_id=-1)):
        run(args.run if i % 2 == 0 else args.alternate)
    steps = np.array(dec.timings["decode_s"]) * 1e3
    one, other = steps[0::2], steps[1::2]
    pairs = min(len(one), len(other))
    print(f"\n{args.model.name}: prompt {args.prompt} tokens, {args.new} steps alternating; median step: "
          f"{RUNS[args.run]} {np.median(one):.1f} ms, {RUNS[args.alternate]} {np.median(other):.1f} ms; "
          f"median ratio of adjacent steps {np.median(one[:pairs] / other[:pairs]):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--activations", choices=("float32", "q8_0"), default="q8_0")
    ap.add_argument("--prompt", type=int, default=20)
    ap.add_argument("--new", type=int, default=40)
    ap.add_argument("--run", choices=RUNS, default="stacked", help="how the layers run (native models)")
    ap.add_argument("--alternate", choices=RUNS, help="alternate the steps with this run, timing no operator")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_ms_threads(args.threads)
    print_machine(args.threads)
    from glm2_ms.api import from_pretrained
    from glm2_ms.generation import Decoder

    model = from_pretrained(args.model, compute_dtype="float32", activations=args.activations)
    run = runs_of(model)
    run(args.run)
    dec = Decoder(model, jit=False)  # (timed wrappers do not compile)
    prompt = np.array([np.arange(args.prompt) % 60000 + 1000], np.int32)
    if args.alternate:
        alternated(dec, prompt, run, args)
    else:
        per_operator(dec, prompt, args)


if __name__ == "__main__":
    main()
