"""ChatGLM2 model configuration: read from a HF `config.json`, presets, and the config files we write."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .errors import CheckpointError, UserError
from .files import CONFIG
from .jsonio import read_json
from .releases import FAMILY_RELEASES, GLM4_VOCAB, RELEASES, ROPE_BASE, TOLD_BY_USER, identify, rope_rule

# Fields of the real THUDM config.json (and of its 32k/later variants) that do not change the weights or math.
_PASSIVE = {"quantization_bit",  # THUDM's int4/int8 weights come dequantized (converters.thudm_quant)
            "_name_or_path", "model_type", "architectures", "auto_map", "apply_query_key_layer_scaling",
            "attention_dropout", "attention_softmax_in_fp32", "bias_dropout_fusion", "fp32_residual_connection",
            "hidden_dropout", "use_cache", "transformers_version", "classifier_dropout", "interleaved_qkv",
            "torch_dtype", "dtype", "bos_token_id", "tie_word_embeddings", "multi_query_attention", "add_bias_linear",
            "rmsnorm", "post_layer_norm", "original_rope", "apply_residual_connection_post_layernorm", "eos_token_id",
            "pad_token_id"}
# Fields whose other values describe a different network than ChatGLM2.
_REQUIRED = {"add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True, "original_rope": True,
             "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": False}
# Fields that change the network when set: what a set value means (they are refused until supported).
_UNSUPPORTED = {"pre_seq_len": "a P-Tuning v2 prefix of {} virtual tokens (THUDM's ptuning; merge or drop it first)",
                "prefix_projection": "a P-Tuning v2 prefix projection"}


# Upper bounds far above any GLM (GLM-4-9B: 40 layers, vocab 151552, seq 131072), checked before anything loops
# over layers or allocates by these sizes.
_LIMITS = {"num_layers": 1024, "hidden_size": 1 << 17, "ffn_hidden_size": 1 << 19, "num_attention_heads": 4096,
           "multi_query_group_num": 4096, "kv_channels": 4096, "padded_vocab_size": 1 << 23, "seq_length": 1 << 24,
           "eos_token_id": 1 << 23, "pad_token_id": 1 << 23}
_LOW = {"eos_token_id": 0, "pad_token_id": 0}


@dataclass(frozen=True)
class GLM2Config:
    num_layers: int = 28
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    num_attention_heads: int = 32
    multi_query_group_num: int = 2
    kv_channels: int = 128
    padded_vocab_size: int = 65024
    layernorm_epsilon: float = 1e-5
    rope_ratio: float = 1.0
    add_qkv_bias: bool = True
    seq_length: int = 32768
    torch_dtype: str = "float16"
    eos_token_id: int | tuple[int, ...] = 2  # GLM-4: several (<|endoftext|>, <|user|>, <|observation|>)
    pad_token_id: int = 0
    release: str = "chatglm2-6b"  # which published model (glm2_core.releases): its tokenizer family and RoPE rule
    told_by: str = field(default="", compare=False)  # what told the release (`glm2-convert inspect` says it)

    # ---- derived sizes used by the weight-name schema and the model
    @property
    def q_rows(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_rows(self) -> int:
        return self.multi_query_group_num * self.kv_channels

    @property
    def qkv_rows(self) -> int:
        return self.q_rows + 2 * self.kv_rows

    @property
    def family(self) -> str:
        """The release's tokenizer and chat format (glm2_core.families.FAMILIES)."""
        return RELEASES[self.release].family

    @property
    def sandwich_norms(self) -> bool:
        """GLM-4-0414's two more RMSNorms per layer (on the attention's and the MLP's output, before each add)."""
        return RELEASES[self.release].sandwich

    @property
    def rope_theta(self) -> float:
        """RoPE's base as the release computes it (10000·rope_ratio, or 10000 where the positions are scaled)."""
        return rope_rule(self.release, self.rope_ratio)[0]

    def rope_inv_freq(self):
        """RoPE's inverse frequencies in float64, one per pair of the rotated half of a head, with the release's
        position scale folded in (angles = position · inv_freq)."""
        base, scale = rope_rule(self.release, self.rope_ratio)
        rot = self.kv_channels // 2
        return 1.0 / base ** (np.arange(0, rot, 2, dtype=np.float64) / rot) / scale

    def __post_init__(self):
        """Types and ranges first: every later check and loop relies on them."""
        if isinstance(self.eos_token_id, list):  # a JSON list; kept as a tuple (the config is hashable)
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for f, high in _LIMITS.items():
            value, low = getattr(self, f), _LOW.get(f, 1)
            several = f == "eos_token_id" and type(value) is tuple and 0 < len(value) <= 16
            if any(type(v) is not int or not low <= v <= high for v in (value if several else [value])):
                some = " (or a list of up to 16)" if f == "eos_token_id" else ""
                raise ValueError(f"{f} must be an integer from {low} to {high}{some}, got {value!r:.40}")
        if self.release not in RELEASES:
            raise ValueError(f"release must be one of {', '.join(RELEASES)}, got {self.release!r:.40}")
        for f in ("layernorm_epsilon", "rope_ratio"):
            v = getattr(self, f)
            if type(v) not in (int, float) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{f} must be a positive number, got {v!r:.40}")
        if type(self.add_qkv_bias) is not bool or not isinstance(self.torch_dtype, str):
            raise ValueError("add_qkv_bias must be true or false, torch_dtype a string")
        if self.num_attention_heads % self.multi_query_group_num:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"multi_query_group_num {self.multi_query_group_num}")
        if self.kv_channels % 4:
            raise ValueError(f"kv_channels {self.kv_channels} must be a multiple of 4 (RoPE pairs on half of each "
                             f"head)")

    @classmethod
    def _build(cls, source: str, **kw) -> GLM2Config:
        try:
            return cls(**kw)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    @classmethod
    def from_dict(cls, d: dict, source: str = CONFIG, release: str | None = None) -> GLM2Config:
        """From THUDM's field set (or our manifests'); `release`: the one the caller was told (--release)."""
        own = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - own - _PASSIVE - set(_UNSUPPORTED) - {"family"})
        if unknown:
            raise CheckpointError(f"{source}: unknown config fields {', '.join(unknown)} (not a ChatGLM2 config?)")
        for key, want in _REQUIRED.items():
            if key in d and d[key] != want:
                raise CheckpointError(f"{source}: {key}={d[key]!r:.40} describes a different network; ChatGLM2 has "
                                      f"{key}={want!r}")
        for key, what in _UNSUPPORTED.items():
            if d.get(key) not in (None, False, 0):
                raise CheckpointError(f"{source}: {key}={d[key]!r:.40}: {what.format(f'{d[key]!s:.40}')}, not "
                                      f"supported")
        kw = {k: v for k, v in d.items() if k in own}
        if release:
            kw["release"], kw["told_by"] = release, TOLD_BY_USER
        legacy = d.get("family")  # what our manifests recorded before the releases
        if "release" not in kw and isinstance(legacy, str) and legacy in FAMILY_RELEASES:
            kw["release"], kw["told_by"] = FAMILY_RELEASES[legacy], f"the family in {source}"
        if "release" not in kw:
            kw["release"], kw["told_by"] = identify(d.get("_name_or_path"),
                                                    d.get("padded_vocab_size", cls.padded_vocab_size),
                                                    d.get("rope_ratio", 1.0), source)
        kw.setdefault("told_by", f"recorded in {source}")
        if "torch_dtype" not in kw and "dtype" in d:
            kw["torch_dtype"] = d["dtype"]
        if d.get("multi_query_attention") is False:
            if "multi_query_group_num" in d and d["multi_query_group_num"] != d.get("num_attention_heads"):
                raise CheckpointError(f"{source}: multi_query_attention is false but multi_query_group_num is "
                                      f"{d['multi_query_group_num']!r:.40}")
            kw["multi_query_group_num"] = d.get("num_attention_heads", cls.num_attention_heads)
        return cls._build(source, **kw)

    @classmethod
    def from_glm_dict(cls, d: dict, source: str = CONFIG, sandwich: bool = False,
                      release: str | None = None) -> GLM2Config:
        """From the config of transformers' native GlmForCausalLM (as `ms2hf --layout glm` writes it), or with
        `sandwich` of its Glm4ForCausalLM (GLM-4-0414)."""
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"{source}: rope_parameters is not an object")
        theta = d.get("rope_theta", rope.get("rope_theta", ROPE_BASE))
        if d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5)) != 0.5:
            raise CheckpointError(f"{source}: partial_rotary_factor must be 0.5 for ChatGLM2")
        if type(theta) not in (int, float):
            raise CheckpointError(f"{source}: rope_theta must be a number, got {theta!r:.40}")
        kind, factor = rope.get("rope_type", rope.get("type", "default")), rope.get("factor", 1.0)
        if kind not in ("default", "linear") or type(factor) not in (int, float):
            raise CheckpointError(f"{source}: rope type {kind!r:.40} (factor {factor!r:.40}): a GLM release has "
                                  f"default or linear RoPE")
        ratio = factor if kind == "linear" else theta / ROPE_BASE
        missing = [theirs for theirs in _GLM_SIZES.values() if theirs not in d]
        if missing:
            raise CheckpointError(f"{source}: GLM config lacks {', '.join(missing)}")
        kw = {ours: d[theirs] for ours, theirs in {**_GLM_SIZES, **_GLM_OTHERS}.items() if theirs in d}
        release, told_by = (release, TOLD_BY_USER) if release else \
            identify(d.get("_name_or_path"), kw["padded_vocab_size"], ratio, source, sandwich)
        cfg = cls._build(source, **kw, rope_ratio=ratio, release=release, told_by=told_by,
                         torch_dtype=d.get("torch_dtype") or d.get("dtype") or "float32")
        given = {"rope_type": kind, "rope_theta": theta, **({"factor": factor} if kind == "linear" else {})}
        if cfg.glm_rope() != given:
            raise CheckpointError(f"{source}: {kind} RoPE with rope_theta {theta} and factor {factor} is not "
                                  f"{release}'s rule ({cfg.glm_rope()}); a folder exported with the wrong rule "
                                  f"computes another model")
        return cfg

    @classmethod
    def from_mapping(cls, d: dict, source: str = CONFIG, release: str | None = None) -> GLM2Config:
        """Either field set: transformers' GlmForCausalLM (model_type "glm") or Glm4ForCausalLM ("glm4"), or
        THUDM's ChatGLM."""
        kind = d.get("model_type")
        if isinstance(kind, str) and kind in GLM_MODEL_TYPES:
            return cls.from_glm_dict(d, source, kind == "glm4", release)
        return cls.from_dict(d, source, release)

    @classmethod
    def from_file(cls, path, release: str | None = None) -> GLM2Config:
        return cls.from_mapping(read_json(path, "config"), str(path), release)

    @classmethod
    def from_pretrained(cls, path) -> GLM2Config:
        """From a folder (its config.json) or a config file, in the chatglm or the transformers-GLM field set."""
        path = Path(path)
        file = path / CONFIG if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"{path}: no config.json")
        return cls.from_file(file)

    @classmethod
    def preset(cls, name: str, **overrides) -> GLM2Config:
        try:
            base = PRESETS[name]
        except KeyError:
            raise UserError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}") from None
        return cls._build(f"preset {name}", **{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})

    def chatglm_json(self, dtype: str | None = None) -> dict:
        """The field set of the real THUDM config.json, with this model's values."""
        d = dict(_CHATGLM_TEMPLATE)
        d.update({k: v for k, v in asdict(self).items() if k not in ("rope_ratio", "release", "told_by")})
        d["_name_or_path"] = RELEASES[self.release].repo
        if self.rope_ratio != 1.0:
            d["rope_ratio"] = self.rope_ratio
        d["multi_query_attention"] = self.multi_query_group_num != self.num_attention_heads
        d["torch_dtype"] = dtype or self.torch_dtype
        return d

    def glm_rope(self) -> dict:
        """The release's RoPE in transformers' terms: default with rope_theta, or linear scaling by a factor."""
        base, scale = rope_rule(self.release, self.rope_ratio)
        return {"rope_type": "linear", "rope_theta": base, "factor": scale} if scale != 1 else \
            {"rope_type": "default", "rope_theta": base}

    def glm_json(self, dtype: str | None = None) -> dict:
        """A config for transformers' native GlmForCausalLM (Glm4ForCausalLM for GLM-4-0414): every field set,
        since its defaults are GLM-4's."""
        rope, model_type = self.glm_rope(), "glm4" if self.sandwich_norms else "glm"
        ours = {theirs: getattr(self, field) for field, theirs in {**_GLM_SIZES, **_GLM_OTHERS}.items()}
        return {
            "_name_or_path": RELEASES[self.release].repo, "architectures": [GLM_MODEL_TYPES[model_type]],
            "model_type": model_type,
            **ours, "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else
            self.eos_token_id, "partial_rotary_factor": 0.5, "rope_theta": rope["rope_theta"],
            "rope_parameters": {**rope, "partial_rotary_factor": 0.5}, "attention_dropout": 0.0, "hidden_act": "silu",
            "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True, "bos_token_id": None,
            "torch_dtype": dtype or self.torch_dtype,
        }


GLM_MODEL_TYPES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}  # transformers' GLM classes, by model_type
# Our fields under transformers' GlmConfig names, read and written through these maps only: the sizes every GLM
# config must have, and the rest (absent: our default).
_GLM_SIZES = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
              "num_attention_heads": "num_attention_heads", "multi_query_group_num": "num_key_value_heads",
              "kv_channels": "head_dim", "padded_vocab_size": "vocab_size"}
_GLM_OTHERS = {"layernorm_epsilon": "rms_norm_eps", "add_qkv_bias": "attention_bias",
               "seq_length": "max_position_embeddings", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}

_CHATGLM_TEMPLATE = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                 "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"},
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True, "fp32_residual_connection": False, "hidden_dropout": 0.0,
    "multi_query_attention": True, "original_rope": True, "post_layer_norm": True, "rmsnorm": True,
    "use_cache": True, "transformers_version": "4.27.1", "tie_word_embeddings": False,
}

PRESETS = {
    "6b": GLM2Config(),
    # the later releases (facts from their config.json files and MindFormers' configs)
    "chatglm2-6b-32k": GLM2Config(rope_ratio=16, release="chatglm2-6b-32k"),
    "chatglm3-6b": GLM2Config(seq_length=8192, release="chatglm3-6b"),
    "glm4-9b": GLM2Config(num_layers=40, padded_vocab_size=GLM4_VOCAB, layernorm_epsilon=1.5625e-07, rope_ratio=500,
                          seq_length=131072, torch_dtype="bfloat16", eos_token_id=(151329, 151336, 151338),
                          pad_token_id=151329, release="glm-4-9b-chat"),
    # GLM-4-0414 (transformers' Glm4ForCausalLM; sizes as their config.json files give them)
    "glm4-9b-0414": GLM2Config(num_layers=40, padded_vocab_size=GLM4_VOCAB, seq_length=32768, torch_dtype="bfloat16",
                               eos_token_id=(151329, 151336, 151338), pad_token_id=151329, release="glm-4-9b-0414"),
    "glm4-32b-0414": GLM2Config(num_layers=61, hidden_size=6144, ffn_hidden_size=23040, num_attention_heads=48,
                                padded_vocab_size=GLM4_VOCAB, add_qkv_bias=False, seq_length=32768,
                                torch_dtype="bfloat16", eos_token_id=(151329, 151336, 151338), pad_token_id=151329,
                                release="glm-4-32b-0414"),
    # real vocabulary (the real tokenizer works), everything else small enough for tests on 2 cores
    "tiny": GLM2Config(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
                       multi_query_group_num=2, kv_channels=16, seq_length=2048, torch_dtype="float32"),
}
