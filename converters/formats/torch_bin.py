"""PyTorch `.bin` (torch.save zip) files. torch is imported only here, and only when a .bin is touched.

Reading uses `torch.load(weights_only=True, mmap=True)`: no code in the pickle runs, and tensors stay on disk
until read. Pages of a tensor are handed back to the kernel once it has been used, so reading a 2 GB shard
does not leave 2 GB resident.
"""
from __future__ import annotations

import ctypes
import mmap
import pickle
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .base import TensorRef

_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
                 "int8": "int8", "uint8": "uint8", "int16": "int16", "int32": "int32", "int64": "int64",
                 "bool": "bool"}


def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading or writing PyTorch .bin files needs torch: pip install 'glm2-toolkit[torch]'") \
            from None
    return torch


def _libc_madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return fn
    except (OSError, AttributeError):
        return None


_MADVISE = _libc_madvise()
_PAGE = mmap.PAGESIZE


def _drop_pages(t) -> None:
    """Tell the kernel the mapped pages of `t` may go: they are clean and private, so a later read refaults them."""
    if _MADVISE is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = start - start % _PAGE, end + (-end % _PAGE)
    _MADVISE(lo, hi - lo, mmap.MADV_DONTNEED)


class TorchBinFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        torch = _torch()
        try:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                self._mapped = True
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                    raise
                # legacy (pre-zip) torch.save files cannot be mapped
                state = torch.load(self.path, map_location="cpu", weights_only=True)
                self._mapped = False
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self.path}: refused to unpickle: the file holds more than tensors and would run "
                                  f"code ({first[:160]})") from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint (truncated or corrupt: "
                                  f"{first[:160]})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: expected a dict of tensors, found {type(state).__name__}")
        self.tensors: dict[str, TensorRef] = {}
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{self.path}: entry {name!r} is a {type(t).__name__}, not a tensor")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _TORCH_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            self.tensors[name] = TensorRef(name, tuple(t.shape), dtype, self.path, lambda t=t: to_numpy(t),
                                           (lambda t=t: _drop_pages(t)) if self._mapped else (lambda: None))

    def close(self) -> None:
        self.tensors = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def to_numpy(t) -> np.ndarray:
    torch = _torch()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: str):
    torch = _torch()
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def save_bin(path: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    """One shard: torch.save needs the whole dict, so a shard's size bounds the memory used to write it."""
    torch = _torch()
    torch.save({k: from_numpy(a, d) for k, (a, d) in tensors.items()}, path)
