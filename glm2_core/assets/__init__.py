"""ChatGLM2's tokenizer files, shipped as package data (every ChatGLM2-6B checkpoint carries the same ones, and
ChatGLM3's tokenizer.model is the same sentencepiece model; GLM-4's is another, not bundled)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ..files import TOKENIZER_CONFIG, TOKENIZER_MODEL

TOKENIZER = (TOKENIZER_MODEL, TOKENIZER_CONFIG)
BUNDLED_FOR = ("chatglm2", "chatglm3")  # the families whose tokenizer.model this is


def bundled_tokenizer(family: str = "chatglm2") -> list[Path]:
    """The bundled tokenizer files, the sentencepiece model first; none for a family they are not of."""
    return [Path(str(files(__name__) / name)) for name in TOKENIZER] if family in BUNDLED_FOR else []
