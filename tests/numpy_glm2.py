"""An independent NumPy forward of ChatGLM2 (float64), written from the model description alone, as a test oracle."""
from __future__ import annotations

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_rule(cfg):
    """(base, positions divided by) as THUDM's modeling files compute them: ChatGLM2's (the 32k release is the one
    whose config sets rope_ratio) keeps base 10000 and divides `seq_idx` by rope_ratio; ChatGLM3's and GLM-4's
    multiply the base."""
    if cfg.release.startswith("chatglm2"):
        return 10000.0, cfg.rope_ratio
    return 10000.0 * cfg.rope_ratio, 1.0


def rope(x, positions, base):
    """x [seq, heads, d]: rotate interleaved pairs of the first d/2 dims."""
    d = x.shape[-1]
    rot = d // 2
    theta = 1.0 / base ** (np.arange(0, rot, 2) / rot)
    ang = positions[:, None] * theta[None, :]  # [seq, rot/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0:rot:2], x[..., 1:rot:2]
    out = x.copy()
    out[..., 0:rot:2] = x0 * cos - x1 * sin
    out[..., 1:rot:2] = x1 * cos + x0 * sin
    return out


class NumpyGLM2:
    def __init__(self, weights: dict, cfg, inputs=None):
        """`inputs`: what the left operand of every product with a weight matrix becomes first (default: itself;
        llama.cpp's quantized activations, for instance)."""
        self.w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
        self.cfg = cfg
        self.cache = [None] * cfg.num_layers
        self.inputs = inputs or (lambda x: x)

    def dot(self, x, name):
        return self.inputs(x) @ self.w[name].T

    def layer(self, i, h, positions):
        c, w = self.cfg, self.w
        p = f"transformer.encoder.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], c.layernorm_epsilon)
        qkv = self.dot(x, p + "self_attention.query_key_value.weight")
        if c.add_qkv_bias:
            qkv = qkv + w[p + "self_attention.query_key_value.bias"]
        d, nh, g = c.kv_channels, c.num_attention_heads, c.multi_query_group_num
        q = qkv[:, :nh * d].reshape(-1, nh, d)
        k = qkv[:, nh * d:nh * d + g * d].reshape(-1, g, d)
        v = qkv[:, nh * d + g * d:].reshape(-1, g, d)
        base, divided = rope_rule(c)
        q, k = rope(q, positions / divided, base), rope(k, positions / divided, base)
        if self.cache[i] is not None:
            k = np.concatenate([self.cache[i][0], k])
            v = np.concatenate([self.cache[i][1], v])
        self.cache[i] = (k, v)
        total = k.shape[0]
        out = np.empty((q.shape[0], nh, d))
        for head in range(nh):
            kk, vv = k[:, head // (nh // g)], v[:, head // (nh // g)]
            s = q[:, head] @ kk.T / np.sqrt(d)
            qpos = positions[:, None]
            kpos = np.arange(total)[None, :]
            s = np.where(kpos <= qpos, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ vv
        attn = self.dot(out.reshape(-1, nh * d), p + "self_attention.dense.weight")
        if p + "post_self_attn_layernorm.weight" in w:  # GLM-4-0414: Glm4DecoderLayer's norm before the add
            attn = rms_norm(attn, w[p + "post_self_attn_layernorm.weight"], c.layernorm_epsilon)
        h = h + attn
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], c.layernorm_epsilon)
        gate_up = self.dot(x, p + "mlp.dense_h_to_4h.weight")
        gate, up = gate_up[:, :c.ffn_hidden_size], gate_up[:, c.ffn_hidden_size:]
        mlp = self.dot(gate / (1 + np.exp(-gate)) * up, p + "mlp.dense_4h_to_h.weight")
        if p + "post_mlp_layernorm.weight" in w:
            mlp = rms_norm(mlp, w[p + "post_mlp_layernorm.weight"], c.layernorm_epsilon)
        return h + mlp

    def hidden(self, ids, start=0):
        h = self.w["transformer.embedding.word_embeddings.weight"][np.asarray(ids)]
        positions = np.arange(start, start + len(ids), dtype=np.float64)
        for i in range(self.cfg.num_layers):
            h = self.layer(i, h, positions)
        return rms_norm(h, self.w["transformer.encoder.final_layernorm.weight"], self.cfg.layernorm_epsilon)

    def logits(self, ids):
        self.cache = [None] * self.cfg.num_layers
        return self.dot(self.hidden(ids), "transformer.output_layer.weight")
