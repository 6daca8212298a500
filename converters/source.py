"""A checkpoint opened as a model: its layout, config and weight map, and its weights streamed in any layout.

The converter writes what `Source.stream` yields; the MindSpore runtime loads it into parameters; `verify`
compares two of them. Only the tensors of one canonical weight are in memory at a time.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glm2_core.config import GLM2Config
from glm2_core.dtypes import BY_NAME, cast, count_nonfinite, float16_overflow, float16_overflow_count, to_float32
from glm2_core.errors import CheckpointError
from glm2_core.files import CONFIG
from glm2_core.names import OPTIMIZER_PREFIXES, Layout, Mapping, classify, detect_layout, infer_config, weight_map
from glm2_core.outputs import MANIFEST
from glm2_core.quants import quantize
from glm2_core.releases import TOLD_BY_USER

from .checkpoint import Checkpoint, open_checkpoint
from .formats.base import Closing, FileSpan, TensorRef

NON_WEIGHTS = {"optimizer": "optimizer state", "cache": "KV-cache entries", "buffer": "buffers",
               "lora": "LoRA adapters"}


def out_dtype(src: str, want: str) -> str:
    """`want` for float tensors unless it is 'keep'; other tensors keep their type."""
    return src if want == "keep" or not BY_NAME[src].is_float else want


def apply_dtype(arr: np.ndarray, name: str, src: str, dst: str, allow_overflow: bool, where: str = "",
                overflowed: dict[str, int] | None = None) -> np.ndarray:
    """`arr` cast to `dst`; values that float16 cannot hold are refused, or with `allow_overflow` written as inf
    and counted into `overflowed` (`where`: the source file, for the message)."""
    if src == dst:
        return arr
    peak = float16_overflow(arr, src) if dst == "float16" else None
    if peak is not None:
        if not allow_overflow:
            raise CheckpointError(f"{where + ': ' if where else ''}tensor {name!r}: value {peak:g} overflows float16 "
                                  f"(max 65504); pass --allow-overflow to write it as inf")
        if overflowed is not None:
            overflowed[name] = overflowed.get(name, 0) + float16_overflow_count(arr, src)  # a tensor may come in parts
    return cast(arr, src, dst)


@dataclass
class Group:
    """One canonical tensor: the names that hold it in the source and in the target layout."""
    source: Mapping
    target: Mapping
    prefix: str = ""  # optimizer moments: "adam_m." etc. before the weight names

    def src_names(self) -> list[str]:
        return [self.prefix + p.name for p in self.source.pieces]

    def dst(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(self.prefix + p.name, self.target.piece_shape(p)) for p in self.target.pieces]


def manifest_layout(ckpt: Checkpoint) -> dict:
    layout = (ckpt.manifest or {}).get("layout", {})
    if not isinstance(layout, dict):
        raise CheckpointError(f"{ckpt.folder / MANIFEST}: 'layout' is not an object")
    return layout


def model_config(ckpt: Checkpoint, layout: Layout, config_path: Path | None,
                 release: str | None = None) -> GLM2Config:
    """The checkpoint's config: the file given, its config.json, its manifest's record or its shapes; `release`:
    the one the user named (--release), where the folder cannot tell."""
    if config_path is not None:
        return GLM2Config.from_file(config_path, release)
    if ckpt.config is not None:
        return GLM2Config.from_mapping(ckpt.config, str(ckpt.folder / CONFIG), release)
    if ckpt.manifest and "config" in ckpt.manifest:
        where = str(ckpt.folder / MANIFEST)
        if not isinstance(ckpt.manifest["config"], dict):
            raise CheckpointError(f"{where}: 'config' is not an object")
        return GLM2Config.from_dict(ckpt.manifest["config"], where, release)
    cfg = infer_config({n: t.shape for n, t in ckpt.tensors.items()}, layout, str(ckpt.path))
    return dataclasses.replace(cfg, release=release, told_by=TOLD_BY_USER) if release else cfg


@dataclass
class Source(Closing):
    ckpt: Checkpoint
    layout: Layout
    cfg: GLM2Config
    mappings: list[Mapping]
    dropped: dict[str, list[str]]
    nonfinite: dict[str, int] = field(default_factory=dict)
    overflowed: dict[str, int] = field(default_factory=dict)  # values written as inf (--allow-overflow)
    proofs: list = field(default_factory=list)  # (prefetch, prove) of every tensor `stream(mapped=True)` handed
    # out mapped: owed by whoever holds those views (TensorRef)

    @classmethod
    def open(cls, path, rearranged_rope: bool | None = None, config: Path | None = None,
             opened: Checkpoint | None = None, verify_checksums: bool = True, release: str | None = None) -> Source:
        """The checkpoint at `path` (or the already `opened` one, which the Source then owns)."""
        ckpt = opened if opened is not None else open_checkpoint(path, verify_checksums)
        try:
            weights, dropped = [], {kind: [] for kind in NON_WEIGHTS.values()}
            for name in ckpt.tensors:
                kind = classify(name)
                (weights if kind == "weight" else dropped[NON_WEIGHTS[kind]]).append(name)
            dropped["non-tensor entries"] = list(ckpt.strings)
            dropped["tokenizer files linking outside the checkpoint"] = ckpt.untrusted_files
            if dropped["LoRA adapters"] and not weights:
                raise CheckpointError(f"{path}: holds only LoRA adapters ({dropped['LoRA adapters'][0]}, …), not a "
                                      f"model: fold them into their base with `glm2-convert merge-lora BASE {path} "
                                      f"DST`")
            if rearranged_rope is None:
                rearranged_rope = manifest_layout(ckpt).get("rearrange_rope", False) is True
            layout = detect_layout(weights, rearranged_rope, str(path))
            cfg = model_config(ckpt, layout, config, release)
            mappings = weight_map(layout, cfg)
            cls._check(ckpt, weights, mappings, str(path))
            return cls(ckpt, layout, cfg, mappings, dropped)
        except BaseException:
            ckpt.close()
            raise

    @staticmethod
    def _check(ckpt: Checkpoint, weights: list[str], mappings: list[Mapping], where: str) -> None:
        expected = {p.name: (m, p) for m in mappings for p in m.pieces}
        missing = [n for n in expected if n not in ckpt.tensors]
        unexpected = [n for n in weights if n not in expected]
        if missing:
            raise CheckpointError(f"{where}: missing {len(missing)} tensors the config requires, e.g. "
                                  f"{', '.join(missing[:3])}")
        if unexpected:
            raise CheckpointError(f"{where}: unexpected tensors not in the model, e.g. {', '.join(unexpected[:3])}")
        for name, (m, p) in expected.items():
            ref = ckpt.tensors[name]
            if ref.shape != m.piece_shape(p) and ckpt.assembled_by is not None:
                raise CheckpointError(f"{ckpt.assembled_by}: the rank slices of {name!r} do not fit this strategy: "
                                      f"laid out by it they make {list(ref.shape)}, the config says "
                                      f"{list(m.piece_shape(p))} (is it the strategy these shards were saved with?)")
            if ref.shape != m.piece_shape(p):
                raise CheckpointError(f"{ref.file}: tensor {name!r} has shape {list(ref.shape)}, the config says "
                                      f"{list(m.piece_shape(p))}")

    def close(self) -> None:
        self.ckpt.close()

    @property
    def dtype(self) -> str:
        return self.ckpt.tensors[self.mappings[0].pieces[0].name].dtype

    def groups(self, target: Layout, with_optimizer: bool = False) -> tuple[list[Group], list[str]]:
        """Groups of weights (and, when asked, of optimizer moments); also the optimizer entries that follow no
        weight (step counters…), which keep their names."""
        tgt = weight_map(target, self.cfg)
        groups = [Group(s, t) for s, t in zip(self.mappings, tgt, strict=True)]
        if not with_optimizer:
            return groups, []
        consumed = set()
        for prefix in OPTIMIZER_PREFIXES:
            for s, t in zip(self.mappings, tgt, strict=True):
                names = [prefix + p.name for p in s.pieces]
                if all(n in self.ckpt.tensors for n in names):
                    groups.append(Group(s, t, prefix))
                    consumed.update(names)
        extras = [n for n in self.ckpt.tensors if classify(n) == "optimizer" and n not in consumed]
        return groups, extras

    def canonical(self, group: Group, count: bool = True) -> tuple[np.ndarray, str]:
        """One canonical tensor assembled from its source pieces (NaN/Inf counted into `nonfinite` unless not
        `count`)."""
        refs = [self.ckpt.tensors[n] for n in group.src_names()]
        dtype = refs[0].dtype
        if any(r.dtype != dtype for r in refs):
            raise CheckpointError(f"{refs[0].file}: the pieces of {group.source.canonical} have different dtypes "
                                  f"({', '.join(f'{r.name}: {r.dtype}' for r in refs)})")
        parts = [r.read() for r in refs]
        for r, a in zip(refs, parts, strict=True):
            bad = count_nonfinite(a, r.dtype) if count else 0
            if bad:
                self.nonfinite[r.name] = bad
        return group.source.scatter(parts), dtype

    def release(self, group: Group) -> int:
        """Let go of a group's source bytes; returns how many there were."""
        refs = [self.ckpt.tensors[n] for n in group.src_names()]
        for r in refs:
            r.release()
        return sum(r.nbytes for r in refs)

    def as_stored(self, group: Group) -> TensorRef | None:
        """The group's one source tensor when it is, row for row, the group's one target tensor."""
        refs = [self.ckpt.tensors[n] for n in group.src_names()]
        if len(refs) != 1 or len(group.target.pieces) != 1 or group.source.pieces[0].rows is not None \
                or group.target.pieces[0].rows is not None:
            return None
        return refs[0]

    def stored_blocks(self, group: Group, kind: str | None) -> np.ndarray | None:
        """The group's one target matrix as the blocks of `kind` its file stores, when it stores it so."""
        ref = self.as_stored(group) if kind else None
        if ref is None or ref.blocks is None or ref.blocks[0] != kind:
            return None
        return ref.blocks[1]()

    def mapped(self, group: Group, dtype: str, kind: str | None) -> tuple[np.ndarray, str] | None:
        """The group's one target tensor as a view of its file's mapping (`TensorRef.mapped`) and its dtype (or
        block kind), when the target is exactly the bytes stored: the dtype kept, or the same block kind; its proof
        is added to `proofs`."""
        ref = self.as_stored(group)
        if ref is None or ref.mapped is None:
            return None
        stored = ref.blocks[0] if ref.blocks is not None else None
        if kind != stored or (stored is None and out_dtype(ref.dtype, dtype) != ref.dtype):
            return None
        try:
            view = ref.mapped()
        except OSError:  # a file system that cannot map files: read as any other
            return None
        self.proofs.append((ref.prefetch, ref.prove))
        return view, kind or ref.dtype

    def kept(self, group: Group, dtype: str, kind: str | None, mapped: bool) -> tuple[np.ndarray, str] | None:
        """The group's one target tensor exactly as stored, where it is, and its dtype or block kind: a view of its
        file's mapping (`mapped`, where the format gives one), or else its blocks of `kind`, read."""
        view = self.mapped(group, dtype, kind) if mapped else None
        if view is not None:
            return view
        stored = self.stored_blocks(group, kind)
        return None if stored is None else (stored, kind)

    def unchanged(self, group: Group, dtype: str) -> FileSpan | None:
        """The group's one target tensor as it lies in the source file, when the target stores exactly those
        bytes; its NaN/Inf are counted as the writer reads it back for its checksums."""
        ref = self.as_stored(group)
        if ref is None or out_dtype(ref.dtype, dtype) != ref.dtype:
            return None
        storage = BY_NAME[ref.dtype].storage

        def count(block: memoryview) -> None:
            bad = count_nonfinite(np.frombuffer(block, storage), ref.dtype)
            if bad:
                self.nonfinite[ref.name] = self.nonfinite.get(ref.name, 0) + bad
        return ref.span(count)

    def stream(self, groups: list[Group], dtype: str = "keep", allow_overflow: bool = False,
               on_done=lambda nbytes: None, adapter=None, spans: bool = False, blocks: dict[str, str] | None = None,
               count: bool = True, mapped: bool = False) -> Iterator[tuple[str, np.ndarray | FileSpan, str]]:
        """(target name, array, dtype) for every target tensor of `groups`, in order; with an `adapter`, its
        LoRA deltas are folded into the canonical weights they belong to (in float32, then the source dtype).
        With `spans`, a tensor whose bytes the target keeps as they are comes as a FileSpan instead of an array.
        `blocks` names target matrices wanted in llama.cpp's blocks (glm2_core.quants), by kind: each comes as
        uint8 blocks and its kind for its dtype, as the file stores them where it does, else quantized. `count`:
        NaN/Inf counted into `nonfinite`, for a conversion's summary (the runtime, which reports none, skips it).
        `mapped`: a tensor kept as stored comes as a view of its file's mapping where the format gives one, nothing
        read yet; its checksum is then owed (`proofs`).

        The next group is read on a second thread while the caller writes this one, so reading and writing
        overlap as they do in `cp` (file reads and numpy release the GIL). At most three groups are in memory:
        the one read ahead, the one being written, and the one before it while its hash finishes."""
        if adapter is not None:
            modules = {g.source.canonical.rsplit(".", 1)[0] for g in groups if not g.prefix}
            stray = sorted(set(adapter.deltas) - modules)
            if stray:
                raise CheckpointError(f"adapter modules not in the model: {', '.join(stray[:3])}")

        blocks = blocks or {}

        def load(g: Group) -> list[tuple[np.ndarray | FileSpan, str]]:
            """The group's target tensors and their dtypes."""
            delta = adapter.delta(g.source.canonical.removesuffix(".weight")) \
                if adapter is not None and not g.prefix and g.source.canonical.endswith(".weight") else None
            span = self.unchanged(g, dtype) if spans and delta is None else None
            if span is not None:
                return [(span, span.dtype)]
            kinds = [blocks.get(name) for name, _ in g.dst()]
            kept = self.kept(g, dtype, kinds[0], mapped) if delta is None else None
            if kept is not None:
                return [kept]
            arr, src_dtype = self.canonical(g, count)
            if delta is not None:
                if delta.shape != arr.shape:
                    raise CheckpointError(f"adapter delta for {g.source.canonical} has shape {list(delta.shape)}, "
                                          f"the weight {list(arr.shape)}")
                arr = cast(to_float32(arr, src_dtype) + delta, "float32", src_dtype)
            dst_dtype = out_dtype(src_dtype, dtype)
            where = str(self.ckpt.tensors[g.src_names()[0]].file)
            return [(quantize(part, src_dtype, kind), kind) if kind else
                    (apply_dtype(part, g.source.canonical, src_dtype, dst_dtype, allow_overflow, where,
                                 self.overflowed), dst_dtype)
                    for part, kind in zip(g.target.gather(arr), kinds, strict=True)]

        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
            pending = pool.submit(load, groups[0]) if groups else None
            for i, g in enumerate(groups):
                parts = pending.result()
                pending = pool.submit(load, groups[i + 1]) if i + 1 < len(groups) else None
                for (name, _), (part, part_dtype) in zip(g.dst(), parts, strict=True):
                    yield name, part, part_dtype
                del parts, part
                if i:  # one group late: the writer may still be hashing the last bytes it was given
                    on_done(self.release(groups[i - 1]))
            if groups:
                on_done(self.release(groups[-1]))
