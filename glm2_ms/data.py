"""ADGEN data: a forgiving JSON-lines reader and the published preprocessing for training and evaluation.

Train (THUDM's ptuning recipe, which MindFormers' v2 recipe follows): the chat prompt of content (ChatGLM2:
`[gMASK] sop` + encode(build_prompt(content)); ChatGLM3/GLM-4: the role-token prompt ending in `<|assistant|>`, as
their finetune demos build it) cut to max_source_length, the answer's ids (`tok.answer_ids`) cut to
max_target_length, then eos; right-padded with pad to seq_length = source + target + 1. Labels are pad over the
prompt, then the answer and eos; pad → −100. Labels here are *unshifted* (THUDM): the loss shifts them by one.
MindFormers stores them pre-shifted.

Eval (MindFormers): prompt and answer strings cut to max − 1 characters; the prompt encoded as above.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glm2_core.errors import UserError

from .tokenizer import GLM2Tokenizer

IGNORE = -100


@dataclass
class Lines:
    """Usable (prompt text, answer text) pairs of a file, and what was skipped and why."""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: {"invalid json": 0, "missing keys": 0, "blank": 0})


def read_jsonl(path, prompt_column: str = "content", response_column: str = "summary") -> Lines:
    out = Lines()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read data ({exc})") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            out.skipped["invalid json"] += 1
            continue
        if not isinstance(row, dict) or prompt_column not in row or response_column not in row:
            out.skipped["missing keys"] += 1
            continue
        prompt, answer = row[prompt_column], row[response_column]
        if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt.strip() or not answer.strip():
            out.skipped["blank"] += 1
            continue
        out.pairs.append((prompt, answer))
    if not out.pairs:
        why = ", ".join(f"{n} {reason}" for reason, n in out.skipped.items() if n) or "empty"
        raise UserError(f"{path}: no usable lines with {prompt_column!r} and {response_column!r} ({why})")
    return out


@dataclass(frozen=True)
class Lengths:
    max_source_length: int = 64
    max_target_length: int = 128
    seq_length: int | None = None  # must be source + target + 1 when given

    def __post_init__(self):
        want = self.max_source_length + self.max_target_length + 1
        if self.seq_length is not None and self.seq_length != want:
            raise UserError(f"seq_length {self.seq_length} disagrees with max_source_length "
                                  f"{self.max_source_length} + max_target_length {self.max_target_length} + 1 = {want}")

    @property
    def total(self) -> int:
        return self.max_source_length + self.max_target_length + 1


def train_example(tok: GLM2Tokenizer, prompt: str, answer: str, lengths: Lengths) -> tuple[list[int], list[int]]:
    """(input_ids, labels), both of length lengths.total."""
    a = tok.build_chat_input(prompt)[:lengths.max_source_length]
    b = tok.answer_ids(answer)[:lengths.max_target_length]
    ids = a + b + [tok.eos_id]
    labels = [IGNORE] * len(a) + b + [tok.eos_id]
    pad = lengths.total - len(ids)
    return ids + [tok.pad_id] * pad, labels + [IGNORE] * pad


def answer_windows(labels: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the loss looks: for each row, the `width` positions from the one before its first label, as flat
    indices into [batch·seq], and the labels those positions predict (the next token's, −100 past the answer).

    A causal LM's loss only needs logits where the next token is a label; in the recipe's rows the labels are
    one run of at most max_target_length + 1 tokens, so a fixed width keeps the graph's shapes static and the
    output layer (hidden × 65,024 per position) runs on that window instead of the whole sequence."""
    batch, seq = labels.shape
    labelled = labels != IGNORE
    first = np.where(labelled.any(1), labelled.argmax(1), 1)
    last = np.where(labelled.any(1), seq - 1 - labelled[:, ::-1].argmax(1), 0)
    if (last - first + 1 > width).any():
        raise UserError(f"a row's labels span more than {width} positions")
    start = np.minimum(np.maximum(first - 1, 0), seq - 1 - width)
    pos = start[:, None] + np.arange(width)
    targets = np.take_along_axis(labels, pos + 1, 1)
    return (pos + np.arange(batch)[:, None] * seq).reshape(-1).astype(np.int32), targets.reshape(-1).astype(np.int32)


def eval_example(tok: GLM2Tokenizer, prompt: str, answer: str, max_source_length: int = 256,
                 max_target_length: int = 256) -> tuple[list[int], str]:
    """(prompt ids, reference text) as MindFormers' evaluation cuts them: by characters, to max − 1."""
    prompt, answer = prompt[:max_source_length - 1], answer[:max_target_length - 1]
    return tok.build_chat_input(prompt), answer


class TrainData:
    """Tokenized ADGEN examples served in seeded, resumable batches."""

    def __init__(self, tok: GLM2Tokenizer, lines: Lines, lengths: Lengths):
        rows = [train_example(tok, p, a, lengths) for p, a in lines.pairs]
        self.input_ids = np.array([r[0] for r in rows], np.int32)
        self.labels = np.array([r[1] for r in rows], np.int32)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batches(self, batch_size: int, seed: int, epoch: int = 0, shuffle: bool = True, drop_remainder: bool = True,
                rank: int = 0, world: int = 1):
        """Batches of one epoch; the order depends only on (seed, epoch). With `world` > 1, each global batch of
        batch_size·world rows is cut into per-rank slices."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self)) if shuffle else np.arange(len(self))
        step = batch_size * world
        stop = len(order) - len(order) % step if drop_remainder else len(order)
        for start in range(0, stop, step):
            idx = order[start:start + step][rank * batch_size:(rank + 1) * batch_size]
            if len(idx):
                yield self.input_ids[idx], self.labels[idx]
