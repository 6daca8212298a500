"""`inspect` (what a checkpoint holds) and `verify` (do two checkpoints hold the same model)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from glm2_core.dtypes import BY_NAME, cast, to_float32
from glm2_core.errors import CheckpointError
from glm2_core.names import canonical_shapes, classify, detect_layout

from .checkpoint import open_checkpoint
from .source import NON_WEIGHTS, Source, manifest_layout, model_config


def _checksums(ckpt) -> str:
    """Read every tensor once, which holds each to its file's checksums, then the whole-file ones."""
    for ref in ckpt.tensors.values():
        ref.read()
        ref.release()
    ckpt.check_complete()
    n = sum(getattr(h, "has_crc", False) for h in ckpt.handles)
    return f"ok ({n} of {len(ckpt.handles)} files carry checksums, all match)" if n else "none in these files"


def _release(ckpt, layout) -> str:
    """The release a checkpoint's config tells, and what told it."""
    try:
        cfg = model_config(ckpt, layout, None)
    except CheckpointError as exc:
        return f"unknown ({exc})"
    return f"{cfg.release} ({cfg.told_by})"


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
            found = detect_layout(weights, rearranged, str(path))
        except CheckpointError as exc:
            layout = release = f"unknown ({exc})"
        else:
            layout, release = found.describe(), _release(ckpt, found)
        return {
            "path": str(path), "format": ckpt.format, "files": [str(f) for f in ckpt.files], "layout": layout,
            "release": release, "quantization": ckpt.quantization,
            "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
                        for t in ckpt.tensors.values()],
            "strings": ckpt.strings, "count": len(ckpt.tensors), "bytes": ckpt.nbytes,
            "dtypes": dict(Counter(t.dtype for t in ckpt.tensors.values())), "non_weights": others,
            "checksums": _checksums(ckpt) if verify_checksums else "not checked (--no-crc-check)",
        }


def common_dtype(a: str, b: str) -> str:
    """The dtype two copies of a tensor are compared in: the narrower one, as a conversion between them rounds to
    it (b's when both are as wide, e.g. float16 and bfloat16)."""
    return a if BY_NAME[a].itemsize < BY_NAME[b].itemsize else b


def _compare(ta: np.ndarray, da: str, tb: np.ndarray, db: str) -> dict:
    """Bit-exact when the dtypes agree; otherwise both are cast to their common dtype first (the comparison says
    so), so a conversion that changed the dtype is judged by what it should have written."""
    to = common_dtype(da, db)
    ca, cb = cast(ta, da, to), cast(tb, db, to)
    equal = np.array_equal(ca.view(np.uint8), cb.view(np.uint8))
    diff = 0.0 if equal else float(np.max(np.abs(to_float32(ca, to).astype(np.float64) - to_float32(cb, to)),
                                          initial=0.0))
    return {"a_dtype": da, "b_dtype": db, "compared_in": to, "bit_exact": equal and da == db, "equal": equal,
            "max_abs_diff": diff}


def verify(a: Path, b: Path, atol: float = 0.0, a_rearranged: bool = False, b_rearranged: bool = False,
           verify_checksums: bool = True) -> dict:
    """Compare the canonical tensors of two checkpoints: bit-exact when dtypes match; when they differ, the values
    after casting both to the narrower dtype (bit-exact there, else the max abs difference)."""
    with Source.open(a, a_rearranged or None, verify_checksums=verify_checksums) as sa, \
            Source.open(b, b_rearranged or None, verify_checksums=verify_checksums) as sb:
        if canonical_shapes(sa.cfg) != canonical_shapes(sb.cfg):
            raise CheckpointError(f"{a} and {b} hold models of different shapes")
        rows, failed = [], 0
        ga, _ = sa.groups(sa.layout)
        gb, _ = sb.groups(sb.layout)
        for x, y in zip(ga, gb, strict=True):
            row = {"name": x.source.canonical, **_compare(*sa.canonical(x), *sb.canonical(y))}
            row["ok"] = row["equal"] or row["max_abs_diff"] <= atol
            failed += not row["ok"]
            rows.append(row)
            sa.release(x)
            sb.release(y)
        sa.ckpt.check_complete()
        sb.ckpt.check_complete()
        return {"a": str(a), "b": str(b), "a_layout": sa.layout.describe(), "b_layout": sb.layout.describe(),
                "atol": atol, "tensors": rows, "compared": len(rows), "mismatched": failed, "ok": failed == 0,
                "casts": sorted({f"{r['a_dtype']} vs {r['b_dtype']}: cast to {r['compared_in']}" for r in rows
                                 if r["a_dtype"] != r["b_dtype"]})}


def verify_lines(report: dict) -> list[str]:
    """The human summary of `verify`: what was compared how, then every mismatch."""
    rows = report["tensors"]
    worst = max((r["max_abs_diff"] for r in rows), default=0.0)
    head = f"{report['a_layout']} vs {report['b_layout']}: {report['compared']} tensors, "
    if report["casts"]:
        head += (f"dtypes differ ({', '.join(report['casts'])}), so the values were compared after the cast: "
                 f"{sum(r['equal'] for r in rows)} equal, ")
    else:
        head += f"{sum(r['bit_exact'] for r in rows)} bit-exact, "
    out = [head + f"max abs diff {worst:.3g}, {report['mismatched']} mismatched"]
    out += [f"  MISMATCH {r['name']}: max abs diff {r['max_abs_diff']:.3g} (in {r['compared_in']})"
            for r in rows if not r["ok"]]
    return out
