"""`glm2-eval`: ADGEN metrics of a model (`glm2-eval MODEL_DIR --data dev.json`), of a predictions file
(`glm2-eval score FILE`), or metric parity between the runtimes (`glm2-eval --parity HF_DIR MS_DIR ...`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from glm2_core.errors import UserError
from glm2_core.options import ExistingPath, Tool, option, sampling_options

USAGE = ("MODEL_DIR --data FILE [OPTIONS]", "--parity HF_DIR MS_DIR --data FILE [OPTIONS]", "score FILE [OPTIONS]")


@click.command("score", cls=Tool)
@click.argument("file", type=ExistingPath())
@option("--variant")
def score(file, variant):
    """The ADGEN metrics of a predictions file (JSON lines with prediction and reference, as glm2-eval writes)."""
    from .metrics import adgen_scores

    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    click.echo(json.dumps(adgen_scores([r["prediction"] for r in rows], [r["reference"] for r in rows], variant),
                          indent=2))


@click.command("glm2-eval", cls=Tool, usage=USAGE, subcommands={"score": score},
               aliases={"--max-source-length": "--max-source-chars", "--max-target-length": "--max-target-chars"})
@click.argument("model_dir", type=ExistingPath())
@click.argument("ms_dir", type=ExistingPath(), required=False)
@click.option("--parity", is_flag=True,
              help="Compare the PyTorch reference on HF_DIR with MindSpore on MS_DIR over the same samples (greedy).")
@click.option("--data", required=True, type=ExistingPath(), help="ADGEN JSON lines with content and summary.")
@click.option("--runtime", type=click.Choice(["ms", "torch"]), default="ms", show_default=True,
              help="ms: the MindSpore runtime; torch: the PyTorch reference.")
@click.option("--max-samples", type=int, show_default="all", help="Evaluate the first N usable lines only.")
@option("--batch-size", default=8)
@click.option("--max-source-chars", "max_source_length", type=int, default=256, show_default=True,
              help="Cut each prompt to this many characters minus one, as MindFormers' evaluation does.")
@click.option("--max-target-chars", "max_target_length", type=int, default=256, show_default=True,
              help="Cut each reference to this many characters minus one, as MindFormers' evaluation does.")
@sampling_options(max_new_tokens=256)
@option("--compute-dtype")
@option("--variant")
@option("--out", default=Path("eval-out"))
@click.option("--min-agreement", type=float, default=1.0, show_default=True,
              help="--parity: fraction of samples whose predictions must be identical.")
@click.option("--max-metric-diff", type=float, default=0.0, show_default=True,
              help="--parity: largest allowed |MindSpore − torch| per metric (points).")
@option("--resume")
@option("--quiet")
def main(model_dir, ms_dir, parity, data, runtime, max_samples, batch_size, max_source_length, max_target_length,
         max_new_tokens, sample, temperature, top_k, top_p, repetition_penalty, seed, compute_dtype, variant, out_dir,
         min_agreement, max_metric_diff, resume, quiet):
    """ADGEN evaluation of the model in MODEL_DIR: predictions.jsonl is written to --out as it goes (--resume
    continues it), metrics.json at the end. THUDM's sampled evaluation is --sample --top-p 0.7
    --temperature 0.95."""
    from .evaluate import EvalSettings, evaluate, metric_parity, parity_markdown

    s = EvalSettings(max_samples, batch_size, max_source_length, max_target_length, max_new_tokens, variant,
                     compute_dtype)
    if parity:
        if ms_dir is None:
            raise UserError("--parity needs two folders: HF_DIR MS_DIR")
        if sample:
            raise UserError("--parity compares greedy predictions; drop --sample")
        report = metric_parity(model_dir, ms_dir, data, out_dir, s, min_agreement, max_metric_diff,
                               progress=not quiet, resume=resume)
        click.echo(parity_markdown(report))
        sys.exit(0 if report["passed"] else 1)
    if ms_dir is not None:
        raise UserError(f"{ms_dir}: a second folder is for --parity only")
    from glm2_ms.cli import sampling_config

    sampling = sampling_config(sample, temperature, top_k, top_p, repetition_penalty, seed)
    result = evaluate(model_dir, data, out_dir, runtime, s, sampling, progress=not quiet, resume=resume)
    click.echo(json.dumps(result, indent=2, ensure_ascii=False))
