"""Move ChatGLM2 checkpoints between HF/PyTorch and MindSpore, tensor by tensor."""

__version__ = "0.1.0"
