"""The update of `mindspore.experimental.optim.AdamW` (bias correction, decoupled weight decay) on MindSpore's
fused `AdamWeightDecay` kernel: one kernel per parameter that updates it and its moments in place.

The experimental AdamW spells the update out in about a dozen elementwise ops per parameter, each with a
parameter-sized result; on CPU that costs several times the fused kernel's time and those results' memory. The
kernel itself has no bias correction (why `nn.AdamWeightDecay` trains slowly); folding it into the kernel's
per-step inputs gives the same update. With bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ, the kernel computes
    p ← p − lr'·(m / (√v + eps') + decay'·p)
and lr' = lr·√bc2 / bc1, eps' = eps·√bc2, decay' = wd·bc1 / √bc2 turn that into AdamW's
    p ← p·(1 − lr·wd) − lr·(m / bc1) / (√(v / bc2) + eps).
State names follow the experimental AdamW (`exp_avg.*`, `exp_avg_sq.*`, `state_step`), so checkpoints and
resume treat both alike.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops


class FusedAdamW(nn.Cell):
    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float):
        super().__init__()
        self.parameters = ParameterTuple([p for g in groups for p in g["params"]])
        self.decays = tuple(float(g["weight_decay"]) for g in groups for _ in g["params"])
        self.exp_avg = self.parameters.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.parameters.clone(prefix="exp_avg_sq", init="zeros")
        self.state_step = Parameter(Tensor(0, ms.int32), "state_step")
        self.lrs = ParameterTuple([Parameter(Tensor(lr, ms.float32), "learning_rate")])
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.kernel = ops.AdamWeightDecay()

    def construct(self, gradients):
        step = self.state_step + 1
        ops.assign(self.state_step, step)
        t = step.astype(ms.float32)
        bc1 = 1 - ops.pow(Tensor(self.beta1, ms.float32), t)
        root_bc2 = ops.sqrt(1 - ops.pow(Tensor(self.beta2, ms.float32), t))
        lr = self.lrs[0] * root_bc2 / bc1
        eps = self.eps * root_bc2
        for p, m, v, g, decay in zip(self.parameters, self.exp_avg, self.exp_avg_sq, gradients, self.decays):  # noqa: B905 (jit: MindSpore's graph parser takes no strict=)
            self.kernel(p, m, v, lr, self.beta1, self.beta2, eps, decay * bc1 / root_bc2, g)
        return True
