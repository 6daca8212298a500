"""`ms2hf --layout glm` writes a folder transformers' native GlmForCausalLM loads and runs as ChatGLM2 does."""
import numpy as np
import torch  # noqa: TID253
import transformers  # noqa: TID253
from numpy_glm2 import NumpyGLM2

from converters.checkpoint import open_checkpoint
from converters.convert import convert
from glm2_core.config import GLM2Config
from glm2_core.dtypes import to_float32
from glm2_core.names import Layout


def test_glm_export_loads_and_matches_an_independent_forward(hf_tiny, tmp_path):
    src = hf_tiny(dtype="float32")
    convert(src, tmp_path / "ms", target=Layout("mindformers", qkv_split=True, rearrange_rope=True), fmt="ckpt",
            progress=False)
    convert(tmp_path / "ms", tmp_path / "glm", target=Layout("glm"), fmt="safetensors",
            progress=False)
    model = transformers.GlmForCausalLM.from_pretrained(tmp_path / "glm", dtype=torch.float32).eval()
    ids = [64790, 64792, 36474, 54591, 13755, 993, 30910]
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    with open_checkpoint(src) as c:
        weights = {n: to_float32(t.read(), t.dtype) for n, t in c.tensors.items()}
    want = NumpyGLM2(weights, GLM2Config.preset("tiny")).logits(ids)
    assert np.abs(got - want).max() < 1e-5 * max(1.0, np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_glm_folder_converts_back(hf_tiny, tmp_path):
    src = hf_tiny(dtype="bfloat16")
    convert(src, tmp_path / "glm", target=Layout("glm"), fmt="safetensors", progress=False)
    convert(tmp_path / "glm", tmp_path / "back", target=Layout("chatglm"), fmt="bin", progress=False)
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "back") as b:
        assert set(a.tensors) == set(b.tensors)
        for name, ref in a.tensors.items():
            assert ref.read().tobytes() == b.tensors[name].read().tobytes()
