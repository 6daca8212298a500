"""The MindSpore ChatGLM2 runtime. Model classes import MindSpore on first use; config and tokenizer do not.

No submodule is named like an export: `from glm2_ms import chat` would otherwise give the module once it is
imported (the import system sets the attribute, and this module's `__getattr__` is never asked again)."""
import importlib

from glm2_core.config import GLM2Config

__all__ = ["GLM2Config", "GLM2Tokenizer", "GLM2ForCausalLM", "Decoder", "SamplingConfig", "open_model",
           "from_pretrained", "chat", "stream_chat"]
_LAZY = {"GLM2Tokenizer": "tokenizer", "GLM2ForCausalLM": "api", "Decoder": "generation",
         "SamplingConfig": "sampling", "open_model": "api", "from_pretrained": "api", "chat": "dialogue",
         "stream_chat": "dialogue"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
