"""`glm2-convert`: synth, hf2ms, ms2hf, inspect, verify."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import CheckpointError


def user_errors(fn):
    """Print a user error as one line on stderr and exit 1 — no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CheckpointError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
    return wrapper


def _print_summary(summary, as_json: bool) -> None:
    if as_json:
        from dataclasses import asdict
        click.echo(json.dumps(asdict(summary), indent=2))
    else:
        click.echo("\n".join(summary.lines()))


PATH = click.Path(path_type=Path)
common = [
    click.option("--dtype", default="keep", show_default=True,
                 type=click.Choice(["keep", "float32", "float16", "bfloat16"]), help="Output dtype of float tensors."),
    click.option("--overwrite", is_flag=True, help="Replace DST if it exists."),
    click.option("--allow-overflow", is_flag=True, help="Write values too large for float16 as inf."),
    click.option("--config", "config", type=PATH, help="config.json to use when SRC has none."),
    click.option("--rearranged-rope", is_flag=True, default=None,
                 help="SRC has MindFormers' rearranged RoPE rows (read from its manifest when it has one)."),
    click.option("--quiet", is_flag=True, help="No progress bar."),
    click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
]


def with_common(fn):
    for opt in reversed(common):
        fn = opt(fn)
    return fn


@click.group()
@click.version_option(package_name="glm2-toolkit")
def main():
    """Convert ChatGLM2 checkpoints between HF/PyTorch and MindSpore, streaming tensor by tensor."""


@main.command()
@click.argument("out_dir", type=PATH)
@click.option("--preset", type=click.Choice(["tiny", "6b"]), default="tiny", show_default=True)
@click.option("--num-layers", type=int, help="Override the preset's layer count.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["bin", "safetensors"]), default="bin", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-shard-size", default=None, help="Shard size (default 2GB, as the release; 10MB for tiny).")
@click.option("--overwrite", is_flag=True)
@user_errors
def synth(out_dir, preset, num_layers, dtype, fmt, seed, max_shard_size, overwrite):
    """Write a random ChatGLM2 checkpoint laid out exactly like the THUDM release."""
    from .config import GLM2Config
    from .output import parse_size
    from .synth import synthesize

    cfg = GLM2Config.preset(preset, num_layers=num_layers)
    size = parse_size(max_shard_size or ("10MB" if preset == "tiny" else "2GB"))
    files = synthesize(out_dir, cfg, dtype, fmt, seed, size, overwrite)
    click.echo(f"wrote {out_dir}: {len(files)} {fmt} shard(s), preset {preset}, {cfg.num_layers} layers, {dtype}")


@main.command()
@click.argument("src", type=PATH)
@click.argument("dst", type=PATH)
@click.option("--layout", type=click.Choice(["mindformers", "mindformers-legacy"]), default="mindformers",
              show_default=True, help="MindFormers names: current (embedding_weight) or r0.8–r1.1 (embedding_table).")
@click.option("--qkv-split", is_flag=True, help="Store query_key_value as wq/wk/wv (qkv_concat=False).")
@click.option("--mlp-split", is_flag=True, help="Store dense_h_to_4h as dense_left/dense_right (mlp_concat=False).")
@click.option("--rearrange-rope", is_flag=True, help="Permute q/k rows per head (use_rearrange_rope=True).")
@click.option("--format", "fmt", type=click.Choice(["ckpt", "safetensors"]), default="ckpt", show_default=True)
@click.option("--keep-optimizer", is_flag=True, help="Keep optimizer state (when SRC is a training checkpoint).")
@with_common
@user_errors
def hf2ms(src, dst, layout, qkv_split, mlp_split, rearrange_rope, fmt, keep_optimizer, dtype, overwrite,
          allow_overflow, config, rearranged_rope, quiet, as_json):
    """Convert a HF ChatGLM2 checkpoint (folder or file) into a MindSpore folder."""
    from .convert import convert
    from .names import Layout

    summary = convert(src, dst, target=Layout(layout, qkv_split, mlp_split, rearrange_rope), fmt=fmt, dtype=dtype,
                      overwrite=overwrite, allow_overflow=allow_overflow, keep_optimizer=keep_optimizer,
                      rearranged_rope=rearranged_rope, config=config, progress=not quiet)
    _print_summary(summary, as_json)


@main.command()
@click.argument("src", type=PATH)
@click.argument("dst", type=PATH)
@click.option("--target", type=click.Choice(["chatglm", "glm"]), default="chatglm", show_default=True,
              help="chatglm: THUDM names; glm: transformers' native GlmForCausalLM.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "bin"]), default="safetensors", show_default=True)
@click.option("--max-shard-size", default="2GB", show_default=True)
@with_common
@user_errors
def ms2hf(src, dst, target, fmt, max_shard_size, dtype, overwrite, allow_overflow, config, rearranged_rope, quiet,
          as_json):
    """Convert a MindSpore checkpoint (any MindFormers layout) into a HF folder."""
    from .convert import convert
    from .names import Layout
    from .output import parse_size

    summary = convert(src, dst, target=Layout(target), fmt=fmt, dtype=dtype, hf_folder=True,
                      max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite,
                      allow_overflow=allow_overflow, rearranged_rope=rearranged_rope, config=config,
                      progress=not quiet)
    _print_summary(summary, as_json)


@main.command("merge-lora")
@click.argument("base", type=PATH)
@click.argument("adapter", type=PATH)
@click.argument("dst", type=PATH)
@click.option("--lora-alpha", type=float, help="The run's lora_alpha, when ADAPTER has no adapter_config.json and "
                                                "is no checkpoint of a glm2-finetune run (whose record gives it).")
@click.option("--hf", "hf_target", type=click.Choice(["chatglm", "glm"]), default=None,
              help="Write a HF folder of this naming instead of a MindSpore one.")
@click.option("--layout", type=click.Choice(["mindformers", "mindformers-legacy"]), default="mindformers",
              show_default=True)
@click.option("--format", "fmt", type=click.Choice(["ckpt", "safetensors", "bin"]), default=None,
              help="Default: ckpt for MindSpore, safetensors for HF.")
@with_common
@user_errors
def merge_lora(base, adapter, dst, lora_alpha, hf_target, layout, fmt, dtype, overwrite, allow_overflow, config,
               rearranged_rope, quiet, as_json):
    """Fold a LoRA adapter (PEFT folder or mindpet .ckpt) into BASE; W += (alpha/r)·B·A."""
    from .adapters import read_adapter
    from .convert import convert
    from .names import Layout

    fmt = fmt or ("safetensors" if hf_target else "ckpt")
    if (fmt == "bin") != bool(hf_target and fmt == "bin"):
        raise CheckpointError("--format bin is for HF output (--hf)")
    lora = read_adapter(adapter, lora_alpha)
    target = Layout(hf_target) if hf_target else Layout(layout)
    summary = convert(base, dst, target=target, fmt=fmt, dtype=dtype, hf_folder=bool(hf_target), overwrite=overwrite,
                      allow_overflow=allow_overflow, rearranged_rope=rearranged_rope, config=config,
                      progress=not quiet, adapter=lora)
    _print_summary(summary, as_json)
    if not as_json:
        click.echo(f"  merged LoRA r={lora.rank} alpha={lora.alpha:g} (scaling {lora.scaling:g}) into "
                   f"{len(lora.deltas)} modules")


@main.command()
@click.argument("path", type=PATH)
@click.option("--json", "as_json", is_flag=True)
@user_errors
def inspect(path, as_json):
    """List the tensors of a checkpoint file or folder, with its detected layout."""
    from .inspect_verify import inspect as run

    info = run(path)
    if as_json:
        click.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    click.echo(f"{info['path']}: {info['format']}, {len(info['files'])} file(s), layout {info['layout']}")
    click.echo(f"{info['count']} tensors, {info['bytes'] / 1e6:.1f} MB, dtypes {info['dtypes']}")
    if info["crc_ok"]:
        click.echo(f"CRC trailer: {'ok' if all(info['crc_ok']) else 'MISMATCH'}")
    for kind, names in info["non_weights"].items():
        click.echo(f"non-weights ({kind}): {len(names)}")
    for t in info["tensors"]:
        click.echo(f"  {t['name']:<64} {str(t['shape']):<16} {t['dtype']:<9} {t['bytes']:>12}")


@main.command()
@click.argument("a", type=PATH)
@click.argument("b", type=PATH)
@click.option("--atol", type=float, default=0.0, show_default=True, help="Allowed max abs difference.")
@click.option("--a-rearranged-rope", is_flag=True)
@click.option("--b-rearranged-rope", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@user_errors
def verify(a, b, atol, a_rearranged_rope, b_rearranged_rope, as_json):
    """Compare two checkpoints of any formats/layouts tensor by tensor; exit 1 on a mismatch."""
    from .inspect_verify import verify as run
    from .inspect_verify import verify_lines

    report = run(a, b, atol, a_rearranged_rope, b_rearranged_rope)
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(verify_lines(report)))
    sys.exit(0 if report["ok"] else 1)
