"""The protobuf wire format, as much of it as MindSpore's files use: varints and length-delimited fields.

Own framing instead of the protobuf package so that `.ckpt` and strategy files are read and written without
mindspore or protobuf installed.
"""
from __future__ import annotations

from collections.abc import Iterator

VARINT, LEN = 0, 2


def varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            break
    raise ValueError("bad varint")


def encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative ints are sent as 64-bit two's complement
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def signed(value: int) -> int:
    """An int32/int64 field's varint as a Python int."""
    return value - (1 << 64) if value >= 1 << 63 else value


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field of one message: ints for varints, bytes for the rest."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = varint(buf, pos, end)
            yield number, wire, value
        elif wire == LEN:
            length, pos = varint(buf, pos, end)
            if pos + length > end:
                raise ValueError(f"field {number} runs past the end of its message")
            yield number, wire, buf[pos:pos + length]
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire} for field {number}")


def repeated_ints(wire: int, value: int | bytes) -> list[int]:
    """One occurrence of a repeated integer field, packed or not."""
    if wire == VARINT:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = varint(value, pos, len(value))
        out.append(v)
    return out


def int_field(number: int, value: int) -> bytes:
    return encode_varint(number << 3 | VARINT) + encode_varint(value)


def len_field(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | LEN) + encode_varint(len(payload)) + payload
