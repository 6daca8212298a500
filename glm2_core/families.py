"""The tokenizer families of the GLM releases, one record each (`glm2_core.releases` says which release has which):
the base vocabulary, the special tokens that follow it in id order, the prompt prefix, the chat format, the tokens
generation stops at, and the chat template a GGUF file carries when the source folder has none. The tokenizers
themselves are `glm2_ms.tokenizer`; the GGUF vocabulary is `converters.gguf_out`.

- ChatGLM2: [MASK] [gMASK] [sMASK] sop eop = 64789…64793; a chat prompt is the text "[Round N]\\n\\n问：…\\n\\n答：".
- ChatGLM3: the same five, then <|system|> <|user|> <|assistant|> <|observation|> = 64794…64797; a chat prompt is
  role tokens: `<|role|>` + encode(metadata + "\\n") + encode(content) per message, then `<|assistant|>`.
- GLM-4: <|endoftext|> [MASK] [gMASK] [sMASK] <sop> <eop> <|system|> … = 151329…; the same role format.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .files import TOKENIZER_CONFIG, TOKENIZER_MODEL
from .jsonio import read_json
from .releases import TOLD_BY_USER

ROLES = ("system", "user", "assistant", "observation")
_SP_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
_ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)
SENTENCEPIECE, TIKTOKEN = "sentencepiece", "tiktoken"


def _roles_template(prefix: str, space: str) -> str:
    """The role format as a Jinja chat template (`space`: ChatGLM3's sentencepiece starts a text with one)."""
    return (prefix + "{% for m in messages %}<|{{ m['role'] }}|>\n" + space + "{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


_ROUNDS_TEMPLATE = ("[gMASK]sop{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
                    "{% set ns.n = ns.n + 1 %}[Round {{ ns.n }}]\n\n问：{{ m['content'] }}\n\n答："
                    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}\n\n{% endif %}{% endfor %}")


@dataclass(frozen=True)
class Family:
    name: str
    title: str                 # how the model is called in a chat
    vocabulary: str            # SENTENCEPIECE or TIKTOKEN
    specials: tuple[str, ...]  # after the base vocabulary, in id order
    prefix: tuple[str, ...]    # every prompt starts with these
    chat: str                  # "rounds" (ChatGLM2's text prompt) or "roles" (role tokens)
    template: str              # the chat format as a Jinja template, for a GGUF file whose source has none
    stops: tuple[str, ...] = ()  # generation stops at these as well as at eos
    eos: str | None = None     # a special token; None: the sentencepiece model's </s>
    pad: str | None = None     # a special token; None: the sentencepiece model's <unk>
    tool_arguments: str = "python"  # how a tool call's arguments are written: tool_call(k=v, …) or JSON
    trained: str = "2023年"    # what the reply's [[训练时间]] placeholder becomes
    # how tools are declared: None, as indented JSON after the system message's content (ChatGLM3's
    # build_chat_input); else (preamble, what follows each function) of a system message of their own (GLM-4's
    # chat template), each function under "## name" as indented JSON
    tools_message: tuple[str, str] | None = None

    def tool_system(self, content: str, tools: list) -> list[str]:
        """The system messages of a system message whose `tools` (functions, or OpenAI's {"type": "function",
        "function": …}) the model may call."""
        if self.tools_message is None:
            return [content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)]
        preamble, after = self.tools_message
        functions = [t.get("function", t) for t in tools]
        declared = preamble + "".join(f"\n\n## {f['name']}\n\n{json.dumps(f, indent=4, ensure_ascii=False)}{after}"
                                      for f in functions)
        return [declared] + ([content] if content else [])


FAMILIES = {f.name: f for f in (
    Family("chatglm2", "ChatGLM2", SENTENCEPIECE, _SP_SPECIALS, ("[gMASK]", "sop"), "rounds", _ROUNDS_TEMPLATE),
    Family("chatglm3", "ChatGLM3", SENTENCEPIECE, _SP_SPECIALS + _ROLE_TOKENS, ("[gMASK]", "sop"), "roles",
           _roles_template("[gMASK]sop", " "), stops=("<|user|>", "<|observation|>")),
    Family("glm4", "GLM-4", TIKTOKEN,
           ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>") + _ROLE_TOKENS
           + ("<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"),
           ("[gMASK]", "<sop>"), "roles", _roles_template("[gMASK]<sop>", ""), stops=("<|user|>", "<|observation|>"),
           eos="<|endoftext|>", pad="<|endoftext|>", tool_arguments="json", trained="2024年",
           tools_message=("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                          "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具",
                          "\n在调用上述函数时，请使用 Json 格式表示调用的参数。")),
)}

MAX_RANKS_BYTES = 64 << 20  # GLM-4's ranks file is 2.6 MB


def read_ranks(path: Path) -> dict[bytes, int]:
    """The ranks file, checked: size bounded, every line two fields, tokens unique, ranks exactly 0…n-1."""
    if path.stat().st_size > MAX_RANKS_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than a BPE ranks file holds")
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        fields = line.split()
        try:
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            if len(fields) != 2:
                raise ValueError
        except (IndexError, ValueError, binascii.Error):
            raise CheckpointError(f"{path}: line {number} is not `base64-token rank`") from None
        if token in ranks or rank != len(ranks):
            raise CheckpointError(f"{path}: line {number}: ranks must be 0, 1, 2, … with each token once")
        ranks[token] = rank
    missing = sum(bytes([b]) not in ranks for b in range(256))
    if missing:  # byte-level BPE: every text must split into tokens (tiktoken panics otherwise)
        raise CheckpointError(f"{path}: {missing} of the 256 single bytes have no rank")
    return ranks


def vocabulary_kind(path: Path) -> str:
    """TIKTOKEN when the file starts with a ranks line (`base64 rank`), else SENTENCEPIECE (a protobuf)."""
    with open(path, "rb") as f:
        first = f.read(256).split(b"\n", 1)[0]
    return TIKTOKEN if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?", first) else SENTENCEPIECE


def detect_family(folder: Path, named: str = "chatglm2") -> str:
    """The tokenizer family of a model folder whose config names the family `named`: GLM-4 when its tokenizer.model
    is a ranks file; for a sentencepiece model, ChatGLM3 when the config names it or a tokenizer_config.json chat
    template has role tokens, else ChatGLM2; without a tokenizer.model, `named`."""
    vocab = folder / TOKENIZER_MODEL if folder.is_dir() else folder
    if vocab.is_file() and vocabulary_kind(vocab) == TIKTOKEN:
        return "glm4"
    if not folder.is_dir():
        return "chatglm2"
    if not vocab.is_file():
        return named
    template = _json(folder / TOKENIZER_CONFIG).get("chat_template")
    return "chatglm3" if named == "chatglm3" or (isinstance(template, str) and "<|user|>" in template) else \
        "chatglm2"


def family_of(folder: Path | None, cfg) -> str:
    """The tokenizer family of a model whose config (`GLM2Config`) is read: its release's if the user named the
    release (--release), else what the tokenizer files in its folder say beyond it (`detect_family`)."""
    if cfg.told_by == TOLD_BY_USER or folder is None:
        return cfg.family
    return detect_family(folder, cfg.family)


def _json(path: Path) -> dict:
    data = read_json(path) if path.is_file() else None
    return data if isinstance(data, dict) else {}
