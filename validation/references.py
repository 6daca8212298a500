"""The references a MindSpore model is checked against, all behind one interface: `trace(ids)` → the residual
stream after each layer's attention and MLP, the final norm and the logits; `generate(ids, n)` → greedy tokens.

- torch:       our PyTorch ChatGLM2 (validation/torch_reference.py) on the HF folder.
- glm:         transformers' native GlmForCausalLM on a `ms2hf --layout glm` export of the HF folder's weights.
- remote-code: the HF folder's own modeling_chatglm.py through transformers (trust_remote_code), when present.

Intermediate values are taken with forward hooks, one layer at a time: nothing beyond the weights is kept but a
few [seq, hidden] arrays. `STREAMED` holds the same references' modules run one layer at a time
(validation/streamed.py), for models whose two whole copies do not fit in memory.
"""
from __future__ import annotations

import dataclasses
import importlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # noqa: TID253  (the references are torch modules)

from converters.convert import convert
from converters.source import Source
from glm2_core.config import GLM_MODEL_TYPES
from glm2_core.dtypes import weights_for
from glm2_core.errors import CheckpointError
from glm2_core.names import EMBEDDING, FINAL_NORM, INPUT_NORM, OUTPUT, Layout, prefix_of

from .streamed import EMBED, HEAD, LayerWeights, logits_by_slice, lookup, of, rows_of, used_rows
from .torch_reference import (
    TORCH_DTYPES,
    Block,
    Embedding,
    RMSNorm,
    attention_bias,
    compute_in,
    empty,
    fill,
    load_reference,
    positions,
    rope_tables,
)

TORCH_NAME = "torch (validation/torch_reference.py)"


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _flat(t: torch.Tensor, hidden: int) -> np.ndarray:
    """[seq, hidden] of a batch-1 tensor laid out [1, seq, h] (ours, transformers) or [seq, 1, h] (original);
    hidden -1: [seq, the rest]."""
    t = t.detach().float()
    return (t.reshape(-1, hidden) if hidden > 0 else t.reshape(t.shape[-2], -1)).numpy()


def hook_layer(layer, attn: str, i: int, hidden: int, records: list) -> list:
    """Hooks that append layer i's residual after attention (its input + what the attention branch adds: the
    attention output, or on GLM-4-0414 its norm's output) and after the MLP (its output) to `records`; returns
    their handles."""
    state = {}
    branch = getattr(layer, "post_self_attn_layernorm", None) or getattr(layer, attn)
    return [layer.register_forward_pre_hook(
                lambda m, args, kwargs: state.__setitem__("x", _first(args) if args else kwargs["hidden_states"]),
                with_kwargs=True),
            branch.register_forward_hook(
                lambda m, a, out: records.append(
                    (f"layer {i} attention", _flat(state["x"], hidden) + _flat(_first(out), hidden)))),
            layer.register_forward_hook(
                lambda m, a, out: records.append((f"layer {i} mlp", _flat(_first(out), hidden))))]


class TorchTrace:
    """Hooks on `layers[i].<attn>` and `layers[i]` give the residual after attention (input + attention output)
    and after the MLP (the layer output) for any ChatGLM2-shaped torch model."""

    def __init__(self, model, layers, attn: str, final_norm, hidden: int, logits_fn, generate_fn, name: str):
        self.model, self.layers, self.attn, self.final_norm = model, layers, attn, final_norm
        self.hidden, self.logits_fn, self.generate_fn, self.name = hidden, logits_fn, generate_fn, name

    @torch.no_grad()
    def trace(self, ids: list[int]) -> list[tuple[str, np.ndarray]]:
        records, hooks = [], []
        for i, layer in enumerate(self.layers):
            hooks += hook_layer(layer, self.attn, i, self.hidden, records)
        hooks.append(self.final_norm.register_forward_hook(
            lambda m, a, out: records.append(("final norm", _flat(out, self.hidden)))))
        try:
            logits = self.logits_fn(torch.tensor([ids]))
        finally:
            for h in hooks:
                h.remove()
        return records + [("logits", logits.detach().float().reshape(len(ids), -1).numpy())]

    @torch.no_grad()
    def generate(self, ids: list[int], n: int) -> list[int]:
        return self.generate_fn(ids, n)


def torch_reference(hf_dir: Path, dtype: str, stored: bool = False, release: str | None = None) -> TorchTrace:
    """`stored`: the weights as stored when computing in float32 (cast per layer as it runs), as the generation
    parity of a model too large for two float32 copies needs; `release`: where the folder cannot tell."""
    model = load_reference(hf_dir, weights_for(dtype) if stored else dtype, compute_dtype=dtype, release=release)
    t = model.transformer

    def generate(ids, n):
        return model.generate(np.array([ids]), max_new_tokens=n, eos_token_id=-1)[0, len(ids):].tolist()

    return TorchTrace(model, t.encoder.layers, "self_attention", t.encoder.final_layernorm, model.config.hidden_size,
                      lambda x: model(x)[0], generate, TORCH_NAME)


def glm_reference(hf_dir: Path, dtype: str, stored: bool = False, release: str | None = None) -> TorchTrace:
    import transformers

    storage = (weights_for(dtype) if stored else dtype) or stored_dtype(hf_dir)
    with tempfile.TemporaryDirectory(prefix="glm2-parity-glm-") as tmp:  # a full model copy: gone once loaded
        convert(hf_dir, Path(tmp) / "glm", target=Layout("glm"), fmt="safetensors", dtype=storage,
                progress=False, release=release)
        # GlmForCausalLM, or Glm4ForCausalLM for GLM-4-0414: the class its config.json's model_type names
        model = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "glm",
                                                                  dtype=TORCH_DTYPES[storage]).eval()
    m = model.model
    compute_in(m.embed_tokens, [*m.layers, m.norm, model.lm_head], dtype)

    def generate(ids, n):
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=n)
        return out[0, len(ids):].tolist()

    return TorchTrace(model, model.model.layers, "self_attn", model.model.norm, model.config.hidden_size,
                      lambda x: model(x, use_cache=False).logits, generate, f"transformers {type(model).__name__}")


def remote_code_reference(hf_dir: Path, dtype: str, stored: bool = False, release: str | None = None) -> TorchTrace:
    """THUDM's own modeling_chatglm.py, which reads the folder's config itself (`release` changes nothing)."""
    if not (Path(hf_dir) / "modeling_chatglm.py").is_file():
        raise CheckpointError(f"{hf_dir}: no modeling_chatglm.py, so there is no remote code to run; use "
                              f"--reference torch or --reference glm")
    import transformers

    try:
        storage = (weights_for(dtype) if stored else dtype) or stored_dtype(hf_dir)
        model = transformers.AutoModel.from_pretrained(hf_dir, trust_remote_code=True,
                                                       dtype=TORCH_DTYPES[storage]).eval()
        t = model.transformer
    except Exception as exc:  # third-party code on a transformers it was not written for: say why, plainly
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{hf_dir}: its modeling_chatglm.py does not load with transformers "
                              f"{transformers.__version__} ({type(exc).__name__}: {first}); use --reference torch "
                              f"or glm") from None

    compute_in(t.embedding.word_embeddings, [*t.encoder.layers, t.encoder.final_layernorm, t.output_layer], dtype)

    def generate(ids, n):
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
        return out[0, len(ids):].tolist()

    return TorchTrace(model, t.encoder.layers, "self_attention", t.encoder.final_layernorm, model.config.hidden_size,
                      lambda x: model(x).logits, generate, "remote code (modeling_chatglm.py)")


REFERENCES = {"torch": torch_reference, "glm": glm_reference, "remote-code": remote_code_reference}


def stored_dtype(path: Path) -> str:
    with Source.open(path) as src:
        return src.dtype


class _TorchLayers:
    """A reference's own torch modules, one stage at a time, filled from the HF checkpoint in `layout`'s names
    (see validation/streamed.py); subclasses say which modules and how the model wires them."""

    layout: str

    def __init__(self, hf_dir: Path, dtype: str, release: str | None = None):
        self.weights = LayerWeights(hf_dir, Layout(self.layout), dtype, release)
        self.cfg, self.dtype = self.weights.cfg, dtype
        self.stages, self.close = self.weights.stages, self.weights.close

    def module(self, build, arrays: dict) -> torch.nn.Module:
        """`build()`'s module in the compute dtype, filled from `arrays` (widened by the copy when stored narrower:
        no float32 copy of the weights outside the module)."""
        module = empty(build, self.dtype)
        state = module.state_dict()
        if set(arrays) != set(state):
            raise AssertionError(f"weights {sorted(arrays)[:3]} do not fill {sorted(state)[:3]}")
        for name, (arr, dt) in arrays.items():
            fill(state, name, arr, dt)
        return module

    def load(self, stage, prompts):
        arrays, h = self.weights.read(stage), self.cfg.hidden_size
        if stage == EMBED:
            rows = used_rows(prompts)
            return self.start(rows_of(arrays, rows), rows)
        if stage == HEAD:
            norm = self.module(self.final_norm, of(arrays, self.norm_prefix))

            @torch.no_grad()
            def head(states):
                hiddens = [norm(state[0]) for state in states]
                logits, seconds = logits_by_slice(
                    of(arrays, self.output_prefix), h, hiddens,
                    lambda weights, rows: self.module(lambda: torch.nn.Linear(h, rows, bias=False), weights),
                    lambda layer, hidden: _flat(layer(hidden).float(), -1))
                return [[("final norm", _flat(x, h)), ("logits", y)]
                        for x, y in zip(hiddens, logits, strict=True)], seconds
            return head
        block = self.module(lambda: self.block(stage), of(arrays, self.block_prefix.format(stage)))

        @torch.no_grad()
        def layer(state):
            got = []
            hooks = hook_layer(block, self.attn, stage, h, got)
            try:
                x = _first(self.run_block(block, state))
            finally:
                for hook in hooks:
                    hook.remove()
            return (x, *state[1:]), got
        return layer


class TorchLayers(_TorchLayers):
    """validation/torch_reference.py's Embedding, Block, RMSNorm and output Linear, and its RoPE tables and mask."""

    layout, attn, name = "chatglm", "self_attention", TORCH_NAME
    block_prefix = prefix_of(Layout(layout), INPUT_NORM, "input_layernorm.weight")
    norm_prefix, output_prefix = prefix_of(Layout(layout), FINAL_NORM), prefix_of(Layout(layout), OUTPUT)
    embedding_prefix = prefix_of(Layout(layout), EMBEDDING, "word_embeddings.weight")

    def start(self, arrays, rows):
        embedding = self.module(lambda: Embedding(dataclasses.replace(self.cfg, padded_vocab_size=len(rows))),
                                of(arrays, self.embedding_prefix))

        @torch.no_grad()
        def start(ids):
            mask = torch.ones(1, len(ids), dtype=torch.long)
            x = embedding.word_embeddings(torch.from_numpy(lookup(rows, ids)[None]))
            cos, sin = rope_tables(self.cfg, positions(mask, 0), x.dtype)
            return (x, cos, sin, attention_bias(mask, 0, len(ids))), []
        return start

    def block(self, i):
        return Block(self.cfg)

    @staticmethod
    def run_block(block, state):
        return block(*state)

    def final_norm(self):
        return RMSNorm(self.cfg.hidden_size, self.cfg.layernorm_epsilon)


class GlmLayers(_TorchLayers):
    """transformers' own GLM modules (embedding, GlmDecoderLayer, GlmRMSNorm, lm_head; Glm4's for GLM-4-0414) wired
    as GlmModel.forward wires them: its rotary embedding and `create_causal_mask`."""

    layout, attn = "glm", "self_attn"
    block_prefix = prefix_of(Layout(layout), INPUT_NORM, "input_layernorm.weight")
    norm_prefix, output_prefix = prefix_of(Layout(layout), FINAL_NORM), prefix_of(Layout(layout), OUTPUT)
    embedding_prefix = prefix_of(Layout(layout), EMBEDDING)

    def __init__(self, hf_dir: Path, dtype: str, release: str | None = None):
        import transformers

        super().__init__(hf_dir, dtype, release)
        config = self.cfg.glm_json(dtype)
        kind = config["model_type"]  # glm, or glm4 (GLM-4-0414)
        self.name = f"transformers {GLM_MODEL_TYPES[kind]}"
        self.modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
        self.prefix = GLM_MODEL_TYPES[kind].removesuffix("ForCausalLM")  # transformers' names: Glm4DecoderLayer, …
        self.config = getattr(transformers, f"{self.prefix}Config").from_dict(config)
        self.config._attn_implementation = "sdpa"  # what GlmForCausalLM.from_pretrained picks on this torch

    def start(self, arrays, rows):
        from transformers.masking_utils import create_causal_mask

        c = self.config
        # the model's nn.Embedding on the rows in use (its padding index only matters to gradients)
        embedding = self.module(lambda: torch.nn.Embedding(len(rows), c.hidden_size), of(arrays, self.embedding_prefix))
        rotary = getattr(self.modeling, f"{self.prefix}RotaryEmbedding")(config=c)

        @torch.no_grad()
        def start(ids):
            x = embedding(torch.from_numpy(lookup(rows, ids)[None]))
            position_ids = torch.arange(len(ids)).unsqueeze(0)
            mask = create_causal_mask(config=c, inputs_embeds=x, attention_mask=None, cache=None,
                                      position_ids=position_ids)
            return (x, mask, rotary(x, position_ids=position_ids), position_ids), []
        return start

    def block(self, i):
        return getattr(self.modeling, f"{self.prefix}DecoderLayer")(self.config, i)

    @staticmethod
    def run_block(block, state):
        x, mask, position_embeddings, position_ids = state
        return block(x, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids,
                     use_cache=False)

    def final_norm(self):
        return getattr(self.modeling, f"{self.prefix}RMSNorm")(self.config.hidden_size, eps=self.config.rms_norm_eps)


STREAMED = {"torch": TorchLayers, "glm": GlmLayers}  # remote-code: its modules are the folder's own, not streamed


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t
