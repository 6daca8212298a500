"""Choosing the next token, shared by the MindSpore runtime and the PyTorch reference (numpy only, so both
decode identically from identical logits)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glm2_core.recipes import SAMPLING

DEFAULT_NEW_TOKENS = 32  # when a caller of generate gives no limit


@dataclass
class SamplingConfig:
    """How the next token is chosen; the defaults are transformers' (glm2_core.recipes)."""
    greedy: bool = not SAMPLING["generate"].do_sample
    temperature: float = SAMPLING["generate"].temperature
    top_k: int = 0
    top_p: float = SAMPLING["generate"].top_p
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("temperature and repetition_penalty must be > 0, top_p in (0, 1], top_k >= 0")


def choose(logits: np.ndarray, history: np.ndarray, s: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row: repetition penalty, then argmax or temperature / top-k / top-p sampling."""
    logits = logits.astype(np.float64)
    if s.repetition_penalty != 1.0:
        for row in range(len(logits)):
            seen = np.unique(history[row])
            val = logits[row, seen]
            logits[row, seen] = np.where(val > 0, val / s.repetition_penalty, val * s.repetition_penalty)
    if s.greedy:
        return logits.argmax(-1)
    logits = logits / s.temperature
    picks = []
    for row in logits:
        order = np.argsort(-row, kind="stable")
        if s.top_k:
            order = order[:s.top_k]
        probs = np.exp(row[order] - row[order[0]])
        probs /= probs.sum()
        if s.top_p < 1.0:
            keep = np.cumsum(probs) - probs < s.top_p  # the smallest prefix whose mass reaches top_p
            order, probs = order[keep], probs[keep] / probs[keep].sum()
        picks.append(order[rng.choice(len(order), p=probs)])
    return np.array(picks)
