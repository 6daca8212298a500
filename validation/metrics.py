"""The ADGEN metrics exactly as the published recipes compute them: jieba words into rouge_chinese for
rouge-1/2/l (F × 100), characters into nltk's sentence_bleu with SmoothingFunction().method3 for bleu-4 (× 100),
each rounded to 4 places per sample, then the mean.

Two variants of which samples count:
- `thudm` (THUDM's ptuning code): every sample counts. Their code crashes on an empty or blank prediction or
  reference (rouge_chinese refuses empty text); here such a sample scores 0 on every metric.
- `mindformers` (MindFormers' ADGEN metric): samples whose prediction is blank are skipped; a blank reference
  with a non-blank prediction scores 0.
"""
from __future__ import annotations

import logging

from . import CACHE

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
VARIANTS = ("thudm", "mindformers")


def _tools():
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    CACHE.mkdir(parents=True, exist_ok=True)
    jieba.dt.tmp_dir = str(CACHE)  # its dictionary cache, else written to the system temp dir
    return jieba, Rouge(), sentence_bleu, SmoothingFunction().method3


def sample_scores(prediction: str, reference: str) -> dict[str, float]:
    """One sample's four scores (× 100, rounded to 4 places); 0 for all when either side is blank."""
    if not prediction.strip() or not reference.strip():
        return {m: 0.0 for m in METRICS}
    jieba, rouge, bleu, smooth = _tools()
    hyp, ref = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    scores = {k: round(v["f"] * 100, 4) for k, v in rouge.get_scores(hyp, ref)[0].items()}
    scores["bleu-4"] = round(bleu([list(reference)], list(prediction), smoothing_function=smooth) * 100, 4)
    return scores


def adgen_scores(predictions: list[str], references: list[str], variant: str = "thudm") -> dict[str, float]:
    """Mean of the per-sample scores; {'rouge-1', 'rouge-2', 'rouge-l', 'bleu-4'} already × 100."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    rows = [sample_scores(p, r) for p, r in zip(predictions, references, strict=True)
            if variant == "thudm" or p.strip()]
    return {m: (sum(r[m] for r in rows) / len(rows) if rows else 0.0) for m in METRICS}
