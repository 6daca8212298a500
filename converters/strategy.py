"""MindSpore parallel strategy files, and where each rank's slice of a parameter lies in the full tensor.

A strategy is the protobuf `ParallelStrategyMap` (mindspore/train/node_strategy.proto) or its JSON form; a
pipeline run leaves one file per stage, which are merged by prefixing every name with `"{stage}-"`, as
`mindspore.merge_pipeline_strategys` does. Geometry (the rules `mindspore.transform_checkpoints` applies):

- a rank's coordinate is `unravel_index(rank, dev_matrix)`; tensor axis `a` with `tensor_map[a] = v >= 0` is cut
  `dev_matrix[-1 - v]` ways and the rank holds piece `coordinate[-1 - v]`; an axis may list several device dims
  (outer first); `-1` means replicated;
- `param_split_shape` gives uneven axis-0 piece sizes, one per slice (indexed like the slices);
- optimizer sharding (`opt_weight_shard_size`, -1 = every replica) cuts axis 0 of the model-parallel piece again,
  across the innermost device dims the tensor map leaves free; `opt_weight_shard_step` is their stride.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from glm2_core import PACKAGE
from glm2_core.errors import CheckpointError
from glm2_core.jsonio import parse_json

from .formats.protowire import LEN, fields, int_field, len_field, repeated_ints, signed

MAX_DEVICES = 1 << 16  # devices of one pipeline stage; checked before anything enumerates ranks
MAX_DIMS = 16
MAX_STAGES = 1 << 10
# field numbers of node_strategy.proto
MAP_STAGE, MAP_STRATEGY_ITEM, MAP_LAYOUT_ITEM = 1, 2, 3
DEV_MATRIX, TENSOR_MAP, SPLIT_SHAPE, FIELD, OPT_STEP, OPT_SIZE = 1, 2, 3, 5, 6, 7  # 4 (indices_offset) is not read


@dataclass(frozen=True)
class ParamLayout:
    dev_matrix: tuple[int, ...]
    tensor_map: tuple  # per axis: an int, or a tuple of device dims (outer first)
    split_shape: tuple[int, ...] = ()
    opt_step: int = 0
    opt_size: int = 0
    field: int = 0
    stage: int = 0

    @property
    def devices(self) -> int:
        return math.prod(self.dev_matrix)

    def _dims(self, axis: int) -> list[int]:
        """Indices into dev_matrix that cut `axis`, outer first."""
        m = self.tensor_map[axis]
        return [len(self.dev_matrix) - 1 - v for v in (m if isinstance(m, tuple) else (m,)) if v >= 0]

    def cuts(self) -> list[int]:
        return [math.prod(self.dev_matrix[d] for d in self._dims(a)) for a in range(len(self.tensor_map))]

    def _coordinate(self, rank: int) -> list[int]:
        coord = []
        for size in reversed(self.dev_matrix):
            coord.append(rank % size)
            rank //= size
        return coord[::-1]

    def _piece(self, coord: list[int], axis: int) -> int:
        index = 0
        for d in self._dims(axis):
            index = index * self.dev_matrix[d] + coord[d]
        return index

    def opt_parts(self) -> list[tuple[int, int]]:
        """The device dims that carry the optimizer shard, outer first, as (dim, radix): the rank's shard index
        is its coordinate in them modulo radix, read as one mixed-radix number. Empty without sharding."""
        if self.opt_step == 0 or self.opt_size == 0:
            return []
        used = {d for a in range(len(self.tensor_map)) for d in self._dims(a)}
        free = [d for d, n in enumerate(self.dev_matrix) if d not in used and n > 1]
        size = self.opt_size if self.opt_size > 0 else math.prod(self.dev_matrix[d] for d in free)
        if len(free) == 1 and math.prod(self.dev_matrix[free[0] + 1:]) != self.opt_step:
            raise CheckpointError(f"opt_weight_shard_step {self.opt_step} disagrees with device matrix "
                                  f"{list(self.dev_matrix)} (expected {math.prod(self.dev_matrix[free[0] + 1:])})")
        parts, left = [], size
        for d in reversed(free):
            radix = min(self.dev_matrix[d], left)
            if left % radix or self.dev_matrix[d] % radix:
                break
            parts.append((d, radix))
            left //= radix
            if left == 1:
                return parts[::-1]
        raise CheckpointError(f"opt_weight_shard_size {self.opt_size} does not fit the free device dims of "
                              f"device matrix {list(self.dev_matrix)} and tensor map {list(self.tensor_map)}")

    def opt_shards(self) -> int:
        return math.prod(r for _, r in self.opt_parts())

    def check(self, name: str) -> None:
        """Refuse a layout that is malformed or out of range; sizes first, since the later checks loop on them."""
        dev = self.dev_matrix
        if not 0 < len(dev) <= MAX_DIMS or any(type(n) is not int or n < 1 for n in dev) \
                or math.prod(dev) > MAX_DEVICES:
            raise CheckpointError(f"parameter {name!r}: bad device matrix {list(dev)[:MAX_DIMS]} (at most "
                                  f"{MAX_DEVICES} devices in {MAX_DIMS} dims)")
        if len(self.tensor_map) > MAX_DIMS or len(self.split_shape) > MAX_DEVICES \
                or any(not -MAX_DEVICES <= v <= MAX_DEVICES for v in (self.opt_step, self.opt_size, self.field)):
            raise CheckpointError(f"parameter {name!r}: tensor map, split shape or optimizer fields out of range")
        for a in range(len(self.tensor_map)):
            m = self.tensor_map[a]
            values = m if isinstance(m, tuple) else (m,)
            if len(values) > MAX_DIMS or any(type(v) is not int or v >= len(dev) or v < -1 for v in values):
                raise CheckpointError(f"parameter {name!r}: tensor map {list(self.tensor_map)} names a device "
                                      f"dim beyond device matrix {list(dev)}")
        if any(type(v) is not int or not 0 <= v < 1 << 40 for v in self.split_shape):
            raise CheckpointError(f"parameter {name!r}: param_split_shape {list(self.split_shape)[:8]} is not a "
                                  f"list of sizes")
        if self.field > 0:
            raise CheckpointError(f"parameter {name!r}: field-sliced layouts (field={self.field}, host/device "
                                  f"embedding caches) are not GLM layouts and are not supported")
        if self.split_shape:
            if len(self.split_shape) != math.prod(self.cuts()):
                raise CheckpointError(f"parameter {name!r}: param_split_shape has {len(self.split_shape)} "
                                      f"entries for {math.prod(self.cuts())} slices")
            if self.opt_parts():
                raise CheckpointError(f"parameter {name!r}: uneven splits with optimizer sharding")
        self.opt_parts()

    def ranks(self) -> range:
        """The global ranks that hold the parameter: those of its pipeline stage."""
        return range(self.stage * self.devices, (self.stage + 1) * self.devices)

    def check_full(self, full: tuple[int, ...], name: str) -> None:
        """Refuse a full shape this layout cannot cut."""
        if len(full) != len(self.tensor_map):
            raise CheckpointError(f"tensor {name!r} has {len(full)} dims, its strategy maps {len(self.tensor_map)}")
        if self.split_shape and full and self.full_shape((0,) + tuple(full[1:]), name)[0] != full[0]:
            raise CheckpointError(f"tensor {name!r}: param_split_shape does not add up to its {full[0]} rows")
        try:
            self.box(0, full)
        except CheckpointError as exc:
            raise CheckpointError(f"tensor {name!r} of shape {list(full)}: {exc}") from None

    def _slice_index(self, pieces: list[int]) -> int:
        index = 0
        for p, n in zip(pieces, self.cuts(), strict=False):
            index = index * n + p
        return index

    def full_shape(self, local: tuple[int, ...], name: str = "") -> tuple[int, ...]:
        """The whole tensor's shape from the shape rank 0 of the stage holds."""
        if len(local) != len(self.tensor_map):
            raise CheckpointError(f"tensor {name!r} has {len(local)} dims, its strategy maps {len(self.tensor_map)}")
        shape = [n * c for n, c in zip(local, self.cuts(), strict=True)]
        if shape:
            shape[0] *= self.opt_shards()
        if self.split_shape:
            cuts = self.cuts()
            shape[0] = sum(self.split_shape[self._slice_index([k] + [0] * (len(cuts) - 1))] for k in range(cuts[0]))
        return tuple(shape)

    def box(self, rank: int, full: tuple[int, ...]) -> tuple[slice, ...]:
        """The part of the full tensor that local `rank` (0 ≤ rank < devices) holds."""
        coord = self._coordinate(rank)
        pieces = [self._piece(coord, a) for a in range(len(full))]
        box = []
        for a, (n, cut, p) in enumerate(zip(full, self.cuts(), pieces, strict=False)):
            if a == 0 and self.split_shape:
                sizes = [self.split_shape[self._slice_index([k] + pieces[1:])] for k in range(cut)]
                box.append(slice(sum(sizes[:p]), sum(sizes[:p + 1])))
                continue
            if n % cut:
                raise CheckpointError(f"axis {a} of length {n} does not split {cut} ways")
            box.append(slice(p * n // cut, (p + 1) * n // cut))
        parts = self.opt_parts()
        if parts and box:
            shard = 0
            for d, radix in parts:
                shard = shard * radix + coord[d] % radix
            rows, shards = box[0].stop - box[0].start, self.opt_shards()
            if rows % shards:
                raise CheckpointError(f"axis 0 piece of {rows} rows does not split {shards} ways for the optimizer")
            start = box[0].start + shard * rows // shards
            box[0] = slice(start, start + rows // shards)
        return tuple(box)


@dataclass
class Strategy:
    """Parameter layouts of a whole run (all pipeline stages), by parameter name."""
    layouts: dict[str, ParamLayout]
    stages: int
    stage_devices: int
    source: str

    @property
    def ranks(self) -> int:
        return self.stage_devices * self.stages



def _ints(msg: bytes, number: int = 1, is_signed: bool = False) -> list[int]:
    out = []
    for num, wire, value in fields(msg):
        if num == number:
            out += repeated_ints(wire, value)
    return [signed(v) for v in out] if is_signed else out


def _layout_from_pb(msg: bytes) -> ParamLayout:
    dev, maps, split, scalars = [], [], [], {FIELD: 0, OPT_STEP: 0, OPT_SIZE: 0}
    for num, wire, value in fields(msg):
        if num == DEV_MATRIX and wire == LEN:
            dev.append(_ints(value))
        elif num == TENSOR_MAP and wire == LEN:
            maps.append(_ints(value, is_signed=True))
        elif num == SPLIT_SHAPE and wire == LEN:
            split += _ints(value, is_signed=True)
        elif num in scalars:
            scalars[num] = signed(value)
    nested = [m for m in maps if m]
    tensor_map = tuple(tuple(m) for m in nested) if len(maps) > 1 else tuple(maps[0] if maps else ())
    return ParamLayout(tuple(dev[0] if dev else ()), tensor_map, tuple(split), scalars[OPT_STEP], scalars[OPT_SIZE],
                       scalars[FIELD])


def _parse_pb(data: bytes) -> tuple[int | None, dict[str, ParamLayout]]:
    """(the stage named by the file's first strategy item, layouts by name)."""
    stage, layouts = None, {}
    for num, wire, value in fields(data):
        if num == MAP_STRATEGY_ITEM and wire == LEN and stage is None:
            for n, w, v in fields(value):
                if n == 2 and w == LEN:
                    stage = next((s for k, _, s in fields(v) if k == 1), 0)
        elif num == MAP_LAYOUT_ITEM and wire == LEN:
            name, layout = None, None
            for n, w, v in fields(value):
                if n == 1 and w == LEN:
                    name = v.decode()
                elif n == 2 and w == LEN:
                    layout = _layout_from_pb(v)
            if name is None or layout is None:
                raise ValueError("a layout item lacks its name or layouts")
            layouts[name] = layout
    return stage, layouts


def _json_ints(value, what: str, nested: bool = False) -> tuple:
    """A JSON list of integers (or, when `nested`, of integers and lists of integers) as a tuple."""
    if not isinstance(value, list) or len(value) > MAX_DEVICES:
        raise ValueError(f"{what} is not a list")
    if nested:
        return tuple(_json_ints(v, what) if isinstance(v, list) else _json_int(v, what) for v in value)
    return tuple(_json_int(v, what) for v in value)


def _json_int(value, what: str) -> int:
    if type(value) is not int or abs(value) >= 1 << 62:
        raise ValueError(f"{what} holds {value!r:.40}, not an integer")
    return value


def _parse_json(data: bytes, where) -> tuple[int | None, dict[str, ParamLayout]]:
    doc = parse_json(data, where)
    items = doc.get("parallel_strategy_item") or {} if isinstance(doc, dict) else None
    layout_items = doc.get("parallel_layout_item") or {} if isinstance(doc, dict) else None
    if not isinstance(items, dict) or not isinstance(layout_items, dict):
        raise ValueError("expected an object with parallel_strategy_item and parallel_layout_item objects")
    first = next(iter(items.values()), {})
    stage = _json_int(first.get("stage", 0), "stage") if isinstance(first, dict) and items else None
    layouts = {}
    for name, item in layout_items.items():
        if not isinstance(item, dict):
            raise ValueError(f"layout of {name!r} is not an object")
        scalars = [_json_int(item.get(k, 0), k) for k in ("opt_weight_shard_step", "opt_weight_shard_size", "field")]
        layouts[name] = ParamLayout(_json_ints(item["dev_matrix"], "dev_matrix"),
                                    _json_ints(item["tensor_map"], "tensor_map", nested=True),
                                    _json_ints(item.get("param_split_shape", []), "param_split_shape"), *scalars)
    return stage, layouts


def _read_file(path: Path) -> tuple[int | None, dict[str, ParamLayout]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read strategy ({exc.strerror})") from None
    if not data:
        raise CheckpointError(f"{path}: empty strategy file")
    try:
        stage, layouts = _parse_json(data, path) if path.suffix == ".json" else _parse_pb(data)
        if stage is not None and not 0 <= stage < MAX_STAGES:
            raise ValueError(f"pipeline stage {stage} out of range")
        return stage, layouts
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, StopIteration) as exc:
        kind = "JSON" if path.suffix == ".json" else "protobuf ParallelStrategyMap"
        raise CheckpointError(f"{path}: not a valid {kind} strategy file ({exc})") from None


def _split_stage(name: str) -> tuple[int, str]:
    head, sep, rest = name.partition("-")
    return (int(head), rest) if sep and head.isdecimal() and len(head) <= 4 else (0, name)


def _strategy_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".ckpt", ".json") and p.is_file())
        if not files:
            raise CheckpointError(f"{path}: no strategy files (.ckpt or .json) in the folder")
        return files
    if path.is_file():
        return [path]
    raise CheckpointError(f"{path}: no such strategy file or folder")


def _stage_layouts(files: list[Path]):
    """Each file with its layouts, named `{stage}-{name}` when several files hold the stages (per-rank copies of
    one stage's strategy are skipped)."""
    stages_seen = set()
    for f in files:
        stage, layouts = _read_file(f)
        if not layouts:
            raise CheckpointError(f"{f}: the strategy has no parameter layouts")
        if len(files) == 1:
            merged_already = all(_split_stage(n)[1] != n for n in layouts)  # names carry "{stage}-"
            if stage and not merged_already:
                raise CheckpointError(f"{f}: is the strategy of pipeline stage {stage} alone; pass the folder that "
                                      f"holds every stage's file (or their merge)")
            yield f, layouts
            continue
        stage = stage or 0
        if stage not in stages_seen:
            stages_seen.add(stage)
            yield f, {f"{stage}-{n}": lay for n, lay in layouts.items()}


def load_strategy(path) -> Strategy:
    """One strategy file, or a folder of per-stage (or per-rank) files merged the way MindSpore merges them."""
    path = Path(path)
    merged: dict[str, ParamLayout] = {}
    for f, layouts in _stage_layouts(_strategy_files(path)):
        for full_name, lay in layouts.items():
            stage_of, name = _split_stage(full_name)
            lay = replace(lay, stage=stage_of)
            try:
                lay.check(name)
            except CheckpointError as exc:
                raise CheckpointError(f"{f}: {exc}") from None
            if name not in merged or stage_of < merged[name].stage:  # shared across stages: the first stage's
                merged[name] = lay
    stages = {lay.stage for lay in merged.values()}
    if stages != set(range(len(stages))):
        raise CheckpointError(f"{path}: pipeline stages {sorted(stages)} are not all present (expected 0…"
                              f"{max(stages)})")
    counts = {lay.devices for lay in merged.values()}
    if len(counts) != 1:
        raise CheckpointError(f"{path}: parameters use different device counts {sorted(counts)}")
    return Strategy(merged, len(stages), counts.pop(), str(path))


def _layout_pb(lay: ParamLayout) -> bytes:
    maps = lay.tensor_map if any(isinstance(m, tuple) for m in lay.tensor_map) else (lay.tensor_map,)
    out = len_field(DEV_MATRIX, b"".join(int_field(1, d) for d in lay.dev_matrix))
    for m in maps:
        out += len_field(TENSOR_MAP, b"".join(int_field(1, v) for v in (m if isinstance(m, tuple) else (m,))))
    out += len_field(SPLIT_SHAPE, b"".join(int_field(1, v) for v in lay.split_shape))
    return out + int_field(FIELD, lay.field) + int_field(OPT_STEP, lay.opt_step) + int_field(OPT_SIZE, lay.opt_size)


def strategy_bytes(layouts: dict[str, ParamLayout], stage: int = 0) -> bytes:
    """A protobuf `ParallelStrategyMap` for one stage, as MindSpore writes it (`mindspore.build_searched_strategy`
    and `transform_checkpoints` read it)."""
    strategys = int_field(1, stage)
    item = len_field(1, PACKAGE.encode()) + len_field(2, strategys)
    out = int_field(MAP_STAGE, 1) + len_field(MAP_STRATEGY_ITEM, item)
    for name, lay in layouts.items():
        out += len_field(MAP_LAYOUT_ITEM, len_field(1, name.encode()) + len_field(2, _layout_pb(lay)))
    return out
