"""ChatGLM2 in MindSpore, top to bottom: RMSNorm, RoPE, grouped-query attention with a static KV cache, SwiGLU,
blocks, the model and its causal-LM head.

Parameter names are the current MindFormers names (`transformer.embedding.embedding_weight`, …), so a converted
checkpoint loads by exact name. Weights are stored in the dtype they were loaded in and cast to the compute
dtype where used (CPU MindSpore has no bfloat16 matmul).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from glm2_core.config import GLM2Config
from glm2_core.dtypes import ACTIVATIONS
from glm2_core.errors import UserError
from glm2_core.quants import row_bytes

from .kernels import (
    native_attention,
    native_embedding,
    native_layer,
    native_layers,
    native_linear,
    native_linear_q8,
    native_rms_norm,
    native_swiglu,
)

MASKED = -1e9  # added to the scores of positions a query may not see (finite: fully padded rows stay finite)


def _param(shape, dtype, init="zeros") -> Parameter:
    return Parameter(initializer(init, shape, dtype))


class RMSNorm(nn.Cell):
    """x · rsqrt(mean(x²) + eps) · weight in float32, cast back (no CPU kernel for ops.rms_norm); in one native
    operator where `use_native_kernels` fused its layer's steps."""

    FUSED = "RmsNorm"  # the native operator (NATIVE_OPS) of its steps

    def __init__(self, dim: int, eps: float, dtype):
        super().__init__()
        self.weight = _param((dim,), dtype, "ones")
        self.eps = eps
        self.native = False  # NATIVE_OPS["RmsNorm"] (set by `use_native_kernels`)
        self.eps_operand = Tensor([eps], ms.float32)  # the native operator's

    def construct(self, x):
        if self.native and not self.training:  # (static)
            return self.natively(x)
        x32 = x.astype(ms.float32)
        x32 = x32 * ops.rsqrt(ops.mean(x32 * x32, -1, keep_dims=True) + self.eps)
        return (x32 * self.weight.astype(ms.float32)).astype(x.dtype)

    def natively(self, x):
        """`construct` in the native operator (float32 x)."""
        return NATIVE_OPS["RmsNorm"](x.reshape(-1, x.shape[-1]), self.weight, self.eps_operand).reshape(x.shape)


class Linear(nn.Cell):
    """y = x Wᵀ (+ b) with W [out, in] as torch stores it. In inference, float32 x against a 16-bit W goes to the
    native kernel when `use_native_kernels` gave it one (no float32 copy of W); otherwise W is cast where used.
    A W held in llama.cpp's blocks (`hold_blocks`) always goes to the native kernel, which quantizes x to q8_0
    blocks first where `quantize_activations` said so."""

    def __init__(self, n_in: int, n_out: int, bias: bool, dtype):
        super().__init__()
        self.weight = _param((n_out, n_in), dtype)
        self.bias = _param((n_out,), dtype) if bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.native = False  # use NATIVE_LINEAR (set by `use_native_kernels`)
        self.blocks = None  # the weight's block kind (glm2_core.quants) when it holds blocks
        self.q8 = False  # x quantized to q8_0 blocks against them (NATIVE_LINEAR_Q8)
        # block-by-block training (train_step.keep_matmul_outputs): `saved` keeps the matmul's output in the
        # forward pass, and `replay` gives it back in the backward pass instead of computing it
        self.saved = self.replay = None

    def construct(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.native and not self.training:  # (static)
            y = NATIVE_LINEAR_Q8(x2, self.weight) if self.q8 else NATIVE_LINEAR(x2, self.weight)
        elif self.replay is not None:  # (static)
            y = self.replay(x2, self.weight, self.saved)
        else:
            # (static) no cast node for a weight already in the compute dtype
            y = self.matmul(x2, self.weight if self.weight.dtype == x.dtype else self.weight.astype(x.dtype))
            if self.saved is not None:  # (static)
                ops.assign(self.saved, y)
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y.reshape(shape[:-1] + (y.shape[-1],))


    def hold_blocks(self, kind: str) -> None:
        """Make the weight a parameter of llama.cpp's blocks of `kind` (uint8 [out, row bytes], set when loaded),
        in place of the float one, which was never allocated."""
        self.weight = _blocks_param(self.weight, kind)
        self.blocks = kind


def _blocks_param(float_param: Parameter, kind: str) -> Parameter:
    n, k = float_param.shape
    return Parameter(initializer("zeros", (n, row_bytes(kind, k)), ms.uint8), name=float_param.name)


NATIVE_LINEAR = None  # the native kernel's operator, once `use_native_kernels` built it (a module global, not a
#                      cell attribute: cells are deep-copied, which a custom operator does not survive)
NATIVE_LINEAR_Q8 = None  # its form over q8_0 activations (set as NATIVE_LINEAR is, for a model with blocks)
NATIVE_OPS = {}  # a layer's fused steps, each one native operator: "Attend", "RmsNorm", "SwiGlu" (set as
#                 NATIVE_LINEAR is, where the model's projections are native)
NATIVE_EMBEDDING = {}  # block kind → the native lookup of an embedding in those blocks (set as NATIVE_LINEAR is)


def use_native_kernels(cell, on: bool = True) -> bool:
    """Let every Linear in `cell` whose weight is 16-bit use the native float32 kernel (glm2_ms/kernels), where it
    can be built here and `cell` computes in float32 (its `compute_dtype`; a bare layer does); whether it could.
    `on=False` takes it back (training: the kernel has no backward). Weights held in blocks use it always: a model
    with them is built only where it can be, computing in float32 (`glm2_ms.api`).

    So `native` alone says which path a cell takes, an attribute the compiler folds: a condition on the input's
    dtype in `construct` made every cell compile both paths, each layer's graph several MB more."""
    global NATIVE_LINEAR, NATIVE_LINEAR_Q8

    op = native_linear()
    NATIVE_LINEAR = op or NATIVE_LINEAR  # cells given it before keep it
    holders = block_holders(cell).values()
    for sub, _ in holders:
        if isinstance(sub, Embedding):
            NATIVE_EMBEDDING[sub.blocks] = native_embedding(sub.blocks)
    if holders:  # for `quantize_activations`
        NATIVE_LINEAR_Q8 = native_linear_q8() or NATIVE_LINEAR_Q8  # as NATIVE_LINEAR: this build's, like the layer's
    native = on and op is not None and getattr(cell, "compute_dtype", ms.float32) == ms.float32
    for sub in linears(cell):
        if sub.blocks is not None:
            sub.native = True
        elif sub.weight.dtype in (ms.float16, ms.bfloat16):
            sub.native = native
    _fuse_steps(cell)
    return native


def _fuse_steps(cell) -> None:
    """A layer's steps between its projections, each in one native operator (attention against the cache, its
    RMSNorms, SwiGLU), where its projections are native; and against a cache the whole layer in one operator made of
    those, where its four projections are plain native Linears (a LoRA one has a path of its own). MindSpore
    dispatches the dozens of small operators the steps are otherwise made of one at a time, which in a decoding step
    costs more than their arithmetic. A layer of float32 weights keeps them in MindSpore: a model all in its
    operators keeps its prefill compiled with open shapes, which an aot operator cannot have
    (`glm2_ms.generation.Decoder`)."""
    for name, build in (("Attend", native_attention), ("RmsNorm", native_rms_norm), ("SwiGlu", native_swiglu),
                        ("Layer", native_layer), ("LayerQ8", lambda: native_layer(q8=True)),
                        ("Layers", native_layers), ("LayersQ8", lambda: native_layers(q8=True))):
        NATIVE_OPS[name] = build() or NATIVE_OPS.get(name)  # cells given one before keep it
    for _, block in cell.cells_and_names():
        if isinstance(block, Block):
            on = block.self_attention.query_key_value.native
            for _, sub in block.cells_and_names():
                if isinstance(sub, (SelfAttention, RMSNorm, MLP)):
                    sub.native = on and NATIVE_OPS[sub.FUSED] is not None
            block.native = all(type(p) is Linear and p.native for p in block.projections()) and \
                NATIVE_OPS["Layer"] is not None and NATIVE_OPS["LayerQ8"] is not None
    for _, encoder in cell.cells_and_names():
        if isinstance(encoder, Encoder):
            encoder.native = all(b.native for b in encoder.layers) and NATIVE_OPS["Layers"] is not None and \
                NATIVE_OPS["LayersQ8"] is not None and NATIVE_OPS["RmsNorm"] is not None


def runs_natively(cell) -> bool:
    """Whether some step of `cell` runs in a native operator (a projection or a fused step)."""
    return any(getattr(sub, "native", False) for _, sub in cell.cells_and_names())


def runs_as_layers(cell) -> bool:
    """Whether every layer of `cell` runs against a cache as one native operator (`Block.fused`)."""
    blocks = [sub for _, sub in cell.cells_and_names() if isinstance(sub, Block)]
    return bool(blocks) and all(b.native for b in blocks)


def check_activations(kind: str, blocks: bool) -> None:
    """Refuse activations `kind` for a model with (`blocks`) or without weights in blocks, before it loads."""
    if kind not in ACTIVATIONS:
        raise UserError(f"unknown activations {kind!r}; expected one of {', '.join(ACTIVATIONS)}")
    if kind != "float32" and not blocks:
        raise UserError(f"activations {kind} go with weights in q8_0/q4_0 blocks, and this model has none "
                        "(quantize= or --quantize gives them)")


def quantize_activations(cell, kind: str) -> None:
    """Let every Linear of `cell` holding q8_0/q4_0 blocks quantize its input to `kind`'s blocks (q8_0) and sum
    each block's products in integers, as llama.cpp does; "float32" takes it back. Faster where a step is bound by
    the arithmetic of widening the weights (a CPU of few cores), and not exact: each activation moves by up to half
    a step of its block. Set when the model loads (`ModelFolder.load`, which checks `kind` first), before a decoder
    compiles its steps with the operator chosen (installed with the model's kernels, `use_native_kernels`)."""
    for sub in linears(cell):
        sub.q8 = sub.blocks is not None and kind == "q8_0"


def linears(cell) -> list[Linear]:
    """Every Linear in `cell`; `.native` tells which use the native kernel."""
    return [sub for _, sub in cell.cells_and_names() if isinstance(sub, Linear)]


def block_holders(cell, holding: bool = True) -> dict:
    """The cells of `cell` that can hold a weight in blocks (Linears, the Embedding) and that weight, by its
    parameter name: those that hold blocks (`holding`), or all of them."""
    out = {}
    for _, sub in cell.cells_and_names():
        weight = sub.weight if isinstance(sub, Linear) else sub.embedding_weight if isinstance(sub, Embedding) \
            else None
        if weight is not None and (sub.blocks is not None or not holding):
            out[weight.name] = (sub, weight)
    return out


def rotate(x, cos, sin):
    """RoPE on the first half of each head as interleaved pairs (x0, x1) → (x0·c − x1·s, x1·c + x0·s).

    x [batch, seq, heads, d]; cos/sin [batch, seq, 1, d/4]."""
    b, s, n, d = x.shape
    rot = d // 2
    # split into equal parts, not slices: one Split kernel, where sizes (or slices) become a StridedSlice each,
    # which on MindSpore's CPU cost more than the arithmetic
    head, rest = ops.split(x, rot, -1)
    x0, x1 = (t.squeeze(-1) for t in ops.split(head.reshape(b, s, n, rot // 2, 2), 1, -1))
    out = ops.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).reshape(b, s, n, rot)
    return ops.cat([out, rest], -1)


class SelfAttention(nn.Cell):
    FUSED = "Attend"

    def __init__(self, cfg: GLM2Config, dtype):
        super().__init__()
        self.heads, self.groups, self.d = cfg.num_attention_heads, cfg.multi_query_group_num, cfg.kv_channels
        self.query_key_value = Linear(cfg.hidden_size, cfg.q_rows + 2 * cfg.kv_rows, cfg.add_qkv_bias, dtype)
        self.dense = Linear(cfg.q_rows, cfg.hidden_size, False, dtype)
        self.scale = 1.0 / float(np.sqrt(cfg.kv_channels))
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.native = False  # NATIVE_OPS["Attend"] against a cache (set by `use_native_kernels`)

    def construct(self, x, cos, sin, mask, cache=None, write=None):
        """x [b, s, hidden]; mask [b, s, kv_len] additive. With a cache (k, v of [b, groups, max_len, d]),
        the new k/v go to the slots `write` [b, s, max_len] (one-hot rows: each row of the batch its own slots, so a
        server's rows may sit at different lengths) and attention runs over the cache."""
        if self.native and cache is not None and not self.training:  # (static)
            ctx, k, v = NATIVE_OPS["Attend"](self.query_key_value(x), cos, sin, mask, write, cache[0], cache[1])
            return self.dense(ctx), (k, v)
        b, s, _ = x.shape
        h, g, d = self.heads, self.groups, self.d
        # the fused output is h/g query blocks of g·d, then k and v (g·d each): a Split into those equal parts
        # (one kernel; sizes (h·d, g·d, g·d) would be a StridedSlice each)
        per = h // g
        parts = ops.split(self.query_key_value(x).reshape(b, s, per + 2, g * d), 1, 2)
        q = rotate(ops.cat(parts[:per], 2).reshape(b, s, h, d), cos, sin)
        k = rotate(parts[per].reshape(b, s, g, d), cos, sin)
        v = parts[per + 1].reshape(b, s, g, d)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, g, s, d]
        if cache is not None:
            keep = (1 - write.sum(1)).reshape(b, 1, -1, 1)
            place = write.transpose(0, 2, 1).reshape(b, 1, write.shape[2], s).broadcast_to((b, g, -1, -1))
            k = cache[0] * keep + self.bmm(place, k)
            v = cache[1] * keep + self.bmm(place, v)
        # queries of one kv group side by side: [b, g, (h/g)·s, d]
        qg = q.transpose(0, 2, 1, 3).reshape(b, g, (h // g) * s, d)
        scores = self.bmm_t(qg, k).astype(ms.float32) * self.scale
        scores = scores.reshape(b, g, h // g, s, -1) + mask.reshape(b, 1, 1, s, -1)
        probs = ops.softmax(scores, -1).astype(x.dtype).reshape(b, g, (h // g) * s, -1)
        ctx = self.bmm(probs, v).reshape(b, h, s, d).transpose(0, 2, 1, 3).reshape(b, s, h * d)
        return self.dense(ctx), (k, v)


class MLP(nn.Cell):
    FUSED = "SwiGlu"

    def __init__(self, cfg: GLM2Config, dtype):
        super().__init__()
        self.ffn = cfg.ffn_hidden_size
        self.dense_h_to_4h = Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, False, dtype)
        self.dense_4h_to_h = Linear(cfg.ffn_hidden_size, cfg.hidden_size, False, dtype)
        self.native = False  # NATIVE_OPS["SwiGlu"] (set by `use_native_kernels`)

    def construct(self, x):
        if self.native and not self.training:  # (static)
            both = self.dense_h_to_4h(x)
            glu = NATIVE_OPS["SwiGlu"](both.reshape(-1, both.shape[-1])).reshape(x.shape[:-1] + (self.ffn,))
            return self.dense_4h_to_h(glu)
        gate, up = ops.split(self.dense_h_to_4h(x), self.ffn, -1)
        return self.dense_4h_to_h(ops.silu(gate) * up)


class Block(nn.Cell):
    def __init__(self, cfg: GLM2Config, dtype):
        super().__init__()
        norm = (lambda: RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon, dtype))
        self.input_layernorm = norm()
        self.self_attention = SelfAttention(cfg, dtype)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, dtype)
        # GLM-4-0414's "sandwich": a norm on each branch's output before its residual add
        self.post_self_attn_layernorm = norm() if cfg.sandwich_norms else None
        self.post_mlp_layernorm = norm() if cfg.sandwich_norms else None
        self.record = None  # the tracing hook (see GLM2Network.trace)
        self.native = False  # the whole layer in NATIVE_OPS["Layer"] against a cache (set by `use_native_kernels`)
        qkv = self.self_attention.query_key_value
        # the native layer's bias operand where the projection has none
        self.no_bias = Tensor(np.zeros(qkv.weight.shape[0], np.float32)) if qkv.bias is None else None

    def projections(self) -> tuple:
        att, mlp = self.self_attention, self.mlp
        return att.query_key_value, att.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h

    def construct(self, x, cos, sin, mask, cache=None, write=None):
        if self.native and cache is not None and self.record is None and not self.training:  # (static)
            return self.fused(x, cos, sin, mask, cache, write)
        attn, kv = self.self_attention(self.input_layernorm(x), cos, sin, mask, cache, write)
        if self.post_self_attn_layernorm is not None:
            attn = self.post_self_attn_layernorm(attn)
        x = x + attn
        if self.record is not None:
            self.record("attention", x)
        mlp = self.mlp(self.post_attention_layernorm(x))
        if self.post_mlp_layernorm is not None:
            mlp = self.post_mlp_layernorm(mlp)
        x = x + mlp
        if self.record is not None:
            self.record("mlp", x)
        return x, kv

    def fused(self, x, cos, sin, mask, cache, write):
        """`construct` against a cache in one native operator (layer.cc): the same steps, the same result, but the
        cache is updated in place and given back (a step holds it once)."""
        k, v, *weights = self.own_operands(cache)
        op = NATIVE_OPS["LayerQ8" if self.quantizes() else "Layer"]
        return op(x, cos, sin, mask, write, k, v, self.input_layernorm.eps_operand, *weights), cache

    def quantizes(self) -> bool:
        """Whether the layer's operator quantizes its projections' inputs (`quantize_activations`)."""
        qkv, dense, up, down = self.projections()
        return qkv.q8 or dense.q8 or up.q8 or down.q8

    def own_operands(self, cache) -> tuple:
        """What the layer operator takes of this layer (its cache and weights), in its order."""
        qkv, dense, up, down = self.projections()
        own = (cache[0], cache[1], self.input_layernorm.weight, qkv.weight,
               self.no_bias if qkv.bias is None else qkv.bias, dense.weight, self.post_attention_layernorm.weight,
               up.weight, down.weight)
        if self.post_mlp_layernorm is not None:
            own += (self.post_self_attn_layernorm.weight, self.post_mlp_layernorm.weight)
        return own


class Embedding(nn.Cell):
    def __init__(self, cfg: GLM2Config, dtype):
        super().__init__()
        self.embedding_weight = _param((cfg.padded_vocab_size, cfg.hidden_size), dtype)
        self.blocks = None  # the table's block kind when it holds blocks (looked up by the native kernel)
        self.drop_pages = None  # for a table that is its file's mapping: unmaps what a lookup mapped (inference)

    def hold_blocks(self, kind: str) -> None:
        """As `Linear.hold_blocks`: the table in llama.cpp's blocks, its rows dequantized as they are looked up."""
        self.embedding_weight = _blocks_param(self.embedding_weight, kind)
        self.blocks = kind

    def construct(self, ids):
        x = self.lookup(ids)
        if self.drop_pages is not None:  # (static; PyNative)
            self.drop_pages()
        return x

    def lookup(self, ids):
        w = self.embedding_weight
        if self.blocks is not None:  # (static)
            return NATIVE_EMBEDDING[self.blocks](ids.astype(ms.int32), w)
        if w.dtype == ms.bfloat16:  # no bfloat16 Gather on CPU: gather the bits (PyNative only: view is not in jit)
            return ops.gather(w.view(ms.uint16), ids, 0).view(ms.bfloat16)
        return ops.gather(w, ids, 0)


def rope_tables(position_ids, inv_freq, dtype):
    """RoPE's cos and sin [b, s, 1, d/4] for `position_ids` [b, s], from float32 angles, in `dtype`."""
    angles = position_ids.astype(ms.float32).expand_dims(-1) * inv_freq
    b, s = position_ids.shape
    return (ops.cos(angles).astype(dtype).reshape(b, s, 1, -1), ops.sin(angles).astype(dtype).reshape(b, s, 1, -1))


def mask_and_positions(input_ids, attention_mask=None, position_ids=None):
    """The additive causal mask [b, s, s] of left-padded rows (`attention_mask` marks real tokens) and the position
    ids (0.. from each row's first real token unless given)."""
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = ops.ones((b, s), ms.int32)
    if position_ids is None:
        position_ids = ops.relu(ops.cumsum(attention_mask.astype(ms.int32), 1) - 1)
    causal = ops.tril(ops.ones((s, s), ms.float32))
    allowed = causal.reshape(1, s, s) * attention_mask.astype(ms.float32).reshape(b, 1, s)
    return (1 - allowed) * MASKED, position_ids


class Encoder(nn.Cell):
    def __init__(self, cfg: GLM2Config, dtype):
        super().__init__()
        self.layers = nn.CellList([Block(cfg, dtype) for _ in range(cfg.num_layers)])
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon, dtype)
        self.native = False  # all layers in NATIVE_OPS["Layers"] against a cache (set by `use_native_kernels`, where
        #                     every layer runs as one operator; a caller taking a layer's `native` back takes this)

    def stacked(self, x, cos, sin, mask, caches, write):
        """Every layer against its cache in one native operator (layer.cc's Layers), each as `Block.fused` runs
        it: one dispatch a step instead of one a layer, each of which has a fixed cost (MindSpore's, and the worker
        thread's wait for it; docs/performance.md). The caches are updated in place and given back."""
        own, q8 = (), False
        for i, block in enumerate(self.layers):  # (loops the compiler reads, where graphs compile)
            own, q8 = own + block.own_operands(caches[i]), q8 or block.quantizes()
        op = NATIVE_OPS["LayersQ8" if q8 else "Layers"]
        return op(x, cos, sin, mask, write, self.layers[0].input_layernorm.eps_operand, *own), tuple(caches)


class GLM2Model(nn.Cell):
    def __init__(self, cfg: GLM2Config, dtype, compute_dtype):
        super().__init__()
        self.embedding = Embedding(cfg, dtype)
        self.encoder = Encoder(cfg, dtype)
        self.output_layer = Linear(cfg.hidden_size, cfg.padded_vocab_size, False, dtype)
        self.compute_dtype = compute_dtype
        self.inv_freq = Tensor(cfg.rope_inv_freq(), ms.float32)
        self.record = None  # the tracing hook (see GLM2Network.trace)

    def construct(self, input_ids, position_ids, mask, caches=None, write=None):
        """Hidden states after the final norm, and the layers' k/v (the updated caches when given)."""
        return self.body(self.embedding(input_ids), position_ids, mask, caches, write)

    def body(self, x, position_ids, mask, caches=None, write=None, last_only=False):
        """Everything after the embedding lookup (what the decoding step runs); `last_only`: the final norm of each
        row's last position only (a step's logits need no more: over a whole prompt the norm's intermediates were
        several times the prompt's hidden states)."""
        x = x.astype(self.compute_dtype)
        if self.record is not None:
            self.record("embedding", x)
        cos, sin = rope_tables(position_ids, self.inv_freq, self.compute_dtype)
        stacked = self.encoder.native and caches is not None and self.record is None and not self.training  # (static)
        if stacked:
            x, kvs = self.encoder.stacked(x, cos, sin, mask, caches, write)
        else:
            kvs = ()
            for i, layer in enumerate(self.encoder.layers):
                x, kv = layer(x, cos, sin, mask, None if caches is None else caches[i], write)
                kvs = kvs + (kv,)
        if last_only:
            x = x[:, -1:]
        # with the layers' operator, the final norm in the native one too, not MindSpore's half dozen operators (a
        # forward without a cache keeps those, as layer-streamed parity's does)
        x = self.encoder.final_layernorm.natively(x) if stacked else self.encoder.final_layernorm(x)
        if self.record is not None:
            self.record("final norm", x)
        return x, kvs


class GLM2Network(nn.Cell):
    """`model(input_ids)` → logits [batch, seq, vocab] (float32), without a cache. The public class,
    `glm2_ms.api.GLM2ForCausalLM`, adds `from_pretrained`, `generate`, `chat` and `stream_chat`.

    `attention_mask` [batch, seq] marks real tokens (left padding); position ids default to 0.. per row's first
    real token, as the original tokenizer makes them."""

    def __init__(self, cfg: GLM2Config, dtype=ms.float32, compute_dtype=None):
        super().__init__()
        self.config = cfg
        self.param_dtype = dtype
        self.compute_dtype = compute_dtype or (ms.float32 if dtype == ms.bfloat16 else dtype)
        self.transformer = GLM2Model(cfg, dtype, self.compute_dtype)

    def construct(self, input_ids, attention_mask=None, position_ids=None, picks=None):
        """With `picks` (flat indices into [batch·seq]), the logits of those positions only: [len(picks), vocab]."""
        mask, position_ids = mask_and_positions(input_ids, attention_mask, position_ids)
        hidden, _ = self.transformer(input_ids, position_ids, mask)
        return self.logits(hidden, picks)

    def settle(self) -> None:
        """Wait for the checksums still owed on weights loaded mapped (`glm2_ms.loading.Proofs`), raising if one
        fails. Called (PyNative) by what hands out something computed from the weights, after its arithmetic, so
        that the two overlap: the decoder's prefill, `trace`, and a call of the public model
        (`glm2_ms.api.GLM2ForCausalLM`)."""
        proofs = self.__dict__.get("_proofs")  # in __dict__: a Cell attribute would be deep-copied
        if proofs is not None:
            proofs.wait()  # a failed check raises again at every call
            del self.__dict__["_proofs"]

    def logits(self, hidden, picks=None):
        """The output layer over the final norm's `hidden` (at the flat positions `picks` only, when given)."""
        if picks is not None:
            hidden = ops.gather(hidden.reshape(-1, hidden.shape[-1]), picks, 0)
        return self.transformer.output_layer(hidden).astype(ms.float32)

    def trace(self, input_ids, attention_mask=None) -> list[tuple[str, Tensor]]:
        """The forward, step by step (PyNative): the residual stream after each layer's attention and MLP, the
        final norm and the logits — what a parity check compares against a reference. The same forward as
        `construct`, recorded through its hook."""
        t, out = self.transformer, []
        hooked = [t, *t.encoder.layers]
        for i, cell in enumerate(hooked):  # cell.record(stage, x) is called where the forward passes that stage
            cell.record = (lambda stage, x: out.append((stage, x))) if i == 0 else \
                (lambda stage, x, i=i: out.append((f"layer {i - 1} {stage}", x)))
        try:
            mask, position_ids = mask_and_positions(input_ids, attention_mask, None)
            hidden, _ = t(input_ids, position_ids, mask)
        finally:
            for cell in hooked:
                cell.record = None
        out.append(("logits", t.output_layer(hidden).astype(ms.float32)))
        self.settle()
        return out
