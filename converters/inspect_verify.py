"""`inspect` (what a checkpoint holds) and `verify` (do two checkpoints hold the same model)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, open_checkpoint
from .convert import _split_names, source_config
from .dtypes import to_float32
from .errors import CheckpointError
from .names import detect_layout, weight_map


def _rearranged(ckpt: Checkpoint, flag: bool) -> bool:
    return flag or bool((ckpt.manifest or {}).get("layout", {}).get("rearrange_rope", False))


def inspect(path: Path) -> dict:
    with open_checkpoint(path) as ckpt:
        weights, others = _split_names(ckpt)
        try:
            layout = detect_layout(weights, _rearranged(ckpt, False)).describe()
        except CheckpointError as exc:
            layout = f"unknown ({exc})"
        crc = [h.crc_ok() for h in ckpt.handles if hasattr(h, "crc_ok")]
        return {
            "path": str(path), "format": ckpt.format, "files": [str(f) for f in ckpt.files], "layout": layout,
            "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
                        for t in ckpt.tensors.values()],
            "strings": ckpt.strings, "count": len(ckpt.tensors), "bytes": ckpt.nbytes,
            "dtypes": dict(Counter(t.dtype for t in ckpt.tensors.values())),
            "non_weights": {k: v for k, v in others.items() if v}, "crc_ok": [c for c in crc if c is not None],
        }


def _canonical(ckpt: Checkpoint, rearranged: bool, config: Path | None):
    weights, _ = _split_names(ckpt)
    layout = detect_layout(weights, rearranged)
    cfg = source_config(ckpt, layout, config)
    return layout, cfg, weight_map(layout, cfg)


def verify(a: Path, b: Path, atol: float = 0.0, a_rearranged: bool = False, b_rearranged: bool = False) -> dict:
    """Compare the canonical tensors of two checkpoints: bit-exact when dtypes match, else max abs difference."""
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        la, cfg_a, map_a = _canonical(ca, _rearranged(ca, a_rearranged), None)
        lb, cfg_b, map_b = _canonical(cb, _rearranged(cb, b_rearranged), None)
        if cfg_a.canonical_shapes() != cfg_b.canonical_shapes():
            raise CheckpointError(f"{a} and {b} hold models of different shapes")
        rows, failed = [], 0
        for ma, mb in zip(map_a, map_b):
            ra = [ca.tensors[p.name] for p in ma.pieces]
            rb = [cb.tensors[p.name] for p in mb.pieces]
            ta = ma.scatter([r.read() for r in ra])
            tb = mb.scatter([r.read() for r in rb])
            da, db = ra[0].dtype, rb[0].dtype
            exact = da == db and np.array_equal(ta.view(np.uint8), tb.view(np.uint8))
            diff = 0.0 if exact else float(np.max(np.abs(to_float32(ta, da).astype(np.float64)
                                                          - to_float32(tb, db)), initial=0.0))
            ok = exact or diff <= atol
            failed += not ok
            rows.append({"name": ma.canonical, "a_dtype": da, "b_dtype": db, "bit_exact": exact,
                         "max_abs_diff": diff, "ok": ok})
            for r in ra + rb:
                r.release()
        return {"a": str(a), "b": str(b), "a_layout": la.describe(), "b_layout": lb.describe(), "atol": atol,
                "tensors": rows, "compared": len(rows), "mismatched": failed, "ok": failed == 0}
