"""Decoding over a static, preallocated KV cache: one jit-compiled step serves every decode step and, up to 1B
parameters, the prefill; a model whose every layer is one native operator runs them op by op instead.

The cache holds each layer's un-expanded k and v ([batch, groups, max_len, d]). Rows are left-padded, so the
new tokens of every row go to the same cache slots; a row's padding slots are masked out and its position ids
start at 0 on its first real token, as in the original ChatGLM2. Whole-layer operators write the new tokens into
the cache in place, so a step holds it once.
"""
from __future__ import annotations

import ctypes
import functools
import operator
import time
from collections.abc import Iterator

import mindspore as ms
import numpy as np
import psutil
from mindspore import Tensor, nn

from glm2_core.config import GLM2Config
from glm2_core.errors import UserError

from .kernels import native_addresses, why_not
from .loading import fits_in_memory
from .model import MASKED, GLM2Network, linears, runs_as_layers, runs_natively
from .sampling import DEFAULT_NEW_TOKENS, SamplingConfig, choose

CACHE_BUCKET = 64  # cache lengths are rounded up to this, so calls of similar length share a compiled step
PREFILL_COMPILED_UP_TO = 10**9  # parameters; a larger model runs its prompts op by op (see Decoder)
CACHE_MEMORY_SHARE = 0.8  # of the memory available: the rest is left to the logits, the step and what runs beside


def cache_length(tokens: int) -> int:
    """The cache length for `tokens` positions: rounded up to CACHE_BUCKET."""
    return -(-tokens // CACHE_BUCKET) * CACHE_BUCKET


def cache_bytes(cfg: GLM2Config, rows: int, positions: int, itemsize: int) -> int:
    """The KV cache of `rows` sequences over `positions` slots: every layer's k and v over the kv groups."""
    return cfg.num_layers * 2 * cfg.multi_query_group_num * cfg.kv_channels * rows * positions * itemsize


def generation_bytes(cfg: GLM2Config, rows: int, prompt: int, positions: int, itemsize: int) -> int:
    """What a generation allocates by its length, at most: the cache twice (a step of separate operators takes the
    caches in and gives new ones out; whole-layer operators write it in place) and the prefill's float32 mask
    [rows, prompt, cache length]."""
    length = cache_length(positions)
    return 2 * cache_bytes(cfg, rows, length, itemsize) + rows * prompt * length * 4


def check_budget(cfg: GLM2Config, prompt_tokens: int, max_new_tokens, rows: int = 1, itemsize: int = 4,
                 option: str = "max_new_tokens", rows_option: str | None = None, memory: bool = True) -> int:
    """The one bound on a generation, checked by every path (API, CLIs, evaluation, parity) before its cache is
    allocated: at least one new token, the prompt and the new tokens within the model's context (its config's
    seq_length), and (`memory`) the cache within the memory available. A cache sized by a huge --max-new-tokens
    was allocated whole and brought the OOM killer. Returns max_new_tokens; a refusal names `option`."""
    try:
        new = operator.index(max_new_tokens)
    except TypeError:
        raise UserError(f"{option} must be a whole number, got {max_new_tokens!r:.40}") from None
    if new < 1:
        raise UserError(f"{option} must be at least 1, got {new}")
    if prompt_tokens + new > cfg.seq_length:
        room = cfg.seq_length - prompt_tokens
        limit = f"at most {room} new tokens fit" if room > 0 else "the prompt alone fills it"
        raise UserError(f"{option} {new}: the prompt's {prompt_tokens} tokens and {new} new ones pass the model's "
                        f"context of {cfg.seq_length} tokens (seq_length in its config.json); {limit}")
    if memory:
        _check_memory(cfg, rows, prompt_tokens, new, itemsize, option, rows_option)
    return new


def _check_memory(cfg: GLM2Config, rows: int, prompt: int, new: int, itemsize: int, option: str,
                  rows_option: str | None) -> None:
    need = generation_bytes(cfg, rows, prompt, prompt + new, itemsize)
    available = psutil.virtual_memory().available
    if need <= CACHE_MEMORY_SHARE * available:
        return
    fewer = f"lower {option}" + (f" or {rows_option}" if rows_option and rows > 1 else "")
    raise UserError(f"{option} {new}: the KV cache of {rows} row{'s' * (rows != 1)} × {prompt + new} positions "
                    f"needs {_gib(need)} (held twice while a step runs, at most), more than "
                    f"{CACHE_MEMORY_SHARE:.0%} of the {_gib(available)} of memory available; {fewer}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def cache_inputs(s: int, valid: np.ndarray, start) -> tuple[np.ndarray, np.ndarray]:
    """The additive mask [b, s, max_len] and the one-hot slot map [b, s, max_len] for s new tokens of each row at
    `start` (one slot for every row, or [b] slots: a row < 0 writes nothing and attends to its valid slots)."""
    b, length = valid.shape
    slots = np.asarray(start).reshape(-1, 1) + np.arange(s)  # [1 or b, s]
    allowed = (np.arange(length) <= slots[..., None]) & valid[:, None, :].astype(bool)
    write = np.zeros((b, s, length), np.float32)
    rows, cols = np.nonzero(np.broadcast_to(slots >= 0, (b, s)))
    write[rows, cols, np.broadcast_to(slots, (b, s))[rows, cols]] = 1
    return np.where(allowed, 0.0, MASKED).astype(np.float32), write


class CachedStep(nn.Cell):
    """Forward of new tokens against the cache: logits of each row's last position, and the updated caches.

    The caches come in and go out flat (k0, v0, k1, v1, …): a jit graph whose input is a tuple of tensors is
    re-specialised on every call on this MindSpore, while flat tensor arguments are not (figures:
    benchmarks/results/2026-12-04-figures-from-the-code.md)."""

    def __init__(self, model: GLM2Network):
        super().__init__()
        self.model = model

    def construct(self, embedded, position_ids, mask, write, *flat):
        caches = tuple((flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2))
        hidden, kvs = self.model.transformer.body(embedded, position_ids, mask, caches, write, last_only=True)
        out = (self.model.transformer.output_layer(hidden[:, -1]).astype(ms.float32),)
        for k, v in kvs:
            out = out + (k, v)
        return out


class PrefillStep(CachedStep):
    """The step compiled once for prompts of every length: its inputs' batch, token and cache-length dimensions are
    left open (`set_inputs`), so one graph serves them all at their own length, with no padding. A graph per input
    shape kept what its nodes produced for as long as it lived (a graph's worth more per prompt length); this one
    allocates per call."""

    OPEN = ((0, 1), (0, 1), (0, 1, 2), (0, 1, 2))  # embedded, position_ids, mask, write; each cache: CACHE_OPEN
    CACHE_OPEN = (0, 2)

    def __init__(self, model: GLM2Network):
        super().__init__(model)
        self.construct = ms.jit(self.construct)
        self.opened = False

    def __call__(self, *args):
        if not self.opened:  # the first call's dtypes and ranks, its varying dimensions opened
            dims = self.OPEN + (self.CACHE_OPEN,) * (len(args) - len(self.OPEN))
            self.set_inputs(*(Tensor(shape=[None if i in open_ else n for i, n in enumerate(a.shape)], dtype=a.dtype)
                              for a, open_ in zip(args, dims, strict=True)))
            self.opened = True
        return super().__call__(*args)


def op_by_op_because(model: GLM2Network) -> str:
    """Why a decoder runs its steps op by op ("" where it compiles them): every layer is one native operator
    (`runs_as_layers`; a step is then a few dozen operators, whose dispatch costs less than the memory the compiler
    keeps for each layer's graph), or the compiled step's copies of the weights would not fit (`compiled_fits`)."""
    if runs_as_layers(model):
        return "each layer one native operator"
    return "" if compiled_fits(model) else "the compiled step's float32 copies of the weights would not fit"


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAPPED_FROM = 1 << 17  # bytes: blocks of this size and larger are mapped from the system and given back when freed


@functools.cache
def give_back_freed_blocks() -> bool:
    """Have glibc map every block of MAPPED_FROM bytes or more and unmap it when freed (its default threshold, held
    fixed); whether it could (not on another C library). glibc otherwise raises the threshold to the largest block
    freed, and a prompt's intermediates, freed, then stay in the C heap for good: memory the weights could use."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MAPPED_FROM))
    except (OSError, AttributeError):
        return False


def compiled_fits(model: GLM2Network) -> bool:
    """Whether the compiled step fits in the memory available. On CPU MindSpore 2.10 a compiled graph keeps what
    its nodes produced for as long as it lives, so the step holds a compute-dtype copy of every weight it casts
    (25 GB beside 12.5 GB of float16 weights at ChatGLM2-6B, unless the native kernel computes without them);
    op by op, one cast is alive at a time."""
    size = Tensor(np.zeros(()), model.compute_dtype).itemsize
    native = {id(c.weight) for c in linears(model) if c.native}
    copies = sum(p.size * size for p in model.get_parameters()
                 if p.dtype != model.compute_dtype and id(p) not in native)
    return fits_in_memory(copies, 0.8)


class Decoder:
    """Holds the compiled steps of one model; `generate` may be called many times. `timings`: the last call's
    prefill (tokens, seconds) and the seconds of each decode step after it.

    Every shape a process runs stays with it: a compiled graph keeps what its nodes produced for as long as it
    lives. So the decoding step is one graph per cache length (CACHE_BUCKET) and the prefill one graph whose
    shapes are left open (`PrefillStep`), every prompt at its own length. Where that graph cannot be used
    (`_prefill_step`), the prompt runs op by op, also at its own length: MindSpore keeps each operator's last
    inputs per shape, which is small now that only the last position reaches the output layer."""

    def __init__(self, model: GLM2Network, jit: bool | None = None, open_shapes: bool = True):
        """`jit`: compile the step (None: unless `op_by_op_because` gives a reason not to). `open_shapes=False`: a
        compiled prefill graph per prompt length instead (the behaviour before, kept for comparisons: each graph
        stays, so memory grows with the lengths met)."""
        self.model, self.timings = model, None
        give_back_freed_blocks()
        self.step = CachedStep(model)  # op by op
        self.op_by_op = op_by_op_because(model) if jit is None else "" if jit else "jit=False"
        self.weights_note = _weights_note(model)
        self.compiled_step = CachedStep(model) if self.compiled else self.step
        if self.compiled:
            self.compiled_step.construct = ms.jit(self.compiled_step.construct)
        self.prefill_step = self._prefill_step(open_shapes)
        self.itemsize = Tensor(np.zeros(()), model.compute_dtype).itemsize  # the cache's
        self.addresses = native_addresses() if runs_as_layers(model) else None  # where caches are written in place

    @property
    def compiled(self) -> bool:
        """Whether the decoding step is compiled (`op_by_op` says why not)."""
        return not self.op_by_op

    @property
    def compiled_prefill(self) -> bool:
        return self.prefill_step is not self.step

    def _prefill_step(self, open_shapes: bool) -> CachedStep:
        """What runs a prompt: the open graph; op by op above PREFILL_COMPILED_UP_TO or where a step runs in
        a native operator (MindSpore 2.10 cannot leave an aot Custom operator's shapes open: "The
        pointer[value] is null" at compile); or, `open_shapes=False`, the compiled step (a graph per length)."""
        model = self.model
        if not self.compiled or sum(p.size for p in model.get_parameters()) > PREFILL_COMPILED_UP_TO:
            return self.step
        if not open_shapes:
            return self.compiled_step
        if runs_natively(model):
            return self.step
        return PrefillStep(model)

    def budget(self, shape: tuple[int, int], max_new_tokens, max_length: int | None = None,
               option: str = "max_new_tokens", rows_option: str | None = None) -> int:
        """The new tokens a call on `shape` ([rows, prompt]) may generate (`max_length`, when given, caps prompt +
        new); a call that does not fit is refused (`check_budget`)."""
        rows, n = shape
        if max_length is not None:
            if max_length <= n:
                raise UserError(f"max_length {max_length} leaves no room for a new token after the prompt's {n}")
            if isinstance(max_new_tokens, (int, np.integer)):
                max_new_tokens = min(max_new_tokens, max_length - n)
        return check_budget(self.model.config, n, max_new_tokens, rows, self.itemsize, option, rows_option)

    def new_cache(self, batch: int, length: int) -> tuple:
        """Zeroed k and v for every layer, flat: (k0, v0, k1, v1, …), each [batch, groups, length, d]. Made from
        host zeros: a Zeros kernel per tensor costs a launch each in PyNative."""
        cfg, dtype = self.model.config, self.model.compute_dtype
        zeros = np.zeros((batch, cfg.multi_query_group_num, length, cfg.kv_channels), np.float32)
        return tuple(Tensor(zeros.copy(), dtype) for _ in range(2 * cfg.num_layers))

    def forward(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, start: int, caches):
        """Run tokens `ids` [b, s] into cache slots start..start+s-1; `valid` [b, max_len] marks usable slots.
        Returns the logits and the caches to give the next call (where whole-layer operators write them in place,
        `caches` themselves, or `writable`'s copies)."""
        mask, write = cache_inputs(ids.shape[1], valid, start)
        if self.addresses is not None:
            caches = self.writable(caches)
        embedded = self.model.transformer.embedding(Tensor(ids, ms.int32))
        step = self.compiled_step if ids.shape[1] == 1 else self.prefill_step
        logits, *caches = step(embedded, Tensor(positions, ms.int32), Tensor(mask),
                               Tensor(write, self.model.compute_dtype), *caches)
        return logits.asnumpy(), tuple(caches)

    def writable(self, caches: tuple) -> tuple:
        """`caches`, each one that the whole-layer operator would be handed as a copy (a view of another tensor, a
        tensor a slice assignment covered whole: MindSpore 2.10 copies those for an operator, and the in-place
        writes would be lost) replaced by a tensor of its own. Checked by the addresses the operator is handed."""
        reached = self._handed_as_they_are(caches)
        if all(reached):
            return caches
        caches = tuple(c if ok else Tensor(c.asnumpy()) for c, ok in zip(caches, reached, strict=True))
        if not all(self._handed_as_they_are(caches)):
            raise RuntimeError("the KV cache would be handed to the layer operator as a copy: its writes would be lost")
        return caches

    def _handed_as_they_are(self, tensors: tuple) -> list[bool]:
        return [at == t.data_ptr() for t, at in zip(tensors, self.addresses(*tensors).asnumpy(), strict=True)]

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 max_new_tokens: int = DEFAULT_NEW_TOKENS, sampling: SamplingConfig | None = None,
                 eos_token_id: int | tuple = 2, pad_token_id: int = 0, max_length: int | None = None) -> np.ndarray:
        """Continue each left-padded row; returns [batch, prompt + new] ids (finished rows padded with pad id)."""
        ids = _rows(input_ids)
        new = list(self.stream(ids, attention_mask, max_new_tokens, sampling, eos_token_id, pad_token_id, max_length))
        return np.concatenate([ids] + [t[:, None] for t in new], 1)

    def stream(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               max_new_tokens: int = DEFAULT_NEW_TOKENS, sampling: SamplingConfig | None = None,
               eos_token_id: int | tuple = 2, pad_token_id: int = 0,
               max_length: int | None = None) -> Iterator[np.ndarray]:
        """The generation loop: yields each step's new token of every row ([batch] int32) as soon as it is chosen.
        A call that does not fit (`budget`) is refused here, before anything runs, not when first iterated."""
        ids = _rows(input_ids)
        max_new_tokens = self.budget(ids.shape, max_new_tokens, max_length)
        return self._steps(ids, attention_mask, max_new_tokens, sampling or SamplingConfig(), eos_token_id,
                           pad_token_id)

    def _steps(self, ids: np.ndarray, attention_mask, max_new_tokens: int, sampling: SamplingConfig,
               eos_token_id: int | tuple, pad_token_id: int) -> Iterator[np.ndarray]:
        b, n = ids.shape
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32).reshape(b, n)
        length = cache_length(n + max_new_tokens)
        valid = np.zeros((b, length), np.int32)
        valid[:, :n] = mask
        positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        rng = np.random.default_rng(sampling.seed)
        clock = time.perf_counter()
        logits, caches = self.forward(ids, positions, valid, 0, self.new_cache(b, length))
        self.model.settle()
        self.timings = {"prefill_tokens": int(mask.sum()), "prefill_s": time.perf_counter() - clock, "rows": b,
                        "decode_s": [], "op_by_op": self.op_by_op, "compiled_prefill": self.compiled_prefill,
                        "weights": self.weights_note}
        out, done = [ids], np.zeros(b, bool)
        last_pos = positions[:, -1]
        for t in range(max_new_tokens):
            token = choose(logits, np.concatenate(out, 1), sampling, rng)
            token = np.where(done, pad_token_id, token).astype(np.int32)
            out.append(token[:, None])
            yield token
            done |= np.isin(token, list(eos))
            if done.all() or t == max_new_tokens - 1:
                break
            valid[:, n + t] = 1
            last_pos = last_pos + 1
            clock = time.perf_counter()
            logits, caches = self.forward(token[:, None], last_pos[:, None].astype(np.int32), valid, n + t, caches)
            self.timings["decode_s"].append(time.perf_counter() - clock)


def describe(timings: dict) -> str:
    """Prefill and decode speed of one generation (each step's first call compiles it: said, and left out of the
    decode rate when there are later steps)."""
    steps = timings["decode_s"]
    later = steps[1:] or steps
    text = (f"prefill {timings['prefill_tokens']} tokens in {timings['prefill_s']:.2f} s "
            f"({timings['prefill_tokens'] / timings['prefill_s']:.1f} tokens/s, "
            f"{'compile included' if timings.get('compiled_prefill', True) else 'op by op'})")
    if later:
        text += (f", decode {timings['rows'] * len(later) / sum(later):.2f} tokens/s over {len(later)} steps"
                 f"{' after the first (compile)' if len(steps) > 1 else ''}")
    if timings.get("op_by_op"):
        text += f"; op by op ({timings['op_by_op']})"
    if timings.get("weights"):
        text += f"; {timings['weights']}"
    return text


def _weights_note(model: GLM2Network) -> str:
    """How 16-bit and quantized weights meet float32 arithmetic: in the native kernel, or cast at every step (and
    why)."""
    narrow = [c for c in linears(model) if c.weight.dtype != model.compute_dtype]
    if not narrow or model.compute_dtype != ms.float32:
        return ""
    if all(c.native for c in narrow):
        kinds = sorted({c.blocks or "16-bit" for c in narrow}, key=lambda k: (k == "16-bit", k))
        how = "kernel with q8_0 activations" if any(c.q8 for c in narrow) else "float32 kernel"
        return f"{' and '.join(kinds)} weights through the native {how}"

    return f"16-bit weights cast to float32 at every step (no native kernel: {why_not() or 'not enabled'})"


def _rows(input_ids) -> np.ndarray:
    """Token ids as an int32 [batch, seq] array (one row when given a flat list)."""
    ids = np.asarray(input_ids, np.int32)
    return ids[None] if ids.ndim == 1 else ids
