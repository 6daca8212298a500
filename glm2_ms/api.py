"""The public API: a model folder opened once (`open_model`: its config, tokenizer and weights) and
`GLM2ForCausalLM`, the network with the forms users know from transformers and THUDM's remote code:
`from_pretrained`, `generate`, `chat`, `stream_chat`. Each is a thin layer over the model's `Decoder` (built on
first use and kept, so its compiled step is reused)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import mindspore as ms

from converters.source import Source
from glm2_core.config import GLM2Config
from glm2_core.dtypes import COMPUTE_DTYPES
from glm2_core.errors import CheckpointError, UserError
from glm2_core.recipes import SAMPLING

from .dialogue import chat, stream_chat
from .generation import Decoder
from .loading import MS_DTYPES, RUNTIME_LAYOUT, Proofs, block_plan, hold_blocks, load_into
from .model import GLM2Network, check_activations, quantize_activations
from .sampling import DEFAULT_NEW_TOKENS, SamplingConfig
from .tokenizer import GLM2Tokenizer

CHAT_MAX_LENGTH = 8192  # THUDM's ChatGLM2 chat/stream_chat default (prompt + reply)
CHAT, GENERATE = SAMPLING["chat"], SAMPLING["generate"]


class GLM2ForCausalLM(GLM2Network):
    """The network (glm2_ms/model.py) with `from_pretrained`, `generate`, `chat` and `stream_chat`."""

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """`glm2_ms.from_pretrained(path, dtype=…, compute_dtype=…, config=…, rearranged_rope=…, release=…,
        quantize=…, mapped=…, activations=…)`: any folder or file glm2-convert reads, streamed into the parameters."""
        return from_pretrained(path, **kwargs)

    def __call__(self, *args, **kwargs):
        """The forward (`GLM2Network.construct`), then the wait for any checksums still owed on mapped weights
        (`settle`): logits are not handed out before them. Called from Python (PyNative); a graph that calls the
        model compiles its construct, and a model loaded for training owes none."""
        out = super().__call__(*args, **kwargs)
        self.settle()
        return out

    @property
    def decoder(self):
        """The static-cache `Decoder` of this model (one per model: its compiled steps are kept)."""
        if "_decoder" not in self.__dict__:
            self.__dict__["_decoder"] = Decoder(self)
        return self.__dict__["_decoder"]

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = DEFAULT_NEW_TOKENS,
                 max_length: int | None = None, do_sample: bool = GENERATE.do_sample,
                 temperature: float = GENERATE.temperature, top_k: int = 0, top_p: float = GENERATE.top_p,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None):
        """Prompt + new tokens per row, as transformers returns them: a MindSpore tensor for a tensor input, a numpy
        array otherwise. Rows are left-padded (`attention_mask` marks real tokens); finished rows are padded.
        A call whose prompt and new tokens pass the model's context (`config.seq_length`), or whose KV cache would
        not fit in the memory available, or with max_new_tokens < 1, raises UserError before anything runs."""
        as_tensor = hasattr(input_ids, "asnumpy")
        ids = input_ids.asnumpy() if as_tensor else input_ids
        mask = attention_mask.asnumpy() if hasattr(attention_mask, "asnumpy") else attention_mask
        cfg = self.config
        out = self.decoder.generate(ids, mask, max_new_tokens,
                                    sampling(do_sample, temperature, top_k, top_p, repetition_penalty, seed),
                                    cfg.eos_token_id if eos_token_id is None else eos_token_id,
                                    cfg.pad_token_id if pad_token_id is None else pad_token_id, max_length)
        if as_tensor:
            return ms.Tensor(out, ms.int32)
        return out

    def chat_length(self, max_length: int | None) -> int:
        """`max_length` of chat and stream_chat: THUDM's default, or the model's context where that is shorter."""
        return min(CHAT_MAX_LENGTH, self.config.seq_length) if max_length is None else max_length

    def chat(self, tokenizer, query: str, history=None, max_length: int | None = None,
             max_new_tokens: int | None = None, do_sample: bool = CHAT.do_sample, top_p: float = CHAT.top_p,
             temperature: float = CHAT.temperature, role: str = "user", **kwargs):
        """(response, history with this round), with THUDM's defaults (sampling, top_p 0.8, temperature 0.8,
        prompt + reply ≤ 8192 tokens, or the model's context where that is shorter). ChatGLM2: history
        [(query, response), …]; ChatGLM3/GLM-4: history of {"role", "content", …} messages (a system message may
        carry "tools"), `role` user or observation (a tool's result; by name: ChatGLM2's positional order is kept),
        and a response that calls a tool is {"name", "parameters"}. `kwargs`: top_k, repetition_penalty, seed.
        A round that does not fit (the context, the memory available) raises UserError before anything runs."""
        max_length = self.chat_length(max_length)
        return chat(self.decoder, tokenizer, query, history, max_new_tokens or max_length,
                    sampling(do_sample, temperature, top_p=top_p, **kwargs), max_length, role)

    def stream_chat(self, tokenizer, query: str, history=None, max_length: int | None = None,
                    max_new_tokens: int | None = None, do_sample: bool = CHAT.do_sample, top_p: float = CHAT.top_p,
                    temperature: float = CHAT.temperature, role: str = "user", **kwargs) -> Iterator[tuple]:
        """Yields (response so far, history with this round so far) as tokens arrive; arguments as `chat`."""
        max_length = self.chat_length(max_length)
        yield from stream_chat(self.decoder, tokenizer, query, history, max_new_tokens or max_length,
                               sampling(do_sample, temperature, top_p=top_p, **kwargs), max_length, role)


def sampling(do_sample: bool, temperature: float = GENERATE.temperature, top_k: int = 0, top_p: float = GENERATE.top_p,
             repetition_penalty: float = 1.0, seed: int | None = None) -> SamplingConfig:
    """transformers' generation arguments as a SamplingConfig (`do_sample=False`: greedy)."""
    return SamplingConfig(not do_sample, temperature, top_k, top_p, repetition_penalty, seed)


@dataclass
class ModelFolder:
    """A model folder (or weights file) opened once: its weights' headers, its config and release (`config`), its
    tokenizer; the model is built from it when asked (`load`). Nothing downstream reads config.json again."""
    source: Source

    @property
    def config(self) -> GLM2Config:
        return self.source.cfg

    @cached_property
    def tokenizer(self) -> GLM2Tokenizer:
        """Its tokenizer.model (else its family's bundled one), in the family its release and files tell."""
        return GLM2Tokenizer.of_model(self.source.ckpt.folder, self.config)

    def load(self, dtype: str | None = None, compute_dtype: str | None = None,
             quantize: str | None = None, training: bool = False, mapped: bool = True,
             activations: str = "float32") -> GLM2ForCausalLM:
        """The runtime model. `dtype`: storage dtype of the float parameters (default: the checkpoint's, float16
        beside quantized weights where it is float32); `compute_dtype`: float32 or float16 (default: the storage
        dtype, float32 for bfloat16 and beside quantized weights); `quantize`: q8_0 or q4_0, the weight matrices
        quantized as they load (`loading.block_plan`; a GGUF or THUDM int4/int8 source keeps its own blocks
        without it). `training`: float weights only (a source's blocks read as the floats they stand for), and
        MindSpore's launch left as it is. `mapped` (inference): weights kept as their file stores them are the
        file's pages, mapped copy-on-write where the format allows (GGUF), read as the first prompt uses them,
        their checksums checked meanwhile (`loading.Proofs`); the file must then stay as it is while the model
        runs. `activations`: what weights in blocks multiply with, float32 (exact) or q8_0 (llama.cpp's arithmetic,
        faster on a CPU of few cores: `glm2_ms.model.quantize_activations`).
        Memory: the parameters plus one tensor in flight."""
        if dtype is not None and dtype not in MS_DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; expected one of {', '.join(MS_DTYPES)}")
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise UserError(f"compute dtype must be {' or '.join(COMPUTE_DTYPES)}, not {compute_dtype!r}")
        src = self.source
        groups, _ = src.groups(RUNTIME_LAYOUT)
        if training and quantize is not None:
            raise UserError("a quantized model cannot be trained: finetune the float model, then quantize it")
        plan = {} if training else block_plan(src, groups, quantize)
        check_activations(activations, bool(plan))  # training: none (floats)
        if plan and compute_dtype not in (None, "float32"):
            raise UserError(f"quantized weights compute in float32, not {compute_dtype}")
        storage = dtype or ("float16" if plan and src.dtype == "float32" else src.dtype)
        if storage not in MS_DTYPES:
            raise CheckpointError(f"{src.ckpt.path}: weights are {storage}; pass dtype= float32, float16 or bfloat16")
        model = GLM2ForCausalLM(src.cfg, MS_DTYPES[storage], MS_DTYPES[compute_dtype or "float32"] if plan
                                else compute_dtype and MS_DTYPES[compute_dtype])
        hold_blocks(model, plan)
        mapped = mapped and not training
        load_into(model, src.stream(groups, storage, blocks=plan, count=False, mapped=mapped), blocking=not training)
        src.ckpt.check_complete()
        quantize_activations(model, activations)
        if src.proofs:
            model.__dict__["_proofs"] = Proofs(src.proofs)
            src.proofs = []
        return model


@contextmanager
def open_model(path, config: Path | None = None, rearranged_rope: bool | None = None,
               release: str | None = None) -> Iterator[ModelFolder]:
    """`with open_model(folder) as m:` `m.config`, `m.tokenizer`, `m.load(…)`: a converter folder, a HF folder, or
    one weights file (+ config.json beside it). `release`: the release it holds where its config cannot tell
    (glm2_core.releases)."""
    with Source.open(path, rearranged_rope, config, release=release) as src:
        yield ModelFolder(src)


def from_pretrained(path, dtype: str | None = None, compute_dtype: str | None = None,
                    config: Path | None = None, rearranged_rope: bool | None = None,
                    release: str | None = None, quantize: str | None = None, mapped: bool = True,
                    activations: str = "float32") -> GLM2ForCausalLM:
    """The model of a folder or file (`ModelFolder.load`), when its tokenizer is not needed."""
    with open_model(path, config, rearranged_rope, release) as folder:
        return folder.load(dtype, compute_dtype, quantize, mapped=mapped, activations=activations)
