"""PyTorch `.bin` files (torch.save's zip archive, and its legacy pre-1.6 stream), read and written without torch.

Reading parses the zip's own directory (zipstore.read_zip) and the pickle with an unpickler that knows only the
globals a state dict of tensors uses (as torch's weights_only loader does): anything else is refused, nothing in
the file runs. A tensor's bytes are located from its storage record's local header and checked against the
record's CRC-32 — when read here, and when copied file to file (the writer's checksum thread reports the CRC of
what it copied to `TensorRef.check`). Writing frames the pickle and the zip here too (see BinWriter).
"""
from __future__ import annotations

import io
import math
import pickle
import pickletools
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glm2_core.dtypes import BY_NAME, BY_TORCH_STORAGE, DType
from glm2_core.errors import CheckpointError

from .base import Closing, FileSpan, TensorRef, write_bytes
from .zipstore import STORED, ZipError, ZipRecord, ZipStoreWriter, read_record, read_zip

MAX_PICKLE = 64 << 20  # a 6B state dict's pickle names 200 tensors: far below this
MAX_DIM = 1 << 48
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _Refused(Exception):
    pass


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: DType
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def select(self, storage: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """This tensor's elements of its whole `storage` (offset and strides applied), copied C-contiguous into
        `out` or a new array (in the storage dtype's native byte order)."""
        dt = self.storage.dtype
        view = np.lib.stride_tricks.as_strided(storage[self.offset:], self.shape,
                                               tuple(s * dt.itemsize for s in self.stride), writeable=False)
        arr = np.empty(self.shape, dt.storage) if out is None else out
        arr[...] = view
        return arr

    @property
    def contiguous(self) -> bool:
        want = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if n != 1 and s != want:
                return False
            want *= n
        return True


class _OrderedDict(dict):
    def __setstate__(self, state):  # the state dict's `_metadata` attribute: not needed
        pass


def _ints(value, what: str, low: int = 0, high: int = MAX_DIM) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and low <= v <= high for v in value):
        raise ValueError(f"{what} must be a tuple of integers in [{low}, {high}], got {value!r:.80}")
    return value


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise ValueError("a tensor's storage is not a storage record")
    shape, stride = _ints(size, "shape"), _ints(stride, "stride")
    (offset,) = _ints((storage_offset,), "storage offset")
    if len(stride) != len(shape):
        raise ValueError(f"shape {list(shape)} and stride {list(stride)} differ in length")
    t = _Tensor(storage, offset, shape, stride)
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if math.prod(shape) and last >= storage.numel:
        raise ValueError(f"a tensor of shape {list(shape)} runs past its storage of {storage.numel} elements")
    return t


def _rebuild_parameter(data, *_):
    if not isinstance(data, _Tensor):
        raise ValueError("a parameter that holds no tensor")
    return data


_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("collections", "OrderedDict"): _OrderedDict,
            **{("torch", d.torch_storage): d for d in BY_TORCH_STORAGE.values()}}
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


class _Unpickler(pickle.Unpickler):
    """Builds storage and tensor descriptions; any other global is refused."""

    def __init__(self, data: io.BytesIO):
        super().__init__(data)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        try:
            return _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"{module!s:.60}.{name!s:.60}".encode("unicode_escape").decode()) from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage" \
                or not isinstance(pid[1], DType) or not isinstance(pid[2], str) or type(pid[4]) is not int:
            raise ValueError(f"unexpected persistent id {pid!r:.80}")
        if len(pid) == 6 and pid[5] is not None:
            raise ValueError("legacy storage views are not supported")
        storage = _Storage(pid[2], pid[1], pid[4])
        if not 0 <= storage.numel <= MAX_DIM or self.storages.setdefault(storage.key, storage) != storage:
            raise ValueError(f"storage {storage.key!r} is described inconsistently")
        return storage


def _unpickle(data: io.BytesIO):
    """One pickle from `data`, after a scan of its opcodes (which also bounds the memo the C unpickler sizes)."""
    start = data.tell()
    for op, arg, _ in pickletools.genops(data):
        if op.name in _MEMO_OPS and not 0 <= arg <= 1 << 20:
            raise ValueError(f"memo index {arg} out of range")
    data.seek(start)
    unpickler = _Unpickler(data)
    return unpickler.load(), unpickler.storages


def _unwrap(state):
    """A training checkpoint's weights, or the state dict itself."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        return state["state_dict"]
    return state


class TorchBinFile(Closing):
    """The tensors of a torch.save file. `verify` checks every record read or copied against its CRC-32."""

    def __init__(self, path: Path, verify: bool = True):
        self.path, self.verify = Path(path), verify
        self.tensors: dict[str, TensorRef] = {}
        self._f = open(self.path, "rb")  # noqa: SIM115 (held until close())
        try:
            zipped = self.has_crc = self._f.read(2) == b"PK"  # the legacy stream carries no checksums
            self._f.seek(0)
            self._index_zip() if zipped else self._index_legacy()
        except _Refused as exc:
            self.close()
            raise CheckpointError(f"{self.path}: refused to unpickle: the file holds more than tensors and would "
                                  f"run code (it names {exc})") from None
        except CheckpointError:
            self.close()
            raise
        except Exception as exc:  # anything the zip reader or the unpickler met in a malformed file
            self.close()
            what = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint (truncated or corrupt: "
                                  f"{what})") from None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def _error(self, name: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {name}: {what}")

    def _state(self, obj) -> dict[str, _Tensor]:
        state = _unwrap(obj)
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: expected a dict of tensors, found {type(state).__name__}")
        for name, t in state.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{self.path}: a key of the state dict is a {type(name).__name__}, not a name")
            if not isinstance(t, _Tensor):
                raise CheckpointError(f"{self.path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        return state

    # ---- the zip archive torch.save writes
    def _index_zip(self) -> None:
        records = read_zip(self.path)
        pickles = [n for n in records if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ZipError(f"expected one data.pkl record, found {len(pickles)}")
        archive = pickles[0][:-len("data.pkl")]
        order = self._small_record(records.get(archive + "byteorder"), 16, b"little").decode(errors="replace")
        if order not in ("little", "big"):
            raise ZipError(f"byteorder record says {order[:20]!r}")
        obj, _ = _unpickle(io.BytesIO(self._small_record(records[pickles[0]], MAX_PICKLE)))
        for name, t in self._state(obj).items():
            rec = records.get(f"{archive}data/{t.storage.key}")
            if rec is None:
                raise self._error(name, f"its storage record data/{t.storage.key} is missing from the archive")
            if rec.size != t.storage.numel * t.storage.dtype.itemsize:
                raise self._error(name, f"storage record data/{t.storage.key} holds {rec.size} bytes, its "
                                        f"{t.storage.numel} {t.storage.dtype.name} elements need "
                                        f"{t.storage.numel * t.storage.dtype.itemsize}")
            self.tensors[name] = self._zip_ref(name, t, rec, order == sys.byteorder)

    def _small_record(self, rec: ZipRecord | None, limit: int, default: bytes | None = None) -> bytes:
        if rec is None and default is not None:
            return default
        if rec.size > limit:
            raise ZipError(f"record {rec.name!r} of {rec.size} bytes is larger than {limit}")
        buf = bytearray(rec.size)
        self._checked(read_record(self._f, rec, memoryview(buf)), rec, rec.name)
        return bytes(buf)

    def _record(self, rec: ZipRecord, out: memoryview, name: str) -> int:
        """A tensor's record read when the tensor is (after indexing): what is wrong with it, in the contract's
        words (a deflated record that inflates past its stated size, one cut off)."""
        try:
            return read_record(self._f, rec, out)
        except ZipError as exc:
            raise self._error(name, str(exc)) from None

    def _checked(self, crc: int, rec: ZipRecord, name: str) -> None:
        if self.verify and crc != rec.crc:
            raise self._error(name, f"bytes do not match the CRC-32 the archive records for {rec.name} "
                                    f"(stored {rec.crc:08x}, read {crc:08x}): the file is corrupt "
                                    f"(--no-crc-check converts it anyway)")

    def _zip_ref(self, name: str, t: _Tensor, rec: ZipRecord, native: bool) -> TensorRef:
        dt, shape = t.storage.dtype, t.shape
        whole = native and rec.method == STORED and t.offset == 0 and t.contiguous \
            and math.prod(shape) * dt.itemsize == rec.size

        def read(out: np.ndarray | None = None) -> np.ndarray:
            if whole:
                arr = np.empty(shape, dt.storage) if out is None else out
                self._checked(self._record(rec, memoryview(arr.reshape(-1).view(np.uint8)), name), rec, name)
                return arr
            raw = np.empty(rec.size, np.uint8)
            self._checked(self._record(rec, memoryview(raw), name), rec, name)
            return t.select(raw.view(dt.storage.newbyteorder("=" if native else "S")), out)

        check = (lambda crc: self._checked(crc, rec, name)) if self.verify else None
        return TensorRef(name, shape, dt.name, self.path, read, into=read,
                         offset=rec.data_offset if whole else None, check=check)

    # ---- the legacy stream: magic, protocol, system info, the state pickle, storage keys, then each storage as
    # an int64 element count and its bytes
    def _index_legacy(self) -> None:
        size = self.path.stat().st_size
        head = io.BytesIO(self._f.read(MAX_PICKLE))
        magic, protocol = _unpickle(head)[0], _unpickle(head)[0]
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise ZipError("neither a zip archive nor a legacy torch.save stream")
        info = _unpickle(head)[0]
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise ValueError("only little-endian legacy files are supported")
        obj, storages = _unpickle(head)
        keys = _unpickle(head)[0]
        if not isinstance(keys, list) or sorted(keys) != sorted(storages):
            raise ValueError("the storage key list disagrees with the storages the state names")
        at, places = head.tell(), {}
        for key in keys:
            s = storages[key]
            self._f.seek(at)
            count = self._f.read(8)
            if len(count) != 8 or struct.unpack("<q", count)[0] != s.numel:
                raise ValueError(f"storage {key!r}: element count does not match the state's {s.numel}")
            places[key] = at + 8
            at += 8 + s.numel * s.dtype.itemsize
            if at > size:
                raise CheckpointError(f"{self.path}: truncated file: storage {key!r} ends at byte {at}, the file "
                                      f"has {size}")
        for name, t in self._state(obj).items():
            self.tensors[name] = self._legacy_ref(name, t, places[t.storage.key])

    def _legacy_ref(self, name: str, t: _Tensor, at: int) -> TensorRef:
        dt, shape = t.storage.dtype, t.shape

        def read(out: np.ndarray | None = None) -> np.ndarray:
            raw = np.empty(t.storage.numel * dt.itemsize, np.uint8)
            self._f.seek(at)
            if self._f.readinto(memoryview(raw)) != raw.size:
                raise CheckpointError(f"{self.path}: truncated file: tensor {name!r}")
            return t.select(raw.view(dt.storage), out)

        return TensorRef(name, shape, dt.name, self.path, read, into=read)


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
        storage_type = BY_NAME[dtype].torch_storage
        if storage_type is None:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be written to a .bin file")
        stride = [math.prod(shape[j + 1:]) for j in range(len(shape))]
        storage = (b"(" + _str("storage") + f"ctorch\n{storage_type}\n".encode() + _str(str(i))
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

    def crc(self, name: str, crcs: list[int]) -> None:
        """The record's CRC-32 (one piece: the whole tensor)."""
        self._zip.crc(self._keys[name], crcs[0])

    def finish(self) -> None:
        self._zip.add(f"{self._archive}/version", b"3\n")
        self._zip.add(f"{self._archive}/.data/serialization_id", b"0" * 40)
        self._zip.finish()
