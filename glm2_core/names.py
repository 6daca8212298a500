"""The weight map: one table of names per layout, read in both directions.

Canonical names are the HF ChatGLM2 ones. Every other layout stores each canonical tensor as one or more
tensors, each a selection of its rows: a rename takes all rows, a q/k/v or gate/up split takes a row range, and
MindFormers' rearranged RoPE permutes the q and k rows inside every head. A row selection is invertible
(scatter the rows back), so hf2ms and ms2hf are the same table, gathered one way and scattered the other.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .config import GLM2Config
from .errors import CheckpointError, UserError

L = "transformer.encoder.layers.{i}."
G = "model.layers.{i}."
EMBEDDING = "transformer.embedding.word_embeddings.weight"
INV_FREQ = "transformer.rotary_pos_emb.inv_freq"

FAMILIES = ("chatglm", "mindformers", "mindformers-legacy", "glm")
HF_FAMILIES = ("chatglm", "glm")  # written as HF folders; the others as MindSpore checkpoints

# canonical template: {family: target template, or [(target template, rows)] for a split}. Absent = same name.
_QKV = {"q", "k", "v"}
TABLE: dict[str, dict[str, object]] = {
    EMBEDDING: {"mindformers": "transformer.embedding.embedding_weight",
                "mindformers-legacy": "transformer.embedding.embedding_table",
                "glm": "model.embed_tokens.weight"},
    L + "input_layernorm.weight": {"glm": G + "input_layernorm.weight"},
    L + "self_attention.query_key_value.{p}": {
        "mindformers/qkv-split": [(L + "self_attention.wq.{p}", "q"), (L + "self_attention.wk.{p}", "k"),
                                  (L + "self_attention.wv.{p}", "v")],
        "glm": [(G + "self_attn.q_proj.{p}", "q"), (G + "self_attn.k_proj.{p}", "k"),
                (G + "self_attn.v_proj.{p}", "v")]},
    L + "self_attention.dense.weight": {"glm": G + "self_attn.o_proj.weight"},
    L + "post_attention_layernorm.weight": {"glm": G + "post_attention_layernorm.weight"},
    L + "mlp.dense_h_to_4h.weight": {
        "mindformers/mlp-split": [(L + "mlp.dense_left.weight", "gate"), (L + "mlp.dense_right.weight", "up")],
        "glm": G + "mlp.gate_up_proj.weight"},
    L + "mlp.dense_4h_to_h.weight": {"glm": G + "mlp.down_proj.weight"},
    "transformer.encoder.final_layernorm.weight": {"glm": "model.norm.weight"},
    "transformer.output_layer.weight": {"glm": "lm_head.weight"},
}

# Entries of MindSpore training checkpoints that are not model weights.
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.", "accu_grad.")
OPTIMIZER_SCALARS = {"global_step", "epoch_num", "step_num", "loss_scale", "learning_rate", "current_iterator_step",
                     "last_overflow_iterator_step", "scale_sense", "beta1_power", "beta2_power"}
# KV caches: MindFormers' older `key_past`/`kvcache_mgr.*` and 2.x's paged-attention blocks
# (`….infer_attention.paged_attention_mgr.key_cache` / `value_cache`, which its save_pretrained writes)
_CACHE = re.compile(r"(key_past|value_past|kvcache_mgr\.|paged_attention_mgr\.(key|value)_cache$)")
_LORA = re.compile(r"\.(mindpet_delta|tk_delta)_lora_[ab]$")


@dataclass(frozen=True)
class Layout:
    family: str = "mindformers"
    qkv_split: bool = False
    mlp_split: bool = False
    rearrange_rope: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserError(f"unknown layout {self.family!r}; expected one of {', '.join(FAMILIES)}")
        if self.family != "mindformers" and (self.qkv_split or self.mlp_split or self.rearrange_rope):
            raise UserError(f"layout {self.family}: split/rearranged variants exist only for the current "
                                  f"MindFormers names (--layout mindformers)")

    def describe(self) -> str:
        flags = [f for f, on in (("qkv-split", self.qkv_split), ("mlp-split", self.mlp_split),
                                 ("rearranged-rope", self.rearrange_rope)) if on]
        return "+".join([self.family, *flags])

    def as_dict(self) -> dict:
        return {"family": self.family, "qkv_split": self.qkv_split, "mlp_split": self.mlp_split,
                "rearrange_rope": self.rearrange_rope}

    def targets(self, template: str) -> list[tuple[str, str]]:
        """The target templates of one canonical template, with the part of the rows each takes."""
        rules = TABLE.get(template, {})
        for key in (f"{self.family}/qkv-split" if self.qkv_split else None,
                    f"{self.family}/mlp-split" if self.mlp_split else None, self.family):
            if key in rules:
                rule = rules[key]
                return rule if isinstance(rule, list) else [(rule, "all")]
        return [(template, "all")]


def _rope_perm(d: int) -> np.ndarray:
    """MindFormers' rearranged RoPE within one head: even rows first, then odd rows."""
    return np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])


def _rows(part: str, template: str, layout: Layout, cfg: GLM2Config):
    """A slice (contiguous rows) or an index array selecting the rows of the canonical tensor."""
    q, kv, ffn = cfg.q_rows, cfg.kv_rows, cfg.ffn_hidden_size
    spans = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, ffn), "up": (ffn, 2 * ffn)}
    is_qkv = "query_key_value" in template
    if not (layout.rearrange_rope and is_qkv):
        if part == "all":
            return None
        return slice(*spans[part])
    d = cfg.kv_channels
    perm = _rope_perm(d)

    def block(p):
        lo, hi = spans[p]
        idx = np.arange(lo, hi)
        return idx if p == "v" else (idx.reshape(-1, d)[:, perm] + 0).reshape(-1)

    return np.concatenate([block(p) for p in ("q", "k", "v")]) if part == "all" else block(part)


@dataclass(frozen=True)
class Piece:
    name: str
    rows: object  # None (all rows), a slice, or an index array


@dataclass(frozen=True)
class Mapping:
    canonical: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    def piece_shape(self, piece: Piece) -> tuple[int, ...]:
        if piece.rows is None:
            return self.shape
        n = piece.rows.stop - piece.rows.start if isinstance(piece.rows, slice) else len(piece.rows)
        return (n, *self.shape[1:])

    def gather(self, canonical: np.ndarray) -> list[np.ndarray]:
        """Canonical tensor → the layout's tensors (views where the rows are contiguous)."""
        return [canonical if p.rows is None else canonical[p.rows] for p in self.pieces]

    def scatter(self, parts: list[np.ndarray]) -> np.ndarray:
        """The layout's tensors → the canonical tensor."""
        if len(parts) == 1 and self.pieces[0].rows is None:
            return parts[0]
        out = np.empty(self.shape, parts[0].dtype)
        for p, a in zip(self.pieces, parts):
            out[p.rows] = a
        return out


def weight_map(layout: Layout, cfg: GLM2Config) -> list[Mapping]:
    """Every canonical weight with the tensors that store it in `layout`, in the release's order."""
    out = []
    for name, shape in cfg.canonical_shapes().items():
        layer = re.search(r"layers\.(\d+)\.", name)
        template = re.sub(r"layers\.\d+\.", "layers.{i}.", name)
        p = None
        if "query_key_value" in template:
            template, p = template.rsplit(".", 1)
            template += ".{p}"
        pieces = tuple(Piece(t.format(i=layer and layer.group(1), p=p), _rows(part, template, layout, cfg))
                       for t, part in layout.targets(template))
        out.append(Mapping(name, shape, pieces))
    return out


def classify(name: str) -> str:
    """'optimizer', 'cache', 'buffer', 'lora' or 'weight' (the last only says: not one of the others)."""
    if name.startswith(OPTIMIZER_PREFIXES) or name in OPTIMIZER_SCALARS:
        return "optimizer"
    if _LORA.search(name):
        return "lora"
    if _CACHE.search(name):
        return "cache"
    if name.endswith("rotary_pos_emb.inv_freq"):
        return "buffer"
    return "weight"


def detect_layout(names, rearrange_rope: bool = False, where: str = "checkpoint") -> Layout:
    """The layout a set of tensor names is in. Rearranged RoPE leaves no trace in names: it must be told."""
    names = set(names)
    families = [f for f, key in (("chatglm", EMBEDDING), ("mindformers", "transformer.embedding.embedding_weight"),
                                 ("mindformers-legacy", "transformer.embedding.embedding_table"),
                                 ("glm", "model.embed_tokens.weight")) if key in names]
    if len(families) != 1:
        found = "several embeddings" if families else "no embedding"
        raise CheckpointError(f"{where}: cannot tell the checkpoint's layout: {found} among its names "
                              f"(expected one of {EMBEDDING}, transformer.embedding.embedding_weight, "
                              f"transformer.embedding.embedding_table, model.embed_tokens.weight)")
    family = families[0]
    mf = family == "mindformers"
    return Layout(family, qkv_split=mf and any(n.endswith("self_attention.wq.weight") for n in names),
                  mlp_split=mf and any(n.endswith("mlp.dense_left.weight") for n in names),
                  rearrange_rope=mf and rearrange_rope)


def infer_config(shapes: dict[str, tuple[int, ...]], layout: Layout, where: str = "checkpoint",
                 kv_channels: int = 128) -> GLM2Config:
    """Model sizes from the tensor shapes alone, for a bare checkpoint without config.json.

    Head size is not visible in the shapes; ChatGLM2's 128 is assumed (pass a config.json otherwise).
    """
    refused = CheckpointError(f"{where}: cannot infer the model sizes from the tensor shapes; give the model's "
                              f"config.json (--config)")
    by_canon = {}
    for m in weight_map(layout, GLM2Config.preset("tiny", num_layers=1)):
        for piece in m.pieces:
            by_canon[piece.name] = m.canonical
    emb = [shapes[n] for n in shapes if by_canon.get(n) == EMBEDDING]
    down = [s for n, s in shapes.items() if n.endswith(("dense_4h_to_h.weight", "down_proj.weight"))]
    qkv = [s for n, s in shapes.items()
           if re.search(r"layers\.0\.self_att\w*\.(query_key_value|wq|wk|wv|[qkv]_proj)\.weight$", n)]
    if len(emb) != 1 or len(emb[0]) != 2 or not down or len(down[0]) != 2 or not qkv or any(len(s) != 2 for s in qkv):
        raise refused
    (vocab, hidden), qkv_rows = emb[0], sum(s[0] for s in qkv)
    layers = {int(m.group(1)) for n in shapes for m in [re.search(r"layers\.(\d{1,6})\.", n)] if m}
    heads = hidden // kv_channels
    groups = (qkv_rows - hidden) // (2 * kv_channels)
    has_bias = any(n.endswith(("query_key_value.bias", "wq.bias", "q_proj.bias")) for n in shapes)
    if hidden % kv_channels or groups <= 0 or heads * kv_channels + 2 * groups * kv_channels != qkv_rows:
        raise refused
    return GLM2Config._build(f"{where} (sizes inferred from its shapes)", num_layers=len(layers), hidden_size=hidden,
                             ffn_hidden_size=down[0][1], num_attention_heads=heads, multi_query_group_num=groups,
                             kv_channels=kv_channels, padded_vocab_size=vocab, add_qkv_bias=has_bias)


def inv_freq(cfg: GLM2Config, dtype: str) -> np.ndarray:
    """The `rotary_pos_emb.inv_freq` buffer as the original code computes it: in the model's dtype."""
    from .dtypes import cast

    dim = cfg.kv_channels // 2
    work = np.float16 if dtype == "float16" else np.float32
    exponent = (np.arange(0, dim, 2, dtype=np.float32) / dim).astype(work)
    power = (np.float32(cfg.rope_base) ** exponent.astype(np.float32)).astype(work)
    value = (np.float32(1.0) / power.astype(np.float32)).astype(work)
    return cast(value, "float16" if work is np.float16 else "float32", dtype)
