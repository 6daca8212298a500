"""Layer-streamed parity: each side runs its own real layers one at a time, with only that layer's weights in
memory, read straight from its checkpoint (the converters' `Source.stream`, as the runtime loads).

Every prompt goes through a stage before the next stage's weights are read (layer-major), so each checkpoint is
read once: the embedding, then each block, then the final norm and the output layer. A side is an object with
`stages()` and `load(stage, prompts)` → a function of one prompt's state returning (next state, records) — for
the head, of every prompt's state, returning each one's records and seconds; the records are the (stage name,
[seq, hidden] array) pairs a whole-model `trace` gives, so the comparison is the same.

The two stages whose size is the vocabulary's stay small too, with the same numbers: the embedding holds the rows
the prompts look up (`used_rows`), the output layer is read from its file and run a slice of rows at a time
(`Rows`, `logits_by_slice`).
"""
from __future__ import annotations

import dataclasses
import gc
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from converters.source import Source, apply_dtype, out_dtype
from glm2_core.dtypes import weights_for
from glm2_core.names import EMBEDDING, FINAL_NORM, INPUT_NORM, OUTPUT, Layout, prefix_of
from glm2_core.quants import KINDS
from glm2_ms import model as m
from glm2_ms.loading import MS_DTYPES, RUNTIME_LAYOUT, block_plan, hold_blocks, load_into, quantized, use_cpu

_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.")
EMBED, HEAD = "embedding", "head"  # the stages around the layers (numbered 0..n-1)
HEAD_BYTES = 256 * 2**20  # float32 bytes of the output layer computed at once
HEAD_ROWS = 1024  # slices of whole multiples of these rows: MindSpore's CPU MatMul rounds some other widths (5,000)
#                   differently from the whole layer; multiples of 64 measured equal to it at hidden 64 and 4096


def stage_of(canonical: str):
    """The stage a canonical weight belongs to: the embedding, a layer's number, or the head."""
    if canonical == EMBEDDING:
        return EMBED
    layer = _LAYER.match(canonical)
    return int(layer.group(1)) if layer else HEAD


class LayerWeights:
    """A checkpoint read stage by stage, in `layout`'s names, its weights in the dtype a runtime computing in
    `compute` keeps them in (`weights_for`: as stored for float32 arithmetic, which casts them where used)."""

    def __init__(self, path: Path, layout: Layout, compute: str, release: str | None = None,
                 blocks: bool = False):
        """`blocks`: the weights the source stores in llama.cpp's blocks come as those blocks, where the runtime
        holds them so (`glm2_ms.loading.block_plan`)."""
        self.src = Source.open(path, release=release)
        self.dtype = weights_for(compute) or self.src.dtype
        try:
            groups, _ = self.src.groups(layout)
            self.blocks = block_plan(self.src, groups, None) if blocks else {}
            self.by_stage: dict = {}
            for g in groups:
                self.by_stage.setdefault(stage_of(g.source.canonical), []).append(g)
        except BaseException:
            self.src.close()
            raise

    @property
    def cfg(self):
        return self.src.cfg

    def stages(self) -> list:
        return [EMBED, *range(self.cfg.num_layers), HEAD]

    def read(self, stage) -> dict[str, tuple[np.ndarray, str] | Rows]:
        """{name: (array, dtype)} of one stage's weights; the output layer as `Rows`, where its format reads rows
        alone (a ChatGLM2-6B output layer is 0.5 GB in float16, GLM-4-9B's 1.24 GB)."""
        groups = self.by_stage[stage]
        lazy = {name: rows for g in groups if g.source.canonical == OUTPUT and (name := g.dst()[0][0]) not in
                self.blocks and (rows := self._rows(g))}
        eager = [g for g in groups if g.dst()[0][0] not in lazy]
        return {name: (arr, dt) for name, arr, dt in self.src.stream(eager, self.dtype, blocks=self.blocks)} | lazy

    def _rows(self, group) -> Rows | None:
        ref = self.src.as_stored(group)
        if ref is None or ref.rows is None:
            return None
        dtype = out_dtype(ref.dtype, self.dtype)
        return Rows(ref.shape[0], dtype, lambda a, b: apply_dtype(ref.rows(a, b), ref.name, ref.dtype, dtype, False))

    def check(self) -> None:
        """After the last stage: the whole-file checksums (of every byte read, and of what nobody read)."""
        self.src.ckpt.check_complete()

    def close(self) -> None:
        self.src.close()


def of(arrays: dict, prefix: str) -> dict[str, tuple[np.ndarray, str]]:
    """The arrays under `prefix`, named relative to it."""
    return {name[len(prefix):]: a for name, a in arrays.items() if name.startswith(prefix)}


def used_rows(prompts: list[list[int]]) -> np.ndarray:
    """The vocabulary rows the prompts look up, sorted. A lookup reads nothing else, so each side's own embedding
    runs on these rows (`lookup` renumbers the ids), not on a table of 65,024 or 151,552 rows."""
    return np.unique(np.concatenate([np.asarray(p, np.int64) for p in prompts]))


def rows_of(arrays: dict, rows: np.ndarray) -> dict:
    return {name: (arr[rows], dt) for name, (arr, dt) in arrays.items()}


def lookup(rows: np.ndarray, ids: list[int]) -> np.ndarray:
    """`ids` as indices into `used_rows`."""
    return np.searchsorted(rows, ids)


@dataclasses.dataclass(frozen=True)
class Rows:
    """A weight whose rows are read from its file a slice at a time: `read(a, b)` gives rows [a, b) in `dtype`."""
    count: int
    dtype: str
    read: Callable[[int, int], np.ndarray]


def logits_by_slice(output: dict, hidden_size: int, hiddens: list, build, apply) -> tuple[list, list[float]]:
    """The logits [seq, vocab] of each of `hiddens` under an output layer ({name: [vocab, hidden] `Rows` or (array,
    dtype)}), from slices of its rows of at most HEAD_BYTES in float32; also each one's seconds. `build(slice
    weights, rows)` gives a side's own output layer of that many rows, filled; `apply(layer, hidden)` its [seq,
    rows] logits. Each logit is the same dot product; what is not held at once is the layer (0.5 GB and its 1 GB
    float32 cast at ChatGLM2-6B, 1.24 GB and 2.5 GB at GLM-4-9B). Slices are the outer loop: each is read and
    filled once for every prompt (and MindSpore's op cache, which keeps the inputs of its last call per shape,
    holds one slice, not one per prompt length)."""
    (name, weight), = output.items()
    rows = weight if isinstance(weight, Rows) else Rows(len(weight[0]), weight[1], lambda a, b: weight[0][a:b])
    step = max(1, HEAD_BYTES // (4 * hidden_size * HEAD_ROWS)) * HEAD_ROWS
    parts: list[list] = [[] for _ in hiddens]
    seconds = [0.0] * len(hiddens)
    for a in range(0, rows.count, step):
        b = min(a + step, rows.count)
        layer = build({name: (rows.read(a, b), rows.dtype)}, b - a)
        for k, hidden in enumerate(hiddens):
            t = time.perf_counter()
            parts[k].append(apply(layer, hidden))
            seconds[k] += time.perf_counter() - t
        del layer
        gc.collect()  # the slice's layer (cells and modules hold reference cycles) before the next slice's
    return [np.concatenate(p, -1) for p in parts], seconds


def layer_major(side, prompts: list[list[int]]) -> tuple[list[list[tuple[str, np.ndarray]]], list[float]]:
    """Every prompt's records through every stage of `side`, one stage's weights at a time; also each prompt's
    compute seconds (reading excluded). The objects alive before the first stage (the libraries' modules) are
    frozen out of the collector meanwhile: each stage's collection then walks only what the stages made, not the
    libraries' objects, two collections per layer and side."""
    records: list[list] = [[] for _ in prompts]
    seconds = [0.0] * len(prompts)
    states: list = list(prompts)
    gc.collect()
    gc.freeze()
    try:
        for stage in side.stages():
            run = side.load(stage, prompts)
            if stage == HEAD:  # every prompt at once: the output layer is read a slice at a time for all of them
                got, spent = run(states)
                for k in range(len(prompts)):
                    records[k] += got[k]
                    seconds[k] += spent[k]
            else:
                for k, state in enumerate(states):
                    t = time.perf_counter()
                    states[k], got = run(state)
                    seconds[k] += time.perf_counter() - t
                    records[k] += got
            del run
            gc.collect()  # this stage's weights (cells and modules hold reference cycles) before the next stage's
        side.weights.check()
    finally:
        gc.unfreeze()
        side.close()
    return records, seconds


class MindSporeLayers:
    """The runtime's own cells (glm2_ms/model.py: Embedding, Block, RMSNorm, the output Linear) and its own mask
    and RoPE tables, one stage's cells built and filled at a time. As in the whole model, the cells keep their
    weights in `LayerWeights.dtype` and compute in `dtype`, casting each weight where it is used."""

    def __init__(self, ms_dir: Path, dtype: str, release: str | None = None, quantize: str | None = None,
                 activations: str = "float32"):
        """`quantize`: the weight matrices quantized as `from_pretrained(…, quantize=…)` holds them; `activations`:
        what those in blocks multiply with, as `from_pretrained(…, activations=…)`."""
        import mindspore as ms

        use_cpu()
        self.quantize, self.activations = quantize, activations
        self.weights = LayerWeights(ms_dir, RUNTIME_LAYOUT, dtype, release, blocks=quantize is None)
        self.prefix = {"embedding": prefix_of(RUNTIME_LAYOUT, EMBEDDING, "embedding_weight"),
                       "block": prefix_of(RUNTIME_LAYOUT, INPUT_NORM, "input_layernorm.weight"),
                       "norm": prefix_of(RUNTIME_LAYOUT, FINAL_NORM), "output": prefix_of(RUNTIME_LAYOUT, OUTPUT)}
        self.ms, self.dtype, self.storage = ms, MS_DTYPES[dtype], MS_DTYPES[self.weights.dtype]
        self.cfg = self.weights.cfg
        self.stages, self.close = self.weights.stages, self.weights.close

    def _filled(self, cell, arrays: dict, output: bool = False):
        if self.quantize:
            arrays = quantized(cell, arrays, self.quantize, output)
        else:  # the blocks a source stores, as the whole model holds them
            hold_blocks(cell, {name: kind for name, (_, kind) in arrays.items() if kind in KINDS})
        load_into(cell, ((name, arr, dt) for name, (arr, dt) in arrays.items()))
        m.quantize_activations(cell, self.activations)
        return cell

    def _rows(self, t) -> np.ndarray:
        return t.asnumpy().astype(np.float32).reshape(t.shape[-2], -1)

    def load(self, stage, prompts):
        ms, cfg, dtype, storage, arrays = self.ms, self.cfg, self.dtype, self.storage, self.weights.read(stage)
        if stage == EMBED:
            rows = used_rows(prompts)
            embedding = self._filled(m.Embedding(dataclasses.replace(cfg, padded_vocab_size=len(rows)), storage),
                                     rows_of(of(arrays, self.prefix["embedding"]), rows))
            inv_freq = ms.Tensor(cfg.rope_inv_freq(), ms.float32)

            def start(ids):
                x = ms.Tensor([ids], ms.int32)
                mask, positions = m.mask_and_positions(x)
                cos, sin = m.rope_tables(positions, inv_freq, dtype)
                return (embedding(ms.Tensor([lookup(rows, ids)], ms.int32)).astype(dtype), cos, sin, mask), []
            return start
        if stage == HEAD:
            norm = self._filled(m.RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon, storage),
                                of(arrays, self.prefix["norm"]))

            def head(states):
                hiddens = [norm(state[0]) for state in states]
                logits, seconds = logits_by_slice(
                    of(arrays, self.prefix["output"]), cfg.hidden_size, hiddens,
                    lambda weights, rows: self._filled(m.Linear(cfg.hidden_size, rows, False, storage), weights,
                                                       output=True),
                    lambda layer, hidden: self._rows(layer(hidden).astype(ms.float32)))
                return [[("final norm", self._rows(h)), ("logits", x)]
                        for h, x in zip(hiddens, logits, strict=True)], seconds
            return head
        block = self._filled(m.Block(cfg, storage), of(arrays, self.prefix["block"].format(stage)))

        def layer(state):
            x, *context = state
            got = []
            block.record = lambda name, y: got.append((f"layer {stage} {name}", self._rows(y)))
            x, _ = block(x, *context)
            return (x, *context), got
        return layer
