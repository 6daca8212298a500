"""`glm2-eval`: ADGEN metrics of a model (`glm2-eval MODEL_DIR --data dev.json`), of a predictions file
(`glm2-eval score FILE`), or metric parity between the runtimes (`glm2-eval --parity HF_DIR MS_DIR ...`)."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from glm2_core.errors import UserError
from glm2_core.options import FRACTION, TOLERANCE, ExistingPath, Interrupted, Tool, option, sampling_options

from .evaluate import PREDICTIONS, EvalRequest, evaluate, metric_parity, parity_markdown
from .metrics import adgen_scores

USAGE = ("MODEL_DIR --data FILE [OPTIONS]", "--parity HF_DIR MS_DIR --data FILE [OPTIONS]", "score FILE [OPTIONS]")


@click.command("score", cls=Tool)
@click.argument("file", type=ExistingPath())
@option("--variant")
def score(file, variant):
    """The ADGEN metrics of a predictions file (JSON lines with prediction and reference, as glm2-eval writes)."""
    pairs = scored_pairs(file)
    click.echo(json.dumps(adgen_scores([p for p, _ in pairs], [r for _, r in pairs], variant), indent=2))


def scored_pairs(file: Path) -> list[tuple[str, str]]:
    """(prediction, reference) of every line of a predictions file; a line that is not a JSON object with both as
    strings is one error naming the file and line."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}: line {number}: not JSON ({exc.msg})") from None
        missing = [k for k in ("prediction", "reference") if not isinstance(row, dict) or k not in row]
        if missing:
            raise UserError(f"{file}: line {number}: no {' or '.join(repr(k) for k in missing)} key (a predictions "
                            f"file has JSON lines with prediction and reference, as glm2-eval writes)")
        if not all(isinstance(row[k], str) for k in ("prediction", "reference")):
            raise UserError(f"{file}: line {number}: prediction and reference must be strings")
        pairs.append((row["prediction"], row["reference"]))
    if not pairs:
        raise UserError(f"{file}: no predictions in it")
    return pairs


@click.command("glm2-eval", cls=Tool, usage=USAGE, subcommands={"score": score},
               aliases={"--max-source-length": "--max-source-chars", "--max-target-length": "--max-target-chars"})
@click.argument("model_dir", type=ExistingPath())
@click.argument("ms_dir", type=ExistingPath(), required=False)
@click.option("--parity", is_flag=True,
              help="Compare the PyTorch reference on HF_DIR with MindSpore on MS_DIR over the same samples (greedy).")
@click.option("--data", required=True, type=ExistingPath(), help="ADGEN JSON lines with content and summary.")
@click.option("--runtime", type=click.Choice(["ms", "torch"]), default="ms", show_default=True,
              help="ms: the MindSpore runtime; torch: the PyTorch reference.")
@click.option("--max-samples", type=click.IntRange(min=1), show_default="all",
              help="Evaluate the first N usable lines only.")
@option("--batch-size", default=8)
@click.option("--max-source-chars", "max_source_length", type=click.IntRange(min=1), default=256, show_default=True,
              help="Cut each prompt to this many characters minus one, as MindFormers' evaluation does.")
@click.option("--max-target-chars", "max_target_length", type=click.IntRange(min=1), default=256, show_default=True,
              help="Cut each reference to this many characters minus one, as MindFormers' evaluation does.")
@sampling_options(max_new_tokens=256)
@option("--compute-dtype")
@option("--quantize")
@option("--activations")
@option("--release")
@option("--variant")
@option("--out", default=Path("eval-out"))
@option("--overwrite")
@click.option("--min-agreement", type=FRACTION, default=1.0, show_default=True,
              help="--parity: fraction of samples whose predictions must be identical.")
@click.option("--max-metric-diff", type=TOLERANCE, default=0.0, show_default=True,
              help="--parity: largest allowed |MindSpore − torch| per metric (points).")
@option("--resume")
@option("--quiet")
def main(model_dir, ms_dir, parity, **flags):
    """ADGEN evaluation of the model in MODEL_DIR: predictions.jsonl is written to --out as it goes (--resume
    continues it; an existing --out is refused otherwise, or replaced with --overwrite), metrics.json at the end.
    THUDM's sampled evaluation is --sample --top-p 0.7 --temperature 0.95."""
    with resumable(flags["out_dir"]):
        request = EvalRequest.from_flags(**flags)
        if parity:
            if ms_dir is None:
                raise UserError("--parity needs two folders: HF_DIR MS_DIR")
            if not request.sampling.greedy:
                raise UserError("--parity compares greedy predictions; drop --sample")
            report = metric_parity(model_dir, ms_dir, request)
            click.echo(parity_markdown(report))
            sys.exit(0 if report["passed"] else 1)
        if ms_dir is not None:
            raise UserError(f"{ms_dir}: a second folder is for --parity only")
        click.echo(json.dumps(evaluate(model_dir, request), indent=2, ensure_ascii=False))


@contextmanager
def resumable(out: Path):
    """Ctrl-C: say what the run leaves, and how to continue it (the same command with --resume)."""
    try:
        yield
    except KeyboardInterrupt:
        if any(out.glob(f"**/{PREDICTIONS}")):
            raise Interrupted(f"the predictions so far are in {out}; run the same command with --resume to "
                              f"continue them") from None
        raise Interrupted("nothing was written") from None
