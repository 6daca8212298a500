"""The MindSpore ChatGLM2 runtime. Model classes import MindSpore on first use; config and tokenizer do not."""
from converters.config import GLM2Config

__all__ = ["GLM2Config", "GLM2Tokenizer", "GLM2ForCausalLM", "Decoder", "SamplingConfig", "from_pretrained", "chat"]
_LAZY = {"GLM2Tokenizer": "tokenizer", "GLM2ForCausalLM": "model", "Decoder": "generation",
         "SamplingConfig": "sampling", "from_pretrained": "loading", "chat": "chat"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
