"""Optimizer sharding across data-parallel ranks, laid out as MindSpore's parallel optimizer lays it out.

Each rank keeps the AdamW state — and a master copy — of only its dim-0 slice of every trainable parameter whose
rows divide by the number of ranks: rank r owns rows [r·n/N, (r+1)·n/N). After the all-reduced gradient is clipped,
each rank updates its slices and an AllGather rebuilds the full parameters on every rank. Parameters that do not
split (and every frozen one) stay replicated. In a strategy file this is `opt_weight_shard_size = N`,
`opt_weight_shard_step = 1` over a device matrix [N] with every tensor axis replicated.
"""
from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, ops

from converters.strategy import ParamLayout

PREFIX = "shard."  # the slices' parameter names; checkpoints use the parameter's own name


class OptimizerShards:
    def __init__(self, params: list[Parameter], rank: int, world: int, enabled: bool):
        self.params, self.world = params, world
        self.slices: dict[str, Parameter] = {}
        self._rows: list[tuple[int, int] | None] = []  # per parameter, the rows this rank owns (None: all)
        for p in params:
            rows = None
            if enabled and world > 1 and len(p.shape) and p.shape[0] % world == 0:
                n = p.shape[0] // world
                rows = (rank * n, (rank + 1) * n)
                self.slices[p.name] = Parameter(Tensor(p.asnumpy()[rows[0]:rows[1]].copy()), PREFIX + p.name)
            self._rows.append(rows)
        self._pairs = [(p, self.slices[p.name]) for p in params if p.name in self.slices]
        self._gather_op = ops.AllGather() if self.slices else None

    @property
    def updated(self) -> list[Parameter]:
        """What the optimizer updates: a rank's slice, or the whole parameter."""
        return [self.slices.get(p.name, p) for p in self.params]

    def take(self, grads: tuple) -> tuple:
        """The gradients of what this rank updates (graph code: a plain zip, as MindSpore's jit parser takes it)."""
        return tuple(g if rows is None else g[rows[0]:rows[1]] for g, rows in zip(grads, self._rows))  # noqa: B905

    def gather(self) -> bool:
        """Every rank's updated slices back into the full parameters (graph code)."""
        for full, part in self._pairs:
            ops.assign(full, self._gather_op(part))
        return True

    def saved(self, name: str, value: np.ndarray) -> np.ndarray:
        """What a rank's checkpoint holds for a parameter: its slice when sharded."""
        return self.slices[name].asnumpy() if name in self.slices else value

    def restore(self, name: str, value: np.ndarray) -> bool:
        """Load a saved slice; True when `name` is sharded (the full parameter then comes from `gather`)."""
        if name not in self.slices:
            return False
        self.slices[name].set_data(Tensor(value).astype(self.slices[name].dtype))
        return True

    def layout(self, name: str, ndim: int) -> ParamLayout:
        opt = (1, self.world) if name in self.slices else (0, 0)
        return ParamLayout((self.world,), (-1,) * ndim, (), *opt)
