"""`glm2-finetune`: full or LoRA finetuning on ADGEN-style JSON lines, single process or under msrun."""
from __future__ import annotations

import json
import typing
from dataclasses import fields

import click
from click.core import ParameterSource

from glm2_core.errors import UserError
from glm2_core.options import VOCABULARY, ExistingPath, Interrupted, Tool, option

from .train_config import TrainConfig


def _setting_option(f, kind):
    """The flag of one TrainConfig field: its help and choices from the field, the shared vocabulary's where
    other tools take the same flag. The default shown is the field's; only flags given on the command line
    override the config file (see `train_config`)."""
    flag, choices = f"--{f.name.replace('_', '-')}", f.metadata["choices"]
    shown = True if f.default is not None else f.metadata["none"]
    if flag in VOCABULARY:
        return option(flag, default=f.default, choices=choices, show_default=shown)
    if kind is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, show_default=shown,
                            help=f.metadata["help"])
    return click.option(flag, f.name, type=click.Choice(choices) if choices else kind, default=f.default,
                        show_default=shown, help=f.metadata["help"])


def config_options(fn):
    """One flag per TrainConfig field, generated (README: every training setting is a flag)."""
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
@option("--quiet")
@config_options
def main(model_dir, train_data, out_dir, config_file, resume, merge, device, quiet, **settings):
    """Finetune the ChatGLM2 in MODEL_DIR (a folder glm2-convert wrote, or any checkpoint it reads) on MindSpore.

    Writes to --out: checkpoints (checkpoint/rank_{r}/, MindFormers' layout), train_log.jsonl, and the adapters
    (PEFT and mindpet) or the finetuned model. Every training setting is a flag; a flag given overrides
    --train-config, which overrides the defaults shown. Ctrl-C stops after the current step and keeps the last
    checkpoint (continue with --resume)."""
    from .distributed import world
    from .loading import use_device
    from .train import Trainer, export

    use_device(device)
    rank, size = world()
    cfg = train_config(config_file, settings)
    if not resume and (out_dir / "checkpoint").exists():  # every rank sees it: none starts a collective
        raise UserError(f"{out_dir}: holds checkpoints already; pass --resume, or another --out")
    trainer = Trainer(model_dir, train_data, out_dir, cfg, resume=resume, progress=not quiet, rank=rank, world=size)
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


def _kept(trainer) -> str:
    from .checkpointing import latest

    path = latest(trainer.out, trainer.rank, trainer.world)
    if path is None:
        return f"after {trainer.state.step} steps, before the first checkpoint; nothing to resume"
    return f"after {trainer.state.step} steps; kept the last checkpoint, {path} (continue with --resume)"
