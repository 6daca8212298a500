"""`glm2-merge-shards`: per-rank MindSpore checkpoints + strategy → one model (MindSpore or HF), and `split`."""
from __future__ import annotations

import sys

import click

from .cli import PATH, _print_summary, user_errors
from .errors import CheckpointError

LAYOUTS = {"ms": ("mindformers", "mindformers-legacy"), "hf": ("chatglm", "glm")}


@click.command()
@click.argument("paths", nargs=-1, required=True, type=PATH)
@click.option("--strategy", required=True, type=PATH,
              help="Strategy file (protobuf or .json), or a folder of per-stage / per-rank files.")
@click.option("--to", "to", type=click.Choice(["ms", "hf"]), default="ms", show_default=True)
@click.option("--layout", type=click.Choice(LAYOUTS["ms"] + LAYOUTS["hf"]), default=None,
              help="Names of the output: mindformers (default for ms), mindformers-legacy, chatglm (default for "
                   "hf) or glm.")
@click.option("--format", "fmt", type=click.Choice(["ckpt", "safetensors", "bin"]), default=None,
              help="Default: ckpt for ms, safetensors for hf.")
@click.option("--keep-optimizer", is_flag=True, help="Keep the optimizer state (MindSpore output only).")
@click.option("--lora-alpha", type=float, help="The run's lora_alpha, to fold LoRA adapters into the weights "
                                                "(default: what a glm2-finetune run recorded).")
@click.option("--dtype", default="keep", show_default=True, type=click.Choice(["keep", "float32", "float16",
                                                                                "bfloat16"]))
@click.option("--max-shard-size", default="2GB", show_default=True, help="HF output shard size.")
@click.option("--config", type=PATH, help="config.json of the model (default: the one beside the rank folders, "
                                         "as glm2-finetune and split write it; else inferred from the shapes).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def merge_command(paths, strategy, to, layout, fmt, keep_optimizer, lora_alpha, dtype, max_shard_size, config,
                  overwrite, quiet, as_json):
    """Merge the rank checkpoints of a distributed run into one model at DST.

    \b
    glm2-merge-shards SRC_DIR --strategy FILE_OR_DIR DST [--to ms|hf]
    glm2-merge-shards RANK0.ckpt RANK1.ckpt … --strategy FILE DST
    glm2-merge-shards split FULL_CKPT --strategy FILE DST_DIR   (the other way; see split --help)

    SRC_DIR holds rank_{r}/ folders of .ckpt or .safetensors files (or is a glm2-finetune or MindFormers output
    folder with checkpoint/rank_{r}/)."""
    from .names import Layout
    from .output import parse_size
    from .shards import merge

    if len(paths) < 2:
        raise CheckpointError("expected SRC_DIR (or rank files) and DST")
    *sources, dst = paths
    layout = layout or LAYOUTS[to][0]
    if layout not in LAYOUTS[to]:
        raise CheckpointError(f"--layout {layout} is a {'HF' if to == 'ms' else 'MindSpore'} naming; --to {to} "
                              f"takes {' or '.join(LAYOUTS[to])}")
    fmt = fmt or ("ckpt" if to == "ms" else "safetensors")
    if (fmt in ("ckpt", "bin")) and fmt != {"ms": "ckpt", "hf": "bin"}[to]:
        raise CheckpointError(f"--format {fmt} does not go with --to {to}")
    summary, stats = merge(list(sources), strategy, dst, target=Layout(layout), hf_folder=to == "hf", fmt=fmt,
                           lora_alpha=lora_alpha, dtype=dtype, overwrite=overwrite, keep_optimizer=keep_optimizer,
                           max_shard_bytes=parse_size(max_shard_size), config=config, progress=not quiet)
    _print_summary(summary, as_json)
    if not as_json:
        click.echo("\n".join(stats.lines()))


@click.command()
@click.argument("full", type=PATH)
@click.argument("dst", type=PATH)
@click.option("--strategy", required=True, type=PATH, help="Target strategy file or folder of per-stage files.")
@click.option("--prefix", default="glm2_rank_", show_default=True, help="Rank files are {prefix}{rank}.ckpt.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def split_command(full, dst, strategy, prefix, overwrite, quiet):
    """Cut a full MindSpore checkpoint into DST/rank_{r}/ files laid out by the strategy (config.json and the
    tokenizer beside FULL go to DST too)."""
    from .shards import split

    click.echo("\n".join(split(full, strategy, dst, prefix=prefix, overwrite=overwrite, progress=not quiet).lines()))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "split":
        split_command(args[1:], prog_name="glm2-merge-shards split")
    else:
        merge_command(args, prog_name="glm2-merge-shards")
