"""Weights into the runtime's parameters, one tensor at a time, and the device they run on (the folder is opened
by `glm2_ms.api.open_model`)."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import psutil

from glm2_core.names import Layout

from .model import use_native_kernels

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
    return nbytes <= share * psutil.virtual_memory().available


def to_tensor(arr: np.ndarray, dtype: str) -> ms.Tensor:
    """A MindSpore tensor owning a copy of `arr` (bfloat16 arrives as uint16 bits)."""
    if dtype == "bfloat16":
        return ms.Tensor(np.ascontiguousarray(arr).view(np.uint16)).view(ms.bfloat16)
    return ms.Tensor(np.array(arr, copy=True))


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
