"""The jit graphs of one optimizer step: forward, backward, unscale, clip, AdamW.

In float32 without accumulation one graph does it all and needs no accumulators. Otherwise `micro` (forward +
backward, gradients added into accumulators) runs per micro-batch and `apply` (unscale, clip, AdamW, zero the
accumulators) once; with float16 the host looks at `finite` between the two and calls `discard` instead of
`apply` on an overflow, so a skipped step leaves the optimizer untouched. Everything that changes between steps
(learning rate, LoRA dropout masks, loss scale) enters as an input: on this MindSpore a parameter changed with
set_data after its graph was compiled keeps its old value inside the graph.
"""
from __future__ import annotations

from collections.abc import Iterable

import mindspore as ms
from mindspore import Tensor, ops
from mindspore.experimental.optim import AdamW

from .data import IGNORE
from .fused_adamw import FusedAdamW
from .lora import lora_cells
from .model import GLM2ForCausalLM
from .optimizer_shards import OptimizerShards
from .train_config import TrainConfig


def token_loss(logits, targets):
    """Mean cross entropy over the targets that are not −100 (logits [n, vocab] float32, targets [n]).

    Written out (log-sum-exp minus the target's logit) rather than ops.cross_entropy, whose graph keeps about
    twice as many vocabulary-wide buffers alive through the backward pass (measured: +2.4–3.2 GB against +1.7 GB
    for one 516 × 65,024 output layer)."""
    valid = targets != IGNORE
    safe = ops.where(valid, targets, ops.zeros_like(targets))
    peak = ops.stop_gradient(logits.max(axis=-1, keepdims=True))
    log_total = ops.log(ops.exp(logits - peak).sum(-1)) + peak.squeeze(-1)
    picked = ops.gather_elements(logits, 1, safe.reshape(-1, 1)).squeeze(-1)
    weight = valid.astype(ms.float32)
    return ((log_total - picked) * weight).sum() / weight.sum()


def build_optimizer(cfg: TrainConfig, updated: list, decayed: int):
    """AdamW over `updated`, whose first `decayed` entries get weight decay (MindFormers' filter: not on norms and
    biases)."""
    groups = [{"params": updated[:decayed], "weight_decay": cfg.weight_decay}]
    if updated[decayed:]:
        groups.append({"params": updated[decayed:], "weight_decay": 0.0})
    optimizer = FusedAdamW if cfg.optimizer == "fused-adamw" else AdamW
    return optimizer(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _backward(model: GLM2ForCausalLM, weights, masks: list, world: int):
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


def _update(opt, shards: OptimizerShards, reducer, max_norm: float, unscale_by: int | None):
    """Graph code: gradients → (unscaled by scale × `unscale_by`,) reduced, clipped, applied; the shards
    gathered."""

    def update(grads, scale, lr):
        for group_lr in opt.lrs:
            ops.assign(group_lr, lr)
        if unscale_by is not None:  # (static) no extra copy of every gradient when there is nothing to undo
            grads = tuple(g / (scale * unscale_by) for g in grads)
        grads = ops.clip_by_global_norm(reducer(grads), max_norm)
        opt(shards.take(grads))
        return shards.gather()

    return update


class TrainStep:
    """The trainable weights (in the optimizer's order: the decayed matrices, then norms and biases), their
    optimizer and its shards, and the compiled graphs that take one optimizer step."""

    def __init__(self, model: GLM2ForCausalLM, cfg: TrainConfig, rank: int = 0, world: int = 1):
        self.cfg, self.world = cfg, world
        if cfg.recompute:
            for block in model.transformer.encoder.layers:
                block.recompute()
        trainable = model.trainable_params()
        decay = [p for p in trainable if len(p.shape) > 1]
        self.weights = ms.ParameterTuple(decay + [p for p in trainable if len(p.shape) <= 1])
        self.shards = OptimizerShards(list(self.weights), rank, world, cfg.shard_optimizer)
        self.opt = build_optimizer(cfg, self.shards.updated, len(decay))
        self.check_finite = cfg.compute_dtype == "float16"
        self.accumulate = cfg.gradient_accumulation_steps > 1 or self.check_finite
        masks = [cell.dropout_mask for _, cell in lora_cells(model)] if cfg.method == "lora" else []
        backward = _backward(model, self.weights, masks, world)
        k = cfg.gradient_accumulation_steps
        update = _update(self.opt, self.shards, self._grad_reducer(), cfg.max_grad_norm,
                         k if self.accumulate else None)
        if self.accumulate:
            self._build_accumulating(backward, update)
        else:
            def fused(ids, picks, targets, scale, lr, *fresh_masks):
                loss, grads = backward(ids, picks, targets, scale, fresh_masks)
                update(grads, scale, lr)
                return loss

            self._fused = ms.jit(fused)
        shards = self.shards

        def gather():
            return shards.gather()

        self.gather = ms.jit(gather)

    def _build_accumulating(self, backward, update) -> None:
        accu = self.weights.clone(prefix="accu_grads", init="zeros")
        all_reduce, world = ops.AllReduce() if self.world > 1 else None, self.world

        def micro(ids, picks, targets, scale, *fresh_masks):
            loss, grads = backward(ids, picks, targets, scale, fresh_masks)
            for a, g in zip(accu, grads):  # noqa: B905 (jit: MindSpore's graph parser takes no strict=)
                ops.assign_add(a, g)
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

        self._micro, self._apply = ms.jit(micro), ms.jit(apply)
        self._discard, self._finite = ms.jit(discard), ms.jit(finite)

    def _grad_reducer(self):
        if self.world == 1:
            return lambda grads: grads
        from mindspore import nn

        return nn.DistributedGradReducer(self.weights, mean=True)

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
