"""`glm2-eval`: ADGEN metrics of a model (`glm2-eval MODEL_DIR --data dev.json`), of a predictions file
(`glm2-eval score PREDICTIONS.jsonl`), or metric parity between the runtimes (`glm2-eval --parity HF MS ...`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from converters.cli import user_errors
from converters.errors import CheckpointError


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1)
@click.option("--data", type=click.Path(exists=True, path_type=Path), help="JSON lines with content/summary.")
@click.option("--parity", nargs=2, type=click.Path(exists=True, path_type=Path), metavar="HF_DIR MS_DIR",
              help="Compare the torch reference on HF_DIR with MindSpore on MS_DIR.")
@click.option("--runtime", type=click.Choice(["ms", "torch"]), default="ms", show_default=True)
@click.option("--max-samples", type=int)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-source-length", type=int, default=256, show_default=True)
@click.option("--max-target-length", type=int, default=256, show_default=True)
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--sample", is_flag=True, help="Sample (THUDM's top_p 0.7, temperature 0.95) instead of greedy.")
@click.option("--top-p", type=float, default=0.7, show_default=True)
@click.option("--temperature", type=float, default=0.95, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--variant", type=click.Choice(["thudm", "mindformers"]), default="thudm", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval-out"), show_default=True)
@click.option("--min-agreement", type=float, default=1.0, show_default=True,
              help="--parity: fraction of samples whose predictions must be identical.")
@click.option("--max-metric-diff", type=float, default=0.0, show_default=True,
              help="--parity: largest allowed |MindSpore − torch| per metric (points).")
@click.option("--resume", is_flag=True, help="Keep the predictions already in --out and predict the rest.")
@click.option("--quiet", is_flag=True)
@user_errors
def main(args, data, parity, runtime, max_samples, batch_size, max_source_length, max_target_length,
         max_new_tokens, sample, top_p, temperature, seed, variant, out, min_agreement, max_metric_diff, resume,
         quiet):
    """ADGEN evaluation; predictions.jsonl is written as it goes and a rerun resumes it."""
    from .evaluate import EvalSettings, evaluate, metric_parity
    from .metrics import adgen_scores

    if args and args[0] == "score":
        if len(args) != 2:
            raise CheckpointError("usage: glm2-eval score PREDICTIONS.jsonl")
        rows = [json.loads(line) for line in Path(args[1]).read_text(encoding="utf-8").splitlines() if line.strip()]
        click.echo(json.dumps(adgen_scores([r["prediction"] for r in rows], [r["reference"] for r in rows],
                                           variant), indent=2))
        return
    if data is None:
        raise CheckpointError("--data is required")
    s = EvalSettings(max_samples, batch_size, max_source_length, max_target_length, max_new_tokens, variant)
    if parity:
        if sample:
            raise CheckpointError("--parity compares greedy predictions; drop --sample")
        report = metric_parity(*parity, data, out, s, min_agreement, max_metric_diff, progress=not quiet,
                               resume=resume)
        from .evaluate import parity_markdown

        click.echo(parity_markdown(report))
        sys.exit(0 if report["passed"] else 1)
    if len(args) != 1:
        raise CheckpointError("usage: glm2-eval MODEL_DIR --data FILE [options]")
    from glm2_ms.sampling import SamplingConfig

    sampling = SamplingConfig(greedy=False, temperature=temperature, top_p=top_p, seed=seed) if sample else None
    result = evaluate(Path(args[0]), data, out, runtime, s, sampling, progress=not quiet, resume=resume)
    click.echo(json.dumps(result, indent=2, ensure_ascii=False))
