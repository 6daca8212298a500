"""The conversion pipeline: source tensors → canonical tensors → dtype policy → target tensors → writer.

Any supported layout converts to any other; the source layout is read from the names. Only the tensors of one
canonical weight are in memory at a time.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .checkpoint import Checkpoint, open_checkpoint
from .config import GLM2Config
from .dtypes import BY_NAME, cast, count_nonfinite, float16_overflow
from .errors import CheckpointError
from .names import EMBEDDING, INV_FREQ, OPTIMIZER_PREFIXES, Layout, Mapping, classify, detect_layout, infer_config, \
    inv_freq, weight_map
from .output import WeightsWriter, hf_index, plan_shards, staged_folder, write_json

MS_WEIGHTS = {"ckpt": "mindspore_model.ckpt", "safetensors": "mindspore_model.safetensors"}


@dataclass
class Summary:
    src: str
    dst: str
    source_layout: str
    target_layout: str
    format: str
    dtype: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        rate = self.bytes / self.seconds / 1e6 if self.seconds else 0.0
        out = [f"{self.src} ({self.source_layout}) -> {self.dst} ({self.target_layout}, {self.format}, "
               f"dtype {self.dtype})",
               f"  {self.tensors} tensors, {self.bytes / 1e6:.1f} MB in {self.seconds:.2f} s ({rate:.0f} MB/s), "
               f"files: {', '.join(self.files)}"]
        for kind, names in self.dropped.items():
            if names:
                shown = ", ".join(names[:4]) + (f", … (+{len(names) - 4})" if len(names) > 4 else "")
                out.append(f"  dropped {len(names)} {kind}: {shown}")
        for name, n in self.nonfinite.items():
            out.append(f"  warning: source tensor {name} holds {n} NaN/Inf values")
        return out


def source_config(ckpt: Checkpoint, layout: Layout, config_path: Path | None) -> GLM2Config:
    if config_path is not None:
        return GLM2Config.from_file(config_path)
    if ckpt.config is not None:
        if ckpt.config.get("model_type") == "glm":
            return GLM2Config.from_glm_dict(ckpt.config, str(ckpt.folder / "config.json"))
        return GLM2Config.from_dict(ckpt.config, str(ckpt.folder / "config.json"))
    if ckpt.manifest and "config" in ckpt.manifest:
        return GLM2Config.from_dict(ckpt.manifest["config"], str(ckpt.folder / "manifest.json"))
    return infer_config({n: t.shape for n, t in ckpt.tensors.items()}, layout)


def _split_names(ckpt: Checkpoint) -> tuple[list[str], dict[str, list[str]]]:
    weights, others = [], {"optimizer state": [], "KV-cache entries": [], "buffers": [], "non-tensor entries": []}
    kinds = {"optimizer": "optimizer state", "cache": "KV-cache entries", "buffer": "buffers"}
    for name in ckpt.tensors:
        kind = classify(name)
        (weights if kind == "weight" else others[kinds[kind]]).append(name)
    others["non-tensor entries"] = [n for n in ckpt.strings]
    return weights, others


def _check_names(ckpt: Checkpoint, weights: list[str], src_map: list[Mapping], where: str) -> None:
    expected = {p.name: (m, p) for m in src_map for p in m.pieces}
    missing = [n for n in expected if n not in ckpt.tensors]
    unexpected = [n for n in weights if n not in expected]
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensors the config requires, e.g. "
                              f"{', '.join(missing[:3])}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors not in the model, e.g. {', '.join(unexpected[:3])}")
    for name, (m, p) in expected.items():
        ref = ckpt.tensors[name]
        if ref.shape != m.piece_shape(p):
            raise CheckpointError(f"{ref.file}: tensor {name!r} has shape {list(ref.shape)}, the config says "
                                  f"{list(m.piece_shape(p))}")


def _out_dtype(src: str, want: str) -> str:
    return src if want == "keep" or not BY_NAME[src].is_float else want


def _apply_dtype(arr: np.ndarray, name: str, src: str, dst: str, allow_overflow: bool) -> np.ndarray:
    if src == dst:
        return arr
    if dst == "float16" and not allow_overflow:
        peak = float16_overflow(arr, src)
        if peak is not None:
            raise CheckpointError(f"tensor {name!r}: value {peak:g} overflows float16 (max 65504); "
                                  f"pass --allow-overflow to write it as inf")
    return cast(arr, src, dst)


@dataclass
class _Group:
    """One canonical tensor to move: where its pieces come from and go to."""
    source: Mapping
    target: Mapping
    src_prefix: str = ""

    def src_names(self):
        return [self.src_prefix + p.name for p in self.source.pieces]

    def dst_names(self):
        return [self.src_prefix + p.name for p in self.target.pieces]


def convert(src, dst, *, target: Layout, fmt: str, dtype: str = "keep", hf_folder: bool = False,
            max_shard_bytes: int | None = None, overwrite: bool = False, allow_overflow: bool = False,
            keep_optimizer: bool = False, rearranged_rope: bool | None = None, config: Path | None = None,
            progress: bool = True) -> Summary:
    """Convert the checkpoint at `src` into a new folder `dst` (MindSpore, or a HF folder when `hf_folder`)."""
    if dtype != "keep" and dtype not in ("float32", "float16", "bfloat16"):
        raise CheckpointError(f"unknown dtype {dtype!r}; expected keep, float32, float16 or bfloat16")
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise CheckpointError(f"{dst}: the destination must not be the source or lie inside it")
    with open_checkpoint(src) as ckpt:
        weights, dropped = _split_names(ckpt)
        if rearranged_rope is None:
            rearranged_rope = bool((ckpt.manifest or {}).get("layout", {}).get("rearrange_rope", False))
        src_layout = detect_layout(weights, rearranged_rope)
        cfg = source_config(ckpt, src_layout, config)
        src_map = weight_map(src_layout, cfg)
        _check_names(ckpt, weights, src_map, str(src))
        groups = [_Group(s, t) for s, t in zip(src_map, weight_map(target, cfg))]
        extras: list[str] = []  # optimizer entries kept under their own names
        if keep_optimizer:
            if hf_folder:
                raise CheckpointError("--keep-optimizer: optimizer state has no place in a HF folder")
            groups, extras = _optimizer_groups(ckpt, src_map, groups, target, cfg)
            dropped["optimizer state"] = []

        plan, nonfinite = [], {}
        for g in groups:
            src_dtype = ckpt.tensors[g.src_names()[0]].dtype
            for name, p in zip(g.dst_names(), g.target.pieces):
                plan.append((name, g.target.piece_shape(p), _out_dtype(src_dtype, dtype)))
        for name in extras:
            ref = ckpt.tensors[name]
            plan.append((name, ref.shape, ref.dtype))
        restore_inv_freq = hf_folder and target.family == "chatglm"
        model_dtype = _out_dtype(ckpt.tensors[groups[0].src_names()[0]].dtype, dtype)
        if restore_inv_freq:
            at = next(i for i, item in enumerate(plan) if item[0] == EMBEDDING) + 1
            plan.insert(at, (INV_FREQ, (cfg.kv_channels // 4,), model_dtype))

        if hf_folder:
            shards = plan_shards(plan, max_shard_bytes or 2 * 10**9, fmt)
        else:
            shards = [(MS_WEIGHTS[fmt], plan)]
        metadata = {"format": "ms"} if fmt == "safetensors" and not hf_folder else \
            ({"format": "pt"} if fmt == "safetensors" else None)
        total = sum(math_bytes(s, d) for _, s, d in plan)

        with staged_folder(dst, overwrite) as tmp:
            writer = WeightsWriter(tmp, fmt, shards, metadata)
            try:
                with _progress(total, progress, f"{src.name} -> {dst.name}") as bar:
                    for g in groups:
                        _move(g, ckpt, writer, dtype, allow_overflow, nonfinite, bar)
                        if restore_inv_freq and g.source.canonical == EMBEDDING:
                            writer.write(INV_FREQ, inv_freq(cfg, model_dtype), model_dtype)
                    for name in extras:
                        ref = ckpt.tensors[name]
                        writer.write(name, ref.read(), ref.dtype)
                        ref.release()
                        bar.update(ref.nbytes)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            config_json = (cfg.glm_json(model_dtype) if target.family == "glm" else cfg.chatglm_json(model_dtype))
            write_json(tmp / "config.json", config_json)
            for f in ckpt.tokenizer_files:
                shutil.copyfile(f, tmp / f.name)
            index = hf_index(shards, fmt) if hf_folder else None
            if index:
                write_json(tmp / index[0], index[1])
            summary = Summary(str(src), str(dst), src_layout.describe(), target.describe(), fmt,
                              model_dtype, len(writer.records), total, 0.0, [f for f, _ in shards],
                              {k: v for k, v in dropped.items() if v}, nonfinite)
            write_json(tmp / "manifest.json", {
                "tool": "glm2-toolkit", "version": __version__, "source": str(src.resolve()),
                "source_layout": src_layout.as_dict(), "layout": target.as_dict(), "format": fmt,
                "dtype": model_dtype, "config": asdict(cfg), "files": [f for f, _ in shards],
                "dropped": summary.dropped, "tensors": writer.records})
    summary.seconds = time.perf_counter() - started
    return summary


def math_bytes(shape, dtype) -> int:
    return math.prod(shape) * BY_NAME[dtype].itemsize


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    # disable=None: a bar only on a terminal, never in logs
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None if enabled else True, file=sys.stderr, leave=False, mininterval=0.5)


def _move(g: _Group, ckpt: Checkpoint, writer: WeightsWriter, dtype: str, allow_overflow: bool,
          nonfinite: dict, bar) -> None:
    refs = [ckpt.tensors[n] for n in g.src_names()]
    src_dtype = refs[0].dtype
    if any(r.dtype != src_dtype for r in refs):
        raise CheckpointError(f"{refs[0].file}: the pieces of {g.source.canonical} have different dtypes "
                              f"({', '.join(f'{r.name}: {r.dtype}' for r in refs)})")
    parts = [r.read() for r in refs]
    for r, a in zip(refs, parts):
        bad = count_nonfinite(a, r.dtype)
        if bad:
            nonfinite[r.name] = bad
    out_dtype = _out_dtype(src_dtype, dtype)
    canonical = _apply_dtype(g.source.scatter(parts), g.source.canonical, src_dtype, out_dtype, allow_overflow)
    for name, a in zip(g.dst_names(), g.target.gather(canonical)):
        writer.write(name, a, out_dtype)
    for r in refs:
        r.release()
        bar.update(r.nbytes)


def _optimizer_groups(ckpt: Checkpoint, src_map: list[Mapping], groups: list[_Group], target: Layout,
                      cfg: GLM2Config) -> tuple[list[_Group], list[str]]:
    """Optimizer moments follow their weights through the map; other optimizer entries keep their names."""
    tgt_map = weight_map(target, cfg)
    consumed, out = set(), list(groups)
    for prefix in OPTIMIZER_PREFIXES:
        for s, t in zip(src_map, tgt_map):
            names = [prefix + p.name for p in s.pieces]
            if all(n in ckpt.tensors for n in names):
                out.append(_Group(s, t, prefix))
                consumed.update(names)
    extras = [n for n in ckpt.tensors if classify(n) == "optimizer" and n not in consumed]
    return out, extras
