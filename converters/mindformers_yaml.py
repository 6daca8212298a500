"""The MindFormers run-config fragment written beside a converted checkpoint: `model.model_config` with the fields
MindFormers' `ChatGLM2Config` (2.1.0, mindformers/models/glm2/glm2_config.py) reads, set to the sizes, layout and
dtype of the weights in the folder, so a MindFormers run config can point at the folder as it is.

Written by hand (no yaml library is needed to convert); every value is a plain scalar or a list of them."""
from __future__ import annotations

import json

from glm2_core.config import GLM2Config
from glm2_core.names import Layout
from glm2_core.releases import rope_rule

MINDFORMERS_YAML = "mindformers_config.yaml"
# MindFormers' sequence length is a run setting (its default; ADGEN finetunes use 193), not a property of the
# weights: the model's own maximum (32768) would make MindFormers build a 32768² mask.
RUN_SEQ_LENGTH = 2048


def unexpressible(cfg: GLM2Config) -> str:
    """Why MindFormers' ChatGLM2 cannot run this release, or "": its RoPE (glm2_modules.FreqsMgr) always scales the
    base by rope_ratio, its config has no field for position interpolation, and its layers have no sandwich norms
    (MindFormers runs GLM-4-0414 with its mcore Glm4, from the HF folder)."""
    if cfg.sandwich_norms:
        return (f"no {MINDFORMERS_YAML}: MindFormers' ChatGLM2 has no sandwich norms; it runs {cfg.release} with "
                f"its mcore Glm4 from the HF folder (--layout glm)")
    base, scale = rope_rule(cfg.release, cfg.rope_ratio)
    if scale == 1:
        return ""
    return (f"no {MINDFORMERS_YAML}: {cfg.release} divides RoPE's positions by rope_ratio {cfg.rope_ratio:g}, and "
            f"MindFormers' ChatGLM2 can only multiply the base by it (another model)")


def model_config(cfg: GLM2Config, layout: Layout, dtype: str) -> dict:
    """ChatGLM2Config fields for weights of `dtype` stored in `layout`."""
    return {
        "type": "ChatGLM2Config", "batch_size": 1, "num_layers": cfg.num_layers,
        "padded_vocab_size": cfg.padded_vocab_size, "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size, "kv_channels": cfg.kv_channels,
        "num_attention_heads": cfg.num_attention_heads, "seq_length": RUN_SEQ_LENGTH, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "layernorm_epsilon": cfg.layernorm_epsilon, "rope_ratio": cfg.rope_ratio,
        "rmsnorm": True, "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
        "add_bias_linear": False, "add_qkv_bias": cfg.add_qkv_bias, "bias_dropout_fusion": True,
        "multi_query_attention": cfg.multi_query_group_num != cfg.num_attention_heads,
        "multi_query_group_num": cfg.multi_query_group_num, "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True, "fp32_residual_connection": False, "quantization_bit": 0,
        "param_init_type": dtype, "compute_dtype": "bfloat16" if dtype == "bfloat16" else "float16",
        "layernorm_compute_type": "float32", "residual_dtype": "float32", "rotary_dtype": "float32",
        "use_past": False, "use_flash_attention": False, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "qkv_concat": not layout.qkv_split, "mlp_concat": not layout.mlp_split,
        "use_rearrange_rope": layout.rearrange_rope, "checkpoint_name_or_path": "",
    }


def _scalar(value) -> str:
    if isinstance(value, tuple):  # GLM-4's several eos ids: a flow sequence
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        # YAML 1.1 (PyYAML, MindFormers' loader) reads 1e-05 as a string: the mantissa needs a dot
        return f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text
    return str(value)


def mindformers_yaml(cfg: GLM2Config, layout: Layout, dtype: str, weights: str, fmt: str) -> str:
    lines = [f"# MindFormers ChatGLM2 model config of the weights in this folder ({weights}, {layout.describe()}, "
             f"{dtype}).",
             "# Merge into a MindFormers run config and set load_checkpoint to this folder's weights file;",
             f"# seq_length is the run's, set to MindFormers' default {RUN_SEQ_LENGTH} here.",
             f"load_ckpt_format: {_scalar(fmt)}", "model:", "  model_config:"]
    lines += [f"    {k}: {_scalar(v)}" for k, v in model_config(cfg, layout, dtype).items()]
    lines += ["  arch:", f"    type: {_scalar('ChatGLM2ForConditionalGeneration')}"]
    return "\n".join(lines) + "\n"
