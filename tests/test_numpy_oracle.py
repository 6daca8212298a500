"""The NumPy oracle used by converter tests reproduces the original HF code's outputs."""
import numpy as np
import reference_data
from numpy_glm2 import NumpyGLM2


def test_oracle_matches_original_hf_outputs_with_kv_cache():
    weights, steps = reference_data.load()
    model, start = NumpyGLM2(weights, reference_data.CONFIG), 0
    for ids, expected in steps:
        got = model.hidden(ids, start)
        start += len(ids)
        assert np.abs(got - expected).max() < 1e-6
