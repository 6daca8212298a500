"""Uncompressed (STORED) zip archives written one record at a time, the container torch.save uses.

A record's CRC-32 can be given after its bytes are written: `finish` patches it into the local header in place.
That lets a caller compute the checksum on another thread while it writes the next record (`zipfile` computes
it on the writing thread, which costs a conversion ~5 s per 12.5 GB). Every record and the end of the archive
carry zip64 fields, as torch's own writer emits them, so sizes and offsets beyond 4 GiB need no second path.
"""
from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

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
        self.crc(name, zlib.crc32(data))

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
