"""`glm2-parity`: does the converted MindSpore model compute what the HF checkpoint computes?"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from glm2_core.errors import UserError
from glm2_core.options import COUNT, FRACTION, PATH, TOLERANCE, ExistingPath, Tool, option
from glm2_core.outputs import check_output

from .parity import DEFAULT_PROMPTS, REPORT, Thresholds, markdown, run_parity, write_report

BY_DTYPE = "by --compute-dtype, or --quantize and --activations, as in docs/parity.md"


@click.command("glm2-parity", cls=Tool)
@click.argument("hf_dir", type=ExistingPath())
@click.argument("ms_dir", type=ExistingPath())
@click.option("--prompts", type=ExistingPath(), show_default="five real prompts, Chinese and English",
              help="A text file, one prompt per line.")
@option("--compute-dtype")
@option("--quantize")
@option("--activations")
@option("--release")
@option("--max-new-tokens", default=32, type=COUNT)  # 0: the layer passes alone (docs/parity.md)
@option("--streamed/--whole")
@click.option("--reference", type=click.Choice(["torch", "glm", "remote-code"]), default="torch", show_default=True,
              help="torch: our PyTorch reference; glm: transformers' GlmForCausalLM (Glm4ForCausalLM for "
                   "GLM-4-0414) on an export of HF_DIR; remote-code: HF_DIR's own modeling_chatglm.py.")
@click.option("--report", type=PATH, show_default="none: print only",
              help="Write report.json, report.md and parity.png into this new folder.")
@option("--overwrite")
@click.option("--logits-atol", type=TOLERANCE, show_default=BY_DTYPE, help="Max abs diff allowed on the logits.")
@click.option("--layer-rtol", type=TOLERANCE, show_default=BY_DTYPE,
              help="Max abs diff allowed after any attention or MLP, relative to the stage's largest |value|.")
@click.option("--min-top1", type=FRACTION, show_default=BY_DTYPE, help="Minimum top-1 agreement (0..1).")
@click.option("--min-greedy", type=FRACTION, show_default=BY_DTYPE, help="Minimum greedy token agreement (0..1).")
def main(hf_dir, ms_dir, prompts, compute_dtype, quantize, activations, release, max_new_tokens, streamed, reference,
         report, overwrite, logits_atol, layer_rtol, min_top1, min_greedy):
    """Run HF_DIR (the reference) and MS_DIR (the MindSpore runtime) on the same token ids and compare every
    layer, the logits and greedy generation; exit 1 when a threshold fails. Both sides compute in
    --compute-dtype, with their weights cast to it. With --quantize, MindSpore's weight matrices are quantized and
    judged by top-1 agreement alone (--min-top1; the KL is reported), not by the float thresholds."""
    sources = (hf_dir, ms_dir, prompts)
    if report:
        check_output(report, overwrite, sources, "--report", kind=REPORT)  # before the run: it takes minutes
    texts = read_prompts(prompts) if prompts else DEFAULT_PROMPTS
    given = dict(logits_max_abs=logits_atol, layer_rel=layer_rtol, top1=min_top1, greedy=min_greedy)
    th = Thresholds.for_quantized(quantize, activations, **given) if quantize else \
        Thresholds.for_dtype(compute_dtype, **given)
    result = run_parity(hf_dir, ms_dir, texts, compute_dtype, max_new_tokens, reference, th, streamed, release,
                        quantize, activations)
    if report:
        write_report(result, report, overwrite, sources)
    click.echo(markdown(result))
    sys.exit(0 if result["passed"] else 1)


def read_prompts(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file; a file without any is refused (no prompt would pass vacuously)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (--prompts takes a text file, one prompt per line)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise UserError(f"{path}: no prompts in it (--prompts takes one prompt per line)")
    return texts
