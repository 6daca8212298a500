"""`inspect` (what a checkpoint holds) and `verify` (do two checkpoints hold the same model)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .checkpoint import open_checkpoint
from .dtypes import to_float32
from .errors import CheckpointError
from .names import classify, detect_layout
from .source import NON_WEIGHTS, Source, manifest_layout


def _checksums(ckpt) -> str:
    """Read every tensor once, which holds each to its file's checksums, then the whole-file ones."""
    for ref in ckpt.tensors.values():
        ref.read()
        ref.release()
    ckpt.check_complete()
    n = sum(getattr(h, "has_crc", False) for h in ckpt.handles)
    return f"ok ({n} of {len(ckpt.handles)} files carry checksums, all match)" if n else "none in these files"


def inspect(path: Path, verify_checksums: bool = True) -> dict:
    with open_checkpoint(path, verify_checksums) as ckpt:
        weights, others = [], {}
        for name in ckpt.tensors:
            kind = classify(name)
            if kind == "weight":
                weights.append(name)
            else:
                others.setdefault(NON_WEIGHTS[kind], []).append(name)
        rearranged = manifest_layout(ckpt).get("rearrange_rope", False) is True
        try:
            layout = detect_layout(weights, rearranged, str(path)).describe()
        except CheckpointError as exc:
            layout = f"unknown ({exc})"
        return {
            "path": str(path), "format": ckpt.format, "files": [str(f) for f in ckpt.files], "layout": layout,
            "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
                        for t in ckpt.tensors.values()],
            "strings": ckpt.strings, "count": len(ckpt.tensors), "bytes": ckpt.nbytes,
            "dtypes": dict(Counter(t.dtype for t in ckpt.tensors.values())), "non_weights": others,
            "checksums": _checksums(ckpt) if verify_checksums else "not checked (--no-crc-check)",
        }


def verify(a: Path, b: Path, atol: float = 0.0, a_rearranged: bool = False, b_rearranged: bool = False,
           verify_checksums: bool = True) -> dict:
    """Compare the canonical tensors of two checkpoints: bit-exact when dtypes match, else max abs difference."""
    with Source.open(a, a_rearranged or None, verify_checksums=verify_checksums) as sa, \
            Source.open(b, b_rearranged or None, verify_checksums=verify_checksums) as sb:
        if sa.cfg.canonical_shapes() != sb.cfg.canonical_shapes():
            raise CheckpointError(f"{a} and {b} hold models of different shapes")
        rows, failed = [], 0
        ga, _ = sa.groups(sa.layout)
        gb, _ = sb.groups(sb.layout)
        for x, y in zip(ga, gb):
            (ta, da), (tb, db) = sa.canonical(x), sb.canonical(y)
            exact = da == db and np.array_equal(ta.view(np.uint8), tb.view(np.uint8))
            diff = 0.0 if exact else float(np.max(np.abs(to_float32(ta, da).astype(np.float64)
                                                          - to_float32(tb, db)), initial=0.0))
            ok = exact or diff <= atol
            failed += not ok
            rows.append({"name": x.source.canonical, "a_dtype": da, "b_dtype": db, "bit_exact": exact,
                         "max_abs_diff": diff, "ok": ok})
            sa.release(x)
            sb.release(y)
        sa.ckpt.check_complete()
        sb.ckpt.check_complete()
        return {"a": str(a), "b": str(b), "a_layout": sa.layout.describe(), "b_layout": sb.layout.describe(),
                "atol": atol, "tensors": rows, "compared": len(rows), "mismatched": failed, "ok": failed == 0}
