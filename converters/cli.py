"""`glm2-convert`: synth, hf2ms, ms2hf, merge-lora, to-gguf, inspect, verify."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict

import click

from glm2_core.config import PRESETS, GLM2Config
from glm2_core.dtypes import WEIGHT_DTYPES
from glm2_core.names import HF_LAYOUTS, MS_LAYOUTS, canonical_shapes, formats_of
from glm2_core.options import AT_LEAST_ONE, PATH, ExistingPath, ToolGroup, option, options
from glm2_core.outputs import MODEL, check_output

from . import gguf_out, inspect_verify
from .adapters import read_adapter
from .convert import Conversion, convert
from .output import parse_size
from .synth import synthesize


def _print_summary(summary, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(asdict(summary), indent=2))
    else:
        click.echo("\n".join(summary.lines()))


def common(src: str = "SRC"):
    """The options of every conversion (`src`: the input argument's name, for the help)."""
    return options(option("--no-crc-check"), option("--dtype"), option("--overwrite"), option("--allow-overflow"),
                   option("--config", src=src), option("--rearranged-rope", src=src), option("--release"),
                   option("--quiet"), option("--json"))


def _preset_help() -> str:
    sizes = [f"{name} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
             f"{sum(map(math.prod, canonical_shapes(cfg).values())) / 1e6:,.0f}M parameters)"
             for name, cfg in PRESETS.items()]
    return (f"Model: {', '.join(sizes)}; each with its release's vocabulary (ChatGLM2/3: 65,024 tokens, GLM-4: "
            f"151,552).")


@click.group("glm2-convert", cls=ToolGroup, interrupted="interrupted; nothing was written")
def main():
    """Convert ChatGLM2 checkpoints between HF/PyTorch and MindSpore, streaming tensor by tensor."""


@main.command()
@click.argument("out_dir", type=PATH)
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True, help=_preset_help())
@click.option("--num-layers", type=AT_LEAST_ONE, default=None, show_default="the preset's",
              help="Override the preset's layer count.")
@option("--dtype", choices=WEIGHT_DTYPES, default="float16")
@option("--format", choices=("bin", "safetensors"), default="bin")
@option("--seed")
@option("--max-shard-size", default=None, show_default="2GB; 10MB for --preset tiny")
@option("--overwrite")
def synth(out_dir, preset, num_layers, dtype, fmt, seed, max_shard_size, overwrite):
    """Write a random ChatGLM2 checkpoint laid out exactly like the THUDM release."""
    cfg = GLM2Config.preset(preset, num_layers=num_layers)
    size = parse_size(max_shard_size or ("10MB" if preset == "tiny" else "2GB"))
    files = synthesize(out_dir, cfg, dtype, fmt, seed, size, overwrite)
    click.echo(f"wrote {out_dir}: {len(files)} {fmt} shard(s), preset {preset}, {cfg.num_layers} layers, {dtype}")


@main.command()
@click.argument("src", type=PATH)
@click.argument("dst", type=PATH)
@option("--layout", choices=MS_LAYOUTS)
@click.option("--qkv-split", is_flag=True, help="Store query_key_value as wq/wk/wv (qkv_concat=False).")
@click.option("--mlp-split", is_flag=True, help="Store dense_h_to_4h as dense_left/dense_right (mlp_concat=False).")
@click.option("--rearrange-rope", is_flag=True, help="Permute q/k rows per head (use_rearrange_rope=True).")
@option("--format", choices=formats_of(MS_LAYOUTS), show_default="ckpt; safetensors for mindformers-mcore")
@option("--keep-optimizer")
@common()
def hf2ms(src, dst, as_json, **flags):
    """Convert a HF ChatGLM2 checkpoint (folder or file) into a MindSpore folder."""
    _print_summary(convert(src, dst, Conversion.from_flags(**flags)), as_json)


@main.command(aliases={"--target": "--layout"})
@click.argument("src", type=PATH)
@click.argument("dst", type=PATH)
@option("--layout", choices=HF_LAYOUTS, default="chatglm")
@option("--format", choices=formats_of(HF_LAYOUTS), default="safetensors")
@option("--max-shard-size")
@common()
def ms2hf(src, dst, as_json, **flags):
    """Convert a MindSpore checkpoint (any MindFormers layout) into a HF folder."""
    _print_summary(convert(src, dst, Conversion.from_flags(**flags)), as_json)


@main.command("merge-lora", aliases={"--hf": "--layout"})
@click.argument("base", type=PATH)
@click.argument("adapter", type=PATH)
@click.argument("dst", type=PATH)
@option("--lora-alpha", show_default="from ADAPTER's adapter_config.json")
@option("--layout")
@option("--format", default=None, show_default="ckpt, or safetensors for a HF --layout")
@common(src="BASE")
def merge_lora(base, adapter, dst, lora_alpha, as_json, **flags):
    """Fold the LoRA ADAPTER (PEFT folder, mindpet .ckpt or a LoRA run's checkpoint) into BASE, writing DST;
    W += (alpha/r)·B·A."""
    how = Conversion.from_flags(**flags)
    check_output(dst, how.overwrite, (base, adapter, how.config), kind=MODEL)  # before the adapter is read
    lora = read_adapter(adapter, lora_alpha)
    summary = convert(base, dst, how, adapter=lora, inputs=(adapter,))
    _print_summary(summary, as_json)
    if not as_json:
        click.echo(f"  merged LoRA r={lora.rank} alpha={lora.alpha:g} (scaling {lora.scaling:g}) into "
                   f"{len(lora.deltas)} modules")


@main.command("to-gguf")
@click.argument("src", type=PATH)
@click.argument("dst", type=PATH)
@option("--dtype", choices=gguf_out.gguf_dtypes())
@options(option("--no-crc-check"), option("--overwrite"), option("--allow-overflow"), option("--config", src="SRC"),
         option("--rearranged-rope", src="SRC"), option("--release"), option("--quiet"), option("--json"))
def to_gguf(src, dst, as_json, **flags):
    """Write SRC (any model folder or file the converters read) as one GGUF file for llama.cpp and ollama: llama.cpp's
    chatglm architecture (glm4 for GLM-4-0414), with the model's tokenizer and chat template, checksummed.

    --dtype q8_0 and q4_0 are llama.cpp's 32-value blocks. As llama.cpp's converter does, 1-D tensors, norms and
    biases stay float32 and a tensor whose rows are not a multiple of 32 values is float16; a q4_0 file's output
    layer is q8_0 (llama-quantize's Q6_K has no writer in the gguf package)."""
    _print_summary(gguf_out.to_gguf(src, dst, Conversion.from_flags("gguf", **flags)), as_json)


@main.command()
@click.argument("path", type=ExistingPath())
@option("--json")
@option("--no-crc-check")
def inspect(path, as_json, no_crc_check):
    """List the tensors of a checkpoint file or folder, with its detected layout and release, after checking the
    checksums its files carry (which reads every tensor; --no-crc-check lists without reading)."""
    info = inspect_verify.inspect(path, verify_checksums=not no_crc_check)
    if as_json:
        click.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    click.echo(f"{info['path']}: {info['format']}, {len(info['files'])} file(s), layout {info['layout']}")
    click.echo(f"release {info['release']}")
    if info["quantization"]:
        click.echo(f"weights: {info['quantization']}, read dequantized")
    click.echo(f"{info['count']} tensors, {info['bytes'] / 1e6:.1f} MB, dtypes {info['dtypes']}")
    click.echo(f"checksums: {info['checksums']}")
    for kind, names in info["non_weights"].items():
        click.echo(f"non-weights ({kind}): {len(names)}")
    for t in info["tensors"]:
        click.echo(f"  {t['name']:<64} {str(t['shape']):<16} {t['dtype']:<9} {t['bytes']:>12}")


@main.command()
@click.argument("a", type=ExistingPath())
@click.argument("b", type=ExistingPath())
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Allowed max abs difference.")
@click.option("--a-rearranged-rope", is_flag=True, help="A has MindFormers' rearranged RoPE rows.")
@click.option("--b-rearranged-rope", is_flag=True, help="B has MindFormers' rearranged RoPE rows.")
@option("--json")
@option("--no-crc-check")
def verify(a, b, atol, a_rearranged_rope, b_rearranged_rope, as_json, no_crc_check):
    """Compare two checkpoints of any formats/layouts tensor by tensor; exit 1 on a mismatch."""
    report = inspect_verify.verify(a, b, atol, a_rearranged_rope, b_rearranged_rope, verify_checksums=not no_crc_check)
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(inspect_verify.verify_lines(report)))
    sys.exit(0 if report["ok"] else 1)
