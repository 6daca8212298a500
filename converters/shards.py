"""Per-rank MindSpore checkpoints of a distributed run: found, checked against the strategy, and seen as one
checkpoint whose tensors are assembled from their slices on read; and the other way, a full checkpoint cut into
rank files for a strategy.

Each parameter's slices are read once per distinct slice (replicas are skipped), straight into the full tensor,
so memory is bounded by the largest parameter.
"""
from __future__ import annotations

import math
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from glm2_core.dtypes import BY_NAME, nbytes
from glm2_core.errors import CheckpointError
from glm2_core.files import CONFIG, STRATEGY, TRAINING
from glm2_core.names import MINDPET, OPTIMIZER_PREFIXES, classify
from glm2_core.outputs import MODEL, check_output, stamp

from .adapters import read_adapter
from .checkpoint import Checkpoint, format_of, open_checkpoint, open_file
from .convert import Conversion, Summary, _progress, convert, request
from .formats.base import TensorRef
from .formats.ckpt import CkptWriter
from .model_folder import copy_files
from .output import fingerprints, staged_folder
from .runs import base_identity, check_base, epoch_step, newest_complete, record_of, recorded_lora, run_folder
from .strategy import ParamLayout, Strategy, load_strategy

SHARDS = "rank shards"  # the kind of folder `split` writes

RANK_DIR = re.compile(r"^rank_(\d+)$")
RANK_FILES = ("*.ckpt", "*.safetensors")  # MindSpore's save_checkpoint formats (format="ckpt" / "safetensors")


@dataclass
class MergeStats:
    ranks: int
    files: dict[int, str]
    notes: list[str] = field(default_factory=list)
    parameters: int = 0
    bytes_read: int = 0
    replicas_skipped: int = 0
    copied: list[str] = field(default_factory=list)  # bookkeeping entries outside the strategy, taken from one rank
    run_folder: Path | None = None  # where the model's config.json (and tokenizer) beside the rank folders are

    def lines(self) -> list[str]:
        out = [f"  {self.ranks} ranks, {self.parameters} parameters laid out by the strategy, "
               f"{self.bytes_read / 1e6:.1f} MB of slices read, {self.replicas_skipped} replica slices skipped"]
        out += [f"  {n}" for n in self.notes]
        if self.copied:
            out.append(f"  not in the strategy, taken from the first rank holding them: {', '.join(self.copied)}")
        return out


def _rank_dirs(src: Path) -> dict[int, Path]:
    for root in (src, src / TRAINING):  # a MindFormers output folder holds checkpoint/rank_{r}
        if root.is_dir():
            found = {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := RANK_DIR.match(p.name))}
            if found:
                return found
    raise CheckpointError(f"{src}: no rank_N folders (expected SRC/rank_0/…ckpt or …safetensors as MindSpore and "
                          f"MindFormers lay them out)")


def discover(sources: list[Path], ranks: int) -> tuple[dict[int, Path], list[str]]:
    """The checkpoint file of every rank 0…ranks-1, and notes on how they were chosen.

    SRC is one folder of rank_N subfolders (or a MindFormers output folder), or the rank files in rank order. In a
    rank folder the newest `-{epoch}_{step}.ckpt` that every rank has is used — a rank that died while saving
    leaves the previous complete set — and files without that suffix go by name, as MindSpore picks them."""
    if len(sources) > 1 or sources[0].is_file():
        if len(sources) != ranks:
            raise CheckpointError(f"the strategy lays out {ranks} ranks, {len(sources)} files were given")
        for p in sources:
            if not p.is_file():
                raise CheckpointError(f"{p}: no such rank file")
        return dict(enumerate(sources)), []
    candidates = _rank_candidates(sources[0], ranks)
    chosen, notes = _newest_set(sources[0], candidates)
    for r, files in candidates.items():
        if len(files) > 1:
            notes.append(f"rank {r}: using {chosen[r].name} of {len(files)} checkpoints")
    return chosen, notes


def _rank_candidates(src: Path, ranks: int) -> dict[int, list[Path]]:
    """The checkpoint files of each rank's folder, by name."""
    if not src.exists():
        raise CheckpointError(f"{src}: no such folder")
    dirs = _rank_dirs(src)
    missing = [r for r in range(ranks) if r not in dirs]
    if missing:
        raise CheckpointError(f"{src}: rank {missing[0]} is missing (rank_{missing[0]}/): the strategy lays out "
                              f"{ranks} ranks")
    extra = sorted(r for r in dirs if r >= ranks)
    if extra:
        raise CheckpointError(f"{src}: rank_{extra[0]}/ lies beyond the strategy's {ranks} ranks (wrong strategy?)")
    candidates = {}
    for r in range(ranks):
        kinds = [sorted(p for p in dirs[r].glob(g) if p.is_file()) for g in RANK_FILES]
        if all(kinds):
            raise CheckpointError(f"{dirs[r]}: holds both .ckpt and .safetensors files; give the rank files of one "
                                  f"checkpoint explicitly")
        candidates[r] = kinds[0] or kinds[1]
        if not candidates[r]:
            raise CheckpointError(f"{dirs[r]}: rank {r} has no .ckpt or .safetensors file")
    return candidates


def _newest_set(src: Path, candidates: dict[int, list[Path]]) -> tuple[dict[int, Path], list[str]]:
    """Each rank's file of the newest epoch/step every rank holds (runs.newest_complete), or its last by name
    when the files carry no epoch/step."""
    keyed = {r: {epoch_step(p): p for p in files} for r, files in candidates.items()}
    if any(None in k for k in keyed.values()):
        return {r: files[-1] for r, files in candidates.items()}, []
    best = newest_complete({r: set(k) for r, k in keyed.items()})
    if best is None:
        raise CheckpointError(f"{src}: the ranks share no epoch/step: no complete checkpoint set")
    newest = max(max(k) for k in keyed.values())
    notes = [] if newest == best else [f"epoch {newest[0]} step {newest[1]} is incomplete (not on every rank); "
                                       f"using epoch {best[0]} step {best[1]}"]
    return {r: k[best] for r, k in keyed.items()}, notes


def layout_of(strategy: Strategy, name: str) -> ParamLayout | None:
    """A parameter's layout; optimizer moments (`adam_m.X`, …) follow their weight when the file lists only it."""
    if name in strategy.layouts:
        return strategy.layouts[name]
    for prefix in OPTIMIZER_PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in strategy.layouts:
            return strategy.layouts[name[len(prefix):]]
    return None


def _uncovered(name: str, strategy: Strategy) -> CheckpointError:
    return CheckpointError(f"{strategy.source}: the strategy does not cover parameter {name!r} (a strategy of another "
                           f"run? LoRA runs must save strategies with only_trainable_params: False)")


def _assembler(full: tuple[int, ...], dtype: str, pieces: list[tuple[tuple[slice, ...], TensorRef]],
               stats: MergeStats):
    """Reads a parameter's distinct slices into one new array of the full shape."""
    def read() -> np.ndarray:
        out = np.empty(full, BY_NAME[dtype].storage)
        for box, ref in pieces:
            target = out[box]
            if ref.into is not None and target.flags.c_contiguous:  # a run of whole rows: straight from disk
                ref.into(target)
            else:
                target[...] = ref.read()
            ref.release()
            stats.bytes_read += ref.nbytes
        return out
    return read


def _geometry(where: str, compute, *args):
    """A layout computation; what it refuses is the strategy file's fault, so the message names it."""
    try:
        return compute(*args)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _pieces(name: str, lay: ParamLayout, by_rank: dict[int, dict[str, TensorRef]],
            stats: MergeStats, where: str) -> tuple[tuple[int, ...], str, list]:
    holders = lay.ranks()
    lacking = [r for r in holders if name not in by_rank[r]]
    if lacking:
        raise CheckpointError(f"{stats.files[lacking[0]]}: lacks {name!r}, which the strategy places on rank "
                              f"{lacking[0]} (a file of another run?)")
    first = by_rank[holders[0]][name]
    full = _geometry(where, lay.full_shape, first.shape, name)
    distinct: dict[tuple, TensorRef] = {}
    for r in holders:
        ref = by_rank[r][name]
        box = _geometry(where, lay.box, r - holders[0], full)
        want = tuple(s.stop - s.start for s in box)
        if ref.shape != want or ref.dtype != first.dtype:
            raise CheckpointError(f"{ref.file}: {name!r} is {ref.dtype} {list(ref.shape)}, the strategy gives rank "
                                  f"{r} a {first.dtype} slice {list(want)} (a file of another run?)")
        key = tuple((s.start, s.stop) for s in box)
        if key in distinct:
            stats.replicas_skipped += 1
        else:
            distinct[key] = ref
    covered = sum(math.prod(b - a for a, b in key) for key in distinct)
    if covered != math.prod(full):
        raise CheckpointError(f"{where}: {name!r}: the rank slices cover {covered} of {math.prod(full)} values")
    return full, first.dtype, [(tuple(slice(a, b) for a, b in key), ref) for key, ref in distinct.items()]


def open_sharded(sources: list[Path], strategy_path: Path) -> tuple[Checkpoint, MergeStats]:
    """The rank files of a run (.ckpt or .safetensors) as one lazy Checkpoint (use it as a context manager); its
    folder is the run folder when one holds the model's config.json beside the rank folders."""
    strategy = load_strategy(strategy_path)
    files, notes = discover([Path(s) for s in sources], strategy.ranks)
    formats = {format_of(p) for p in files.values()}
    if len(formats) != 1:
        raise CheckpointError(f"{sources[0]}: the rank files mix formats ({', '.join(sorted(formats))})")
    first = files[0]
    folder = run_folder(first.parent.parent if RANK_DIR.match(first.parent.name) else first.parent)
    stats = MergeStats(strategy.ranks, {r: str(p) for r, p in files.items()}, notes, run_folder=folder)
    ckpt = Checkpoint(Path(sources[0]), list(files.values()), formats.pop(), folder=folder,
                      assembled_by=Path(strategy_path))
    try:
        by_rank = {}
        for r, p in files.items():
            opened = ckpt._stack.enter_context(open_file(p))
            ckpt.handles.append(opened)
            by_rank[r] = opened.tensors
            if r == 0:
                ckpt.strings.update(getattr(opened, "strings", {}))
        order = list(dict.fromkeys(n for r in sorted(by_rank) for n in by_rank[r]))
        for name in order:
            lay = layout_of(strategy, name)
            if lay is None:
                if classify(name) in ("weight", "lora"):
                    raise _uncovered(name, strategy)
                ckpt.tensors[name] = by_rank[min(r for r in by_rank if name in by_rank[r])][name]
                stats.copied.append(name)
                continue
            full, dtype, pieces = _pieces(name, lay, by_rank, stats, strategy.source)
            ckpt.tensors[name] = TensorRef(name, full, dtype, pieces[0][1].file,
                                           _assembler(full, dtype, pieces, stats))
            stats.parameters += 1
    except BaseException:
        ckpt.close()
        raise
    return ckpt, stats


@dataclass
class SplitSummary:
    src: str
    dst: str
    ranks: int
    parameters: int
    replicated: list[str]
    bytes_written: int
    seconds: float

    def lines(self) -> list[str]:
        rate = self.bytes_written / self.seconds / 1e6 if self.seconds else 0.0
        out = [f"{self.src} -> {self.dst}: {self.ranks} rank files, {self.parameters} parameters laid out, "
               f"{self.bytes_written / 1e6:.1f} MB written in {self.seconds:.2f} s ({rate:.0f} MB/s)"]
        if self.replicated:
            out.append(f"  not in the strategy, copied to every rank: {', '.join(self.replicated)}")
        return out


def split(full: Path, strategy_path: Path, dst: Path, *, prefix: str = "glm2_rank_", overwrite: bool = False,
          progress: bool = True) -> SplitSummary:
    """Cut a full MindSpore checkpoint into `dst/rank_{r}/{prefix}{r}.ckpt` for the strategy; the strategy
    files are copied to `dst/strategy/`. Each tensor is read once and its slices go to every rank's file."""
    started = time.perf_counter()
    inputs = (full, strategy_path)
    check_output(dst, overwrite, inputs, kind=SHARDS)
    strategy = load_strategy(strategy_path)
    with open_checkpoint(full) as ckpt:
        if ckpt.format != "ckpt":
            raise CheckpointError(f"{full}: split reads a MindSpore .ckpt checkpoint, not {ckpt.format}")
        watched = fingerprints(ckpt.files)
        plan = _split_plan(ckpt, strategy, full)
        beside = [f for f in (ckpt.folder / CONFIG, *ckpt.tokenizer_files) if f.is_file()]  # so merging DST back
        # needs no --config
        strategy_path = Path(strategy_path)
        given = [s for s in (sorted(strategy_path.iterdir()) if strategy_path.is_dir() else [strategy_path])
                 if s.is_file()]
        need = sum(_rank_bytes(ref, lay, holders) for ref, lay, holders in plan) + \
            sum(f.stat().st_size for f in beside + given)
        with staged_folder(dst, overwrite, inputs, need, SHARDS, watched) as tmp, \
                _progress(ckpt.nbytes, progress, f"split {full.name}") as bar:
            written = _write_ranks(tmp, plan, strategy.ranks, prefix, bar.update)
            ckpt.check_complete()
            copy_files(tmp, beside)
            (tmp / STRATEGY).mkdir()
            copy_files(tmp / STRATEGY, given)
            stamp(tmp, SHARDS, source=str(Path(full).resolve()))
    replicated = [ref.name for ref, lay, _ in plan if lay is None]
    return SplitSummary(str(full), str(dst), strategy.ranks, len(plan) - len(replicated), replicated, written,
                        time.perf_counter() - started)


def _split_plan(ckpt: Checkpoint, strategy: Strategy, full: Path) -> list[tuple[TensorRef, ParamLayout | None, range]]:
    """Every tensor with its layout (None: copied whole to every rank) and the ranks that hold it."""
    plan = []
    for name, ref in ckpt.tensors.items():
        lay = layout_of(strategy, name)
        if lay is None and classify(name) in ("weight", "lora"):
            raise _uncovered(name, strategy)
        if lay is not None:
            _geometry(strategy.source, lay.check_full, ref.shape, name)
        plan.append((ref, lay, range(strategy.ranks) if lay is None else lay.ranks()))
    missing = [n for n in strategy.layouts if classify(n) == "weight" and n not in ckpt.tensors]
    if missing:
        raise CheckpointError(f"{full}: lacks {missing[0]!r}, which the strategy lays out")
    return plan


def _rank_bytes(ref: TensorRef, lay: ParamLayout | None, holders: range) -> int:
    """The bytes of a tensor's slices over every rank that holds one (a replicated one, whole on each)."""
    if lay is None:
        return ref.nbytes * len(holders)
    return sum(nbytes(tuple(s.stop - s.start for s in lay.box(r - holders[0], ref.shape)), ref.dtype)
               for r in holders)


def _write_ranks(folder: Path, plan, ranks: int, prefix: str, on_done) -> int:
    """`folder/rank_{r}/{prefix}{r}.ckpt` for every rank, each tensor read once; returns the bytes written."""
    written = 0
    with ExitStack() as files:
        writers = {}
        for r in range(ranks):
            (folder / f"rank_{r}").mkdir()
            writers[r] = CkptWriter(files.enter_context(open(folder / f"rank_{r}" / f"{prefix}{r}.ckpt", "wb")))
        for ref, lay, holders in plan:
            arr = ref.read()
            for r in holders:
                part = arr if lay is None else arr[lay.box(r - holders[0], ref.shape)]
                writers[r].write(ref.name, np.ascontiguousarray(part), ref.dtype)
                written += part.nbytes
            ref.release()
            on_done(ref.nbytes)
        for writer in writers.values():
            writer.finish()
    return written


def merge(sources: list[Path], strategy_path: Path, dst: Path, how: Conversion | None = None,
          lora_alpha: float | None = None, **options) -> tuple[Summary, MergeStats]:
    """Rank shards → one checkpoint at `dst` (MindSpore, or a HF folder), through the converter. LoRA adapters
    found in the shards are folded into the weights, with the alpha given or, for one of our runs, recorded; the
    shards of a LoRA run that saved only its adapter are folded into the run's base model, which must still be the
    one the run recorded. `how`: the conversion (or its fields as keywords). The model's config and tokenizer come
    from the run folder when it has them (the tokenizer otherwise is the bundled ChatGLM2 one, which every
    ChatGLM2-6B checkpoint shares)."""
    how = request(how, options)
    check_output(dst, how.overwrite, (*sources, strategy_path, how.config), kind=MODEL)
    ckpt, stats = open_sharded(sources, strategy_path)
    with ckpt:
        adapter = _adapter(ckpt, sources[0], stats, lora_alpha)
        base = _run_base(stats) if adapter is not None and not any(
            classify(n) == "weight" for n in ckpt.tensors) else None
        if how.config is None and stats.run_folder is not None and base is None:
            how = replace(how, config=stats.run_folder / CONFIG)
            stats.notes.append(f"config.json from {stats.run_folder}")
        inputs = (*sources, strategy_path)
        if base is not None:
            summary = convert(base, dst, how, adapter=adapter, inputs=inputs)
        else:
            summary = convert(sources[0], dst, replace(how, bundled_tokenizer=True), adapter=adapter, opened=ckpt,
                              inputs=inputs)
        stats.notes += summary.notes
    if not how.keep_optimizer:  # the converter dropped them, and its summary says so
        stats.copied = [n for n in stats.copied if classify(n) != "optimizer"]
    return summary, stats


def _adapter(ckpt: Checkpoint, source: Path, stats: MergeStats, lora_alpha: float | None):
    """The LoRA adapter the shards hold (None without one), with the alpha given or the run's recorded one."""
    if not any(MINDPET.match(n) for n in ckpt.tensors):
        return None
    recorded = recorded_lora(Path(stats.files[0]))
    if lora_alpha is None and recorded is None:
        raise CheckpointError(f"{source}: the shards hold LoRA adapters and no run record gives their "
                              f"alpha; pass the run's --lora-alpha to fold them into the merged weights")
    adapter = read_adapter(source, lora_alpha if lora_alpha is not None else float(recorded[1]["lora_alpha"]),
                           opened=ckpt)
    stats.notes.append(f"LoRA alpha {adapter.alpha:g} ({'given' if lora_alpha is not None else recorded[0]})")
    return adapter


def _run_base(stats: MergeStats) -> Path:
    """The base model of the LoRA run whose adapter-only saves these are, as its record names it, refused when
    the folder there now holds other weights."""
    first = Path(stats.files[0])
    found = record_of(first)
    recorded = found[1].get("base") if found else None
    if not isinstance(recorded, dict) or not recorded.get("path"):
        raise CheckpointError(f"{first}: holds a LoRA adapter without the weights it adapts, and no run record "
                              f"names its base model; fold it into one with `glm2-convert merge-lora BASE {first} "
                              f"DST`")
    fold = f"fold it into a base with `glm2-convert merge-lora BASE {first} DST`"
    if not Path(recorded["path"]).is_dir():
        raise CheckpointError(f"{found[0]}: the run's base model {recorded['path']} is gone; {fold}")
    check_base(found[0], recorded, base_identity(Path(recorded["path"])), f"the run's base changed; {fold}")
    stats.notes.append(f"base model {recorded['path']} (the run's, {found[0]})")
    return Path(recorded["path"])
