"""`glm2-parity`: does the converted MindSpore model compute what the HF checkpoint computes?"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from converters.cli import user_errors


@click.command()
@click.argument("hf_dir", type=click.Path(exists=True, path_type=Path))
@click.argument("ms_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--prompts", type=click.Path(exists=True, path_type=Path),
              help="A text file, one prompt per line (default: five real prompts, Chinese and English).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Compute dtype of both sides.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Greedy tokens compared.")
@click.option("--reference", type=click.Choice(["torch", "glm", "remote-code"]), default="torch", show_default=True)
@click.option("--report", type=click.Path(path_type=Path), help="Write report.json, report.md and parity.png here.")
@click.option("--logits-atol", type=float, help="Max abs diff allowed on the logits (default by dtype).")
@click.option("--layer-rtol", type=float, help="Max abs diff allowed after any attention or MLP, relative to the "
                                               "stage's largest |value|.")
@click.option("--min-top1", type=float, help="Minimum top-1 agreement (0..1).")
@click.option("--min-greedy", type=float, help="Minimum greedy token agreement (0..1).")
@user_errors
def main(hf_dir, ms_dir, prompts, dtype, max_new_tokens, reference, report, logits_atol, layer_rtol, min_top1,
         min_greedy):
    """Run HF_DIR (reference) and MS_DIR (MindSpore runtime) on the same ids; exit 1 when a threshold fails."""
    from .parity import DEFAULT_PROMPTS, Thresholds, markdown, run_parity, write_report

    texts = [line.strip() for line in prompts.read_text().splitlines() if line.strip()] if prompts else \
        DEFAULT_PROMPTS
    th = Thresholds.for_dtype(dtype, logits_max_abs=logits_atol, layer_rel=layer_rtol, top1=min_top1,
                              greedy=min_greedy)
    result = run_parity(hf_dir, ms_dir, texts, dtype, max_new_tokens, reference, th)
    if report:
        write_report(result, report)
    click.echo(markdown(result))
    sys.exit(0 if result["passed"] else 1)
