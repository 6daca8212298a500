"""`glm2-merge-shards`: per-rank MindSpore checkpoints + strategy → one model (MindSpore or HF), and `split`."""
from __future__ import annotations

import click

from glm2_core.errors import UserError
from glm2_core.options import PATH, ExistingPath, Tool, option

from .cli import _print_summary
from .convert import Conversion
from .shards import merge, split

MERGE_USAGE = ("SRC_DIR --strategy FILE_OR_DIR DST [OPTIONS]", "RANK0.ckpt RANK1.ckpt … --strategy FILE DST [OPTIONS]",
               "split FULL_CKPT --strategy FILE DST_DIR [OPTIONS]")


@click.command("split", cls=Tool, interrupted="interrupted; nothing was written")
@click.argument("full", type=ExistingPath())
@click.argument("dst", type=PATH)
@option("--strategy")
@click.option("--prefix", default="glm2_rank_", show_default=True, help="Rank files are {prefix}{rank}.ckpt.")
@option("--overwrite")
@option("--quiet")
def split_command(full, dst, strategy, prefix, overwrite, quiet):
    """Cut a full MindSpore checkpoint FULL into DST/rank_{r}/ files laid out by the strategy (config.json and the
    tokenizer beside FULL go to DST too)."""
    click.echo("\n".join(split(full, strategy, dst, prefix=prefix, overwrite=overwrite, progress=not quiet).lines()))


@click.command("glm2-merge-shards", cls=Tool, usage=MERGE_USAGE, subcommands={"split": split_command},
               interrupted="interrupted; nothing was written",
               aliases={"--to": ("--layout", {"ms": "mindformers", "hf": "chatglm"})})
@click.argument("paths", nargs=-1, required=True, type=PATH)
@option("--strategy")
@option("--layout")
@option("--format", default=None, show_default="ckpt; safetensors for a HF --layout or mindformers-mcore")
@option("--keep-optimizer")
@option("--lora-alpha", show_default="what a glm2-finetune run recorded; needed for other LoRA runs' shards")
@option("--dtype")
@option("--max-shard-size")
@option("--config", src="the shards", show_default="the config.json beside the rank folders, as glm2-finetune and "
                                                  "split write it")
@option("--release")
@option("--overwrite")
@option("--quiet")
@option("--json")
def main(paths, strategy, lora_alpha, as_json, **flags):
    """Merge the rank checkpoints of a distributed run into one model at DST (MindSpore, or HF with a HF
    --layout); `split` goes the other way (see glm2-merge-shards split --help).

    SRC_DIR holds rank_{r}/ folders of .ckpt or .safetensors files (or is a glm2-finetune or MindFormers output
    folder with checkpoint/rank_{r}/)."""
    if len(paths) < 2:
        raise UserError("expected SRC_DIR (or rank files) and DST")
    *sources, dst = paths
    summary, stats = merge(list(sources), strategy, dst, Conversion.from_flags(**flags), lora_alpha)
    _print_summary(summary, as_json)
    if not as_json:
        click.echo("\n".join(stats.lines()))
