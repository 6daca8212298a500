"""The references a MindSpore model is checked against, all behind one interface: `trace(ids)` → the residual
stream after each layer's attention and MLP, the final norm and the logits; `generate(ids, n)` → greedy tokens.

- torch:       our PyTorch ChatGLM2 (validation/torch_reference.py) on the HF folder.
- glm:         transformers' native GlmForCausalLM on a `ms2hf --layout glm` export of the HF folder's weights.
- remote-code: the HF folder's own modeling_chatglm.py through transformers (trust_remote_code), when present.

Intermediate values are taken with forward hooks, one layer at a time: nothing beyond the weights is kept but a
few [seq, hidden] arrays.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from glm2_core.errors import CheckpointError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _flat(t: torch.Tensor, hidden: int) -> np.ndarray:
    """[seq, hidden] of a batch-1 tensor laid out [1, seq, h] (ours, transformers) or [seq, 1, h] (original)."""
    return t.detach().float().reshape(-1, hidden).numpy()


class TorchTrace:
    """Hooks on `layers[i].<attn>` and `layers[i]` give the residual after attention (input + attention output)
    and after the MLP (the layer output) for any ChatGLM2-shaped torch model."""

    def __init__(self, model, layers, attn: str, final_norm, hidden: int, logits_fn, generate_fn, name: str):
        self.model, self.layers, self.attn, self.final_norm = model, layers, attn, final_norm
        self.hidden, self.logits_fn, self.generate_fn, self.name = hidden, logits_fn, generate_fn, name

    @torch.no_grad()
    def trace(self, ids: list[int]) -> list[tuple[str, np.ndarray]]:
        records, hooks = [], []
        for i, layer in enumerate(self.layers):
            state = {}
            hooks.append(layer.register_forward_pre_hook(
                lambda m, args, kwargs, st=state: st.__setitem__("x", _first(args) if args else
                                                                  kwargs["hidden_states"]), with_kwargs=True))
            hooks.append(getattr(layer, self.attn).register_forward_hook(
                lambda m, a, out, st=state, i=i: records.append(
                    (f"layer {i} attention", _flat(st["x"], self.hidden) + _flat(_first(out), self.hidden)))))
            hooks.append(layer.register_forward_hook(
                lambda m, a, out, i=i: records.append((f"layer {i} mlp", _flat(_first(out), self.hidden)))))
        hooks.append(self.final_norm.register_forward_hook(
            lambda m, a, out: records.append(("final norm", _flat(out, self.hidden)))))
        try:
            logits = self.logits_fn(torch.tensor([ids]))
        finally:
            for h in hooks:
                h.remove()
        return records + [("logits", logits.detach().float().reshape(len(ids), -1).numpy())]

    @torch.no_grad()
    def generate(self, ids: list[int], n: int) -> list[int]:
        return self.generate_fn(ids, n)


def torch_reference(hf_dir: Path, dtype: str) -> TorchTrace:
    from .torch_reference import load_reference

    model = load_reference(hf_dir, dtype)
    t = model.transformer

    def generate(ids, n):
        return model.generate(np.array([ids]), max_new_tokens=n, eos_token_id=-1)[0, len(ids):].tolist()

    return TorchTrace(model, t.encoder.layers, "self_attention", t.encoder.final_layernorm, model.config.hidden_size,
                      lambda x: model(x)[0], generate, "torch (validation/torch_reference.py)")


def glm_reference(hf_dir: Path, dtype: str) -> TorchTrace:
    import transformers

    from converters.convert import convert
    from glm2_core.names import Layout

    with tempfile.TemporaryDirectory(prefix="glm2-parity-glm-") as tmp:  # a full model copy: gone once loaded
        convert(hf_dir, Path(tmp) / "glm", target=Layout("glm"), fmt="safetensors", dtype=dtype,
                progress=False)
        model = transformers.GlmForCausalLM.from_pretrained(Path(tmp) / "glm", dtype=TORCH_DTYPES[dtype]).eval()

    def generate(ids, n):
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=n)
        return out[0, len(ids):].tolist()

    return TorchTrace(model, model.model.layers, "self_attn", model.model.norm, model.config.hidden_size,
                      lambda x: model(x).logits, generate, "transformers GlmForCausalLM")


def remote_code_reference(hf_dir: Path, dtype: str) -> TorchTrace:
    if not (Path(hf_dir) / "modeling_chatglm.py").is_file():
        raise CheckpointError(f"{hf_dir}: no modeling_chatglm.py, so there is no remote code to run; use "
                              f"--reference torch or --reference glm")
    import transformers

    try:
        model = transformers.AutoModel.from_pretrained(hf_dir, trust_remote_code=True,
                                                       dtype=TORCH_DTYPES[dtype]).eval()
        t = model.transformer
    except Exception as exc:  # third-party code on a transformers it was not written for: say why, plainly
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{hf_dir}: its modeling_chatglm.py does not load with transformers "
                              f"{transformers.__version__} ({type(exc).__name__}: {first}); use --reference torch "
                              f"or glm") from None

    def generate(ids, n):
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
        return out[0, len(ids):].tolist()

    return TorchTrace(model, t.encoder.layers, "self_attention", t.encoder.final_layernorm, model.config.hidden_size,
                      lambda x: model(x).logits, generate, "remote code (modeling_chatglm.py)")


REFERENCES = {"torch": torch_reference, "glm": glm_reference, "remote-code": remote_code_reference}


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t
