"""Chat rounds in the original ChatGLM2 prompt format: the reply, and the history with the round appended.

(The module is not named `chat`: a submodule of that name would shadow the `chat` function `glm2_ms` exports.)"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .generation import Decoder, SamplingConfig
from .tokenizer import GLM2Tokenizer

History = list[tuple[str, str]]


def process_response(text: str) -> str:
    """As THUDM's `ChatGLMForConditionalGeneration.process_response` does."""
    return text.strip().replace("[[训练时间]]", "2023年")


def _generation(decoder: Decoder, tok: GLM2Tokenizer, query: str, history: History | None, max_new_tokens: int,
                sampling: SamplingConfig | None, max_length: int | None) -> tuple[np.ndarray, dict]:
    ids = np.array([tok.build_chat_input(query, history)], np.int32)
    return ids, dict(max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id, max_length=max_length)


def chat(decoder: Decoder, tok: GLM2Tokenizer, query: str, history: History | None = None,
         max_new_tokens: int = 256, sampling: SamplingConfig | None = None,
         max_length: int | None = None) -> tuple[str, History]:
    """(reply, history + [(query, reply)])."""
    ids, kwargs = _generation(decoder, tok, query, history, max_new_tokens, sampling, max_length)
    reply = process_response(tok.decode(decoder.generate(ids, **kwargs)[0, ids.shape[1]:]))
    return reply, list(history or []) + [(query, reply)]


def stream_chat(decoder: Decoder, tok: GLM2Tokenizer, query: str, history: History | None = None,
                max_new_tokens: int = 256, sampling: SamplingConfig | None = None,
                max_length: int | None = None) -> Iterator[tuple[str, History]]:
    """(reply so far, history + [(query, reply so far)]) after every new token, as THUDM's `stream_chat` yields
    them (not while the text ends in an incomplete character)."""
    ids, kwargs = _generation(decoder, tok, query, history, max_new_tokens, sampling, max_length)
    for text in tok.decode_stream(decoder.stream(ids, **kwargs)):
        reply = process_response(text)
        yield reply, list(history or []) + [(query, reply)]
