"""Parity and evaluation of the MindSpore runtime against the references (PyTorch, transformers, the published
ADGEN metrics)."""
import os

from glm2_core import cache_dir

# Library caches go to the user's cache folder, not the system temp dir, so the tools leave nothing there: torch
# creates its compile-cache folder when transformers or peft import torch._dynamo, jieba writes its dictionary
# cache (validation/metrics.py) — both in the temp dir by default.
CACHE = cache_dir()
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "torchinductor"))
