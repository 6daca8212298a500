"""`glm2-parity`: does the converted MindSpore model compute what the HF checkpoint computes?"""
from __future__ import annotations

import sys

import click

from glm2_core.options import PATH, ExistingPath, Tool, option

BY_DTYPE = "by --compute-dtype, as in the README"


@click.command("glm2-parity", cls=Tool)
@click.argument("hf_dir", type=ExistingPath())
@click.argument("ms_dir", type=ExistingPath())
@click.option("--prompts", type=ExistingPath(), show_default="five real prompts, Chinese and English",
              help="A text file, one prompt per line.")
@option("--compute-dtype")
@option("--max-new-tokens", default=32)
@option("--streamed/--whole")
@click.option("--reference", type=click.Choice(["torch", "glm", "remote-code"]), default="torch", show_default=True,
              help="torch: our PyTorch reference; glm: transformers' GlmForCausalLM on an export of HF_DIR; "
                   "remote-code: HF_DIR's own modeling_chatglm.py.")
@click.option("--report", type=PATH, show_default="none: print only",
              help="Write report.json, report.md and parity.png into this folder.")
@click.option("--logits-atol", type=float, show_default=BY_DTYPE, help="Max abs diff allowed on the logits.")
@click.option("--layer-rtol", type=float, show_default=BY_DTYPE,
              help="Max abs diff allowed after any attention or MLP, relative to the stage's largest |value|.")
@click.option("--min-top1", type=float, show_default=BY_DTYPE, help="Minimum top-1 agreement (0..1).")
@click.option("--min-greedy", type=float, show_default=BY_DTYPE, help="Minimum greedy token agreement (0..1).")
def main(hf_dir, ms_dir, prompts, compute_dtype, max_new_tokens, streamed, reference, report, logits_atol,
         layer_rtol, min_top1, min_greedy):
    """Run HF_DIR (the reference) and MS_DIR (the MindSpore runtime) on the same token ids and compare every
    layer, the logits and greedy generation; exit 1 when a threshold fails. Both sides compute in
    --compute-dtype, with their weights cast to it."""
    from .parity import DEFAULT_PROMPTS, Thresholds, markdown, run_parity, write_report

    texts = [line.strip() for line in prompts.read_text().splitlines() if line.strip()] if prompts else \
        DEFAULT_PROMPTS
    th = Thresholds.for_dtype(compute_dtype, logits_max_abs=logits_atol, layer_rel=layer_rtol, top1=min_top1,
                              greedy=min_greedy)
    result = run_parity(hf_dir, ms_dir, texts, compute_dtype, max_new_tokens, reference, th, streamed)
    if report:
        write_report(result, report)
    click.echo(markdown(result))
    sys.exit(0 if result["passed"] else 1)
