"""Chat rounds in each family's format: the reply, and the history with the round appended.

ChatGLM2 keeps history as [(query, reply), …] and its prompt as text; ChatGLM3 and GLM-4 keep
[{"role", "content", "metadata"?}, …] and a reply may be a tool call (metadata = the tool's name), as their
`chat`/`process_response` return it. (The module is not named `chat`: a submodule of that name would shadow the
`chat` function `glm2_ms` exports.)"""
from __future__ import annotations

import ast
import copy
import json
from collections.abc import Iterator

import numpy as np

from .generation import Decoder, SamplingConfig
from .tokenizer import GLM2Tokenizer

History = list  # [(query, reply)] for ChatGLM2, [{"role", "content", …}] for ChatGLM3 and GLM-4
ASSISTANT = "<|assistant|>"


def process_response(text: str, trained: str = "2023年") -> str:
    """As THUDM's `ChatGLMForConditionalGeneration.process_response` does for ChatGLM2."""
    return text.strip().replace("[[训练时间]]", trained)


def role_response(tok: GLM2Tokenizer, output: str, history: History) -> tuple[str | dict, History]:
    """ChatGLM3/GLM-4: each `<|assistant|>` part of the output is `metadata\\ncontent`; with empty metadata the
    reply is text, otherwise a call of the tool named by the metadata: {"name", "parameters"} when the system
    message declared tools, else {"name", "content"}. Every part is appended to the history."""
    history, reply = copy.deepcopy(history), ""
    tools = bool(history) and history[0]["role"] == "system" and "tools" in history[0]
    for part in output.split(ASSISTANT):
        metadata, content = part.split("\n", 1) if "\n" in part else ("", part)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            reply = content.replace("[[训练时间]]", tok.family.trained)
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        reply = {"name": metadata.strip(), **({"parameters": tool_arguments(content, tok.family.tool_arguments)}
                                              if tools else {"content": content})}
    return reply, history


def tool_arguments(content: str, form: str) -> dict:
    """A tool call's arguments, read as data, never run: JSON (GLM-4), or ChatGLM3's code block holding
    `tool_call(name=literal, …)`. Unreadable arguments come back as {"raw": content}."""
    try:
        if form == "json":
            args = json.loads(content)
            return args if isinstance(args, dict) else {"raw": content}
        call = ast.parse("\n".join(content.strip().split("\n")[1:-1]).strip(), mode="eval").body
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call" \
                and not call.args and all(k.arg for k in call.keywords):
            return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, SyntaxError, TypeError, RecursionError):
        pass
    return {"raw": content}


def chat_input(tok: GLM2Tokenizer, query: str, history: History | None = None, role: str = "user") -> np.ndarray:
    """The round's prompt ids [1, n]: the history and the query in the family's format (the history counts toward
    the model's context)."""
    return np.array([tok.build_chat_input(query, history, role)], np.int32)


def _generation(decoder: Decoder, tok: GLM2Tokenizer, query: str, history: History | None, role: str,
                max_new_tokens: int, sampling: SamplingConfig | None, max_length: int | None):
    ids = chat_input(tok, query, history, role)
    return ids, dict(max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=tok.stop_ids,
                     pad_token_id=tok.pad_id, max_length=max_length)


def output_text(tok: GLM2Tokenizer, new: list[int]) -> str:
    """The generated ids as the family's reply is read from them: ChatGLM2's text; in the role format with the
    special tokens that split its parts (`<|assistant|>`), the padding left out."""
    if tok.family.chat == "rounds":
        return tok.decode(new)
    return tok.decode([i for i in new if i != tok.pad_id], skip_special_tokens=False)


def _reply(tok: GLM2Tokenizer, new: list[int], query: str, history: History | None, role: str):
    """The reply and the new history from the generated ids (the stop token, if reached, dropped)."""
    if new and new[-1] in tok.stop_ids:
        new = new[:-1]
    if tok.family.chat == "rounds":
        reply = process_response(output_text(tok, new), tok.family.trained)
        return reply, list(history or []) + [(query, reply)]
    asked = list(history or []) + [{"role": role, "content": query}]
    return role_response(tok, output_text(tok, new), asked)


def chat(decoder: Decoder, tok: GLM2Tokenizer, query: str, history: History | None = None,
         max_new_tokens: int = 256, sampling: SamplingConfig | None = None, max_length: int | None = None,
         role: str = "user") -> tuple[str | dict, History]:
    """(reply, history with this round); `role` (ChatGLM3/GLM-4): who says `query` (user or observation)."""
    ids, kwargs = _generation(decoder, tok, query, history, role, max_new_tokens, sampling, max_length)
    new = decoder.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
    return _reply(tok, new, query, history, role)


def stream_chat(decoder: Decoder, tok: GLM2Tokenizer, query: str, history: History | None = None,
                max_new_tokens: int = 256, sampling: SamplingConfig | None = None, max_length: int | None = None,
                role: str = "user") -> Iterator[tuple[str | dict, History]]:
    """(reply so far, history with this round so far) after every new token, as THUDM's `stream_chat` yields
    them (not while the text ends in an incomplete character)."""
    ids, kwargs = _generation(decoder, tok, query, history, role, max_new_tokens, sampling, max_length)
    new: list[int] = []
    for token in decoder.stream(ids, **kwargs):
        new.append(int(token[0]))
        if new[-1] in tok.stop_ids:
            break
        if tok.complete_text(new):
            yield _reply(tok, new, query, history, role)
