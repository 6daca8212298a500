"""CRC-32 (the zip and MindSpore-trailer polynomial) of a file assembled from the CRCs of its pieces.

A conversion reads a file's tensors out of order and on several threads, so the checksum of the whole file is
built from per-piece CRCs with `crc32_combine` (zlib's algorithm: multiply by x^(8·len) modulo the polynomial),
instead of reading the file a second time in order.
"""
from __future__ import annotations

try:  # ISA-L's CRC-32 (carry-less multiply): faster than zlib's, same values; zlib's where the wheel is missing
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32

_POLY = 0xEDB88320  # reflected CRC-32 polynomial
_ONE = 1 << 31  # x^0 in the reflected representation


def _multmodp(a: int, b: int) -> int:
    """a(x)·b(x) modulo the CRC polynomial."""
    m, p = _ONE, 0
    while m:
        if a & m:
            p ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
        m >>= 1
    return p


_X2N = [_ONE >> 1]  # x^(2^k): x^1, x^2, x^4, …
for _ in range(63):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def _x8nmodp(n: int) -> int:
    """x^(8n) modulo the polynomial."""
    p, k = _ONE, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc1 = crc(A), crc2 = crc(B) and len(B)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


class FileCrc:
    """The CRC-32 of bytes [0, end) of a file, from pieces reported in any order; the gaps between them (record
    headers, entries nobody read) are read from the file when the total is asked for."""

    def __init__(self, path, end: int):
        self.path, self.end = path, end
        self._pieces: dict[int, tuple[int, int]] = {}  # offset → (length, crc)

    def add(self, offset: int, length: int, crc: int) -> None:
        self._pieces[offset] = (length, crc)

    def value(self) -> int:
        crc, at = 0, 0
        with open(self.path, "rb") as f:
            for offset in sorted(self._pieces) + [self.end]:
                if offset < at:
                    raise AssertionError("overlapping checksum pieces")
                crc = _crc_of_range(f, at, offset - at, crc)
                if offset == self.end:
                    break
                length, piece = self._pieces[offset]
                crc, at = crc32_combine(crc, piece, length), offset + length
        return crc


def _crc_of_range(f, offset: int, n: int, crc: int = 0, block: int = 16 << 20) -> int:
    f.seek(offset)
    while n > 0:
        chunk = f.read(min(block, n))
        if not chunk:
            raise EOFError(f"file ends {n} bytes early")
        crc = crc32(chunk, crc)
        n -= len(chunk)
    return crc
