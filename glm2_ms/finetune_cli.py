"""`glm2-finetune`: full or LoRA finetuning on ADGEN-style JSON lines, single process or under msrun."""
from __future__ import annotations

import json
from pathlib import Path

import click

from converters.cli import user_errors

OVERRIDES = [("learning_rate", float), ("lr_end", float), ("warmup_steps", int), ("batch_size", int),
             ("gradient_accumulation_steps", int), ("epochs", int), ("lora_rank", int), ("lora_alpha", float),
             ("lora_dropout", float), ("target_modules", str), ("max_source_length", int),
             ("max_target_length", int), ("seq_length", int), ("compute_dtype", str), ("save_steps", int),
             ("seed", int), ("weight_decay", float), ("max_grad_norm", float), ("prompt_column", str),
             ("response_column", str), ("optimizer", click.Choice(["adamw", "fused-adamw"]))]


def _overrides(fn):
    for name, kind in reversed(OVERRIDES):
        fn = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=None,
                          help=f"Override the config's {name}.")(fn)
    return fn


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="A folder glm2-convert wrote (or any checkpoint folder it reads).")
@click.option("--train-data", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--method", type=click.Choice(["lora", "full"]), default=None, help="Default: the config's (lora).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path),
              help="YAML or JSON with MindFormers-like field names.")
@click.option("--max-steps", type=int, default=None)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT.")
@click.option("--merge", is_flag=True, help="LoRA: also write the base model with the adapter merged.")
@click.option("--shard-optimizer", is_flag=True, default=None,
              help="Under msrun: shard AdamW state and update across the ranks (each holds 1/N).")
@click.option("--device", type=click.Choice(["CPU", "Ascend", "GPU"]), default="CPU", show_default=True,
              help="MindSpore device (CPU is what this project tests).")
@click.option("--quiet", is_flag=True)
@_overrides
@user_errors
def main(model_dir, train_data, method, out_dir, config_file, max_steps, resume, merge, shard_optimizer, device,
         quiet, **overrides):
    """Finetune a converted ChatGLM2 on MindSpore; write checkpoints, adapters (PEFT and mindpet), logs."""
    from .distributed import world
    from .loading import use_device
    from .train import Trainer, export
    from .train_config import TrainConfig

    use_device(device)
    rank, size = world()
    cfg = TrainConfig.load(config_file, method=method, max_steps=max_steps, shard_optimizer=shard_optimizer,
                           **overrides)
    if not resume and (out_dir / "checkpoint").exists():  # every rank sees it: none starts a collective
        raise click.ClickException(f"{out_dir} holds checkpoints already: pass --resume, or another --out")
    trainer = Trainer(model_dir, train_data, out_dir, cfg, resume=resume, progress=not quiet, rank=rank, world=size)
    if rank == 0:
        skipped = {k: v for k, v in trainer.skipped.items() if v}
        click.echo(f"{len(trainer.data)} training examples ({skipped or 'none'} skipped), {trainer.total} steps, "
                   f"{size} process(es)", err=True)
    losses = trainer.train()
    if rank == 0:
        outputs = export(trainer, merge)
        click.echo(json.dumps({"steps": trainer.state.step, "first_loss": losses[0] if losses else None,
                               "last_loss": losses[-1] if losses else None, "outputs": outputs}, indent=2))
