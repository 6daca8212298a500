"""PyTorch `.bin` (torch.save zip) files. torch is imported only here, and only when a .bin is read; writing one
needs no torch (the pickle and the zip are framed here).

Reading uses `torch.load(weights_only=True, mmap=True)`: no code in the pickle runs, and tensors stay on disk
until read. Pages of a tensor are handed back to the kernel once it has been used, so reading a 2 GB shard
does not leave 2 GB resident. Writing frames the zip here, one tensor at a time (see BinWriter).
"""
from __future__ import annotations

import ctypes
import math
import mmap
import pickle
import struct
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .base import Closing, FileSpan, TensorRef, write_bytes
from .zipstore import ZipStoreWriter

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


def _advise(t, advice: int) -> None:
    """madvise the pages mapping tensor `t` (DONTNEED after use: they are clean and private, so a later read
    refaults them from the file)."""
    if _MADVISE is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = start - start % _PAGE, end + (-end % _PAGE)
    _MADVISE(lo, hi - lo, advice)


class TorchBinFile(Closing):
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
        state = _unwrap(state)
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: expected a dict of tensors, found {type(state).__name__}")
        offsets = self._offsets(torch) if self._mapped else {}
        self.tensors: dict[str, TensorRef] = {}
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{self.path}: entry {name!r} is a {type(t).__name__}, not a tensor")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _TORCH_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            mapped = self._mapped
            self.tensors[name] = TensorRef(name, tuple(t.shape), dtype, self.path, lambda t=t: to_numpy(t),
                                           lambda t=t: mapped and _advise(t, mmap.MADV_DONTNEED),
                                           offset=offsets.get(name))

    def _offsets(self, torch) -> dict[str, int]:
        """Where each contiguous tensor's bytes start in the file, from a load onto the meta device (torch notes
        each storage's record offset there; nothing is read)."""
        import sys
        import zipfile

        with zipfile.ZipFile(self.path) as z:
            order = [z.read(n).decode() for n in z.namelist() if n.endswith("/byteorder")]
        if order and order[0] != sys.byteorder:  # torch swaps these bytes as it loads them
            return {}
        out = {}
        for name, t in _unwrap(torch.load(self.path, map_location="meta", weights_only=True)).items():
            base = getattr(t.untyped_storage(), "_checkpoint_offset", None) if isinstance(t, torch.Tensor) else None
            if base is not None and t.is_contiguous():
                out[name] = base + t.storage_offset() * t.element_size()
        return out

    def close(self) -> None:
        self.tensors = {}


def _unwrap(state):
    """A training checkpoint's weights, or the state dict itself."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        return state["state_dict"]
    return state


def to_numpy(t) -> np.ndarray:
    torch = _torch()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


_STORAGE_TYPES = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
                  "float64": "DoubleStorage", "int8": "CharStorage", "uint8": "ByteStorage", "int16": "ShortStorage",
                  "int32": "IntStorage", "int64": "LongStorage", "bool": "BoolStorage"}
ALIGN = 64  # torch aligns every storage record to 64 bytes (its .storage_alignment)


def _int(v: int) -> bytes:
    if 0 <= v < 1 << 8:
        return b"K" + bytes([v])  # BININT1
    if 0 <= v < 1 << 16:
        return b"M" + struct.pack("<H", v)  # BININT2
    if -(1 << 31) <= v < 1 << 31:
        return b"J" + struct.pack("<i", v)  # BININT
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _tuple(values) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"  # MARK … TUPLE


def state_pickle(plan: list[tuple[str, tuple[int, ...], str]]) -> bytes:
    """The data.pkl torch.save writes for a dict of contiguous tensors, opcode by opcode (protocol 2), so that
    writing a .bin needs no torch: each value is `_rebuild_tensor_v2` over persistent storage record i."""
    out = [b"\x80\x02}("]  # PROTO 2, EMPTY_DICT, MARK
    for i, (name, shape, dtype) in enumerate(plan):
        if dtype not in _STORAGE_TYPES:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be written to a .bin file")
        stride = [math.prod(shape[j + 1:]) for j in range(len(shape))]
        storage = (b"(" + _str("storage") + f"ctorch\n{_STORAGE_TYPES[dtype]}\n".encode() + _str(str(i))
                   + _str("cpu") + _int(math.prod(shape)) + b"tQ")  # the persistent id, BINPERSID
        out += [_str(name), b"ctorch._utils\n_rebuild_tensor_v2\n(", storage, _int(0), _tuple(shape),
                _tuple(stride), b"\x89ccollections\nOrderedDict\n)RtR"]  # False, OrderedDict(); REDUCE
    return b"".join(out) + b"u."  # SETITEMS, STOP


class BinWriter:
    """Streams a torch.save-compatible zip: the pickle first (known from the plan), then each tensor's bytes in
    its own 64-byte-aligned stored record. torch.save itself needs every tensor in memory at once.

    A tensor's CRC-32 comes later through `crc` (the caller computes it beside the sha256 on its hash thread)."""

    def __init__(self, f, plan: list[tuple[str, tuple[int, ...], str]], archive: str):
        self._zip = ZipStoreWriter(f, ALIGN)
        self._f, self._archive = f, archive
        self._keys = {name: f"{archive}/data/{i}" for i, (name, _, _) in enumerate(plan)}
        for record, data in (("data.pkl", state_pickle(plan)), (".format_version", b"1"),
                             (".storage_alignment", str(ALIGN).encode()), ("byteorder", b"little")):
            self._zip.add(f"{archive}/{record}", data)

    def write(self, name: str, data: np.ndarray | FileSpan, dtype: str) -> None:
        self._zip.begin(self._keys[name], data.nbytes)
        write_bytes(self._f, data)

    def crc(self, name: str, value: int) -> None:
        self._zip.crc(self._keys[name], value)

    def finish(self) -> None:
        self._zip.add(f"{self._archive}/version", b"3\n")
        self._zip.add(f"{self._archive}/.data/serialization_id", b"0" * 40)
        self._zip.finish()
