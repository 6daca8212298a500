"""JSON files a user hands us (configs, indexes, manifests, strategies): read with limits, refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError

MAX_JSON = 64 << 20  # far above any real one (a 6B index lists 200 tensors), far below a harmful one


def parse_json(data: bytes | str, where) -> object:
    """Any JSON value; malformed text, too-deep nesting and too-long integers are refused naming `where`."""
    try:
        doc = json.loads(data)
        json.dumps(doc, ensure_ascii=False).encode()  # a lone surrogate ("\ud800") parses, but is no text
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError, and so
        # is a 4301-digit integer; UnicodeEncodeError is one too
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: not valid JSON ({first})") from None
    return doc


def read_json(path, what: str = "JSON") -> dict:
    """A JSON object from a file of at most MAX_JSON bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if len(data) > MAX_JSON:
        raise CheckpointError(f"{path}: larger than {MAX_JSON >> 20} MiB, too large for a {what} file")
    doc = parse_json(data, path)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def json_text(data) -> str:
    """How this toolkit writes JSON: indented, UTF-8 as it is, a final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_json(path: Path, data) -> None:
    path.write_text(json_text(data))
