"""The tokenizers of the GLM family, behaving as the originals' `tokenization_chatglm.py`.

A family member's tokenizer is data (`glm2_core.families.Family`): its base vocabulary (ChatGLM2 and ChatGLM3: the
same sentencepiece model; GLM-4: a tiktoken BPE ranks file), the special tokens that follow that vocabulary in id
order, the prefix every prompt starts with, its chat format and the tokens generation stops at.
Pad is the sentencepiece `<unk>` (0) or GLM-4's `<|endoftext|>`; batches are padded on the left, with position ids
restarting at 0 for each row's first real token.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.model_folder import tokenizer_model
from glm2_core.assets import bundled_tokenizer
from glm2_core.config import GLM2Config
from glm2_core.errors import CheckpointError
from glm2_core.families import FAMILIES, ROLES, TIKTOKEN, detect_family, family_of, read_ranks
from glm2_core.files import CONFIG, TOKENIZER_MODEL

DEFAULT_MODEL = bundled_tokenizer()[0]  # the tokenizer.model this toolkit ships (ChatGLM2's and ChatGLM3's)


def build_prompt(query: str, history: list[tuple[str, str]] | None = None) -> str:
    """ChatGLM2's chat prompt (text)."""
    prompt = ""
    for i, (old_query, response) in enumerate(history or []):
        prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
    return prompt + f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："


class SentencePieceVocab:
    """ChatGLM2/3's base vocabulary: a sentencepiece model (its <unk>, <s>, </s> are ids 0, 1, 2)."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from None
        self.size = self.sp.vocab_size()
        self.eos_id, self.pad_id = self.sp.eos_id(), self.sp.unk_id()
        self.skipped = {self.sp.bos_id(), self.eos_id, self.pad_id}  # dropped by decode(skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


# GLM-4's pre-tokenizer (its tokenization_chatglm.py): the cl100k-style split
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
class TiktokenVocab:
    """GLM-4's base vocabulary: a tiktoken BPE ranks file, one `base64(token) rank` per line, ranks 0…n-1."""

    def __init__(self, path: Path):
        import tiktoken

        ranks = read_ranks(path)
        self.enc = tiktoken.Encoding(name=f"glm4:{path}", pat_str=GLM4_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={})
        self.size = len(ranks)
        self.eos_id = self.pad_id = None  # set from the family's special tokens
        self.skipped: set[int] = set()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")


@dataclass
class Batch:
    input_ids: np.ndarray       # [batch, seq] int32, left-padded with pad_id
    attention_mask: np.ndarray  # [batch, seq] int32, 1 on real tokens
    position_ids: np.ndarray    # [batch, seq] int32, 0.. on real tokens, 0 on padding


class GLM2Tokenizer:
    """A GLM family tokenizer: `GLM2Tokenizer()` is ChatGLM2's (the bundled model); `from_pretrained(folder)`
    reads the folder's tokenizer.model and picks the family (see `detect_family`)."""

    def __init__(self, model_file: str | Path = DEFAULT_MODEL, family: str = "chatglm2"):
        if family not in FAMILIES:
            raise CheckpointError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
        path = Path(model_file)
        if path.is_dir():
            path = path / TOKENIZER_MODEL
        if not path.is_file():
            raise CheckpointError(f"{path}: no tokenizer.model")
        self.family = FAMILIES[family]
        self.vocab = (TiktokenVocab if self.family.vocabulary == TIKTOKEN else SentencePieceVocab)(path)
        self.n_words = self.vocab.size
        self.special = {tok: self.n_words + i for i, tok in enumerate(self.family.specials)}
        self.vocab_size = self.n_words + len(self.special)
        self.eos_id = self.special[self.family.eos] if self.family.eos else self.vocab.eos_id
        self.pad_id = self.special[self.family.pad] if self.family.pad else self.vocab.pad_id
        self.skipped = self.vocab.skipped | {self.eos_id, self.pad_id}
        self.stop_ids = (self.eos_id, *(self.special[t] for t in self.family.stops))

    @classmethod
    def from_pretrained(cls, path: str | Path, family: str | None = None) -> GLM2Tokenizer:
        """The tokenizer of a model folder, as transformers' AutoTokenizer is loaded: its tokenizer.model (else the
        bundled one, for the families it belongs to), of the family the folder tells (`detect_family`) or
        `family`. Loading the model too? `glm2_ms.open_model` opens the folder once for both."""
        path = Path(path)
        if family is None:
            config = path / CONFIG
            named = GLM2Config.from_file(config).family if config.is_file() else "chatglm2"
            family = detect_family(path, named)
        return cls._of_family(path, family)

    @classmethod
    def of_model(cls, folder: Path, cfg: GLM2Config) -> GLM2Tokenizer:
        """The tokenizer of a model whose config (`GLM2Config`) is read already: the family of its release, or of its
        tokenizer files where they say more (`detect_family`); the release's, if the user named it (--release)."""
        return cls._of_family(folder, family_of(folder, cfg))

    @classmethod
    def _of_family(cls, folder: Path, family: str) -> GLM2Tokenizer:
        return cls(tokenizer_model(folder, family), family)

    def prefix(self) -> list[int]:
        return [self.special[t] for t in self.family.prefix]

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        ids = self.vocab.encode(text)
        ids = self.prefix() + ids if add_special_tokens else ids
        return ids[:max_length] if max_length else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.vocab.decode([i for i in ids if i < self.n_words and i not in self.skipped])
        out, run = [], []
        for i in ids:
            if i >= self.n_words:
                out.append(self.vocab.decode(run) + self.family.specials[i - self.n_words])
                run = []
            else:
                run.append(i)
        return "".join(out) + self.vocab.decode(run)

    def decode_stream(self, tokens: Iterable) -> Iterator[str]:
        """The text of the tokens so far, after each new token (an id, or a one-element array) that ends on a
        complete character, as THUDM's stream_chat shows a reply growing."""
        ids: list[int] = []
        for token in tokens:
            ids.append(int(np.asarray(token).reshape(-1)[0]))
            text = self.complete_text(ids)
            if text:
                yield text

    def complete_text(self, ids: list[int]) -> str:
        """The text of `ids`, or "" while it ends in an incomplete character (a byte token of a longer one)."""
        text = self.decode(ids)
        return "" if text.endswith("\ufffd") else text

    def message(self, role: str, content: str, metadata: str = "") -> list[int]:
        """One message of the role format: `<|role|>` + encode(metadata + "\\n") + encode(content)."""
        if role not in ROLES:
            raise CheckpointError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        return [self.special[f"<|{role}|>"]] + self.vocab.encode(f"{metadata}\n") + self.vocab.encode(content)

    def build_chat_input(self, query: str, history=None, role: str = "user") -> list[int]:
        """The prompt of a chat round. ChatGLM2: history is [(query, reply), …] and every query the user's;
        ChatGLM3/GLM-4: history is [{"role", "content", "metadata"?, "tools"?}, …] as their `chat` keeps it (a
        system message's tools declared as the release declares them: `Family.tool_system`) and `role` says who
        speaks."""
        if self.family.chat == "rounds":
            return self.encode(build_prompt(query, history))
        ids = self.prefix()
        for item in history or []:
            if item["role"] == "system" and "tools" in item:
                for content in self.family.tool_system(item["content"], item["tools"]):
                    ids += self.message("system", content)
                continue
            ids += self.message(item["role"], item["content"], item.get("metadata", ""))
        return ids + self.message(role, query) + [self.special["<|assistant|>"]]

    def answer_ids(self, answer: str) -> list[int]:
        """The ids of a reply as the model writes it after the chat prompt (what finetuning trains on): the text;
        in the role format the assistant message's metadata line ("\n") first."""
        return self.vocab.encode(answer) if self.family.chat == "rounds" else \
            self.vocab.encode("\n") + self.vocab.encode(answer)

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
