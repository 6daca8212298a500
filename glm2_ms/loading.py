"""Open a model folder once — its release, config, tokenizer and weights — and load the weights straight into the
runtime's parameters, one tensor at a time."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import mindspore as ms
import numpy as np

from converters.source import Source
from glm2_core.config import GLM2Config
from glm2_core.dtypes import COMPUTE_DTYPES
from glm2_core.errors import CheckpointError, UserError
from glm2_core.names import Layout

from .model import GLM2ForCausalLM, use_native_kernels
from .tokenizer import GLM2Tokenizer

RUNTIME_LAYOUT = Layout("mindformers")  # the runtime's parameter names
MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def use_device(target: str = "CPU") -> None:
    """Select MindSpore's device (CPU, Ascend or GPU); a no-op when this process already runs kernels there (the
    device can be chosen only once)."""
    try:
        ms.set_device(target)
    except RuntimeError:
        if ms.get_context("device_target") != target:
            raise


def use_cpu() -> None:
    use_device("CPU")


def fits_in_memory(nbytes: int, share: float) -> bool:
    """Whether `nbytes` fit in `share` of the memory available now (psutil), the rest left to what runs beside."""
    import psutil

    return nbytes <= share * psutil.virtual_memory().available


def to_tensor(arr: np.ndarray, dtype: str) -> ms.Tensor:
    """A MindSpore tensor owning a copy of `arr` (bfloat16 arrives as uint16 bits)."""
    if dtype == "bfloat16":
        return ms.Tensor(np.ascontiguousarray(arr).view(np.uint16)).view(ms.bfloat16)
    return ms.Tensor(np.array(arr, copy=True))


@dataclass
class ModelFolder:
    """A model folder (or weights file) opened once: its weights' headers, its config and release (`config`), its
    tokenizer; the model is built from it when asked (`load`). Nothing downstream reads config.json again."""
    source: Source
    _tokenizer: GLM2Tokenizer | None = field(default=None, repr=False)

    @property
    def config(self) -> GLM2Config:
        return self.source.cfg

    @cached_property
    def tokenizer(self) -> GLM2Tokenizer:
        """Its tokenizer.model (else its family's bundled one), in the family its release and files tell."""
        return GLM2Tokenizer.of_model(self.source.ckpt.folder, self.config)

    def load(self, dtype: str | None = None, compute_dtype: str | None = None) -> GLM2ForCausalLM:
        """The runtime model. `dtype`: storage dtype of the parameters (default: the checkpoint's);
        `compute_dtype`: float32 or float16 (default: the storage dtype, float32 for bfloat16). Memory: the
        parameters plus one tensor in flight."""
        if dtype is not None and dtype not in MS_DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; expected one of {', '.join(MS_DTYPES)}")
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise UserError(f"compute dtype must be {' or '.join(COMPUTE_DTYPES)}, not {compute_dtype!r}")
        src = self.source
        storage = dtype or src.dtype
        if storage not in MS_DTYPES:
            raise CheckpointError(f"{src.ckpt.path}: weights are {storage}; pass dtype= float32, float16 or bfloat16")
        model = GLM2ForCausalLM(src.cfg, MS_DTYPES[storage], compute_dtype and MS_DTYPES[compute_dtype])
        groups, _ = src.groups(RUNTIME_LAYOUT)
        load_into(model, src.stream(groups, storage))
        src.ckpt.check_complete()
        return model


@contextmanager
def open_model(path, config: Path | None = None, rearranged_rope: bool | None = None,
               release: str | None = None) -> Iterator[ModelFolder]:
    """`with open_model(folder) as m:` `m.config`, `m.tokenizer`, `m.load(…)`: a converter folder, a HF folder, or
    one weights file (+ config.json beside it). `release`: the release it holds where its config cannot tell
    (glm2_core.releases)."""
    with Source.open(path, rearranged_rope, config, release=release) as src:
        yield ModelFolder(src)


def from_pretrained(path, dtype: str | None = None, compute_dtype: str | None = None,
                    config: Path | None = None, rearranged_rope: bool | None = None,
                    release: str | None = None) -> GLM2ForCausalLM:
    """The model of a folder or file (`ModelFolder.load`), when its tokenizer is not needed."""
    with open_model(path, config, rearranged_rope, release) as folder:
        return folder.load(dtype, compute_dtype)


def load_into(cell, weights) -> None:
    """Set every parameter of `cell` from `weights` ((name, array, dtype) by the cell's parameter names), for
    inference (with the native kernels, where they can be built)."""
    params = {p.name: p for p in cell.get_parameters()}
    for name, arr, dt in weights:
        params.pop(name).set_data(to_tensor(arr, dt))
    if params:
        raise AssertionError(f"parameters left unset: {sorted(params)[:3]}")
    cell.set_train(False)
    use_native_kernels(cell)
