"""Reader for tests/data/glm2_tiny_reference.data (outputs of the original HF ChatGLM2 code; layout in its README)."""
from pathlib import Path

import numpy as np

from glm2_core.config import GLM2Config

PATH = Path(__file__).parent / "data" / "glm2_tiny_reference.data"
CONFIG = GLM2Config(num_layers=1, hidden_size=32, ffn_hidden_size=48, num_attention_heads=8,
                    multi_query_group_num=2, kv_channels=4, padded_vocab_size=5, torch_dtype="float32")
_L = "transformer.encoder.layers.0."
_WEIGHTS = [("transformer.embedding.word_embeddings.weight", (5, 32)), (_L + "input_layernorm.weight", (32,)),
            (_L + "self_attention.query_key_value.weight", (48, 32)),
            (_L + "self_attention.query_key_value.bias", (48,)),
            (_L + "self_attention.dense.weight", (32, 32)), (_L + "post_attention_layernorm.weight", (32,)),
            (_L + "mlp.dense_h_to_4h.weight", (96, 32)), (_L + "mlp.dense_4h_to_h.weight", (32, 48)),
            ("transformer.encoder.final_layernorm.weight", (32,))]


def load():
    """(weights by HF name, [(ids, expected hidden states)] for the prefill and the two cached decode steps)."""
    raw, off = PATH.read_bytes(), 0
    weights = {}
    for name, shape in _WEIGHTS:
        n = int(np.prod(shape))
        weights[name] = np.frombuffer(raw, np.float32, n, off).reshape(shape).copy()
        off += 4 * n
    steps = []
    for n in (3, 1, 1):
        ids = np.frombuffer(raw, np.int32, n, off).copy()
        off += 4 * n
        steps.append((ids, np.frombuffer(raw, np.float32, n * 32, off).reshape(n, 32).copy()))
        off += 4 * n * 32
    assert off == len(raw)
    return weights, steps
