"""One chat round: the original ChatGLM2 prompt format over the history, reply appended to it."""
from __future__ import annotations

import numpy as np

from .generation import Decoder, SamplingConfig
from .tokenizer import GLM2Tokenizer


def chat(decoder: Decoder, tok: GLM2Tokenizer, query: str, history=None, max_new_tokens: int = 256,
         sampling: SamplingConfig | None = None, on_token=None) -> tuple[str, list[tuple[str, str]]]:
    """(reply, history + [(query, reply)])."""
    history = list(history or [])
    ids = np.array([tok.build_chat_input(query, history)], np.int32)
    out = decoder.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id, on_token=on_token)
    reply = tok.decode(out[0, ids.shape[1]:]).strip()
    return reply, history + [(query, reply)]
