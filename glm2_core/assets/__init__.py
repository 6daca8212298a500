"""ChatGLM2's tokenizer files, shipped as package data (every ChatGLM2-6B checkpoint carries the same ones)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

TOKENIZER = ("tokenizer.model", "tokenizer_config.json")


def bundled_tokenizer() -> list[Path]:
    """The bundled tokenizer files, the sentencepiece model first."""
    return [Path(str(files(__name__) / name)) for name in TOKENIZER]
