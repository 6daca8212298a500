"""MindSpore `.ckpt`: a streaming reader and writer of its protobuf framing.

A file is a run of serialized `Checkpoint{repeated Value value = 1}` messages, one Value each:
`Value{string tag = 1; TensorProto tensor = 2; MapTensorProto maptensor = 3}` and
`TensorProto{repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3}`.
`mindspore.save_checkpoint` cuts tensors over 512 MiB into several Values with the same tag and the full dims,
and may end the file with `b"crc_num"` + a 10-byte big-endian CRC-32 of everything before it.
MindSpore's own loader parses the whole file into memory; here only the record headers are read, and each
tensor's bytes are read on demand by offset.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np

from glm2_core.dtypes import BY_CKPT, BY_NAME
from glm2_core.errors import CheckpointError

from .base import Closing, FileSpan, TensorRef, read_exact, write_bytes
from .checksums import FileCrc, crc32, crc32_combine
from .protowire import encode_varint as _encode_varint
from .protowire import varint as _varint

CHUNK_BYTES = 512 * 1024 * 1024
CRC_MARK = b"crc_num"
CRC_TRAILER = len(CRC_MARK) + 10


def _text(buf: bytes, pos: int, length: int) -> str:
    if pos + length > len(buf):
        raise ValueError("record header larger than expected")
    return buf[pos:pos + length].decode()


class CkptFile(Closing):
    """Index of a .ckpt: tensors (name → TensorRef) and string entries (name → str). Use as a context manager."""

    HEADER_PEEK = 4096  # a Value's tag, dims and type fit in far less; the content is never read here

    def __init__(self, path: Path, verify: bool = True):
        self.path = Path(path)
        self.tensors: dict[str, TensorRef] = {}
        self.strings: dict[str, str] = {}
        self.has_crc = False
        self._crc: FileCrc | None = None  # with a CRC trailer: the checksum, assembled from what is read
        self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115 (held until close())
        try:
            self._index(verify)
        except CheckpointError:
            self.close()
            raise
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            self.close()
            raise CheckpointError(f"{self.path}: not a valid MindSpore checkpoint (corrupt protobuf: {exc})") from None

    def close(self) -> None:
        self._f.close()

    def _index(self, verify: bool) -> None:
        f, size = self._f, self.path.stat().st_size
        segments: dict[str, list[tuple[int, int]]] = {}
        meta: dict[str, tuple[tuple[int, ...], str]] = {}
        order: list[str] = []
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(self.HEADER_PEEK)
            if size - pos == CRC_TRAILER and head.startswith(CRC_MARK):
                self.has_crc = True
                break
            if not head or head[0] != 0x0A:
                raise ValueError(f"expected a checkpoint record at offset {pos}")
            length, start = _varint(head, 1, len(head))
            record_end = pos + start + length
            if record_end > size:
                raise CheckpointError(f"{self.path}: truncated file: record at offset {pos} needs {length} bytes, "
                                      f"the file ends {record_end - size} bytes early")
            tag, dims, ttype, content = self._parse_value(head, start, start + length, pos)
            if tag in meta and order[-1] != tag:
                raise ValueError(f"pieces of tensor {tag!r} are not adjacent")
            if tag in meta and meta[tag] != (dims, ttype):
                raise ValueError(f"pieces of tensor {tag!r} disagree on shape or type")
            if tag not in meta:
                order.append(tag)
                meta[tag] = (dims, ttype)
                segments[tag] = []
            segments[tag].append(content)
            pos = record_end
        if self.has_crc and verify:
            self._crc = FileCrc(self.path, size - CRC_TRAILER)
        for tag in order:
            self._add(tag, *meta[tag], segments[tag])

    def _parse_value(self, head: bytes, pos: int, end: int, file_pos: int):
        """Parse one Value from the peeked bytes `head`; `end` may lie beyond them (the content is not needed)."""
        tag, tensor = None, None
        while pos < end:
            key, pos = _varint(head, pos, len(head))
            if key & 7 != 2:
                raise ValueError(f"unexpected wire type {key & 7} in record at offset {file_pos}")
            length, pos = _varint(head, pos, len(head))
            if key >> 3 == 1:
                tag = _text(head, pos, length)
            elif key >> 3 == 2:
                tensor = (pos, pos + length)
            elif key >> 3 == 3:
                raise CheckpointError(f"{self.path}: entry {tag!r} is a MapParameter, which this tool does not convert")
            pos += length
        if pos != end or tag is None or tensor is None:
            raise ValueError(f"record at offset {file_pos} is malformed")
        return (tag, *_parse_tensor(head, *tensor, file_pos, tag))

    def _add(self, tag: str, dims: tuple[int, ...], ttype: str, segments: list[tuple[int, int]]) -> None:
        total = sum(n for _, n in segments)
        if ttype == "str":  # numpy's fixed-width unicode: UTF-32, padded with NULs
            if total > 1 << 20:
                raise CheckpointError(f"{self.path}: string entry {tag!r} of {total} bytes is implausibly long")
            data = b"".join(self._read_bytes(off, n, tag) for off, n in segments)
            try:
                self.strings[tag] = data.decode("utf-32-le").rstrip("\0")
            except UnicodeDecodeError:
                raise CheckpointError(f"{self.path}: string entry {tag!r} is not valid UTF-32 text") from None
            return
        if ttype not in BY_CKPT:
            raise CheckpointError(f"{self.path}: tensor {tag!r} has unsupported type {ttype!r}")
        dt = BY_CKPT[ttype]
        shape = () if dims in ((), (0,)) else dims
        if math.prod(shape) * dt.itemsize != total:
            raise CheckpointError(f"{self.path}: tensor {tag!r} holds {total} bytes, but shape {list(shape)} of "
                                  f"{dt.name} needs {math.prod(shape) * dt.itemsize}")
        single = segments[0] if len(segments) == 1 else None
        check = None if self._crc is None or single is None else lambda crc: self._crc.add(*single, crc)
        self.tensors[tag] = TensorRef(tag, shape, dt.name, self.path, lambda: self._read(tag, shape, dt.name, segments),
                                      into=lambda out: self._read(tag, shape, dt.name, segments, out),
                                      offset=single and single[0], check=check,
                                      rows=lambda a, b: self._read_rows(tag, shape, dt.name, segments, a, b))

    def _read_bytes(self, offset: int, n: int, what: str) -> bytes:
        arr = np.empty(n, np.uint8)
        read_exact(self._f, offset, arr, self.path, what)
        return arr.tobytes()

    def _read(self, tag, shape, dtype, segments, out: np.ndarray | None = None) -> np.ndarray:
        arr = np.empty(shape, BY_NAME[dtype].storage) if out is None else out
        self._read_range(tag, segments, 0, arr)
        return arr

    def _read_rows(self, tag, shape, dtype, segments, a: int, b: int) -> np.ndarray:
        arr = np.empty((b - a, *shape[1:]), BY_NAME[dtype].storage)
        self._read_range(tag, segments, a * arr.itemsize * math.prod(shape[1:]), arr)
        return arr

    def _read_range(self, tag, segments, start: int, arr: np.ndarray) -> None:
        """Fill `arr` with the tensor's bytes from `start` on, wherever its pieces lie; each piece read is added
        to the file's checksum."""
        flat = arr.reshape(-1).view(np.uint8)
        at = 0  # the tensor's byte at which this segment starts
        for offset, n in segments:
            lo, hi = max(at, start), min(at + n, start + len(flat))
            if lo < hi:
                part = flat[lo - start:hi - start]
                read_exact(self._f, offset + lo - at, part, self.path, tag)
                if self._crc is not None:
                    self._crc.add(offset + lo - at, hi - lo, crc32(part))
            at += n

    def check_complete(self) -> None:
        """After the tensors were read or copied: the file's CRC trailer must match its contents (the pieces
        nobody read — record headers, dropped entries — are read now)."""
        if self._crc is None:
            return
        self._f.seek(self._crc.end + len(CRC_MARK))
        stored = int.from_bytes(self._f.read(10), "big")
        computed = self._crc.value()
        if computed != stored:
            raise CheckpointError(f"{self.path}: contents do not match the file's CRC trailer (stored {stored:08x}, "
                                  f"computed {computed:08x}): the file is corrupt (--no-crc-check reads it anyway)")


def _record_header(tag: str, shape: tuple[int, ...], ttype: str, content_len: int) -> bytes:
    tensor = b"".join(b"\x08" + _encode_varint(d) for d in shape)
    t = ttype.encode()
    tensor += b"\x12" + _encode_varint(len(t)) + t + b"\x1a" + _encode_varint(content_len)
    name = tag.encode()
    value = b"\x0a" + _encode_varint(len(name)) + name + b"\x12" + _encode_varint(len(tensor) + content_len) + tensor
    return b"\x0a" + _encode_varint(len(value) + content_len) + value


class CkptWriter:
    """Writes tensors one at a time, framed exactly as `mindspore.save_checkpoint` frames Tensors, and `finish`
    ends the file with the CRC trailer `save_checkpoint(crc_check=True)` writes (the CRC-32 of every byte before
    it), so that our files are checked by our readers and by `mindspore.load_checkpoint(crc_check=True)` alike.

    With `deferred_crc`, the CRC-32 of each record's data (pieces of `PIECE` bytes) is handed in later through
    `crc`, computed by the caller on another thread while the next tensor is written (converters/output.py)."""

    PIECE = CHUNK_BYTES

    def __init__(self, f: BinaryIO, deferred_crc: bool = False):
        self._f, self._deferred = f, deferred_crc
        self._parts: list[list] = []  # [crc-32 or None until handed in, length] of every piece, in file order
        self._waiting: dict[str, list[list]] = {}

    def write(self, name: str, data: np.ndarray | FileSpan, dtype: str) -> None:
        ttype = BY_NAME[dtype].ckpt
        pieces = []
        for at in range(0, data.nbytes, CHUNK_BYTES) if data.nbytes else [0]:
            n = min(CHUNK_BYTES, data.nbytes - at)
            header = _record_header(name, data.shape, ttype, n)
            self._f.write(header)
            write_bytes(self._f, data, at, n)
            piece = [None if self._deferred else _crc_of(data, at, n), n]
            self._parts += [[crc32(header), len(header)], piece]  # in file order: each record's header, its data
            pieces.append(piece)
        if self._deferred:
            self._waiting[name] = pieces

    def crc(self, name: str, crcs: list[int]) -> None:
        """The CRC-32 of each `PIECE` of `name`'s data, as written."""
        for piece, value in zip(self._waiting.pop(name), crcs, strict=True):
            piece[0] = value

    def finish(self) -> None:
        if self._waiting:
            raise AssertionError(f"no CRC was handed in for {sorted(self._waiting)[:3]}")
        total = 0
        for value, n in self._parts:
            total = crc32_combine(total, value, n)
        self._f.write(CRC_MARK + total.to_bytes(10, "big"))


def _crc_of(data: np.ndarray | FileSpan, at: int, n: int) -> int:
    """CRC-32 of bytes [at, at + n) of a tensor."""
    if isinstance(data, FileSpan):
        crc = 0
        for block in FileSpan(data.file, data.offset + at, (n,), "uint8").blocks():
            crc = crc32(block, crc)
        return crc
    return crc32(memoryview(np.ascontiguousarray(data)).cast("B")[at:at + n])


def _parse_tensor(head: bytes, pos: int, end: int, file_pos: int, tag: str):
    """A TensorProto's (dims, tensor_type, (file offset, length) of its content) from `head[pos:end]`."""
    dims, ttype, content = [], None, None
    while pos < end:
        key, pos = _varint(head, pos, len(head))
        number, wire = key >> 3, key & 7
        if (number, wire) == (1, 0):
            d, pos = _varint(head, pos, len(head))
            dims.append(d)
            continue
        if wire != 2:
            raise ValueError(f"unexpected field {number} in tensor {tag!r}")
        length, pos = _varint(head, pos, len(head))
        if number == 1:  # packed dims
            stop = pos + length
            while pos < stop:
                d, pos = _varint(head, pos, stop)
                dims.append(d)
            continue
        if number == 2:
            ttype = _text(head, pos, length)
        elif number == 3:
            content = (file_pos + pos, length)
        pos += length
    if pos != end or ttype is None or content is None:
        raise ValueError(f"tensor {tag!r} is malformed")
    return tuple(dims), ttype, content
