"""`glm2-finetune`: full or LoRA finetuning on ADGEN-style JSON lines, single process or under msrun."""
from __future__ import annotations

import json
import os
import typing
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource

from glm2_core.errors import UserError, listed
from glm2_core.files import TRAINING
from glm2_core.options import VOCABULARY, ExistingPath, Interrupted, Tool, option
from glm2_core.outputs import absolute, refuse_overlap

from .checkpointing import latest, run_lock
from .distributed import world
from .loading import use_device
from .train import Trainer, export
from .train_config import TrainConfig


def _setting_option(f, kind):
    """The flag of one TrainConfig field: its help, choices and range from the field, the shared vocabulary's where
    other tools take the same flag (narrowed to the field's range). The default shown is the field's; only flags
    given on the command line override the config file (see `train_config`)."""
    flag, choices, bounds = f"--{f.name.replace('_', '-')}", f.metadata["choices"], f.metadata["range"]
    shown = True if f.default is not None else f.metadata["none"]
    if flag in VOCABULARY:
        return option(flag, default=f.default, choices=choices, show_default=shown,
                      type=bounds.click_type(kind) if bounds else None)
    if kind is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, show_default=shown,
                            help=f.metadata["help"])
    kind = click.Choice(choices) if choices else bounds.click_type(kind) if bounds else kind
    return click.option(flag, f.name, type=kind, default=f.default, show_default=shown, help=f.metadata["help"])


def config_options(fn):
    """One flag per TrainConfig field, generated (docs/finetuning.md: every training setting is a flag)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in reversed(fields(TrainConfig)):
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        fn = _setting_option(f, kind)(fn)
    return fn


def train_config(path, settings: dict) -> TrainConfig:
    """The config file's settings (or the defaults) with those given on the command line over them."""
    ctx = click.get_current_context()
    given = {k: v for k, v in settings.items() if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}
    return TrainConfig.load(path, **given)


@click.command("glm2-finetune", cls=Tool, aliases={"--model": None, "--config": "--train-config"})
@click.argument("model_dir", type=ExistingPath())
@click.option("--train-data", required=True, type=ExistingPath(),
              help="Training data: JSON lines with the prompt and answer keys (--prompt-column, --response-column).")
@option("--out", required=True)
@click.option("--train-config", "config_file", type=ExistingPath(), default=None,
              show_default="none: the defaults shown",
              help="YAML or JSON of training settings (the names of the flags below, with underscores).")
@option("--resume")
@click.option("--merge", is_flag=True, help="LoRA: also write the base model with the adapter merged.")
@click.option("--device", type=click.Choice(["CPU", "Ascend", "GPU"]), default="CPU", show_default=True,
              help="MindSpore device (CPU is what this project tests).")
@option("--release")
@option("--quiet")
@config_options
def main(model_dir, train_data, out_dir, config_file, resume, merge, device, release, quiet, **settings):
    """Finetune the ChatGLM2 in MODEL_DIR (a folder glm2-convert wrote, or any checkpoint it reads) on MindSpore.

    Writes to --out (a new or empty folder; with --resume, the run's): checkpoints (checkpoint/rank_{r}/,
    MindFormers' layout; the newest --keep-checkpoints kept), train_log.jsonl, and the adapters (PEFT and mindpet)
    or the finetuned model. Every training setting is a flag; a flag given overrides --train-config, which
    overrides the defaults shown. Ctrl-C stops after the running step and saves it (continue with --resume);
    a second Ctrl-C stops at once."""
    refuse_overlap(out_dir, (model_dir, train_data, config_file), "--out")
    cfg = train_config(config_file, settings)
    scheduler = os.environ.get("MS_ROLE") == "MS_SCHED"  # msrun's scheduler runs this command too, writing nothing
    # msrun names a worker's rank before MindSpore does
    with nullcontext() if scheduler else run_lock(out_dir, int(os.environ.get("RANK_ID", "0"))):
        check_out(out_dir, resume)
        _run(model_dir, train_data, out_dir, cfg, resume, merge, device, release, quiet)


def _run(model_dir, train_data, out_dir, cfg, resume: bool, merge: bool, device: str, release: str | None,
         quiet: bool) -> None:
    use_device(device)
    rank, size = world()
    trainer = Trainer(model_dir, train_data, out_dir, cfg, resume=resume, progress=not quiet, rank=rank, world=size,
                      release=release)
    if rank == 0:
        skipped = {k: v for k, v in trainer.skipped.items() if v}
        click.echo(f"{len(trainer.data)} training examples ({skipped or 'none'} skipped), {trainer.total} steps, "
                   f"{size} process(es)", err=True)
    try:
        losses = trainer.train()
    except KeyboardInterrupt:
        raise Interrupted(_kept(trainer)) from None
    if rank == 0:
        outputs = export(trainer, merge)
        click.echo(json.dumps({"steps": trainer.state.step, "first_loss": losses[0] if losses else None,
                               "last_loss": losses[-1] if losses else None, "outputs": outputs}, indent=2))


def check_out(out_dir, resume: bool) -> None:
    """A new run needs a new or empty --out (a run's folder is continued with --resume); every rank sees the same,
    so none starts a collective."""
    _check_writable(out_dir)
    if resume:
        return
    if (out_dir / TRAINING).exists():
        raise UserError(f"{out_dir}: holds checkpoints already; pass --resume, or another --out")
    if out_dir.is_symlink() and not out_dir.exists() or out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose another --out")
    try:
        present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot list it ({exc.strerror or exc})") from None
    if present:
        raise UserError(f"{out_dir}: not empty (holds {listed(present)}); a new run needs a new or empty --out")


def _check_writable(out_dir: Path) -> None:
    """--out, or the nearest folder above it that exists (the run creates the rest), must be writable: said before
    the model is loaded, not at the first save."""
    place = absolute(out_dir)
    while not place.exists() and place != place.parent:
        place = place.parent
    if not os.access(place, os.W_OK | os.X_OK):
        raise UserError(f"{out_dir}: cannot write in {place} (permission denied)")


def _kept(trainer) -> str:
    step = trainer.state.step
    path = latest(trainer.out, trainer.rank, trainer.world)
    if path is None:
        left = "left nothing in --out" if not trainer.out.exists() else "nothing to resume"
        return f"after {step} steps, before the first checkpoint; {left}"
    if trainer.saved_step == step:
        return f"after {step} steps; saved step {step} to {path} (continue with --resume)"
    return f"after {step} steps; kept the last checkpoint, {path} (continue with --resume)"
