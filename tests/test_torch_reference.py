"""The PyTorch reference against the original HF code's outputs, and against the MindSpore runtime."""
import numpy as np
import reference_data
import torch  # noqa: TID253

from validation.torch_reference import TorchGLM2, load_reference


def test_reference_matches_original_hf_outputs_with_kv_cache():
    weights, steps = reference_data.load()
    model = TorchGLM2(reference_data.CONFIG).eval()
    state = model.state_dict()
    for name, w in weights.items():
        state[name].copy_(torch.from_numpy(w))
    past, seen = None, 0
    with torch.no_grad():
        for ids, expected in steps:
            mask = torch.ones(1, seen + len(ids), dtype=torch.long)
            _, past, hidden = model(torch.tensor(ids[None]).long(), mask, past=past, output_hidden_states=True)
            assert np.abs(hidden[-1][0].numpy() - expected).max() <= 1e-5
            seen += len(ids)


def test_reference_loads_every_format_to_the_same_model(hf_tiny):
    """The same weights from a .bin and from safetensors give the same logits, bit for bit, in each dtype."""
    ids = torch.tensor([[64790, 64792, 36474, 54591]])
    for dtype in ("float32", "bfloat16"):
        a, b = (load_reference(hf_tiny(fmt, dtype), dtype="float32") for fmt in ("bin", "safetensors"))
        with torch.no_grad():
            la, lb = a(ids)[0], b(ids)[0]
        assert la.shape == (1, 4, 65024) and torch.isfinite(la).all()
        assert torch.equal(la, lb), dtype


def test_float32_compute_over_16bit_weights_equals_the_float32_model_and_keeps_them_16bit(hf_tiny):
    """`compute_in`: the same logits and cache, bit for bit, as the float32 model on the rounded weights, over
    several calls (the widened copies live in shared buffers); the stored weights stay 16-bit and untouched."""
    for dtype in ("float16", "bfloat16"):
        folder = hf_tiny("bin", dtype)
        wide = load_reference(folder, dtype="float32")
        narrow = load_reference(folder, compute_dtype="float32")
        stored = {k: v.clone() for k, v in narrow.state_dict().items()}
        ids = torch.tensor([[64790, 64792, 36474, 54591]])
        with torch.no_grad():
            for _ in range(2):
                (lw, pw, _), (ln, pn, _) = wide(ids), narrow(ids)
                assert torch.equal(lw, ln) and lw.dtype == torch.float32
                assert all(torch.equal(a, b) for kv_w, kv_n in zip(pw, pn, strict=True)
                           for a, b in zip(kv_w, kv_n, strict=True))
                (lw, *_), (ln, *_) = wide(ids[:, :1], past=pw), narrow(ids[:, :1], past=pn)
                assert torch.equal(lw, ln)
        for k, v in narrow.state_dict().items():
            assert v.dtype == getattr(torch, dtype) and torch.equal(v, stored[k]), k
