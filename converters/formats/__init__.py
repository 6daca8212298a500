"""Readers that list tensors without loading them, and writers that take them one at a time; `FORMATS` says, once,
which file suffixes each format has and which reader and writer serve it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .ckpt import CkptFile, CkptWriter
from .gguf_io import GGUFFile
from .safetensors_io import SafetensorsFile, SafetensorsWriter
from .torch_bin import BinWriter, TorchBinFile


def _safetensors_reader(path: Path, verify: bool):
    return SafetensorsFile(path)  # the format carries no checksum


def _ckpt_writer(handle, plan, file: str, metadata):
    return CkptWriter(handle, deferred_crc=True)


def _safetensors_writer(handle, plan, file: str, metadata):
    return SafetensorsWriter(handle, plan, metadata)


def _bin_writer(handle, plan, file: str, metadata):
    return BinWriter(handle, plan, Path(file).stem.split(".")[0])


@dataclass(frozen=True)
class Format:
    """A weights file format: its suffixes, its reader (path, verify_checksums) and its writer (open handle, the
    file's plan, its name, safetensors metadata; None: not a model folder's format, written by its own command);
    the functions above adapt the classes that take other arguments."""
    suffixes: tuple[str, ...]
    reader: Callable
    writer: Callable | None


FORMATS = {
    "ckpt": Format((".ckpt",), CkptFile, _ckpt_writer),
    "safetensors": Format((".safetensors",), _safetensors_reader, _safetensors_writer),
    "bin": Format((".bin", ".pt", ".pth"), TorchBinFile, _bin_writer),
    "gguf": Format((".gguf",), GGUFFile, None),  # llama.cpp's one-file format: read here, written by to-gguf
}
