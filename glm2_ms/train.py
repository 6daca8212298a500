"""Full and LoRA finetuning of GLM2 on MindSpore: AdamW with bias correction, warmup + polynomial decay,
gradient clipping and accumulation, float16 compute with dynamic loss scaling, a jit-compiled step, exact resume.

The loop lives here; the step's graphs in train_step.py, the checkpoints in train_checkpoint.py. The loss scaler
lives on the host and enters the step as an input, so the whole training state is the parameters, the optimizer
and a few numbers in the checkpoint's record.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from converters.adapters import adapter_from_mindpet, write_mindpet, write_peft
from converters.convert import convert, write_model_folder
from converters.runs import base_identity
from glm2_core.errors import UserError
from glm2_core.files import RUN_ENTRIES, TRAIN_LOG
from glm2_core.names import Layout
from glm2_core.releases import RELEASES

from . import checkpointing as ckpt
from .api import open_model
from .data import Lengths, TrainData, answer_windows, read_jsonl
from .lora import LoRAConfig, apply_lora, dropout_masks, lora_state, size_dropout_masks
from .model import GLM2Network, use_native_kernels
from .train_checkpoint import State, TrainingCheckpoint, network_state, resume_point
from .train_config import TrainConfig
from .train_step import TrainStep, token_loss

__all__ = ["Trainer", "export", "token_loss"]


class Trainer:
    def __init__(self, model_dir, train_file, out_dir, cfg: TrainConfig, resume: bool = False,
                 progress: bool = True, rank: int = 0, world: int = 1, model: GLM2Network | None = None,
                 release: str | None = None):
        self.cfg, self.out, self.rank, self.world = cfg, Path(out_dir), rank, world
        self.model_dir, self.progress, self.release = Path(model_dir), progress, release  # release: --release
        lengths = Lengths(cfg.max_source_length, cfg.max_target_length, cfg.seq_length)
        with open_model(self.model_dir, release=release) as folder:  # opened once: config, tokenizer, weights
            self.tok = folder.tokenizer
            lines = read_jsonl(train_file, cfg.prompt_column, cfg.response_column)
            self.skipped = lines.skipped
            self.data = TrainData(self.tok, lines, lengths)
            self.seq = lengths.total
            per_epoch = len(self.data) // (cfg.batch_size * world) // cfg.gradient_accumulation_steps
            if per_epoch == 0:
                raise UserError(f"{train_file}: {len(self.data)} examples do not fill one step of "
                                f"{cfg.batch_size * world * cfg.gradient_accumulation_steps}")
            self.steps_per_epoch = per_epoch
            self.total = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)
            self.base = base_identity(self.model_dir)
            point = resume_point(self.out, cfg, self.total, self.base, rank, world) if resume else None
            self.model = model or folder.load(_storage_dtype(cfg, folder.source.dtype), cfg.compute_dtype,
                                              training=True)
        use_native_kernels(self.model, False)  # MindSpore's MatMul, whose backward training needs
        if cfg.method == "lora":
            apply_lora(self.model, LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                                              cfg.seed))
            size_dropout_masks(self.model, cfg.batch_size, lengths.total)
        self.model.set_train(True)
        self.train_step = TrainStep(self.model, cfg, rank, world)
        self.checkpoints = TrainingCheckpoint(self.out, self.model, self.train_step, cfg, self.total, rank, world,
                                              self.base)
        self.state = State(loss_scale=cfg.loss_scale if cfg.compute_dtype == "float16" else 1.0)
        if point is not None:
            self.checkpoints.resume(self.state, *point)
        self.saved_step = self.state.step if point is not None else None  # the step of this run's newest save
        self._log, self._model_files = None, None  # the model files this run wrote, once it has

    # ---- the loop
    def train(self, stop_after: int | None = None) -> list[float]:
        """Train to the end (or for `stop_after` more steps, as an interrupted run would); returns all losses.

        Ctrl-C (or SIGTERM) stops at the end of the running step, saves it and raises KeyboardInterrupt, so that
        --resume continues from exactly there; a second one stops at once. Nothing is written to --out before the
        first step is done, and a fresh --out is emptied again when the run stops before its first save."""
        cfg, st = self.cfg, self.state
        stop = min(self.total, st.step + stop_after) if stop_after else self.total
        fresh = not self.out.exists() or self.out.is_dir() and not any(self.out.iterdir())
        created = not self.out.exists()
        bar = self._bar()
        try:
            with StopRequest() as request:
                while st.step < stop:
                    batches = self.data.batches(cfg.batch_size, cfg.seed, st.epoch, rank=self.rank, world=self.world)
                    for _ in range(st.in_epoch * cfg.gradient_accumulation_steps):
                        next(batches)  # resume inside an epoch: skip what was already trained on
                    while st.in_epoch < self.steps_per_epoch and st.step < stop:
                        t0 = time.perf_counter()
                        loss = self._one_step(batches)
                        self._record(loss, time.perf_counter() - t0, bar)
                        if request.stop or (cfg.save_steps and st.step % cfg.save_steps == 0 and st.step < self.total):
                            self.save()
                        if request.stop:
                            raise KeyboardInterrupt
                    if st.in_epoch >= self.steps_per_epoch:
                        st.epoch, st.in_epoch = st.epoch + 1, 0
                self.save()
                if request.stop:
                    raise KeyboardInterrupt
        except BaseException:
            self._close(bar)
            if fresh and self.saved_step is None:
                self._discard(created)
            raise
        self._close(bar)
        return st.losses

    def _close(self, bar) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if bar is not None:
            bar.close()

    def _discard(self, created: bool) -> None:
        """A run that stops before its first save in a fresh --out leaves it as it found it (one process: under
        msrun the other ranks may still be writing): what it wrote is removed, anything else put there meanwhile
        is kept, and with it the folder."""
        if self.world > 1 or not self.out.is_dir():
            return
        written = set(RUN_ENTRIES) | {f.name for f in self._model_files or ()}
        for entry in self.out.iterdir():
            if entry.name in written:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if created and not any(self.out.iterdir()):
            self.out.rmdir()

    def _one_step(self, batches) -> float:
        cfg, st = self.cfg, self.state
        lr = cfg.lr_at(st.step, self.total)
        losses, finite = self.train_step(self._micro_batches(batches, st.step), lr, st.loss_scale)
        if cfg.compute_dtype == "float16":
            self._adjust_scale(finite)
        st.step += 1
        st.in_epoch += 1
        self.lr = float(np.float32(lr))  # as the step received it
        return float(np.mean(losses))

    def _micro_batches(self, batches, step: int):
        """The micro-batches of one optimizer step: ids, the answer windows' positions and targets, and the LoRA
        dropout masks, drawn by the micro-batch's place in the global batch (N ranks × k micro-batches draw the
        masks one process with N·k micro-batches would)."""
        cfg = self.cfg
        for micro in range(cfg.gradient_accumulation_steps):
            ids, labels = next(batches)
            masks = []
            if cfg.method == "lora" and cfg.lora_dropout > 0:
                rng = np.random.default_rng([cfg.seed, step, micro * self.world + self.rank])
                masks = dropout_masks(self.model, rng, *ids.shape, cfg.lora_dropout)
            yield ids, *answer_windows(labels, cfg.max_target_length + 1), masks

    def _adjust_scale(self, finite: bool) -> None:
        st, cfg = self.state, self.cfg
        if not finite:
            st.loss_scale, st.good_steps = max(st.loss_scale / cfg.loss_scale_factor, 1.0), 0
            return
        st.good_steps += 1
        if st.good_steps >= cfg.loss_scale_window:
            st.loss_scale, st.good_steps = st.loss_scale * cfg.loss_scale_factor, 0

    def _record(self, loss: float, seconds: float, bar) -> None:
        st, cfg = self.state, self.cfg
        st.losses.append(loss)
        tokens = cfg.batch_size * self.world * cfg.gradient_accumulation_steps * self.seq
        row = {"step": st.step, "epoch": st.epoch, "loss": loss, "lr": self.lr, "tokens_per_s": tokens / seconds,
               "rss_mb": _rss_mb(), "loss_scale": st.loss_scale}
        if self.rank == 0 and st.step % cfg.log_steps == 0:
            if self._log is None:  # opened with the first row: nothing is written before a step is done
                self.out.mkdir(parents=True, exist_ok=True)
                self._log = (self.out / TRAIN_LOG).open("a")
            self._log.write(json.dumps(row) + "\n")
            self._log.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")

    def _bar(self):
        if self.rank != 0 or not self.progress:
            return None

        return tqdm(total=self.total, initial=self.state.step, desc=f"{self.cfg.method} finetune", unit="step",
                    disable=None)

    def save(self) -> Path:
        """The state at this step; the model's config and tokenizer beside the first save (what merging the rank
        checkpoints needs besides them: converters/runs.py)."""
        path = self.checkpoints.save(self.state, first=self._write_model_files)
        self.saved_step = self.state.step
        return path


    def _write_model_files(self) -> None:
        if self.rank == 0 and self._model_files is None:
            self._model_files = ckpt.write_model_files(self.out, self.model.config, "float32", self.model_dir)


class StopRequest:
    """While a run trains: the first Ctrl-C (SIGINT, or the SIGTERM MindSpore turns it into: glm2_core/options.py)
    or SIGTERM asks it to stop at the end of the running step, so that the step is saved; a second one goes to the
    handler that was there before (the tools': stop now)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    NOTICE = b"\nstopping after this step to save it (interrupt again to stop at once)\n"

    def __init__(self):
        self.stop, self.previous = False, {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if not self.stop:
            self.stop = True
            os.write(2, self.NOTICE)
            return
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt


def export(trainer: Trainer, merge: bool = False) -> dict[str, str]:
    """What a finished run leaves besides its checkpoints. Full: the model as a converter folder. LoRA: a PEFT
    adapter (ChatGLM names, and transformers-GLM names), a mindpet adapter, and with `merge` the base checkpoint
    with the adapter folded in (streamed from the base on disk)."""
    out = trainer.out
    if trainer.cfg.method == "full":
        write_model_folder(network_state(trainer.model), trainer.model.config, out / "model", source=out,
                           tokenizer_from=trainer.model_dir, overwrite=True)
        return {"model": str(out / "model")}
    return _export_adapter(trainer, merge)


def _export_adapter(trainer: Trainer, merge: bool) -> dict[str, str]:
    out, cfg, mcfg = trainer.out, trainer.cfg, trainer.model.config
    adapter = adapter_from_mindpet(lora_state(trainer.model), cfg.lora_alpha, cfg.lora_dropout)
    # PEFT adapters: `adapter` in the names of the release's own HF form, and in transformers-GLM names too where
    # that is another form (GLM-4-0414's own form is transformers')
    native = RELEASES[mcfg.release].native
    forms = {"adapter": native, **({"adapter-glm": "glm"} if native != "glm" else {})}
    paths = {**{key: out / key for key in forms}, "mindpet": out / "mindpet"}
    base = str(trainer.model_dir.resolve())  # PEFT loads the base from here, whatever the current folder
    for key, layout in forms.items():
        write_peft(adapter, paths[key], layout, mcfg, base)
    write_mindpet(adapter, paths["mindpet"])
    if merge:
        paths["merged"] = out / "merged"
        convert(trainer.model_dir, paths["merged"], target=Layout("mindformers"), fmt="ckpt", overwrite=True,
                progress=False, adapter=adapter, release=trainer.release)
    return {k: str(v) for k, v in paths.items()}


def _storage_dtype(cfg: TrainConfig, stored: str) -> str:
    """The weights' dtype in memory: float32 for what is trained; LoRA's frozen base as the checkpoint stores it
    (float16 is cast to the compute dtype exactly where used, so the losses are those of a float32 copy) — except
    bfloat16, whose embedding lookup has no kernel inside a jit graph on CPU."""
    if cfg.method == "full":
        return "float32"
    return "float32" if stored == "bfloat16" else stored


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        return 0.0
