"""Open any supported checkpoint — a HF folder (sharded or not), a folder we wrote, or one weights file — as one
lazy map of tensors, with the config, tokenizer files and manifest that sit beside it."""
from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glm2_core.errors import CheckpointError
from glm2_core.files import CONFIG, HF_WEIGHTS, INDEX_FILES
from glm2_core.jsonio import read_json
from glm2_core.outputs import MANIFEST, TOOL

from .formats import FORMATS
from .formats.base import Closing, TensorRef
from .model_folder import tokenizer_candidates, trusted
from .thudm_quant import dequantize, describe, quantization


def format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    for name, fmt in FORMATS.items():
        if suffix in fmt.suffixes:
            return name
    known = [s for fmt in FORMATS.values() for s in fmt.suffixes]
    raise CheckpointError(f"{path}: unknown weights file type {suffix or '(no suffix)'}; expected "
                          f"{', '.join(known[:-1])} or {known[-1]}")


def open_file(path: Path, verify_checksums: bool = True):
    """One weights file; `verify_checksums`: hold what is read or copied to the checksums the file carries."""
    fmt = format_of(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return FORMATS[fmt].reader(path, verify_checksums)


@dataclass
class Checkpoint(Closing):
    path: Path
    files: list[Path]
    format: str
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    strings: dict[str, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    config: dict | None = None
    manifest: dict | None = None
    folder: Path | None = None
    handles: list = field(default_factory=list)
    assembled_by: Path | None = None  # the strategy whose layouts assembled these tensors from rank slices
    quantization: str | None = None  # a THUDM quantized release's weights, read dequantized (thudm_quant)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @property
    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files to carry into a converted folder (see `model_folder.trusted`)."""
        return [p for p in tokenizer_candidates(self.folder) if trusted(p)]

    @property
    def untrusted_files(self) -> list[str]:
        """Tokenizer files left out: symlinks that lead out of the checkpoint (`model_folder.trusted`)."""
        return [f"{p.name} -> {p.resolve()}" for p in tokenizer_candidates(self.folder) if not trusted(p)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def check_complete(self) -> None:
        """After a full pass over the tensors: checksums that cover whole files (a .ckpt's CRC trailer) must hold."""
        for h in self.handles:
            getattr(h, "check_complete", lambda: None)()

    def close(self) -> None:
        self._stack.close()


def _inside(folder: Path, name, listed_in: Path) -> Path:
    """The shard an index or manifest names: a relative path that stays in the folder by its name. The file may
    be a symlink, as every file of a Hugging Face hub cache snapshot is (into ../../blobs/)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{listed_in}: a shard name is {name!r}, not a file name")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(f"{listed_in}: shard path {name!r} points outside the checkpoint folder")
    if not (folder / p).is_file():
        raise CheckpointError(f"{listed_in}: names shard {name!r}, which does not exist")
    return folder / p


def _weights_files(folder: Path) -> tuple[list[Path], Path | None, dict | None]:
    """(shard files, index file, index weight_map) for a folder."""
    indexes = [folder / n for n in INDEX_FILES if (folder / n).is_file()]
    if indexes:
        index = indexes[0]
        weight_map = read_json(index, "index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map")
        files = sorted({_inside(folder, v, index) for v in weight_map.values()})
        return files, index, weight_map
    listed = read_json(folder / MANIFEST, "manifest").get("files") if (folder / MANIFEST).is_file() else None
    if listed is not None:
        if not isinstance(listed, list):
            raise CheckpointError(f"{folder / MANIFEST}: 'files' is not a list of file names")
        return [_inside(folder, n, folder / MANIFEST) for n in listed], None, None
    singles = [folder / n for n in HF_WEIGHTS.values() if (folder / n).is_file()]
    if not singles:
        singles = sorted(p for p in folder.iterdir() if p.suffix in (".ckpt", ".safetensors", ".bin", ".gguf")
                         and p.is_file())
    if len(singles) != 1:
        what = "no weights file" if not singles else f"several weights files ({', '.join(p.name for p in singles)})"
        raise CheckpointError(f"{folder}: {what}; expected an index json, one model.safetensors / pytorch_model.bin, "
                              f"or one .ckpt or .gguf")
    return singles, None, None


def _read_beside(ckpt: Checkpoint, verify_checksums: bool) -> None:
    """What the weights need from beside them: the config (a GGUF file carries its own), which also says whether
    they are THUDM's int4/int8 (then read dequantized), and our manifest, whose digests a safetensors read is held
    to."""
    folder = ckpt.folder
    ckpt.config = getattr(ckpt.handles[0], "config", None) if len(ckpt.handles) == 1 else None
    if ckpt.config is None and (folder / CONFIG).is_file():
        ckpt.config = read_json(folder / CONFIG, "config")
    bits = quantization(ckpt.config)
    if bits is not None:
        ckpt.tensors, ckpt.quantization = dequantize(ckpt.tensors, bits, str(ckpt.path)), describe(bits)
    if (folder / MANIFEST).is_file():
        ckpt.manifest = read_json(folder / MANIFEST, "manifest")
        if verify_checksums and ckpt.format == "safetensors":
            _check_by_manifest(ckpt)


def _check_by_manifest(ckpt: Checkpoint) -> None:
    """safetensors carries no checksum: where our manifest.json lists a tensor's sha256, every read of it is checked
    against that (a copied span by the writer, which hashes what it copies; a read here). Partial row reads cannot
    be checked, so they are turned off for these tensors."""
    if ckpt.manifest.get("tool") != TOOL or not isinstance(ckpt.manifest.get("tensors"), list):
        return
    where = ckpt.folder / MANIFEST
    for record in ckpt.manifest["tensors"]:
        ref = ckpt.tensors.get(record.get("name")) if isinstance(record, dict) else None
        digest = record.get("sha256") if ref is not None and record.get("file") == ref.file.name else None
        if isinstance(digest, str):
            ref.sha256, ref.rows, ref.into = digest, None, None
            ref.reader = _hashed(ref.reader, ref, digest, where)


def _hashed(read, ref: TensorRef, digest: str, where: Path):
    def reader() -> np.ndarray:
        arr = read()
        if hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest() != digest:
            raise CheckpointError(f"{ref.file}: tensor {ref.name!r} does not match the sha256 {where} records: the "
                                  f"file is corrupt (--no-crc-check reads it anyway)")
        return arr
    return reader


def open_checkpoint(path, verify_checksums: bool = True) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    files, index, weight_map = _weights_files(path) if path.is_dir() else ([path], None, None)
    formats = {format_of(f) for f in files}
    if len(formats) != 1:
        raise CheckpointError(f"{path}: mixes weights formats {sorted(formats)}")
    ckpt = Checkpoint(path, files, formats.pop(), folder=folder)
    try:
        for f in files:
            opened = ckpt._stack.enter_context(open_file(f, verify_checksums))
            ckpt.handles.append(opened)
            for name, ref in opened.tensors.items():
                if name in ckpt.tensors:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {ckpt.tensors[name].file.name}")
                if weight_map is not None and weight_map.get(name) is not None and folder / weight_map[name] != f:
                    raise CheckpointError(f"{index}: maps {name!r} to {weight_map[name]}, but it is in {f.name}")
                ckpt.tensors[name] = ref
            ckpt.strings.update(getattr(opened, "strings", {}))
            ckpt.metadata.update(getattr(opened, "metadata", {}) or {})
        if weight_map is not None and set(weight_map) != set(ckpt.tensors):
            missing = sorted(set(weight_map) - set(ckpt.tensors))
            extra = sorted(set(ckpt.tensors) - set(weight_map))
            raise CheckpointError(f"{index}: index and shards disagree: missing {missing[:3]}, unlisted {extra[:3]}")
        _read_beside(ckpt, verify_checksums)
    except BaseException:
        ckpt.close()
        raise
    return ckpt
