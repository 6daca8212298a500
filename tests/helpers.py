"""What several test files share: a checkpoint's tensors read whole, the MindSpore layouts, and the optional extras.

The backends the toolkit is built on (MindSpore, torch, transformers, sentencepiece, pyyaml) are imported plainly:
when one is missing or broken the suite fails. Only the genuinely optional extras (`optional`) skip their tests,
and the summary names them (conftest.py)."""
import numpy as np
import pytest

from converters.checkpoint import open_checkpoint
from glm2_core.names import Layout

LAYOUTS = [Layout("mindformers"), Layout("mindformers-legacy"), Layout("mindformers", qkv_split=True),
           Layout("mindformers", mlp_split=True), Layout("mindformers", rearrange_rope=True),
           Layout("mindformers", True, True, True)]
OPTIONAL = {"peft": "validation", "safetensors": "validation", "safetensors.torch": "validation",
            "jieba": "metrics", "rouge_chinese": "metrics", "nltk": "metrics"}  # module → the extra that has it
MISSING: set[str] = set()  # the optional modules this run lacked (conftest's summary lists them)


def tensors(path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as c:
        return {n: t.read() for n, t in c.tensors.items()}


def tensor_bytes(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor's dtype, shape and bytes: what a bit-exact comparison needs."""
    with open_checkpoint(path) as c:
        return {n: (t.dtype, t.shape, t.read().tobytes()) for n, t in c.tensors.items()}


def optional(module: str):
    """An optional extra's module; without it the calling test (or module) is skipped, and the summary says so."""
    try:
        return pytest.importorskip(module, reason=f"the optional extra [{OPTIONAL[module]}] is not installed")
    except pytest.skip.Exception:
        MISSING.add(f"{module} [{OPTIONAL[module]}]")
        raise
