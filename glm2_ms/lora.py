"""LoRA as MindSpore cells, named as mindpet names them, so MindFormers reads our adapters and we read theirs.

y = x Wᵀ + b + dropout(x) Aᵀ Bᵀ · alpha/r, with A [r, in] initialised HeUniform(√5) (mindpet's choice, i.e.
U(±1/√in)) and B [out, r] zeros, so training starts from the base model exactly. Base weights are frozen.

Dropout: CPU MindSpore has no dropout kernel usable inside a jit graph whose randomness can be saved and
restored, and `--resume` must reproduce an uninterrupted run exactly. So each LoRA cell holds its dropout mask
as a non-trainable parameter that the trainer refills before every step from a generator seeded by the step.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops
from mindspore.common.initializer import initializer

from glm2_core.errors import UserError
from glm2_core.names import LORA_A, LORA_B

from .model import GLM2Network, Linear
from .train_config import lora_targets


@dataclass(frozen=True)
class LoRAConfig:
    """The MindFormers GLM2 LoRA recipe by default."""
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: str = "query_key_value"  # comma-separated last names of Linear cells (PEFT's target_modules)
    seed: int = 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(Linear):
    def __init__(self, base: Linear, name: str, cfg: LoRAConfig):
        n_out, n_in = base.weight.shape
        super().__init__(n_in, n_out, base.bias is not None, base.weight.dtype)
        self.weight, self.bias = base.weight, base.bias  # the same (frozen) parameters
        self.weight.requires_grad = False
        if self.bias is not None:
            self.bias.requires_grad = False
        # HeUniform(negative_slope=√5) is U(±1/√in); drawn from a generator seeded by (seed, name) so that a run
        # is reproducible (and resumable) whatever MindSpore's global seed is
        bound = 1.0 / math.sqrt(n_in)
        rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
        self.mindpet_delta_lora_a = Parameter(Tensor(rng.uniform(-bound, bound, (cfg.rank, n_in)).astype(np.float32)),
                                              name=f"{name}.{LORA_A}")
        self.mindpet_delta_lora_b = Parameter(initializer("zeros", (n_out, cfg.rank), ms.float32),
                                              name=f"{name}.{LORA_B}")
        self.scaling = cfg.scaling
        self.use_dropout = cfg.dropout > 0
        self.dropout_mask = Parameter(Tensor(np.ones((1, 1, n_in), np.float32)), name=f"{name}.lora_dropout_mask",
                                      requires_grad=False)
        self.lora_mm = ops.MatMul(transpose_b=True)

    def construct(self, x):
        y = super().construct(x)
        shape = x.shape
        if self.training and self.use_dropout:
            x = x * self.dropout_mask.astype(x.dtype)
        flat = x.reshape(-1, shape[-1])
        delta = self.lora_mm(self.lora_mm(flat, self.mindpet_delta_lora_a.astype(x.dtype)),
                             self.mindpet_delta_lora_b.astype(x.dtype))
        return y + (delta * self.scaling).reshape(y.shape)


def _targets(model: GLM2Network, modules: str):
    """The Linear cells whose last name is one of the comma list `modules`, exactly (PEFT's rule: `dense` is not
    `dense_h_to_4h`), with their parent cell and attribute."""
    wanted = set(lora_targets(modules).split(","))
    cells = dict(model.cells_and_names())
    found = []
    for name, cell in cells.items():
        parent_name, _, attr = name.rpartition(".")
        if type(cell) is Linear and attr in wanted:
            found.append((name, cells[parent_name], attr, cell))
    return found


def apply_lora(model: GLM2Network, cfg: LoRAConfig) -> list[str]:
    """Wrap every Linear named in cfg.target_modules; freeze everything but the LoRA factors."""
    targets = _targets(model, cfg.target_modules)
    if not targets:
        raise UserError(f"target_modules: no Linear cell of the model is named {cfg.target_modules!r}")
    for p in model.get_parameters():
        p.requires_grad = False
    for name, parent, attr, cell in targets:
        setattr(parent, attr, LoRALinear(cell, name, cfg))
        _rename(getattr(parent, attr), name)
    return [name for name, *_ in targets]


def _rename(cell, name: str) -> None:
    """Assigning a cell to a parent re-prefixes its parameters with the attribute name alone; restore full names."""
    for attr, p in cell.parameters_and_names():
        p.name = f"{name}.{attr}"


def lora_cells(model: GLM2Network) -> list[tuple[str, LoRALinear]]:
    return [(n, c) for n, c in model.cells_and_names() if isinstance(c, LoRALinear)]


def size_dropout_masks(model: GLM2Network, batch: int, seq: int) -> None:
    """Give the mask parameters the training batch's shape (before the train step is compiled)."""
    for _, cell in lora_cells(model):
        cell.dropout_mask.set_data(Tensor(np.ones((batch, seq, cell.weight.shape[1]), np.float32)))


def dropout_masks(model: GLM2Network, rng: np.random.Generator, batch: int, seq: int, p: float) -> list[Tensor]:
    """Fresh inverted-dropout masks for every LoRA cell, drawn in a fixed order from `rng` (the train step
    assigns them to the cells' dropout_mask parameters inside its graph)."""
    masks = []
    for _, cell in lora_cells(model):
        keep = rng.random((batch, seq, cell.weight.shape[1]), dtype=np.float32) >= p
        masks.append(Tensor(keep.astype(np.float32) / np.float32(1 - p)))
    return masks


def lora_state(model: GLM2Network) -> dict[str, np.ndarray]:
    """The adapter: {name.mindpet_delta_lora_a/_b: float32 array}, copied (asnumpy may share the parameter's
    memory, so a saved state would follow later training)."""
    out = {}
    for _, cell in lora_cells(model):
        for p in (cell.mindpet_delta_lora_a, cell.mindpet_delta_lora_b):
            out[p.name] = p.asnumpy().copy()
    return out
