"""A run's training state and its checkpoints: save, resume, and the optimizer moments under MindFormers' names.

The files (MindFormers' layout, written atomically) are described in glm2_ms/checkpointing.py and
converters/runs.py; the record beside each training file keeps the position, the loss scaler and the run's
settings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor

from converters.runs import NETWORK, TRAINING, ckpt_path, record_path
from glm2_core.errors import CheckpointError

from . import checkpointing as ckpt
from .optimizer_shards import PREFIX
from .train_config import TrainConfig
from .train_step import TrainStep

MOMENTS = {"exp_avg.": "adam_m.", "exp_avg_sq.": "adam_v."}  # the optimizers' state names → MindFormers' names
SCHEDULE = ("learning_rate", "lr_end", "warmup_steps", "lr_power")  # with the total step count: every step's lr


@dataclass
class State:
    step: int = 0           # optimizer steps taken
    epoch: int = 0
    in_epoch: int = 0       # optimizer steps taken in this epoch
    loss_scale: float = 1.0
    good_steps: int = 0
    losses: list = field(default_factory=list)


def network_state(model) -> dict[str, np.ndarray]:
    """The network's parameters (not the LoRA dropout masks, which are per-step inputs)."""
    return {p.name: p.asnumpy() for p in model.get_parameters() if not p.name.endswith("dropout_mask")}


def moments(opt) -> dict[str, Parameter]:
    """The optimizer's moments by their checkpoint names: `adam_m.<weight>` / `adam_v.<weight>`."""
    named = {}
    for prefix, params in (("exp_avg.", opt.exp_avg), ("exp_avg_sq.", opt.exp_avg_sq)):
        for p in params:
            named[MOMENTS[prefix] + p.name[len(prefix):].removeprefix(PREFIX)] = p
    return named


def weight_of(name: str) -> str:
    """The weight a checkpoint entry belongs to (a moment's weight, or the name itself)."""
    return name.split(".", 1)[1] if name.startswith(tuple(MOMENTS.values())) else name


class TrainingCheckpoint:
    """This rank's checkpoints of one run: the network, the moments and the counters, with the record."""

    def __init__(self, out: Path, model, step: TrainStep, cfg: TrainConfig, total: int, rank: int = 0,
                 world: int = 1):
        self.out, self.model, self.step, self.cfg = out, model, step, cfg
        self.total, self.rank, self.world = total, rank, world

    def save(self, st: State) -> Path:
        """This rank's checkpoint files (and, from rank 0 of several, the strategy that lays them out)."""
        shards = self.step.shards
        net = {n: shards.saved(n, a) for n, a in network_state(self.model).items()}
        full = net | {n: p.asnumpy() for n, p in moments(self.step.opt).items()}
        if self.world > 1 and self.rank == 0:
            ckpt.write_strategy(self.out, {n: shards.layout(weight_of(n), a.ndim) for n, a in full.items()})
        full.update({"global_step": np.array(st.step, np.int32), "epoch_num": np.array(st.epoch, np.int32),
                     "step_num": np.array(st.step, np.int32), "loss_scale": np.array(st.loss_scale, np.float32)})
        path = ckpt_path(self.out, TRAINING, self.rank, st.epoch, st.step)
        ckpt.write_ckpt(ckpt_path(self.out, NETWORK, self.rank, st.epoch, st.step), net)
        ckpt.write_ckpt(path, full)
        ckpt.write_json_atomic(record_path(path), {
            "step": st.step, "epoch": st.epoch, "in_epoch": st.in_epoch, "loss_scale": st.loss_scale,
            "good_steps": st.good_steps, "world": self.world, "shard_optimizer": bool(shards.slices),
            "total_steps": self.total, "config": self.cfg.as_dict(), "losses": st.losses})
        return path

    def resume(self, st: State) -> None:
        """Load the newest checkpoint every rank completed into the model, the optimizer and `st`."""
        path, side = self._newest()
        saved = ckpt.read_ckpt(path)
        params = {p.name: p for p in self.model.get_parameters() if not p.name.endswith("dropout_mask")}
        for name, p in moments(self.step.opt).items():
            params[p.name] = p
            saved[p.name] = saved.pop(name)
        shards = self.step.shards
        for name, p in params.items():
            if name not in saved:
                raise CheckpointError(f"{path}: has no {name}; it was written by another run")
            if not shards.restore(name, saved[name]):
                p.set_data(Tensor(saved[name]).astype(p.dtype))
        if shards.slices:
            self.step.gather()
        self.step.opt.state_step.set_data(Tensor(int(saved["global_step"]), ms.int32))
        st.step, st.epoch, st.in_epoch = side["step"], side["epoch"], side["in_epoch"]
        st.loss_scale, st.good_steps, st.losses = side["loss_scale"], side["good_steps"], side["losses"]
        if self.rank == 0:
            self._truncate_log(st.step)

    def _newest(self) -> tuple[Path, dict]:
        """The checkpoint to resume from and its record, refused when the run's shape or schedule changed."""
        newest = ckpt.latest(self.out, 0)
        side = json.loads(record_path(newest).read_text()) if newest else None
        if side is not None and side["world"] != self.world:
            raise CheckpointError(f"{newest}: saved by {side['world']} processes, resumed with {self.world}; resume "
                                  f"with the same number of processes")
        path = ckpt.latest(self.out, self.rank, self.world)
        if path is None:
            raise CheckpointError(f"{self.out}: --resume, but no checkpoint that all {self.world} ranks completed "
                                  f"under checkpoint/rank_*")
        side = json.loads(record_path(path).read_text())
        sharded = bool(self.step.shards.slices)
        if side.get("shard_optimizer", False) != sharded:
            raise CheckpointError(f"{path}: saved with shard_optimizer={side.get('shard_optimizer', False)}; resume "
                                  f"with the same setting")
        self._check_schedule(record_path(path), side)
        return path, side

    def _check_schedule(self, where: Path, side: dict) -> None:
        """The learning rate of every step follows from the total step count and the schedule's settings: a resume
        that changed them would jump to another curve mid-run (a larger --max-steps raises the lr), so it is
        refused."""
        total = side.get("total_steps", self.total)
        if total != self.total:
            raise CheckpointError(f"{where}: the run was scheduled for {total} steps; resuming with {self.total} would "
                                  f"rebuild the learning-rate schedule mid-run: resume with --max-steps {total}, or "
                                  f"start a new --out")
        saved = {k: side["config"].get(k) for k in SCHEDULE}
        now = {k: getattr(self.cfg, k) for k in SCHEDULE}
        changed = [k for k in SCHEDULE if saved[k] != now[k]]
        if changed:
            raise CheckpointError(f"{where}: the run used {changed[0]}={saved[changed[0]]}, resumed with "
                                  f"{now[changed[0]]}; a resume keeps the learning-rate schedule")

    def _truncate_log(self, step: int) -> None:
        """Keep train_log.jsonl to the steps the resumed checkpoint holds: a killed run may have logged steps past
        its last checkpoint (the last line perhaps half written), which are trained again now."""
        log = self.out / "train_log.jsonl"
        if log.is_file():
            rows = log.read_text().splitlines()
            kept = [line for line in rows if _logged_step(line) <= step]
            if len(kept) != len(rows):
                ckpt.write_atomic(log, "".join(line + "\n" for line in kept).encode())


def _logged_step(line: str) -> float:
    """The step of a train_log.jsonl line; infinity for a line that is not a whole record."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
