"""The jit graphs of one optimizer step: forward, backward, unscale, clip, AdamW.

In float32 without accumulation one graph does it all and needs no accumulators. Otherwise `micro` (forward +
backward, gradients added into accumulators) runs per micro-batch and `apply` (unscale, clip, AdamW, zero the
accumulators) once; with float16 the host looks at `finite` between the two and calls `discard` instead of
`apply` on an overflow, so a skipped step leaves the optimizer untouched. Everything that changes between steps
(learning rate, LoRA dropout masks, loss scale) enters as an input: on this MindSpore a parameter changed with
set_data after its graph was compiled keeps its old value inside the graph.

With `recompute` (the default) the forward and backward passes run block by block, driven from the host
(`BlockwiseBackward`: one block's graphs, compiled once; the matmuls' outputs kept from the forward pass,
`keep_matmul_outputs`), and the update runs eagerly with the gradients clipped one at a time: on CPU a
compiled graph keeps every intermediate it computed, so the fewer and smaller the graphs, the lower the peak.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.experimental.optim import AdamW

from .data import IGNORE
from .fused_adamw import FusedAdamW
from .lora import lora_cells
from .model import GLM2Network, Linear, mask_and_positions, rope_tables
from .optimizer_shards import OptimizerShards
from .train_config import TrainConfig


def token_loss(logits, targets):
    """Mean cross entropy over the targets that are not −100 (logits [n, vocab] float32, targets [n]).

    On MindSpore's fused LogSoftmax: the vocabulary-wide buffers decide this loss's memory on CPU, and log-sum-exp
    written out kept several of them through the backward pass, ops.cross_entropy more. Memory is chosen over time:
    LogSoftmax's gradient kernel is slower than the written-out ops, and a backward of our own saved little
    (figures: benchmarks/results/2026-12-04-figures-from-the-code.md)."""
    picked = ops.gather_elements(ops.log_softmax(logits, -1), 1, ops.maximum(targets, 0).reshape(-1, 1))
    weight = (targets != IGNORE).astype(ms.float32)
    return -(picked.squeeze(-1) * weight).sum() / weight.sum()


def build_optimizer(cfg: TrainConfig, updated: list, decayed: int):
    """AdamW over `updated`, whose first `decayed` entries get weight decay (MindFormers' filter: not on norms and
    biases)."""
    groups = [{"params": updated[:decayed], "weight_decay": cfg.weight_decay}]
    if updated[decayed:]:
        groups.append({"params": updated[decayed:], "weight_decay": 0.0})
    optimizer = FusedAdamW if cfg.optimizer == "fused-adamw" else AdamW
    return optimizer(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _backward(model: GLM2Network, weights, masks: list, world: int):
    """Graph code: one micro-batch's loss and the gradients of loss × scale (the loss the global batch's)."""
    all_reduce = ops.AllReduce() if world > 1 else None

    def forward(ids, picks, targets, scale):
        loss = token_loss(model(ids, picks=picks), targets)
        return loss * scale, loss

    grad_fn = ms.value_and_grad(forward, None, weights, has_aux=True)

    def backward(ids, picks, targets, scale, fresh_masks):
        for param, value in zip(masks, fresh_masks):  # noqa: B905 (jit: MindSpore's graph parser takes no strict=)
            ops.assign(param, value)
        (_, loss), grads = grad_fn(ids, picks, targets, scale)
        if world > 1:  # the reported loss is the global batch's (each rank's mean, averaged)
            loss = all_reduce(loss) / world
        return loss, grads

    return backward


# Eagerly, the primitives: Tensor `/` (ops.div) on CPU holds several buffers of its operand's size for one
# division, RealDiv one (benchmarks/results/2026-12-04-figures-from-the-code.md).
_mul, _real_div = ops.Mul(), ops.RealDiv()


def _update(opt, shards: OptimizerShards, reducer, clip, unscale_by: int | None):
    """Graph code (or run eagerly): gradients → (unscaled by scale × `unscale_by`,) reduced, clipped by `clip`,
    applied; the shards gathered."""

    def update(grads, scale, lr):
        for group_lr in opt.lrs:
            ops.assign(group_lr, lr)
        if unscale_by is not None:  # (static) no extra copy of every gradient when there is nothing to undo
            grads = [_real_div(g, scale * unscale_by) for g in grads]  # a list: the eager clipping replaces its items
        grads = clip(reducer(grads))
        opt(shards.take(grads))
        return shards.gather()

    return update


def clip_in_place(grads: list, max_norm: float) -> tuple:
    """ops.clip_by_global_norm's result (within float32 rounding; unchanged below max_norm), computed eagerly
    over a list it may overwrite: each square and each clipped gradient (which replaces its input) is the only
    temporary alive; a graph would keep every intermediate, about three copies of the gradients. Each gradient's
    rows are summed first: MindSpore's CPU ReduceSum over a whole tensor at once is slower; each gradient is
    scaled in one pass (figures: benchmarks/results/2026-12-04-figures-from-the-code.md)."""
    limit = Tensor(max_norm, ms.float32)
    square_sum = ops.ReduceSum(False)
    sums = [square_sum(square_sum(ops.square(g), tuple(range(1, g.ndim))), ()).astype(ms.float32) for g in grads]
    factor = _real_div(limit, ops.maximum(ops.sqrt(ops.addn(sums)), limit))
    for i, g in enumerate(grads):
        grads[i] = None  # the list held the only reference besides `g`
        grads[i] = _mul(g, factor).astype(g.dtype)
    return tuple(grads)


def _value_and_grad(fn, position, params: list, has_aux: bool = False):
    """ms.value_and_grad of `fn` by input `position` (or None) and `params`, whose result takes another shape for
    each of these choices, always as (value, the input's gradient or None, the parameters' gradients)."""
    by_input, by_params = position is not None, bool(params)
    grad = ms.value_and_grad(fn, position, ms.ParameterTuple(params) if by_params else None, has_aux=has_aux)

    def call(*args):
        value, g = grad(*args)
        if not by_params:
            return value, g, ()
        if not by_input:
            return value, None, g
        return value, g[0], g[1]

    return call


def _copy_into(slots: list, values) -> None:
    """Copies `values` into `slots` in place (Tensor.copy_, eagerly): a compiled graph reads a parameter's memory,
    so it sees the new values (set_data, which gives the parameter new memory, it would not), in order with the
    graphs around it; faster on CPU than a jit graph of Assigns (figures:
    benchmarks/results/2026-12-04-figures-from-the-code.md)."""
    for slot, value in zip(slots, values, strict=True):
        slot.copy_(value)


class Replay(nn.Cell):
    """x Wᵀ given back from the output its forward pass saved: the backward pass of a block trained block by block
    (`keep_matmul_outputs`) runs the block again without its matmuls. The gradients are the matmul's: dx = dy W,
    and dW = dyᵀ x for a trained W."""

    def __init__(self, trained: bool):
        super().__init__()
        self.trained = trained
        self.grad_weight = ops.MatMul(transpose_a=True)

    def construct(self, x, weight, saved):
        return saved

    def bprop(self, x, weight, saved, out, dout):
        dx = ops.matmul(dout, weight.astype(dout.dtype))
        dw = self.grad_weight(dout, x).astype(weight.dtype) if self.trained else ops.zeros_like(weight)
        return dx, dw, ops.zeros_like(saved)


def keep_matmul_outputs(worker: nn.Cell, dtype) -> tuple[nn.Cell, list]:
    """A second block (`replayer`) on `worker`'s parameters, and a slot for each matmul's output (sized by the
    first batch): `worker`'s Linears write their outputs there, the replayer's read them back (Replay).

    The matmuls are most of a block's forward pass; keeping their outputs (at GLM2's shapes about 10 hidden
    widths a token) lets the backward pass recompute only what lies between them, so a step does torch's passes
    of matmuls, not one more (benchmarks/profile_step.py counts them)."""
    replayer = copy.deepcopy(worker)
    pairs = list(zip(worker.cells_and_names(), replayer.cells_and_names(), strict=True))
    kept = []
    for (name, cell), (_, twin) in pairs:
        for attr, param in list(cell._params.items()):  # share the worker's parameters
            setattr(twin, attr, param)
        if isinstance(cell, Linear):
            slot = Parameter(ops.zeros((1, cell.weight.shape[0]), dtype), name=f"blockwise_worker.{name}.kept",
                             requires_grad=False)
            cell.saved = twin.saved = slot
            twin.replay = Replay(cell.weight.requires_grad)
            kept.append(slot)
    return replayer, kept


class BlockwiseBackward:
    """One micro-batch's loss and gradients, computed a stage at a time from the host (`recompute`).

    Forward: the embedding, then every block without a gradient graph, keeping only each block's input
    ([batch, seq, hidden]); the head (final norm, answer-window output layer, loss) with its gradient. Backward,
    from the last block to the first: the block's forward again, inside the gradient of sum(block(x) · upstream),
    which gives the block's parameter gradients and the upstream gradient of the block below; last the
    embedding's. Each stage runs the model's own cells; the gradients equal the whole graph's (tested).

    Why: on CPU every compiled graph keeps its buffers (a block's forward or backward graph adds its own, whichever
    block it runs: benchmarks/results/2026-12-04-figures-from-the-code.md), so a whole-model graph holds every block's
    activations, float32 weight casts and gradients buffers at once. Here one block's forward and backward graphs are
    compiled once, on a working copy of a block (`worker`), and each block's parameters are copied into it
    (`_copy_into`, in place) before it runs: the graphs' buffers are one block's whatever the depth.
    The backward pass of a block takes its matmuls' outputs from the forward pass (`keep_matmul_outputs`) instead
    of computing them again."""

    def __init__(self, model: GLM2Network, weights, masks: list, world: int):
        t = model.transformer
        dtype, norm, blocks = t.compute_dtype, t.encoder.final_layernorm, t.encoder.layers
        self.index = {id(p): i for i, p in enumerate(weights)}
        all_reduce = ops.AllReduce() if world > 1 else None

        def mine(*cells):
            return [p for c in cells for p in c.trainable_params() if id(p) in self.index]

        def prepare(ids, *fresh_masks):
            for param, value in zip(masks, fresh_masks):  # noqa: B905 (jit: MindSpore's graph parser takes no strict=)
                ops.assign(param, value)
            mask, position_ids = mask_and_positions(ids)
            cos, sin = rope_tables(position_ids, t.inv_freq, dtype)
            return t.embedding(ids).astype(dtype), cos, sin, mask

        def head(x, picks, targets, scale):
            loss = token_loss(model.logits(norm(x), picks), targets)
            if world > 1:  # the reported loss is the global batch's (each rank's mean, averaged)
                loss = all_reduce(loss) / world
            return loss * scale, loss

        def embedded(ids, upstream):
            return (t.embedding(ids).astype(dtype) * upstream).sum()

        self.prepare = ms.jit(prepare)
        self.head_params = mine(norm, t.output_layer)
        self.head = ms.jit(_value_and_grad(head, 0, self.head_params, has_aux=True))
        self.embedding_params = mine(t.embedding)
        self.embedding = ms.jit(_value_and_grad(embedded, None, self.embedding_params)) \
            if self.embedding_params else None
        self.sources = [list(b.get_parameters()) for b in blocks]
        self._compile_worker(blocks, dtype)

    def _compile_worker(self, blocks, dtype) -> None:
        worker = copy.deepcopy(blocks[0])
        slots = list(worker.get_parameters())
        for p in slots:
            p.name = "blockwise_worker." + p.name
        trained = [k for k, p in enumerate(slots) if p.requires_grad]
        self.trained = [[params[k] for k in trained] for params in self.sources]
        assert all(id(p) in self.index for params in self.trained for p in params)
        replayer, self.kept = keep_matmul_outputs(worker, dtype)

        def forward(x, cos, sin, mask):
            return worker(x, cos, sin, mask)[0]

        def weighted(x, cos, sin, mask, upstream):
            return (replayer(x, cos, sin, mask)[0] * upstream).sum()

        self.slots, self.forward = slots, ms.jit(forward)
        self.backward = ms.jit(_value_and_grad(weighted, 0, [slots[k] for k in trained]))

    def __call__(self, ids, picks, targets, scale, fresh_masks):
        grads = [None] * len(self.index)

        def put(params, values):
            for p, g in zip(params, values, strict=True):
                grads[self.index[id(p)]] = g

        rows = ids.shape[0] * ids.shape[1]
        for slot in self.kept:  # sized by the first batch, before the graphs are compiled; every batch has its shape
            if slot.shape[0] != rows:
                assert slot.shape[0] == 1, f"a batch of {rows} tokens after batches of {slot.shape[0]}"
                slot.set_data(ops.zeros((rows, slot.shape[1]), slot.dtype))
        x, cos, sin, mask = self.prepare(ids, *fresh_masks)
        inputs, kept, last = [], [], len(self.sources) - 1
        for i, params in enumerate(self.sources):
            inputs.append(x)
            _copy_into(self.slots, params)
            x = self.forward(x, cos, sin, mask)
            if i < last:  # eagerly: the next block writes the slots
                kept.append([ops.deepcopy(slot) for slot in self.kept])
        (_, loss), upstream, head_grads = self.head(x, picks, targets, scale)
        put(self.head_params, head_grads)
        for i in reversed(range(len(self.sources))):
            if i < last:  # the worker and its slots still hold the last block's weights and outputs
                _copy_into(self.slots, self.sources[i])
                _copy_into(self.kept, kept.pop())
            _, upstream, block_grads = self.backward(inputs.pop(), cos, sin, mask, upstream)
            put(self.trained[i], block_grads)
        if self.embedding is not None:
            put(self.embedding_params, self.embedding(ids, upstream)[2])
        return loss, grads


class TrainStep:
    """The trainable weights (in the optimizer's order: the decayed matrices, then norms and biases), their
    optimizer and its shards, and the compiled graphs that take one optimizer step."""

    def __init__(self, model: GLM2Network, cfg: TrainConfig, rank: int = 0, world: int = 1):
        self.cfg, self.world = cfg, world
        trainable = model.trainable_params()
        decay = [p for p in trainable if len(p.shape) > 1]
        self.weights = ms.ParameterTuple(decay + [p for p in trainable if len(p.shape) <= 1])
        self.shards = OptimizerShards(list(self.weights), rank, world, cfg.shard_optimizer)
        self.opt = build_optimizer(cfg, self.shards.updated, len(decay))
        self.check_finite = cfg.compute_dtype == "float16"
        self.accumulate = cfg.gradient_accumulation_steps > 1 or self.check_finite
        masks = [cell.dropout_mask for _, cell in lora_cells(model)] if cfg.method == "lora" else []
        # recompute: the backward is driven block by block from the host, and what follows it is a graph of its
        # own; otherwise backward and what follows are one graph
        self.backward = backward = (BlockwiseBackward if cfg.recompute else _backward)(model, self.weights, masks,
                                                                                         world)
        after, whole = (ms.jit, lambda f: f) if cfg.recompute else (lambda f: f, ms.jit)
        k = cfg.gradient_accumulation_steps
        update = _update(self.opt, self.shards, self._grad_reducer(), self._clip(cfg), k if self.accumulate else None)
        if self.accumulate:
            self._build_accumulating(backward, update, after, whole)
        else:
            def fused(ids, picks, targets, scale, lr, *fresh_masks):
                loss, grads = backward(ids, picks, targets, scale, fresh_masks)
                update(grads, scale, lr)
                return loss

            self._fused = whole(fused)
        shards = self.shards

        def gather():
            return shards.gather()

        self.gather = ms.jit(gather)

    def _build_accumulating(self, backward, update, after, whole) -> None:
        accu = self.weights.clone(prefix="accu_grads", init="zeros")
        all_reduce, world = ops.AllReduce() if self.world > 1 else None, self.world

        def add(*grads):
            for a, g in zip(accu, grads):  # noqa: B905 (jit: MindSpore's graph parser takes no strict=)
                ops.assign_add(a, g)
            return True

        add = after(add)

        def micro(ids, picks, targets, scale, *fresh_masks):
            loss, grads = backward(ids, picks, targets, scale, fresh_masks)
            add(*grads)
            return loss

        def discard():
            for a in accu:
                ops.assign(a, ops.zeros_like(a))
            return True

        def apply(scale, lr):
            update(tuple(accu), scale, lr)
            return discard()

        def finite():
            ok = ms.amp.all_finite(tuple(accu))
            if world > 1:  # every rank must take the same decision
                return all_reduce(ok.astype(ms.float32)) == world
            return ok

        self._micro, self._apply = whole(micro), ms.jit(apply) if whole is ms.jit else apply
        self._discard, self._finite = ms.jit(discard), ms.jit(finite)

    def _clip(self, cfg: TrainConfig):
        """Gradient clipping: in the graph, or (block by block: the update runs eagerly) one gradient at a time."""
        if cfg.recompute:
            return lambda grads: clip_in_place(grads if isinstance(grads, list) else list(grads), cfg.max_grad_norm)

        def in_graph(grads):
            return ops.clip_by_global_norm(grads, cfg.max_grad_norm)

        return in_graph

    def _grad_reducer(self):
        if self.world == 1:
            return lambda grads: grads

        reducer = nn.DistributedGradReducer(self.weights, mean=True)

        def reduce(grads):  # a tuple: the block-by-block step hands the eager update a list
            return reducer(tuple(grads))

        return reduce

    def __call__(self, micro_batches: Iterable, lr: float, scale: float) -> tuple[list[float], bool]:
        """One optimizer step over `micro_batches` — (ids, picks, targets, dropout masks) each, drawn as the step
        reaches them: their losses, and whether the update was applied (not after a float16 overflow)."""
        lr, scale = Tensor(lr, ms.float32), Tensor(scale, ms.float32)
        losses = []
        for ids, picks, targets, masks in micro_batches:
            args = (Tensor(ids), Tensor(picks), Tensor(targets), scale)
            loss = self._micro(*args, *masks) if self.accumulate else self._fused(*args, lr, *masks)
            losses.append(float(loss.asnumpy()))
        finite = True
        if self.accumulate:
            finite = not self.check_finite or bool(self._finite().asnumpy())
            self._apply(scale, lr) if finite else self._discard()
        return losses, finite
