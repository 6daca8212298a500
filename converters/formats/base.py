"""What every reader hands out: a tensor's name, shape and dtype, and a way to read its bytes later."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..dtypes import BY_NAME


class Closing:
    """`with` support for anything that has close()."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class TensorRef:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    reader: Callable[[], np.ndarray] = field(repr=False)
    release: Callable[[], None] = field(default=lambda: None, repr=False)
    into: Callable[[np.ndarray], object] | None = field(default=None, repr=False)  # read into a C-contiguous buffer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * BY_NAME[self.dtype].itemsize

    def read(self) -> np.ndarray:
        """The tensor as a numpy array of the storage dtype (bfloat16 as uint16 bits)."""
        return self.reader()


def read_exact(f, offset: int, arr: np.ndarray, path: Path, what: str) -> None:
    """Fill `arr` with the bytes at `offset`; a short read means the file was cut off."""
    from ..errors import CheckpointError

    f.seek(offset)
    view = memoryview(arr).cast("B")
    got = f.readinto(view)
    if got != len(view):
        raise CheckpointError(f"{path}: truncated file: tensor {what!r} needs {len(view)} bytes at offset {offset}, "
                              f"only {got} present")
