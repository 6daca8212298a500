"""Full and LoRA finetuning of GLM2 on MindSpore: AdamW with bias correction, warmup + polynomial decay,
gradient clipping and accumulation, float16 compute with dynamic loss scaling, a jit-compiled step, exact resume.

The step is one jit graph (forward, backward, unscale, clip, AdamW), or with gradient accumulation two: `micro`
(gradients added into accumulators) and `apply`. The loss scaler lives on the host and enters as an input, so
the whole training state is the parameters, the optimizer and a few numbers in the checkpoint's sidecar.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.experimental.optim import AdamW

from converters.runs import NETWORK, TRAINING, ckpt_path, record_path
from glm2_core.errors import CheckpointError

from . import checkpointing as ckpt
from .data import IGNORE, Lengths, TrainData, answer_windows, read_jsonl
from .fused_adamw import FusedAdamW
from .loading import from_pretrained
from .lora import LoRAConfig, apply_lora, dropout_masks, lora_cells, size_dropout_masks
from .model import GLM2ForCausalLM
from .optimizer_shards import PREFIX, OptimizerShards
from .tokenizer import GLM2Tokenizer
from .train_config import TrainConfig

MOMENTS = {"exp_avg.": "adam_m.", "exp_avg_sq.": "adam_v."}  # experimental AdamW names → MindFormers names
SCHEDULE = ("learning_rate", "lr_end", "warmup_steps", "lr_power")  # with the total step count: every step's lr


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


@dataclass
class State:
    step: int = 0           # optimizer steps taken
    epoch: int = 0
    in_epoch: int = 0       # optimizer steps taken in this epoch
    loss_scale: float = 1.0
    good_steps: int = 0
    losses: list = field(default_factory=list)


class Trainer:
    def __init__(self, model_dir, train_file, out_dir, cfg: TrainConfig, resume: bool = False,
                 progress: bool = True, rank: int = 0, world: int = 1, model: GLM2ForCausalLM | None = None):
        self.cfg, self.out, self.rank, self.world = cfg, Path(out_dir), rank, world
        self.model_dir, self.progress = Path(model_dir), progress
        lengths = Lengths(cfg.max_source_length, cfg.max_target_length, cfg.seq_length)
        self.tok = GLM2Tokenizer.from_pretrained(self.model_dir)
        lines = read_jsonl(train_file, cfg.prompt_column, cfg.response_column)
        self.skipped = lines.skipped
        self.data = TrainData(self.tok, lines, lengths)
        self.seq = lengths.total
        self.model = model or from_pretrained(self.model_dir, dtype="float32", compute_dtype=cfg.compute_dtype)
        if cfg.method == "lora":
            apply_lora(self.model, LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                                              cfg.seed))
            size_dropout_masks(self.model, cfg.batch_size, lengths.total)
        self.model.set_train(True)
        trainable = self.model.trainable_params()
        # in the optimizer's order: the decayed matrices, then norms and biases (MindFormers' filter)
        decay = [p for p in trainable if len(p.shape) > 1]
        self.weights = ms.ParameterTuple(decay + [p for p in trainable if len(p.shape) <= 1])
        self.shards = OptimizerShards(list(self.weights), rank, world, cfg.shard_optimizer)
        decay, no_decay = self.shards.updated[:len(decay)], self.shards.updated[len(decay):]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = FusedAdamW if cfg.optimizer == "fused-adamw" else AdamW
        self.opt = optimizer(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        per_epoch = len(self.data) // (cfg.batch_size * world) // cfg.gradient_accumulation_steps
        if per_epoch == 0:
            raise CheckpointError(f"{train_file}: {len(self.data)} examples do not fill one step of "
                                  f"{cfg.batch_size * world * cfg.gradient_accumulation_steps}")
        self.steps_per_epoch = per_epoch
        self.total = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)
        self.state = State(loss_scale=cfg.loss_scale if cfg.compute_dtype == "float16" else 1.0)
        self._build_steps()
        if resume:
            self._resume()

    # ---- the jit graphs
    def _build_steps(self):
        """`micro` (forward + backward, gradients into accumulators) and `apply` (unscale, clip, AdamW, zero the
        accumulators); in float32 without accumulation one fused graph does both and needs no accumulators.
        With float16 the host looks at `finite` between the two and calls `discard` instead of `apply` on an
        overflow, so a skipped step leaves the optimizer untouched."""
        model, opt, cfg = self.model, self.opt, self.cfg
        k = cfg.gradient_accumulation_steps
        check_finite = cfg.compute_dtype == "float16"
        self._accumulate = k > 1 or check_finite
        reducer = self._grad_reducer()
        masks = [cell.dropout_mask for _, cell in lora_cells(model)] if cfg.method == "lora" else []
        accu = self.weights.clone(prefix="accu_grads", init="zeros") if self._accumulate else ()
        world, shards = self.world, self.shards
        all_reduce = ops.AllReduce() if world > 1 else None

        def forward(ids, picks, targets, scale):
            loss = token_loss(model(ids, picks=picks), targets)
            return loss * scale, loss

        grad_fn = ms.value_and_grad(forward, None, self.weights, has_aux=True)

        def backward(ids, picks, targets, scale, fresh_masks):
            for param, value in zip(masks, fresh_masks):
                ops.assign(param, value)
            (_, loss), grads = grad_fn(ids, picks, targets, scale)
            if world > 1:  # the reported loss is the global batch's (each rank's mean, averaged)
                loss = all_reduce(loss) / world
            return loss, grads

        def update(grads, scale, lr):
            for group_lr in opt.lrs:
                ops.assign(group_lr, lr)
            if self._accumulate:  # (static) no extra copy of every gradient when there is nothing to undo
                grads = tuple(g / (scale * k) for g in grads)
            grads = ops.clip_by_global_norm(reducer(grads), cfg.max_grad_norm)
            opt(shards.take(grads))
            return shards.gather()

        def fused(ids, picks, targets, scale, lr, *fresh_masks):
            loss, grads = backward(ids, picks, targets, scale, fresh_masks)
            update(grads, scale, lr)
            return loss

        def micro(ids, picks, targets, scale, *fresh_masks):
            loss, grads = backward(ids, picks, targets, scale, fresh_masks)
            for a, g in zip(accu, grads):
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

        # Every value that changes between steps enters as an input: on this MindSpore a parameter changed with
        # set_data after its graph was compiled keeps its old value inside the graph.
        self._fused, self._micro, self._apply = ms.jit(fused), ms.jit(micro), ms.jit(apply)
        self._discard, self._finite = ms.jit(discard), ms.jit(finite)

        def gather():
            return shards.gather()

        self._gather = ms.jit(gather)

    def _grad_reducer(self):
        if self.world == 1:
            return lambda grads: grads
        from mindspore import nn

        return nn.DistributedGradReducer(self.weights, mean=True)

    # ---- the loop
    def train(self, stop_after: int | None = None) -> list[float]:
        """Train to the end (or for `stop_after` more steps, as an interrupted run would); returns all losses."""
        cfg, st = self.cfg, self.state
        stop = min(self.total, st.step + stop_after) if stop_after else self.total
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # what merging the rank checkpoints needs besides them (converters/runs.py)
            ckpt.write_model_files(self.out, self.model.config, "float32", self.model_dir)
        log = (self.out / "train_log.jsonl").open("a") if self.rank == 0 else None
        bar = self._bar()
        try:
            while st.step < stop:
                batches = self.data.batches(cfg.batch_size, cfg.seed, st.epoch, rank=self.rank, world=self.world)
                for _ in range(st.in_epoch * cfg.gradient_accumulation_steps):
                    next(batches)  # resume inside an epoch: skip what was already trained on
                while st.in_epoch < self.steps_per_epoch and st.step < stop:
                    t0 = time.perf_counter()
                    loss = self._one_step(batches)
                    self._record(loss, time.perf_counter() - t0, log, bar)
                    if cfg.save_steps and st.step % cfg.save_steps == 0 and st.step < self.total:
                        self.save()
                if st.in_epoch >= self.steps_per_epoch:
                    st.epoch, st.in_epoch = st.epoch + 1, 0
            self.save()
        finally:
            if log:
                log.close()
            if bar is not None:
                bar.close()
        return st.losses

    def _one_step(self, batches) -> float:
        cfg, st = self.cfg, self.state
        lr = Tensor(cfg.lr_at(st.step, self.total), ms.float32)
        scale = Tensor(st.loss_scale, ms.float32)
        losses = []
        for micro in range(cfg.gradient_accumulation_steps):
            ids, labels = next(batches)
            masks = []
            if cfg.method == "lora" and cfg.lora_dropout > 0:
                # indexed by the micro-batch's place in the global batch: N ranks × k micro-batches draw the
                # masks one process with N·k micro-batches would
                rng = np.random.default_rng([cfg.seed, st.step, micro * self.world + self.rank])
                masks = dropout_masks(self.model, rng, *ids.shape, cfg.lora_dropout)
            step = self._micro if self._accumulate else self._fused
            extra = () if self._accumulate else (lr,)
            picks, targets = answer_windows(labels, cfg.max_target_length + 1)
            losses.append(float(step(Tensor(ids), Tensor(picks), Tensor(targets), scale, *extra, *masks).asnumpy()))
        finite = True
        if self._accumulate:
            finite = cfg.compute_dtype != "float16" or bool(self._finite().asnumpy())
            self._apply(scale, lr) if finite else self._discard()
        if cfg.compute_dtype == "float16":
            self._adjust_scale(finite)
        st.step += 1
        st.in_epoch += 1
        self.lr = float(lr.asnumpy())
        return float(np.mean(losses))

    def _adjust_scale(self, finite: bool) -> None:
        st, cfg = self.state, self.cfg
        if not finite:
            st.loss_scale, st.good_steps = max(st.loss_scale / cfg.loss_scale_factor, 1.0), 0
            return
        st.good_steps += 1
        if st.good_steps >= cfg.loss_scale_window:
            st.loss_scale, st.good_steps = st.loss_scale * cfg.loss_scale_factor, 0

    def _record(self, loss: float, seconds: float, log, bar) -> None:
        st, cfg = self.state, self.cfg
        st.losses.append(loss)
        tokens = cfg.batch_size * self.world * cfg.gradient_accumulation_steps * self.seq
        row = {"step": st.step, "epoch": st.epoch, "loss": loss, "lr": self.lr, "tokens_per_s": tokens / seconds,
               "rss_mb": _rss_mb(), "loss_scale": st.loss_scale}
        if log and st.step % cfg.log_steps == 0:
            log.write(json.dumps(row) + "\n")
            log.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")

    def _bar(self):
        if self.rank != 0 or not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total, initial=self.state.step, desc=f"{self.cfg.method} finetune", unit="step",
                    disable=None)

    # ---- checkpoints
    def network_state(self) -> dict[str, np.ndarray]:
        return {p.name: p.asnumpy() for p in self.model.get_parameters() if not p.name.endswith("dropout_mask")}

    def save(self) -> Path:
        """This rank's checkpoint files (and, from rank 0 of several, the strategy that lays them out)."""
        st = self.state
        net = {n: self.shards.saved(n, a) for n, a in self.network_state().items()}
        full = dict(net)
        for prefix, moments in (("exp_avg.", self.opt.exp_avg), ("exp_avg_sq.", self.opt.exp_avg_sq)):
            for p in moments:
                full[MOMENTS[prefix] + p.name[len(prefix):].removeprefix(PREFIX)] = p.asnumpy()
        if self.world > 1 and self.rank == 0:
            ckpt.write_strategy(self.out, {n: self.shards.layout(n.split(".", 1)[1] if n.startswith(
                tuple(MOMENTS.values())) else n, a.ndim) for n, a in full.items()})
        full.update({"global_step": np.array(st.step, np.int32), "epoch_num": np.array(st.epoch, np.int32),
                     "step_num": np.array(st.step, np.int32), "loss_scale": np.array(st.loss_scale, np.float32)})
        path = ckpt_path(self.out, TRAINING, self.rank, st.epoch, st.step)
        ckpt.write_ckpt(ckpt_path(self.out, NETWORK, self.rank, st.epoch, st.step), net)
        ckpt.write_ckpt(path, full)
        ckpt.write_json_atomic(record_path(path), {
            "step": st.step, "epoch": st.epoch, "in_epoch": st.in_epoch, "loss_scale": st.loss_scale,
            "good_steps": st.good_steps, "world": self.world, "shard_optimizer": bool(self.shards.slices),
            "total_steps": self.total, "config": self.cfg.as_dict(), "losses": st.losses})
        return path

    def _resume(self) -> None:
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
        if side.get("shard_optimizer", False) != bool(self.shards.slices):
            raise CheckpointError(f"{path}: saved with shard_optimizer={side.get('shard_optimizer', False)}; resume "
                                  f"with the same setting")
        self._check_schedule(record_path(path), side)
        saved = ckpt.read_ckpt(path)
        params = {p.name: p for p in self.model.get_parameters()}
        for prefix, moments in (("exp_avg.", self.opt.exp_avg), ("exp_avg_sq.", self.opt.exp_avg_sq)):
            for p in moments:
                params[p.name] = p
                saved[p.name] = saved.pop(MOMENTS[prefix] + p.name[len(prefix):].removeprefix(PREFIX))
        for name, p in params.items():
            if name.endswith("dropout_mask"):
                continue
            if name not in saved:
                raise CheckpointError(f"{path}: has no {name}; it was written by another run")
            if not self.shards.restore(name, saved[name]):
                p.set_data(Tensor(saved[name]).astype(p.dtype))
        if self.shards.slices:
            self._gather()
        self.opt.state_step.set_data(Tensor(int(saved["global_step"]), ms.int32))
        st = self.state
        st.step, st.epoch, st.in_epoch = side["step"], side["epoch"], side["in_epoch"]
        st.loss_scale, st.good_steps, st.losses = side["loss_scale"], side["good_steps"], side["losses"]
        if self.rank == 0:
            self._truncate_log()

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

    def _truncate_log(self) -> None:
        """Keep train_log.jsonl to the steps the resumed checkpoint holds: a killed run may have logged steps past
        its last checkpoint (the last line perhaps half written), which are trained again now."""
        log = self.out / "train_log.jsonl"
        if log.is_file():
            rows = log.read_text().splitlines()
            kept = [line for line in rows if _logged_step(line) <= self.state.step]
            if len(kept) != len(rows):
                ckpt.write_atomic(log, "".join(line + "\n" for line in kept).encode())


def export(trainer: "Trainer", merge: bool = False) -> dict[str, str]:
    """What a finished run leaves besides its checkpoints. LoRA: a PEFT adapter (ChatGLM names, and transformers-GLM
    names), a mindpet adapter, and with `merge` the base checkpoint with the adapter folded in (streamed from the
    base on disk). Full: the model as a converter folder."""
    from converters.adapters import adapter_from_mindpet, write_mindpet, write_peft
    from converters.convert import convert
    from converters.model_folder import write_model_folder
    from glm2_core.names import Layout

    from .lora import lora_state

    out, cfg, mcfg = trainer.out, trainer.cfg, trainer.model.config
    if cfg.method == "full":
        write_model_folder(trainer.network_state(), mcfg, out / "model", source=out, tokenizer_from=trainer.model_dir,
                           overwrite=True)
        return {"model": str(out / "model")}
    adapter = adapter_from_mindpet(lora_state(trainer.model), cfg.lora_alpha, cfg.lora_dropout)
    paths = {"adapter": out / "adapter", "adapter-glm": out / "adapter-glm", "mindpet": out / "mindpet"}
    base = str(trainer.model_dir.resolve())  # PEFT loads the base from here, whatever the current folder
    write_peft(adapter, paths["adapter"], "chatglm", mcfg, base)
    write_peft(adapter, paths["adapter-glm"], "glm", mcfg, base)
    write_mindpet(adapter, paths["mindpet"])
    if merge:
        paths["merged"] = out / "merged"
        convert(trainer.model_dir, paths["merged"], target=Layout("mindformers"), fmt="ckpt", overwrite=True,
                progress=False, adapter=adapter)
    return {k: str(v) for k, v in paths.items()}


def _logged_step(line: str) -> float:
    """The step of a train_log.jsonl line; infinity for a line that is not a whole record."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        return 0.0
