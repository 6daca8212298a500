"""The weight-name schema: every canonical weight with its shape, and the names that store it in each layout.

Canonical names are the HF ChatGLM2 ones (`SCHEMA`). Every other layout stores each canonical tensor as one or
more tensors, each a selection of its rows: a rename takes all rows, a q/k/v or gate/up split takes a row range,
MindFormers' rearranged RoPE permutes the q and k rows inside every head, and its mcore names interleave them
(q/k/v by key-value group, gate/up row by row). A row selection is invertible
(scatter the rows back), so hf2ms and ms2hf are the same table, gathered one way and scattered the other; the
layout of a set of names and the sizes of a bare checkpoint are read from the same table.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .config import GLM2Config
from .dtypes import cast
from .errors import CheckpointError, UserError
from .releases import identify

L = "transformer.encoder.layers.{i}."
G = "model.layers.{i}."
EMBEDDING = "transformer.embedding.word_embeddings.weight"
OUTPUT = "transformer.output_layer.weight"
INV_FREQ = "transformer.rotary_pos_emb.inv_freq"
QKV_WEIGHT, QKV_BIAS = L + "self_attention.query_key_value.weight", L + "self_attention.query_key_value.bias"
MLP_UP, MLP_DOWN = L + "mlp.dense_h_to_4h.weight", L + "mlp.dense_4h_to_h.weight"
SANDWICH = L + "post_self_attn_layernorm.weight"  # GLM-4-0414's (with post_mlp_layernorm)
INPUT_NORM, FINAL_NORM = L + "input_layernorm.weight", "transformer.encoder.final_layernorm.weight"

M = "decoder.layers.{i}."
B = "blk.{i}."  # llama.cpp's GGUF names


@dataclass(frozen=True)
class LayoutSpec:
    """What a layout is besides its names: how it is written and which architectures its names can hold."""
    what: str                  # for --help
    formats: tuple[str, ...]   # the weights formats it is written in, the default first
    config: str = "chatglm"    # the config.json written beside it: THUDM's fields ("chatglm") or transformers' ("glm")
    sandwich: tuple[bool, ...] = (False, True)  # the values of GLM-4-0414's sandwich norms its names can hold

    @property
    def hf(self) -> bool:
        """Written as a HF folder (else as a MindSpore checkpoint or a GGUF file)."""
        return "bin" in self.formats

    @property
    def folder(self) -> bool:
        """Written as a model folder (else as one GGUF file, which carries its config and tokenizer)."""
        return "gguf" not in self.formats


LAYOUTS = {
    "mindformers": LayoutSpec("MindFormers' current names", ("ckpt", "safetensors")),
    "mindformers-legacy": LayoutSpec("MindFormers r0.8–r1.1", ("ckpt", "safetensors")),
    # MindFormers 2.1.0's mcore Glm4 (inference only), which reads a folder of safetensors and transformers' config
    "mindformers-mcore": LayoutSpec("MindFormers 2.1's mcore Glm4, GLM-4-0414 only", ("safetensors", "ckpt"), "glm",
                                    sandwich=(True,)),
    "chatglm": LayoutSpec("THUDM's HF names, a HF folder", ("safetensors", "bin"), sandwich=(False,)),
    "glm": LayoutSpec("transformers' GlmForCausalLM, a HF folder", ("safetensors", "bin"), "glm"),
    # llama.cpp's `chatglm` and `glm4` architectures: THUDM's fused qkv and gate/up, renamed (to-gguf)
    "gguf": LayoutSpec("llama.cpp's names, one GGUF file", ("gguf",)),
}
HF_LAYOUTS = tuple(name for name, spec in LAYOUTS.items() if spec.hf)
MS_LAYOUTS = tuple(name for name, spec in LAYOUTS.items() if spec.folder and not spec.hf)


def formats_of(layouts) -> tuple[str, ...]:
    """The weights formats the layouts are written in, the first layout's default first."""
    return tuple(dict.fromkeys(f for name in layouts for f in LAYOUTS[name].formats))


FORMAT_NAMES = formats_of(MS_LAYOUTS + HF_LAYOUTS)  # the formats of model folders: ckpt, safetensors, bin


def _qkv(p: str) -> dict[str, object]:
    return {"mindformers/qkv-split": [(L + f"self_attention.wq.{p}", "q"), (L + f"self_attention.wk.{p}", "k"),
                                      (L + f"self_attention.wv.{p}", "v")],
            "glm": [(G + f"self_attn.q_proj.{p}", "q"), (G + f"self_attn.k_proj.{p}", "k"),
                    (G + f"self_attn.v_proj.{p}", "v")],
            "mindformers-mcore": [(M + f"self_attention.linear_qkv.{p}", "qkv-by-group")],
            "gguf": B + f"attn_qkv.{p}"}


@dataclass(frozen=True)
class Weight:
    """One canonical weight: its THUDM name (`{i}`: the layer), its shape from the config's sizes, and how each
    layout stores it: {layout or layout/variant: its name, or [(name, rows)] for a split}; absent: the same name."""
    template: str
    shape: Callable[[GLM2Config], tuple[int, ...]]
    layouts: dict[str, object] = field(default_factory=dict)
    rope: bool = False  # its q/k rows are the ones MindFormers' rearranged RoPE permutes
    present: Callable[[GLM2Config], bool] = lambda cfg: True


# The schema, in the release's order (the layer's entries repeat for every layer).
SCHEMA = (
    Weight(EMBEDDING, lambda c: (c.padded_vocab_size, c.hidden_size),
           {"mindformers": "transformer.embedding.embedding_weight",
            "mindformers-legacy": "transformer.embedding.embedding_table", "glm": "model.embed_tokens.weight",
            "mindformers-mcore": "embedding.word_embeddings.weight", "gguf": "token_embd.weight"}),
    Weight(INPUT_NORM, lambda c: (c.hidden_size,),
           {"glm": G + "input_layernorm.weight", "mindformers-mcore": M + "input_layernorm.weight",
            "gguf": B + "attn_norm.weight"}),
    Weight(QKV_WEIGHT, lambda c: (c.qkv_rows, c.hidden_size), _qkv("weight"), rope=True),
    Weight(QKV_BIAS, lambda c: (c.qkv_rows,), _qkv("bias"), rope=True, present=lambda c: c.add_qkv_bias),
    Weight(L + "self_attention.dense.weight", lambda c: (c.hidden_size, c.q_rows),
           {"glm": G + "self_attn.o_proj.weight", "mindformers-mcore": M + "self_attention.linear_proj.weight",
            "gguf": B + "attn_output.weight"}),
    Weight(SANDWICH, lambda c: (c.hidden_size,),
           {"glm": G + "post_self_attn_layernorm.weight", "mindformers-mcore": M + "post_self_attn_layernorm.weight",
            "gguf": B + "post_attention_norm.weight"},
           present=lambda c: c.sandwich_norms),
    Weight(L + "post_attention_layernorm.weight", lambda c: (c.hidden_size,),
           {"glm": G + "post_attention_layernorm.weight", "mindformers-mcore": M + "pre_mlp_layernorm.weight",
            "gguf": B + "ffn_norm.weight"}),
    Weight(MLP_UP, lambda c: (2 * c.ffn_hidden_size, c.hidden_size),
           {"mindformers/mlp-split": [(L + "mlp.dense_left.weight", "gate"), (L + "mlp.dense_right.weight", "up")],
            "glm": G + "mlp.gate_up_proj.weight",
            "mindformers-mcore": [(M + "mlp.linear_fc1.weight", "gate-up-by-row")], "gguf": B + "ffn_up.weight"}),
    Weight(MLP_DOWN, lambda c: (c.hidden_size, c.ffn_hidden_size),
           {"glm": G + "mlp.down_proj.weight", "mindformers-mcore": M + "mlp.linear_fc2.weight",
            "gguf": B + "ffn_down.weight"}),
    Weight(L + "post_mlp_layernorm.weight", lambda c: (c.hidden_size,),
           {"glm": G + "post_mlp_layernorm.weight", "mindformers-mcore": M + "post_mlp_layernorm.weight",
            "gguf": B + "post_ffw_norm.weight"},
           present=lambda c: c.sandwich_norms),
    Weight(FINAL_NORM, lambda c: (c.hidden_size,),
           {"glm": "model.norm.weight", "mindformers-mcore": "decoder.final_layernorm.weight",
            "gguf": "output_norm.weight"}),
    Weight(OUTPUT, lambda c: (c.padded_vocab_size, c.hidden_size),
           {"glm": "lm_head.weight", "mindformers-mcore": "output_layer.weight", "gguf": "output.weight"}),
)
BY_TEMPLATE = {w.template: w for w in SCHEMA}
VARIANTS = {"qkv_split": (QKV_WEIGHT, "mindformers/qkv-split"), "mlp_split": (MLP_UP, "mindformers/mlp-split")}

# LoRA factors as mindpet names them: `<module>.mindpet_delta_lora_a` [r, in] and `…_lora_b` [out, r]
# (mindpet < 1.0.2, MindFormers r0.7: `tk_delta_lora_a/_b`)
LORA_A, LORA_B = "mindpet_delta_lora_a", "mindpet_delta_lora_b"
MINDPET = re.compile(r"^(.*)\.(?:mindpet_delta|tk_delta)_lora_([ab])$")

_LAYER = re.compile(r"(?:(?<=\blayers\.)|(?<=^blk\.))\d{1,6}(?=\.)")


def layer_template(name: str) -> tuple[str, int | None]:
    """`….layers.3.mlp…` → (`….layers.{i}.mlp…`, 3); a name outside the layers → (name, None)."""
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return f"{name[:m.start()]}{{i}}{name[m.end():]}", int(m.group())


def canonical_weights(cfg: GLM2Config) -> list[tuple[str, Weight]]:
    """Every canonical weight of a model as (name, schema entry), in the release's order."""
    present = [w for w in SCHEMA if w.present(cfg)]
    layered = [w for w in present if "{i}" in w.template]
    first = present.index(layered[0])
    return ([(w.template, w) for w in present[:first]]
            + [(w.template.format(i=i), w) for i in range(cfg.num_layers) for w in layered]
            + [(w.template, w) for w in present[first + len(layered):]])


def canonical_shapes(cfg: GLM2Config) -> dict[str, tuple[int, ...]]:
    """Every weight of the HF ChatGLM2 layout (the canonical names) with its shape, in the release's order."""
    return {name: w.shape(cfg) for name, w in canonical_weights(cfg)}


# Entries of MindSpore training checkpoints that are not model weights.
ADAM_MOMENTS = ("adam_m.", "adam_v.")  # MindFormers' names of AdamW's first and second moments
OPTIMIZER_PREFIXES = (*ADAM_MOMENTS, "moment1.", "moment2.", "accu_grads.", "accu_grad.")
OPTIMIZER_SCALARS = {"global_step", "epoch_num", "step_num", "loss_scale", "learning_rate", "current_iterator_step",
                     "last_overflow_iterator_step", "scale_sense", "beta1_power", "beta2_power"}
# KV caches: MindFormers' older `key_past`/`kvcache_mgr.*` and 2.x's paged-attention blocks
# (`….infer_attention.paged_attention_mgr.key_cache` / `value_cache`, which its save_pretrained writes)
_CACHE = re.compile(r"(key_past|value_past|kvcache_mgr\.|paged_attention_mgr\.(key|value)_cache$)")


@dataclass(frozen=True)
class Layout:
    name: str = "mindformers"
    qkv_split: bool = False
    mlp_split: bool = False
    rearrange_rope: bool = False

    def __post_init__(self):
        if self.name not in LAYOUTS:
            raise UserError(f"unknown layout {self.name!r}; expected one of {', '.join(LAYOUTS)}")
        if self.name != "mindformers" and (self.qkv_split or self.mlp_split or self.rearrange_rope):
            raise UserError(f"layout {self.name}: split/rearranged variants exist only for the current "
                                  f"MindFormers names (--layout mindformers)")

    @property
    def spec(self) -> LayoutSpec:
        return LAYOUTS[self.name]

    def expresses(self, cfg: GLM2Config) -> bool:
        """Whether this layout's names can hold the model (MindFormers' mcore Glm4 always has sandwich norms;
        THUDM's ChatGLM code never)."""
        return cfg.sandwich_norms in self.spec.sandwich

    def describe(self) -> str:
        flags = [f for f, on in (("qkv-split", self.qkv_split), ("mlp-split", self.mlp_split),
                                 ("rearranged-rope", self.rearrange_rope)) if on]
        return "+".join([self.name, *flags])

    def as_dict(self) -> dict:
        return {"name": self.name, "qkv_split": self.qkv_split, "mlp_split": self.mlp_split,
                "rearrange_rope": self.rearrange_rope}

    def targets(self, weight: Weight) -> list[tuple[str, str]]:
        """The names (templates) that store a canonical weight in this layout, with the part of its rows each
        takes."""
        rules = weight.layouts
        for key in (f"{self.name}/qkv-split" if self.qkv_split else None,
                    f"{self.name}/mlp-split" if self.mlp_split else None, self.name):
            if key in rules:
                rule = rules[key]
                return rule if isinstance(rule, list) else [(rule, "all")]
        return [(weight.template, "all")]

    def pieces(self) -> dict[str, tuple[Weight, str]]:
        """Every name (template) of this layout → the canonical weight it stores and the part of its rows."""
        return {name: (w, part) for w in SCHEMA for name, part in self.targets(w)}


def prefix_of(layout: Layout, canonical: str, suffix: str = "weight") -> str:
    """The prefix of the module that holds a canonical weight in `layout`, for code that builds that module and
    fills it from the weights under the prefix: the weight's name there without `suffix` (the module's own part of
    the name), a layer's number as `{}`. E.g. the THUDM names' block: "transformer.encoder.layers.{}."."""
    name = layout.targets(BY_TEMPLATE[canonical])[0][0]
    if not name.endswith(suffix):
        raise AssertionError(f"{layout.name}: {name} does not end with {suffix}")
    return name[:-len(suffix)].replace("{i}", "{}")


def _rope_perm(d: int) -> np.ndarray:
    """MindFormers' rearranged RoPE within one head: even rows first, then odd rows."""
    return np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])


def _interleaved(part: str, cfg: GLM2Config) -> np.ndarray:
    """MindFormers' mcore fused rows (its loader's `deal_training_qkv_weight` / `deal_training_ffn_weight`):
    linear_qkv holds, key-value group by group, the group's q heads, its k head, its v head; linear_fc1 holds gate
    row 0, up row 0, gate row 1, …"""
    if part == "gate-up-by-row":
        ffn = cfg.ffn_hidden_size
        return np.stack([np.arange(ffn), ffn + np.arange(ffn)], axis=1).reshape(-1)
    groups, d = cfg.multi_query_group_num, cfg.kv_channels
    q = np.arange(cfg.q_rows).reshape(groups, -1)
    k = cfg.q_rows + np.arange(cfg.kv_rows).reshape(groups, d)
    return np.concatenate([q, k, k + cfg.kv_rows], axis=1).reshape(-1)


def _rows(part: str, weight: Weight, layout: Layout, cfg: GLM2Config):
    """A slice (contiguous rows) or an index array selecting the rows of the canonical tensor."""
    if part in ("qkv-by-group", "gate-up-by-row"):
        return _interleaved(part, cfg)
    q, kv, ffn = cfg.q_rows, cfg.kv_rows, cfg.ffn_hidden_size
    spans = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, ffn), "up": (ffn, 2 * ffn)}
    if not (layout.rearrange_rope and weight.rope):
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
        for p, a in zip(self.pieces, parts, strict=True):
            out[p.rows] = a
        return out


def weight_map(layout: Layout, cfg: GLM2Config) -> list[Mapping]:
    """Every canonical weight with the tensors that store it in `layout`, in the release's order."""
    out = []
    for name, weight in canonical_weights(cfg):
        layer = layer_template(name)[1]
        pieces = tuple(Piece(t.format(i=layer), _rows(part, weight, layout, cfg)) for t, part in layout.targets(weight))
        out.append(Mapping(name, weight.shape(cfg), pieces))
    return out


def classify(name: str) -> str:
    """'optimizer', 'cache', 'buffer', 'lora' or 'weight' (the last only says: not one of the others)."""
    if name.startswith(OPTIMIZER_PREFIXES) or name in OPTIMIZER_SCALARS:
        return "optimizer"
    if MINDPET.match(name):
        return "lora"
    if _CACHE.search(name):
        return "cache"
    if name.endswith("rotary_pos_emb.inv_freq"):
        return "buffer"
    return "weight"


def detect_layout(names, rearrange_rope: bool = False, where: str = "checkpoint") -> Layout:
    """The layout a set of tensor names is in: its name by the name of its embedding, the split variants by
    their names. Rearranged RoPE leaves no trace in names: it must be told."""
    templates = {layer_template(n)[0] for n in names}
    embeddings = {Layout(f).targets(BY_TEMPLATE[EMBEDDING])[0][0]: f for f in LAYOUTS}
    found = [f for name, f in embeddings.items() if name in templates]
    if len(found) != 1:
        raise CheckpointError(f"{where}: cannot tell the checkpoint's layout: "
                              f"{'several embeddings' if found else 'no embedding'} among its names "
                              f"(expected one of {', '.join(embeddings)})")
    mf = found[0] == "mindformers"
    split = {flag: mf and BY_TEMPLATE[canonical].layouts[variant][0][0] in templates
             for flag, (canonical, variant) in VARIANTS.items()}
    layout = Layout(found[0], **split, rearrange_rope=mf and rearrange_rope)
    _refuse_other_architecture(names, templates, layout, where)
    return layout


_LLAMA_MLP = re.compile(r"\.mlp\.(gate|up)_proj\.")  # Llama's MLP: GLM fuses gate and up


def _refuse_other_architecture(names, templates: set[str], layout: Layout, where: str) -> None:
    """A checkpoint whose embedding is named as in one of the layouts (transformers' Llama shares GLM's
    `model.embed_tokens`) but whose layers hold names no GLM layout has, and lack the GLM's MLP, is another
    model: said so, instead of a later 'cannot infer the sizes' or 'missing tensors'."""
    pieces = layout.pieces()
    up = {name for name, (w, _) in pieces.items() if w.template == MLP_UP}
    if up & templates:
        return
    foreign = sorted(n for n in names if classify(n) == "weight" and layer_template(n)[0] not in pieces)
    if not foreign:
        return
    kind = "llama-style" if any(_LLAMA_MLP.search(n) for n in foreign) else "non-GLM"
    raise CheckpointError(f"{where}: not a GLM checkpoint (found {kind} names no GLM layout has, e.g. "
                          f"{', '.join(foreign[:2])}; and no {layout.name} MLP weights)")


def infer_config(shapes: dict[str, tuple[int, ...]], layout: Layout, where: str = "checkpoint",
                 kv_channels: int = 128) -> GLM2Config:
    """Model sizes from the tensor shapes alone, for a bare checkpoint without config.json.

    Head size is not visible in the shapes; ChatGLM2's 128 is assumed (pass a config.json otherwise).
    """
    refused = CheckpointError(f"{where}: cannot infer the model sizes from the tensor shapes; give the model's "
                              f"config.json (--config)")
    pieces, found, layers = layout.pieces(), {}, set()
    for name, shape in shapes.items():
        template, layer = layer_template(name)
        if template in pieces:
            found.setdefault((pieces[template][0].template, layer), []).append(shape)
            layers.add(layer)
    emb, down, qkv = (found.get(key, []) for key in ((EMBEDDING, None), (MLP_DOWN, 0), (QKV_WEIGHT, 0)))
    if len(emb) != 1 or len(down) != 1 or not qkv or any(len(s) != 2 for s in emb + down + qkv):
        raise refused
    (vocab, hidden), qkv_rows = emb[0], sum(s[0] for s in qkv)
    heads = hidden // kv_channels
    groups = (qkv_rows - hidden) // (2 * kv_channels)
    if hidden % kv_channels or groups <= 0 or heads * kv_channels + 2 * groups * kv_channels != qkv_rows:
        raise refused
    return GLM2Config._build(f"{where} (sizes inferred from its shapes)", num_layers=len(layers - {None}),
                             hidden_size=hidden, ffn_hidden_size=down[0][1], num_attention_heads=heads,
                             multi_query_group_num=groups, kv_channels=kv_channels, padded_vocab_size=vocab,
                             add_qkv_bias=any(t == QKV_BIAS for t, _ in found),
                             release=identify(None, vocab, sandwich=(SANDWICH, 0) in found)[0],
                             told_by="its shapes (no config)")


def inv_freq(cfg: GLM2Config, dtype: str) -> np.ndarray:
    """The `rotary_pos_emb.inv_freq` buffer as the original code computes it: in the model's dtype, with base
    10000 whatever rope_ratio (the releases register it so; their forward computes θ itself, never reading it)."""
    dim = cfg.kv_channels // 2
    work = np.float16 if dtype == "float16" else np.float32
    exponent = (np.arange(0, dim, 2, dtype=np.float32) / dim).astype(work)
    power = (np.float32(10000.0) ** exponent.astype(np.float32)).astype(work)
    value = (np.float32(1.0) / power.astype(np.float32)).astype(work)
    return cast(value, "float16" if work is np.float16 else "float32", dtype)
