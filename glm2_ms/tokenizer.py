"""The ChatGLM2 tokenizer on sentencepiece alone, behaving as the original `tokenization_chatglm.py`.

Five special tokens follow the SentencePiece vocabulary ([MASK] [gMASK] [sMASK] sop eop = 64789…64793); every
prompt starts with `[gMASK] sop`; pad is `<unk>` (0) and batches are padded on the left, with position ids
restarting at 0 for each row's first real token.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glm2_core.assets import bundled_tokenizer
from glm2_core.errors import CheckpointError

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
DEFAULT_MODEL = bundled_tokenizer()[0]  # the tokenizer.model this toolkit ships


def build_prompt(query: str, history: list[tuple[str, str]] | None = None) -> str:
    prompt = ""
    for i, (old_query, response) in enumerate(history or []):
        prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
    return prompt + f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："


@dataclass
class Batch:
    input_ids: np.ndarray       # [batch, seq] int32, left-padded with pad_id
    attention_mask: np.ndarray  # [batch, seq] int32, 1 on real tokens
    position_ids: np.ndarray    # [batch, seq] int32, 0.. on real tokens, 0 on padding


class GLM2Tokenizer:
    def __init__(self, model_file: str | Path = DEFAULT_MODEL):
        import sentencepiece as spm

        path = Path(model_file)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise CheckpointError(f"{path}: no tokenizer.model")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.special = {tok: self.n_words + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = self.n_words + len(SPECIAL_TOKENS)
        self.gmask_id, self.sop_id = self.special["[gMASK]"], self.special["sop"]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GLM2Tokenizer:
        """The tokenizer of a model folder (its tokenizer.model), as transformers' AutoTokenizer is loaded."""
        return cls(path)

    def prefix(self) -> list[int]:
        return [self.gmask_id, self.sop_id]

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        ids = self.sp.encode(text)
        ids = self.prefix() + ids if add_special_tokens else ids
        return ids[:max_length] if max_length else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            skip = {self.bos_id, self.eos_id, self.pad_id}
            ids = [i for i in ids if i < self.n_words and i not in skip]
            return self.sp.decode(ids)
        out, run = [], []
        for i in ids:
            if i >= self.n_words:
                out.append(self.sp.decode(run) + SPECIAL_TOKENS[i - self.n_words])
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def decode_stream(self, tokens: Iterable) -> Iterator[str]:
        """The text of the tokens so far, after each new token (an id, or a one-element array) that ends on a
        complete character, as THUDM's stream_chat shows a reply growing."""
        ids: list[int] = []
        for token in tokens:
            ids.append(int(np.asarray(token).reshape(-1)[0]))
            text = self.decode(ids)
            if text and not text.endswith("\ufffd"):
                yield text

    def build_chat_input(self, query: str, history=None) -> list[int]:
        return self.encode(build_prompt(query, history))

    def batch(self, sequences: list[list[int]], max_length: int | None = None) -> Batch:
        """Left-pad token id lists into arrays, truncating each (from the right) to `max_length`."""
        if max_length:
            sequences = [s[:max_length] for s in sequences]
        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), self.pad_id, np.int32)
        mask = np.zeros_like(ids)
        pos = np.zeros_like(ids)
        for row, s in enumerate(sequences):
            if s:
                ids[row, width - len(s):] = s
                mask[row, width - len(s):] = 1
                pos[row, width - len(s):] = np.arange(len(s))
        return Batch(ids, mask, pos)

    def __call__(self, texts: list[str] | str, max_length: int | None = None) -> Batch:
        texts = [texts] if isinstance(texts, str) else texts
        return self.batch([self.encode(t) for t in texts], max_length)
