"""The MindSpore runtime against the original HF code's outputs, and its own consistency (cache, padding, layouts)."""
import mindspore as ms  # noqa: TID253
import numpy as np
import reference_data

from glm2_core.names import Layout, weight_map
from glm2_ms.generation import Decoder, cache_inputs
from glm2_ms.loading import to_tensor
from glm2_ms.model import GLM2Network

ms.set_device("CPU")


def load_reference_model():
    weights, steps = reference_data.load()
    cfg = reference_data.CONFIG
    model = GLM2Network(cfg, ms.float32)
    params = {p.name: p for p in model.get_parameters()}
    for m in weight_map(Layout("mindformers"), cfg):
        if m.canonical in weights:
            params.pop(m.pieces[0].name).set_data(to_tensor(weights[m.canonical], "float32"))
    assert list(params) == ["transformer.output_layer.weight"]  # the reference stops at the final norm
    return model, steps


def test_prefill_and_cached_decode_match_the_original_code():
    model, steps = load_reference_model()
    dec = Decoder(model, jit=False)
    length = 8
    caches = dec.new_cache(1, length)
    valid = np.zeros((1, length), np.int32)
    start = 0
    for ids, expected in steps:
        n = len(ids)
        valid[0, start:start + n] = 1
        mask, write = cache_inputs(n, valid, start)
        hidden, kvs = model.transformer(ms.Tensor(ids[None], ms.int32),
                                        ms.Tensor(np.arange(start, start + n)[None], ms.int32), ms.Tensor(mask),
                                        tuple(zip(caches[::2], caches[1::2], strict=True)), ms.Tensor(write))
        caches = tuple(t for kv in kvs for t in kv)
        assert np.abs(hidden.asnumpy()[0] - expected).max() <= 1e-5
        start += n
    # and the same three steps as one uncached pass
    all_ids = np.concatenate([ids for ids, _ in steps])
    mask = np.where(np.tril(np.ones((5, 5), bool)), 0.0, -1e9).astype(np.float32)[None]
    hidden, _ = model.transformer(ms.Tensor(all_ids[None], ms.int32), ms.Tensor(np.arange(5)[None], ms.int32),
                                  ms.Tensor(mask))
    expected = np.concatenate([y for _, y in steps])
    assert np.abs(hidden.asnumpy()[0] - expected).max() <= 1e-5
