"""ChatGLM2 in PyTorch with the original HF parameter names and semantics, as the parity reference.

RMSNorm in float32; RoPE on the first half of each head as interleaved pairs with float32 angles; grouped-query
attention (kv group h // (heads/groups)) with float32 softmax; SwiGLU; a KV cache of un-expanded k/v that grows
by concatenation (the reference favours the plainest form over speed); left padding via the attention mask.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch  # noqa: TID253  (the reference is a torch module)
import torch.nn.functional as F  # noqa: TID253
from torch import nn  # noqa: TID253

from converters.source import Source
from glm2_core.config import GLM2Config
from glm2_core.names import INV_FREQ, Layout
from glm2_ms.sampling import SamplingConfig, choose

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


def rotate(x, cos, sin):
    """x [b, s, n, d]; cos/sin [b, s, 1, d/4]: interleaved pairs of the first d/2 dims."""
    rot = x.shape[-1] // 2
    pairs = x[..., :rot].unflatten(-1, (rot // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2)
    return torch.cat([out, x[..., rot:]], -1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.h, self.g, self.d = cfg.num_attention_heads, cfg.multi_query_group_num, cfg.kv_channels
        self.query_key_value = nn.Linear(cfg.hidden_size, cfg.q_rows + 2 * cfg.kv_rows, bias=cfg.add_qkv_bias)
        self.dense = nn.Linear(cfg.q_rows, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past=None):
        b, s, _ = x.shape
        h, g, d = self.h, self.g, self.d
        q, k, v = self.query_key_value(x).split([h * d, g * d, g * d], -1)
        q = rotate(q.view(b, s, h, d), cos, sin).transpose(1, 2)
        k = rotate(k.view(b, s, g, d), cos, sin).transpose(1, 2)
        v = v.view(b, s, g, d).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        kx, vx = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
        scores = (q @ kx.transpose(-1, -2)).float() / d ** 0.5 + mask[:, None]
        ctx = torch.softmax(scores, -1).to(v.dtype) @ vx
        return self.dense(ctx.transpose(1, 2).reshape(b, s, h * d)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, -1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)
        # GLM-4-0414: a norm on each branch's output before its residual add; identity for the other releases
        sandwich = (lambda: RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon) if cfg.sandwich_norms else nn.Identity())
        self.post_self_attn_layernorm, self.post_mlp_layernorm = sandwich(), sandwich()

    def forward(self, x, cos, sin, mask, past=None):
        attn, kv = self.self_attention(self.input_layernorm(x), cos, sin, mask, past)
        x = x + self.post_self_attn_layernorm(attn)
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x))), kv


class Embedding(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)


class Encoder(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)


class Transformer(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.embedding = Embedding(cfg)
        self.encoder = Encoder(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)


def rope_tables(cfg: GLM2Config, position_ids, dtype):
    """cos and sin [b, s, 1, d/4] for `position_ids` [b, s]: exact (float64) angles whatever the model dtype."""
    angles = position_ids.double()[..., None] * torch.from_numpy(cfg.rope_inv_freq())
    return torch.cos(angles).float().to(dtype)[:, :, None], torch.sin(angles).float().to(dtype)[:, :, None]


def positions(attention_mask, n_past: int):
    """Position ids of the new tokens: 0.. from each row's first real token."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)[:, n_past:]


def attention_bias(attention_mask, n_past: int, s: int):
    """The additive mask [b, s, n_past + s]: causal, and no look at padding (`attention_mask` [b, n_past + s])."""
    causal = torch.ones(s, n_past + s, dtype=torch.bool).tril(n_past)
    allowed = causal[None] & attention_mask[:, None, :].bool()
    return torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)


class TorchGLM2(nn.Module):
    """`forward(input_ids, attention_mask, position_ids, past)` → (logits fp32, new past, hidden states)."""

    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past=None, output_hidden_states=False,
                last_only=False):
        t = self.transformer
        b, s = input_ids.shape
        n_past = 0 if past is None else past[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(b, n_past + s, dtype=torch.long)
        if position_ids is None:
            position_ids = positions(attention_mask, n_past)
        x = t.embedding.word_embeddings(input_ids)
        cos, sin = rope_tables(self.config, position_ids, x.dtype)
        mask = attention_bias(attention_mask, n_past, s)
        hidden, new_past = [], []
        for i, layer in enumerate(t.encoder.layers):
            hidden.append(x)
            x, kv = layer(x, cos, sin, mask, None if past is None else past[i])
            new_past.append(kv)
        x = t.encoder.final_layernorm(x)
        hidden.append(x)
        logits = t.output_layer(x[:, -1:] if last_only else x).float()
        return logits, new_past, (hidden if output_hidden_states else None)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, sampling=None, eos_token_id=2,
                 pad_token_id=0) -> np.ndarray:
        """Same contract as the MindSpore Decoder.generate (shared sampling code)."""
        sampling = sampling or SamplingConfig()
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
        b, n = ids.shape
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)).long()
        rng = np.random.default_rng(sampling.seed)
        logits, past, _ = self(ids, mask, last_only=True)
        out, done = [ids.numpy()], np.zeros(b, bool)
        for t in range(max_new_tokens):
            token = choose(logits[:, -1].numpy(), np.concatenate(out, 1), sampling, rng)
            token = np.where(done, pad_token_id, token)
            out.append(token[:, None])
            done |= token == eos_token_id
            if done.all() or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
            logits, past, _ = self(torch.as_tensor(token[:, None]), mask, past=past, last_only=True)
        return np.concatenate(out, 1)


def empty(build, dtype: str) -> nn.Module:
    """The module `build()` makes, with uninitialised storage in `dtype` (no random init of weights that are about
    to be overwritten)."""
    with torch.device("meta"):
        module = build()
    return module.to(TORCH_DTYPES[dtype]).to_empty(device="cpu").eval()


def fill(state: dict, name: str, arr: np.ndarray, dt: str) -> None:
    """Copy one streamed array (bfloat16 arrives as uint16 bits) into the tensor `state[name]`, casting to its
    dtype (no copy of the array on the way: `copy_` reads it)."""
    arr = np.ascontiguousarray(arr)
    t = torch.from_numpy(arr.view(np.int16) if dt == "bfloat16" else arr)
    state[name].copy_(t.view(torch.bfloat16) if dt == "bfloat16" else t)


def compute_in(lookup, units, dtype: str) -> None:
    """Run a model in `dtype` over weights stored in another: the embedding `lookup` gathers its stored rows and
    widens them; each module of `units` computes over `dtype` copies of its tensors, made as it is entered and
    dropped (its stored tensors put back) as it is left, so only the running one is held in `dtype`. For float32
    over 16-bit weights the values are those of the float32 model on the rounded weights (16-bit values widen
    exactly). The copies are views of one workspace the size of the largest unit, reused by every unit (units run
    one after another, none inside another): widening into fresh memory would cost its page faults, more than the
    copy itself, and narrowing back is not needed."""
    to = TORCH_DTYPES[dtype]
    workspace = torch.empty(0, dtype=to)

    def tensors(module):
        return [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point() and t.dtype != to]

    def enter(module, _):
        nonlocal workspace
        stored = tensors(module)
        need = sum(t.numel() for t in stored)
        if workspace.numel() < need:
            workspace = None  # the smaller one goes before the larger comes
            workspace = torch.empty(need, dtype=to)
        at, module.stored_tensors = 0, []
        for t in stored:
            module.stored_tensors.append((t, t.data))
            t.data = workspace[at:at + t.numel()].view(t.shape).copy_(t.data)
            at += t.numel()

    def leave(module, *_):
        for t, data in module.stored_tensors:
            t.data = data
        module.stored_tensors = []

    if lookup.weight.dtype != to:
        lookup.register_forward_hook(lambda module, args, out: out.to(to))
    for unit in units:
        if tensors(unit):
            unit.register_forward_pre_hook(enter)
            unit.register_forward_hook(leave, always_call=True)


def load_reference(path, dtype: str | None = None, config: Path | None = None,
                   compute_dtype: str | None = None, release: str | None = None) -> TorchGLM2:
    """The reference model from any checkpoint the converters read (`reference_from`)."""
    with Source.open(path, config=config, release=release) as src:
        return reference_from(src, dtype, compute_dtype)


def reference_from(src: Source, dtype: str | None = None, compute_dtype: str | None = None) -> TorchGLM2:
    """The reference model of an opened checkpoint, its weights in `dtype` (default: as stored), computing in
    `compute_dtype` (default: the weights' dtype; see `compute_in`)."""
    storage = dtype or src.dtype
    model = empty(lambda: TorchGLM2(src.cfg), storage)
    state = model.state_dict()
    groups, _ = src.groups(Layout("chatglm"))
    for name, arr, dt in src.stream(groups, storage):
        fill(state, name, arr, dt)
    src.ckpt.check_complete()
    assert INV_FREQ not in state  # computed in the forward from the config, never read from files
    if compute_dtype is not None:
        t = model.transformer
        compute_in(t.embedding.word_embeddings, [*t.encoder.layers, t.encoder.final_layernorm, t.output_layer],
                   compute_dtype)
    return model


def with_peft_adapter(model: TorchGLM2, adapter_dir) -> nn.Module:
    """The reference with a PEFT LoRA adapter applied by peft itself. The adapter's task type (CAUSAL_LM) asks
    for a transformers model; the reference is a plain module, so it is wrapped as one."""
    import peft

    config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    config.task_type = None
    return peft.PeftModel.from_pretrained(model, str(adapter_dir), config=config).eval()
