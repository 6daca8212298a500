"""Move GLM checkpoints between HF/PyTorch and MindSpore, tensor by tensor."""
