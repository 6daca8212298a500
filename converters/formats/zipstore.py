"""Zip archives, the container torch.save uses: read from their own directory, and written (STORED) one record
at a time.

Reading takes every record's data offset from its local header, checked against the central directory: torch's
own prediction of that offset holds only for the exact layout its writer makes.

A record's CRC-32 can be given after its bytes are written: `finish` patches it into the local header in place.
That lets a caller compute the checksum on another thread while it writes the next record (`zipfile` computes
it on the writing thread, in the conversion's time: benchmarks/convert_6b.py). Every record and the end of the archive
carry zip64 fields, as torch's own writer emits them, so sizes and offsets beyond 4 GiB need no second path.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

from .checksums import crc32

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_FULL32, _FULL16 = 0xFFFFFFFF, 0xFFFF
_VERSION = 45  # 4.5: zip64
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, the earliest a zip can say; keeps output deterministic
_CRC_AT = 14  # offset of the CRC field in a local header


class ZipStoreWriter:
    def __init__(self, f: BinaryIO, align: int = 1):
        self._f, self._align = f, align
        self._records: list[list] = []  # [name bytes, header offset, size, crc or None]
        self._index: dict[str, int] = {}

    def begin(self, name: str, size: int) -> None:
        """Write `name`'s local header; the caller then writes exactly `size` bytes, aligned to `align`."""
        raw = name.encode()
        offset = self._f.tell()
        zip64 = struct.pack("<HHQQ", 1, 16, size, size)
        start = offset + _LOCAL.size + len(raw) + len(zip64) + 4
        pad = -start % self._align
        extra = zip64 + b"FB" + pad.to_bytes(2, "little") + b"Z" * pad  # torch pads with an "FB" field too
        self._f.write(_LOCAL.pack(0x04034B50, _VERSION, 0, 0, 0, _DOS_DATE, 0, _FULL32, _FULL32, len(raw),
                                  len(extra)) + raw + extra)
        self._index[name] = len(self._records)
        self._records.append([raw, offset, size, None])

    def crc(self, name: str, value: int) -> None:
        self._records[self._index[name]][3] = value

    def add(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        self._f.write(data)
        self.crc(name, crc32(data))

    def finish(self) -> None:
        end = self._f.tell()
        for raw, offset, _, crc in self._records:
            if crc is None:
                raise AssertionError(f"zip record {raw.decode()} has no CRC")
            self._f.seek(offset + _CRC_AT)
            self._f.write(struct.pack("<I", crc))
        self._f.seek(end)
        for raw, offset, size, crc in self._records:
            extra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
            self._f.write(_CENTRAL.pack(0x02014B50, _VERSION, _VERSION, 0, 0, 0, _DOS_DATE, crc, _FULL32, _FULL32,
                                        len(raw), len(extra), 0, 0, 0, 0, _FULL32) + raw + extra)
        central_end = self._f.tell()
        n = len(self._records)
        self._f.write(_ZIP64_END.pack(0x06064B50, _ZIP64_END.size - 12, _VERSION, _VERSION, 0, 0, n, n,
                                      central_end - end, end))
        self._f.write(_ZIP64_LOCATOR.pack(0x07064B50, 0, central_end, 1))
        self._f.write(_END.pack(0x06054B50, 0, 0, min(n, _FULL16), min(n, _FULL16), _FULL32, _FULL32, 0))


STORED, DEFLATED = 0, 8
MAX_RECORDS = 1 << 20  # a 6B state dict has ~200; the count is checked against the directory's size as well
MAX_DIRECTORY = 256 << 20
_EOCD_SEARCH = _END.size + 0xFFFF  # the end record and the longest comment


class ZipError(ValueError):
    """The file is not a zip archive this reader accepts; the message says why."""


@dataclass(frozen=True)
class ZipRecord:
    name: str
    data_offset: int  # where the record's (compressed) bytes start, from its local header
    size: int  # uncompressed
    compressed_size: int
    crc: int
    method: int


def _unpack(fmt: struct.Struct, buf: bytes, at: int, what: str) -> tuple:
    if at < 0 or at + fmt.size > len(buf):
        raise ZipError(f"{what} is cut off")
    return fmt.unpack_from(buf, at)


def _end_of_directory(f: BinaryIO, size: int) -> tuple[int, int, int, int]:
    """(record count, directory offset, directory size, where the directory must end) from the end records."""
    tail_at = max(0, size - _EOCD_SEARCH)
    f.seek(tail_at)
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0:
        raise ZipError("no end-of-central-directory record")
    _, disk, cd_disk, n_disk, n, cd_size, cd_offset, _ = _unpack(_END, tail, at, "end record")
    end_at = tail_at + at
    if (disk, cd_disk) != (0, 0) or n_disk != n:
        raise ZipError("multi-volume archives are not supported")
    if _FULL32 in (cd_size, cd_offset) or n == _FULL16:
        loc = _unpack(_ZIP64_LOCATOR, tail, at - _ZIP64_LOCATOR.size, "zip64 locator")
        if loc[0] != 0x07064B50:
            raise ZipError("zip64 fields without a zip64 locator")
        z64_at = loc[2]
        if not 0 <= z64_at <= end_at - _ZIP64_LOCATOR.size - _ZIP64_END.size:
            raise ZipError("zip64 end record lies outside the file")
        f.seek(z64_at)
        z64 = _unpack(_ZIP64_END, f.read(_ZIP64_END.size), 0, "zip64 end record")
        if z64[0] != 0x06064B50:
            raise ZipError("bad zip64 end record signature")
        n, cd_size, cd_offset, end_at = z64[7], z64[8], z64[9], z64_at
    if cd_offset + cd_size > end_at:
        raise ZipError(f"central directory [{cd_offset}, +{cd_size}) overruns its end record at {end_at}")
    if n > MAX_RECORDS or n * _CENTRAL.size > cd_size or cd_size > MAX_DIRECTORY:
        raise ZipError(f"central directory of {cd_size} bytes cannot hold {n} records")
    return n, cd_offset, cd_size, end_at


def _zip64_values(extra: bytes, wanted: list[bool]) -> list[int]:
    """The zip64 extra field's values, for the 32-bit fields that are saturated (in the order of `wanted`)."""
    at, out = 0, []
    while at + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, at)
        if tag == 1:
            body = extra[at + 4:at + 4 + n]
            need = sum(wanted)
            if len(body) < 8 * need:
                raise ZipError("zip64 extra field is too short")
            out = list(struct.unpack_from(f"<{need}Q", body))
            break
        at += 4 + n
    if len(out) < sum(wanted):
        raise ZipError("saturated sizes without a zip64 extra field")
    return out


def _central_records(directory: bytes, n: int) -> list[tuple[bytes, int, ZipRecord]]:
    """(raw name, local header offset, record with its data offset still unknown) for each directory entry."""
    out, at = [], 0
    for _ in range(n):
        (sig, _, _, flags, method, _, _, crc, csize, size, name_len, extra_len, comment_len, disk, _, _,
         offset) = _unpack(_CENTRAL, directory, at, "central directory")
        if sig != 0x02014B50:
            raise ZipError(f"bad central directory entry at {at}")
        start = at + _CENTRAL.size
        if start + name_len + extra_len + comment_len > len(directory):
            raise ZipError("central directory entry is cut off")
        raw = directory[start:start + name_len]
        extra = directory[start + name_len:start + name_len + extra_len]
        wanted = [size == _FULL32, csize == _FULL32, offset == _FULL32, disk == _FULL16]
        values = iter(_zip64_values(extra, wanted) if any(wanted[:3]) else [])
        size = next(values) if wanted[0] else size
        csize = next(values) if wanted[1] else csize
        offset = next(values) if wanted[2] else offset
        try:
            name = raw.decode("utf-8") if flags & 0x800 else raw.decode("cp437")
        except UnicodeDecodeError:
            raise ZipError("a record name is not valid UTF-8") from None
        if flags & 1:
            raise ZipError(f"record {name!r} is encrypted")
        if method not in (STORED, DEFLATED):
            raise ZipError(f"record {name!r}: compression method {method} is not supported")
        if size > (csize if method == STORED else 1100 * csize + 64):  # deflate expands at most ~1032:1
            raise ZipError(f"record {name!r}: {csize} stored bytes cannot hold {size}")
        out.append((raw, offset, ZipRecord(name, -1, size, csize, crc, method)))
        at = start + name_len + extra_len + comment_len
    return out


def read_zip(path: Path) -> dict[str, ZipRecord]:
    """Every record of a zip file, its data offset read from its local header; raises ZipError."""
    records: dict[str, ZipRecord] = {}
    with open(path, "rb") as f:
        n, cd_offset, cd_size, _ = _end_of_directory(f, f.seek(0, 2))
        f.seek(cd_offset)
        for raw, offset, rec in _central_records(f.read(cd_size), n):
            if rec.name in records:
                raise ZipError(f"record {rec.name!r} appears twice")
            if offset + _LOCAL.size + len(raw) > cd_offset:
                raise ZipError(f"record {rec.name!r}: local header at {offset} lies outside the data area")
            f.seek(offset)
            head = f.read(_LOCAL.size + len(raw))
            sig, _, _, method, _, _, _, _, _, name_len, extra_len = _unpack(_LOCAL, head, 0, "local header")
            if sig != 0x04034B50 or method != rec.method or head[_LOCAL.size:] != raw or name_len != len(raw):
                raise ZipError(f"record {rec.name!r}: local header disagrees with the central directory")
            data = offset + _LOCAL.size + name_len + extra_len
            if data + rec.compressed_size > cd_offset:
                raise ZipError(f"record {rec.name!r}: {rec.compressed_size} bytes at {data} run into the central "
                               f"directory")
            records[rec.name] = replace(rec, data_offset=data)
    spans = sorted((r.data_offset, r.data_offset + r.compressed_size, r.name) for r in records.values())
    for (_, end, a), (start, _, b) in pairwise(spans):
        if start < end:
            raise ZipError(f"records {a!r} and {b!r} overlap")
    return records


def read_record(f: BinaryIO, rec: ZipRecord, out: memoryview) -> int:
    """Fill `out` (rec.size bytes) with the record's uncompressed bytes; returns their CRC-32."""
    f.seek(rec.data_offset)
    if rec.method == STORED:
        got = f.readinto(out)
        if got != rec.size:
            raise ZipError(f"record {rec.name!r} is cut off: {got} of {rec.size} bytes")
        return crc32(out)
    inflate, at, left, crc = zlib.decompressobj(-15), 0, rec.compressed_size, 0
    while not inflate.eof:
        chunk = inflate.unconsumed_tail
        if not chunk:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise ZipError(f"record {rec.name!r} is cut off")
            left -= len(chunk)
        try:
            piece = inflate.decompress(chunk, rec.size - at + 1)  # bounded: never more than the stated size + 1
        except zlib.error as exc:
            raise ZipError(f"record {rec.name!r} does not inflate ({exc})") from None
        if at + len(piece) > rec.size:
            raise ZipError(f"record {rec.name!r} inflates past its stated size {rec.size}")
        out[at:at + len(piece)] = piece
        crc = crc32(piece, crc)
        at += len(piece)
    if at != rec.size:
        raise ZipError(f"record {rec.name!r} inflates to {at} bytes, its header says {rec.size}")
    return crc
