"""OpenAI's chat and completions protocol over the releases' own chat formats: the request bodies (validated,
unknown fields refused as OpenAI refuses them), messages and tools → the prompt ids of the model's family, and the
model's tokens → text deltas, a reply or `tool_calls` (parsed as `dialogue.role_response` parses them, never run).

No MindSpore here: the server (`serve.py`) runs the tokens through the engine."""
from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from glm2_core.errors import UserError
from glm2_core.recipes import SAMPLING

from .dialogue import ASSISTANT, output_text, process_response, role_response
from .sampling import SamplingConfig
from .tokenizer import GLM2Tokenizer

MAX_STOPS = 4  # OpenAI's limit on `stop`
DEFAULTS = SAMPLING["chat"]  # temperature and top_p a request leaves out: THUDM's chat defaults


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Function(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class CalledFunction(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class NamedChoice(Strict):
    type: Literal["function"]
    function: dict[str, str]


class StreamOptions(Strict):
    include_usage: bool = False


class Sampled(Strict):
    """The fields chat and completions share."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)
    n: int = Field(1, ge=1, le=1, description="one choice a request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float = Field(0, ge=0, le=0)
    presence_penalty: float = Field(0, ge=0, le=0)
    logprobs: Literal[False] | None = None
    repetition_penalty: float = Field(1.0, gt=0)  # beyond OpenAI's fields, as vLLM and THUDM's servers take it

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop sequences, none empty")
        return stops

    def sampling(self) -> SamplingConfig:
        """temperature 0: greedy; otherwise sampled (THUDM's chat defaults where the request is silent)."""
        temperature = DEFAULTS.temperature if self.temperature is None else self.temperature
        return SamplingConfig(temperature == 0, temperature or 1.0, 0,
                              DEFAULTS.top_p if self.top_p is None else self.top_p, self.repetition_penalty, self.seed)


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | NamedChoice | None = None
    parallel_tool_calls: bool | None = None

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampled):
    prompt: str | list[str]
    echo: Literal[False] = False
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("one prompt a request (n = 1)")
        return value

    @property
    def new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "".join(self.prompt)


# -- requests → prompts ---------------------------------------------------------------------------------------
class Conversation:
    """A chat request in the model's format: `ids` (the prompt), and what reading the reply needs (`asked`: the
    history the reply continues; `opening`: text the prompt already put in the model's mouth)."""

    def __init__(self, tok: GLM2Tokenizer, req: ChatRequest):
        self.tok = tok
        if tok.family.chat == "rounds":
            if req.tools:
                raise UserError(f"tools: {tok.family.title} has no tool format (ChatGLM3 and GLM-4 have)")
            query, history = _rounds(req.messages)
            self.ids, self.asked, self.opening = tok.build_chat_input(query, history), None, ""
            return
        shown = req.tools and req.tool_choice != "none"
        history = _roles(tok, req.messages, [t.function.model_dump(exclude_none=True) for t in req.tools]
                         if shown else None)
        last = history.pop()
        self.asked = history + [last]
        self.ids = tok.build_chat_input(last["content"], history, last["role"])
        self.opening = ""
        if isinstance(req.tool_choice, NamedChoice):  # the call is begun in the prompt: the tool's name, its line
            name = req.tool_choice.function.get("name")
            if name not in {t.function.name for t in req.tools or []}:
                raise UserError(f"tool_choice names {name!r}, which is not one of the request's tools")
            self.opening = name + "\n"
            self.ids += tok.vocab.encode(self.opening)


def _rounds(messages: list[Message]) -> tuple[str, list]:
    """ChatGLM2: a system message goes before the query (as THUDM's openai_api.py does); the rest alternate
    user / assistant and end with the user's query."""
    system = [m.text for m in messages if m.role in ("system", "developer")]
    rest = [m for m in messages if m.role not in ("system", "developer")]
    if not rest or rest[-1].role != "user" or any(m.role == "tool" for m in rest):
        raise UserError("messages: ChatGLM2 takes user and assistant turns ending with the user's")
    pairs = rest[:-1]
    if any(m.role != want for m, want in zip(pairs, ["user", "assistant"] * len(pairs), strict=False)) \
            or len(pairs) % 2:
        raise UserError("messages: ChatGLM2 takes user and assistant turns, alternating")
    history = [(pairs[i].text, pairs[i + 1].text) for i in range(0, len(pairs), 2)]
    return "\n".join(system + [rest[-1].text]), history


def _roles(tok: GLM2Tokenizer, messages: list[Message], tools: list | None) -> list[dict]:
    """ChatGLM3 / GLM-4 history: roles as the release names them (a tool's result is an observation), an
    assistant's tool calls as the model writes them, the tools on the system message."""
    history = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            history += [{"role": "assistant", "metadata": c.function.name,
                         "content": _written_call(tok, c.function)} for c in m.tool_calls]
        elif m.role == "assistant":
            history.append({"role": "assistant", "metadata": "", "content": m.text})
        else:
            role = {"developer": "system", "tool": "observation"}.get(m.role, m.role)
            history.append({"role": role, "content": m.text})
    if tools:
        if history[0]["role"] != "system":
            history.insert(0, {"role": "system", "content": ""})
        history[0]["tools"] = tools
    if history[-1]["role"] not in ("user", "observation"):
        raise UserError("messages: the last message must be the user's or a tool's result")
    return history


def _written_call(tok: GLM2Tokenizer, call: CalledFunction) -> str:
    """A call as the release writes it: GLM-4 its JSON arguments; ChatGLM3 a `tool_call(k=v, …)` code block."""
    if tok.family.tool_arguments == "json":
        return call.arguments
    try:
        args = json.loads(call.arguments)
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise UserError(f"messages: tool call {call.name!r}: arguments must be a JSON object")
    return "```python\ntool_call(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")\n```"


# -- tokens → replies ------------------------------------------------------------------------------------------
class Transcript:
    """The reply as its tokens arrive: `add` gives the text that may be shown now (held back while a character,
    a stop sequence or a tool call's first line is incomplete); `reply` the whole of it at the end."""

    def __init__(self, tok: GLM2Tokenizer, stops: list[str] | None, conversation: Conversation | None = None):
        self.tok, self.stops, self.chat = tok, stops or [], conversation
        self.tokens: list[int] = []
        self.shown = ""
        self.stopped = False  # a stop sequence was met: the caller ends the job

    def add(self, token: int) -> str:
        if token not in self.tok.stop_ids:
            self.tokens.append(token)
        text, call = self._reply()
        if call is not None or text is None:
            return ""
        text = self._cut(text)
        ready = text if self.stopped else text[:len(text) - self._held(text)]
        if ready.endswith("\ufffd") or not ready.startswith(self.shown):
            return ""
        delta, self.shown = ready[len(self.shown):], ready
        return delta

    def reply(self) -> tuple[str | None, list[dict] | None]:
        """(content, tool_calls) of the finished reply."""
        text, call = self._reply()
        if call is not None:
            return None, [call]
        return self._cut(text or ""), None

    def rest(self, content: str | None) -> str:
        """What `add` held back of the finished reply's `content` (`reply`'s)."""
        return content[len(self.shown):] if content and content.startswith(self.shown) else ""

    def _reply(self) -> tuple[str | None, dict | None]:
        """(text, None), (None, tool call), or (None, None) while the role format's metadata line is unfinished."""
        tok, chat = self.tok, self.chat
        if chat is None:
            return tok.decode(self.tokens), None
        if chat.asked is None:
            return process_response(output_text(tok, self.tokens), tok.family.trained), None
        output = chat.opening + output_text(tok, self.tokens)
        if "\n" not in output.split(ASSISTANT)[-1]:
            return None, None
        reply, _ = role_response(tok, output, chat.asked)
        if isinstance(reply, dict) and "parameters" in reply:
            return None, _tool_call(reply)
        return (reply if isinstance(reply, str) else reply["content"]), None

    def _cut(self, text: str) -> str:
        at = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            self.stopped = True
            return text[:at]
        return text

    def _held(self, text: str) -> int:
        """The length of the longest end of `text` that begins a stop sequence."""
        return max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def _tool_call(reply: dict) -> dict:
    params = reply["parameters"]
    arguments = params["raw"] if set(params) == {"raw"} else json.dumps(params, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": reply["name"], "arguments": arguments}}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
