"""A run's training state and its checkpoints: save, resume, and the optimizer moments under MindFormers' names.

The files (MindFormers' layout, written atomically) are described in glm2_ms/checkpointing.py and
converters/runs.py; the record beside each training file keeps the position, the loss scaler, the run's settings
and the base model's identity. A LoRA run saves what it trains, not its frozen base: a save of a 6B run is the
adapter's size, and resuming checks that the base is the run's.
"""
from __future__ import annotations

import errno
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor

from converters.runs import check_base, ckpt_path, record_of, record_path, trainable_path
from glm2_core.errors import CheckpointError, sized
from glm2_core.files import NETWORK, TRAIN_LOG, TRAINING
from glm2_core.names import ADAM_MOMENTS

from . import checkpointing as ckpt
from .optimizer_shards import PREFIX
from .train_config import TrainConfig
from .train_step import TrainStep

# the optimizers' state names → MindFormers' names
MOMENTS = dict(zip(("exp_avg.", "exp_avg_sq."), ADAM_MOMENTS, strict=True))
SCHEDULE = ("learning_rate", "lr_end", "warmup_steps", "lr_power")  # with the total step count: every step's lr
# the settings a resume may change: how often it saves and logs, how many saves it keeps, and whether a step runs
# block by block (the same losses, another memory peak); max_steps and epochs count through the total step count,
# which the schedule's check compares
MAY_CHANGE = frozenset({"save_steps", "log_steps", "keep_checkpoints", "recompute", "max_steps", "epochs"})


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
                 world: int = 1, base: dict | None = None):
        self.out, self.model, self.step, self.cfg = out, model, step, cfg
        self.total, self.rank, self.world, self.base = total, rank, world, base

    def save(self, st: State, first=lambda: None) -> Path:
        """This rank's checkpoint files (and, from rank 0 of several, the strategy that lays them out), after what
        `first` writes; then the saves beyond --keep-checkpoints go."""
        shards = self.step.shards
        net = {n: shards.saved(n, a) for n, a in self.saved_state().items()}
        full = net | {n: p.asnumpy() for n, p in moments(self.step.opt).items()}
        if self.world > 1 and self.rank == 0:
            ckpt.write_strategy(self.out, {n: shards.layout(weight_of(n), a.ndim) for n, a in full.items()})
        full.update({"global_step": np.array(st.step, np.int32), "epoch_num": np.array(st.epoch, np.int32),
                     "step_num": np.array(st.step, np.int32), "loss_scale": np.array(st.loss_scale, np.float32)})
        path = ckpt_path(self.out, TRAINING, self.rank, st.epoch, st.step)
        need = sum(a.nbytes for a in full.values()) + sum(a.nbytes for a in net.values())
        with self._space_for(st, need):
            first()
            ckpt.write_ckpt(path, full)
            ckpt.write_ckpt(self._network_path(st), net)
            ckpt.write_json_atomic(record_path(path), {
                "step": st.step, "epoch": st.epoch, "in_epoch": st.in_epoch, "loss_scale": st.loss_scale,
                "good_steps": st.good_steps, "world": self.world, "shard_optimizer": bool(shards.slices),
                "total_steps": self.total, "config": self.cfg.as_dict(), "base": self.base, "losses": st.losses})
        self._prune()
        return path

    @contextmanager
    def _space_for(self, st: State, need: int):
        """A save that cannot fit is refused before its first byte, and a disk that fills while it is written ends
        the run in one line, both saying the bytes needed and free and which checkpoint is the newest whole one
        (the half-written files are gone: checkpointing.write_ckpt)."""
        self.out.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.out).free
        if need > free:
            raise CheckpointError(self._full(st, need, free, "needs"))
        try:
            yield
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise CheckpointError(self._full(st, need, free, "needed")) from None

    def _full(self, st: State, need: int, free: int, verb: str) -> str:
        newest = ckpt.latest(self.out, self.rank, self.world)
        kept = f"the newest whole checkpoint is {newest}" if newest else "no checkpoint was saved yet"
        return (f"{self.out}: no space for the checkpoint of step {st.step}: it {verb} {sized(need)}, "
                f"{sized(free)} {'are' if verb == 'needs' else 'were'} free; {kept}")

    @property
    def lora(self) -> bool:
        return self.cfg.method == "lora"

    def saved_state(self) -> dict[str, np.ndarray]:
        """What a save holds of the network: all of it, or for LoRA the adapter (the frozen rest is the base)."""
        if not self.lora:
            return network_state(self.model)
        return {p.name: p.asnumpy() for p in self.step.weights}

    def _network_path(self, st: State) -> Path:
        """The network file beside a save: per step (full), or MindFormers' one trainable-parameters file (LoRA)."""
        return trainable_path(self.out, self.rank) if self.lora else \
            ckpt_path(self.out, NETWORK, self.rank, st.epoch, st.step)

    def _prune(self) -> None:
        """Delete this rank's saves older than the newest --keep-checkpoints (the record first: without it a file
        is no checkpoint to resume from), never the newest one every rank completed. Only files named and
        recorded as this run's saves are touched."""
        keep = self.cfg.keep_checkpoints
        if not keep:
            return
        protected = ckpt.latest(self.out, self.rank, self.world)
        for epoch, step in sorted(ckpt.saved_steps(self.out, self.rank))[:-keep]:
            path = ckpt_path(self.out, TRAINING, self.rank, epoch, step)
            found = record_of(path)
            if path != protected and found is not None and "step" in found[1]:
                for f in (record_path(path), path, ckpt_path(self.out, NETWORK, self.rank, epoch, step)):
                    f.unlink(missing_ok=True)

    def resume(self, st: State, path: Path, side: dict) -> None:
        """Load the checkpoint `resume_point` chose into the model, the optimizer and `st` (what a killed save left
        half written goes first)."""
        ckpt.remove_partials(self.out, self.rank)
        saved = ckpt.read_ckpt(path)
        params = {p.name: p for p in self.step.weights} if self.lora else \
            {p.name: p for p in self.model.get_parameters() if not p.name.endswith("dropout_mask")}
        for name, p in moments(self.step.opt).items():
            params[p.name] = p
            if name in saved:
                saved[p.name] = saved.pop(name)
        shards = self.step.shards
        for name, p in params.items():
            if name not in saved:
                raise CheckpointError(f"{path}: has no {name}; it was written by another run")
            if not shards.restore(name, saved[name]):
                if tuple(saved[name].shape) != tuple(p.shape):
                    raise CheckpointError(f"{path}: {name} has the shape {list(saved[name].shape)}, the model's "
                                          f"is {list(p.shape)}; it was written by another run")
                p.set_data(Tensor(saved[name]).astype(p.dtype))
        if shards.slices:
            self.step.gather()
        self.step.opt.state_step.set_data(Tensor(int(saved["global_step"]), ms.int32))
        st.step, st.epoch, st.in_epoch = side["step"], side["epoch"], side["in_epoch"]
        st.loss_scale, st.good_steps, st.losses = side["loss_scale"], side["good_steps"], side["losses"]
        if self.rank == 0:
            self._truncate_log(st.step)

    def _truncate_log(self, step: int) -> None:
        """Keep train_log.jsonl to the steps the resumed checkpoint holds: a killed run may have logged steps past
        its last checkpoint (the last line perhaps half written), which are trained again now."""
        log = self.out / TRAIN_LOG
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


def resume_point(out: Path, cfg: TrainConfig, total: int, base: dict, rank: int = 0, world: int = 1
                 ) -> tuple[Path, dict]:
    """The checkpoint to resume from and its record, refused (one line) when the run would not continue as it
    began: another number of processes, learning-rate schedule, setting that changes the training, or base
    model. Needs only the records: it runs before the model is loaded and before anything is written."""
    newest = ckpt.latest(out, 0)
    side = _read_record(newest) if newest else None
    if side is not None and side.get("world") != world:
        raise CheckpointError(f"{newest}: saved by {side.get('world')} processes, resumed with {world}; resume "
                              f"with the same number of processes")
    path = ckpt.latest(out, rank, world)
    if path is None:
        ranks = "no checkpoint under checkpoint/rank_0" if world == 1 else \
            f"no checkpoint that all {world} ranks completed under checkpoint/rank_*"
        raise CheckpointError(f"{out}: --resume, but {ranks}")
    side = _read_record(path)
    where = record_path(path)
    _check_schedule(where, side, cfg, total)
    _check_settings(where, side["config"], cfg)
    check_base(where, side.get("base"), base)
    return path, side


def _read_record(path: Path) -> dict:
    where = record_path(path)
    try:
        side = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: cannot read the checkpoint's record ({exc})") from None
    if not isinstance(side, dict) or not isinstance(side.get("config"), dict) or \
            not all(k in side for k in ("step", "epoch", "in_epoch", "loss_scale", "good_steps", "losses")):
        raise CheckpointError(f"{where}: not the record of a glm2-finetune checkpoint")
    return side


def _check_schedule(where: Path, side: dict, cfg: TrainConfig, total_now: int) -> None:
    """The learning rate of every step follows from the total step count and the schedule's settings: a resume
    that changed them would jump to another curve mid-run (a larger --max-steps raises the lr), so it is
    refused."""
    total = side.get("total_steps", total_now)
    if total != total_now:
        raise CheckpointError(f"{where}: the run was scheduled for {total} steps; resuming with {total_now} would "
                              f"rebuild the learning-rate schedule mid-run: resume with --max-steps {total}, or "
                              f"start a new --out")
    saved = {k: side["config"].get(k) for k in SCHEDULE}
    now = {k: getattr(cfg, k) for k in SCHEDULE}
    changed = [k for k in SCHEDULE if saved[k] != now[k]]
    if changed:
        raise CheckpointError(f"{where}: the run used {changed[0]}={saved[changed[0]]}, resumed with "
                              f"{now[changed[0]]}; a resume keeps the learning-rate schedule")


def _check_settings(where: Path, recorded: dict, cfg: TrainConfig) -> None:
    """Every setting that changes what is trained or how must be the run's (a setting the record predates is
    not checked)."""
    for f in fields(cfg):
        if f.name in MAY_CHANGE or f.name in SCHEDULE or f.name not in recorded:
            continue
        was, now = recorded[f.name], getattr(cfg, f.name)
        if was != now:
            raise CheckpointError(f"{where}: the run used {f.name}={_shown(was)}, resumed with {_shown(now)}; "
                                  f"resume with the run's settings (--{f.name.replace('_', '-')} {_shown(was)}), "
                                  f"or start a new --out")


def _shown(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
