"""A GGUF file read as a checkpoint (GGUF in): its header scanned here (the metadata and tensor table, bounded by the
file's size at every step), its tensors read by offset, the block types dequantized by the `gguf` package. What a
converted folder needs that GGUF keeps elsewhere is read back from the metadata: the sizes and RoPE into a THUDM
config, and our checksums (`glm2_toolkit.sha256`, which `converters.gguf_out` writes) held against every tensor
read.

The header is scanned rather than parsed by the `gguf` package's GGUFReader, which builds a numpy view of every
string of the vocabulary (seconds for a 65,024-token vocabulary, more for GLM-4's); the tests hold the scan to
GGUFReader on every file they write.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from glm2_core.errors import CheckpointError
from glm2_core.names import BY_TEMPLATE, EMBEDDING, QKV_BIAS, Layout
from glm2_core.quants import KINDS, dequantize
from glm2_core.releases import RELEASES, SANDWICH_RELEASE

from .base import TensorRef, WeightsFile, read_exact, read_through

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
K = gguf.Keys
EMBEDDING_NAME, QKV_BIAS_NAME = (Layout("gguf").targets(BY_TEMPLATE[w])[0][0] for w in (EMBEDDING, QKV_BIAS))
STORED = {T.F32: "float32", T.F16: "float16", T.BF16: "bfloat16"}  # read as stored (bfloat16 as its bits)
DEQUANTIZED = tuple(KINDS.values())  # read as float32 values, or as their blocks
ARCHES = {"chatglm": False, "glm4": True}  # llama.cpp's GLM architectures → whether the layers have sandwich norms
# our keys in a file to-gguf wrote: the toolkit's version (what --overwrite looks for), the source, each tensor's sha256
TOOL_KEY, SOURCE_KEY, SHA_KEY = "glm2_toolkit.version", "glm2_toolkit.source", "glm2_toolkit.sha256"
SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy's order (GGUF lists the fastest dimension first)
    type: int
    offset: int  # from the start of the file


class _Cursor:
    """Reads little-endian values from a mapped file, refusing to go past its end."""

    def __init__(self, data, bad):
        self.data, self.pos, self.bad = data, 0, bad

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.bad(f"a value at byte {self.pos} runs past the end of the file")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(f"a string at byte {self.pos - len(raw)} is not UTF-8") from None

    def value(self, kind: int, depth: int = 0):
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])
        if kind == V.STRING:
            return self.string()
        if kind != V.ARRAY or depth:
            raise self.bad(f"unknown value type {kind} at byte {self.pos}")
        item, count = self.unpack("<I"), self.unpack("<Q")
        if count > len(self.data) - self.pos:  # every item takes at least a byte
            raise self.bad(f"an array of {count} items at byte {self.pos} is longer than the file")
        if item in SCALARS and item != V.BOOL:
            raw = self.take(count * struct.calcsize(SCALARS[item]))
            return np.frombuffer(raw, np.dtype(SCALARS[item])).tolist()
        return [self.value(item, depth + 1) for _ in range(count)]


def scan(path: Path, bad) -> tuple[dict, list[TensorInfo]]:
    """The metadata (key → value; arrays as lists) and the tensor table of a GGUF file (version 2 or 3)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) < 24:
            raise bad("shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            c = _Cursor(data, bad)
            if c.unpack("<I") != gguf.GGUF_MAGIC:
                raise bad("no GGUF magic")
            version = c.unpack("<I")
            if version not in (2, 3):
                raise bad(f"GGUF version {version}; this reader takes 2 and 3")
            n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
            if n_tensors > len(data) // 24 or n_kv > len(data) // 12:
                raise bad(f"{n_tensors} tensors and {n_kv} keys do not fit in {len(data)} bytes")
            kv = {}
            for _ in range(n_kv):
                key = c.string()
                kv[key] = c.value(c.unpack("<I"))
            table = []
            for _ in range(n_tensors):
                name, dims = c.string(), c.unpack("<I")
                if not 1 <= dims <= MAX_DIMS:
                    raise bad(f"tensor {name!r} has {dims} dimensions")
                shape = tuple(c.unpack("<Q") for _ in range(dims))[::-1]
                table.append((name, shape, c.unpack("<I"), c.unpack("<Q")))
            align = kv.get(K.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
            if type(align) is not int or not 1 <= align <= 1 << 20:
                raise bad(f"{K.General.ALIGNMENT} {align!r:.20}")
            start = -(-c.pos // align) * align
            return kv, [TensorInfo(n, s, k, start + o) for n, s, k, o in table]


class GGUFFile(WeightsFile):
    """The tensors of a GGUF file of llama.cpp's `chatglm` or `glm4` architecture, and `config`: the model's THUDM
    config as the metadata gives it."""

    def __init__(self, path: Path, verify: bool = True):
        self.verify = verify
        self._map = None
        super().__init__(path)

    def _index(self) -> None:
        self.kv, table = scan(self.path, self._bad)
        self.size = self.path.stat().st_size
        self.arch = self._string(K.General.ARCHITECTURE)
        if self.arch not in ARCHES:
            raise self._bad(f"architecture {self.arch!r:.40} is not a GLM (expected {' or '.join(ARCHES)})")
        digests = self._digests(table) if self.verify else {}
        self.has_crc = bool(digests)  # what inspect counts: the file carries checksums (ours, sha256)
        for t in table:
            if t.name in self.tensors:
                raise self._bad(f"tensor {t.name!r} appears twice")
            self._add(t, digests.get(t.name))
        self.config = self._config()

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a GGUF file of a GLM ({why})")

    def _string(self, key: str) -> str:
        value = self.kv.get(key)
        if not isinstance(value, str):
            raise self._bad(f"no {key}")
        return value

    def _number(self, key: str, default=None):
        """The architecture's `key` (one of gguf.Keys' `{arch}.…` templates) as a number."""
        key = key.format(arch=self.arch)
        value = self.kv.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._bad(f"{key} is {value!r:.40}, not a number")
        return float(str(np.float32(value))) if isinstance(value, float) else value  # 1e-05, not 9.99999974e-06

    def _digests(self, table: list[TensorInfo]) -> dict[str, str]:
        """Our per-tensor sha256s, by tensor name (none in a file another tool wrote)."""
        listed = self.kv.get(SHA_KEY)
        if listed is None:
            return {}
        if not isinstance(listed, list) or len(listed) != len(table) or not all(isinstance(d, str) for d in listed):
            raise self._bad(f"{SHA_KEY} does not list one digest for each of its {len(table)} tensors")
        return {t.name: d for t, d in zip(table, listed, strict=True)}

    def _add(self, t: TensorInfo, digest: str | None) -> None:
        try:
            kind = T(t.type)
        except ValueError:
            kind = None
        if kind not in STORED and kind not in DEQUANTIZED:
            raise self._bad(f"tensor {t.name!r} is of type {t.type if kind is None else kind.name}; this reader takes "
                            f"{', '.join(k.name for k in (*STORED, *DEQUANTIZED))}")
        shape, offset = t.shape, t.offset
        block, size = gguf.GGML_QUANT_SIZES[kind]
        if any(n < 1 or n > 1 << 40 for n in shape) or shape[-1] % block:
            raise self._bad(f"tensor {t.name!r} has shape {list(shape)}")
        size = int(np.prod(shape, dtype=np.int64)) // block * size
        if offset + size > self.size:
            raise CheckpointError(f"{self.path}: truncated file: tensor {t.name!r} ends at byte {offset + size}")

        def raw() -> np.ndarray:
            data = np.empty(size, np.uint8)
            h = hashlib.sha256() if digest is not None else None
            read_exact(self._f, offset, data, self.path, t.name, h)
            if h is not None and h.hexdigest() != digest:
                raise self._corrupt(t.name)
            return data

        def prove() -> None:
            h = hashlib.sha256()
            read_through(self.path, self._inode, offset, size, h)
            if h.hexdigest() != digest:
                raise self._corrupt(t.name)

        owed = {"prefetch": lambda: read_through(self.path, self._inode, offset, size),
                "prove": prove if digest is not None else None}

        if kind in STORED:
            dtype = STORED[kind]
            stored = np.uint16 if dtype == "bfloat16" else dtype
            read = lambda: raw().view(stored).reshape(shape)
            mapped = lambda: self._view(offset, size).view(stored).reshape(shape)
            self.tensors[t.name] = TensorRef(t.name, shape, dtype, self.path, read, offset=offset, sha256=digest,
                                             mapped=mapped, **owed)
        else:
            kind_name = kind.name.lower()
            count = int(np.prod(shape[:-1]))
            rows = lambda: raw().reshape(count, -1)
            read = lambda: dequantize(rows(), kind_name).reshape(shape)
            self.tensors[t.name] = TensorRef(t.name, shape, "float32", self.path, read, blocks=(kind_name, rows),
                                             mapped=lambda: self._view(offset, size).reshape(count, -1), **owed)

    def _view(self, offset: int, size: int) -> np.ndarray:
        """Bytes [offset, offset + size) of a copy-on-write mapping of the file (made on first use, and kept while
        any view of it lives)."""
        if self._map is None:
            self._map = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._inode = os.fstat(self._f.fileno()).st_ino
        return np.frombuffer(self._map, np.uint8, size, offset)

    def _corrupt(self, name: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: tensor {name!r} does not match the sha256 the file records: the file "
                               f"is corrupt (--no-crc-check reads it anyway)")

    def _config(self) -> dict:
        """THUDM's config fields from the metadata. The release comes from general.name (which to-gguf writes as
        the release's repository name); RoPE from the base or llama.cpp's linear scaling."""
        heads = int(self._number(K.Attention.HEAD_COUNT))
        hidden = int(self._number(K.LLM.EMBEDDING_LENGTH))
        embd = self.tensors.get(EMBEDDING_NAME)
        if embd is None or len(embd.shape) != 2:
            raise self._bad(f"no {EMBEDDING_NAME} matrix")
        scaling = self.kv.get(K.Rope.SCALING_TYPE.format(arch=self.arch))
        base = float(self._number(K.Rope.FREQ_BASE, 10000.0))
        ratio = float(self._number(K.Rope.SCALING_FACTOR)) if scaling == "linear" else base / 10000.0
        name = self.kv.get(K.General.NAME)
        name = name if isinstance(name, str) else ""
        sandwich = ARCHES[self.arch]
        if sandwich and not any(r in name.lower() for r, rel in RELEASES.items() if rel.sandwich):
            name = RELEASES[SANDWICH_RELEASE].repo
        eos = [self.kv.get(k) for k in (K.Tokenizer.EOS_ID, K.Tokenizer.EOT_ID, K.Tokenizer.EOM_ID)]
        eos = [int(e) for e in eos if isinstance(e, int) and not isinstance(e, bool)]
        several = self.kv.get(K.Tokenizer.MODEL) == "gpt2"  # GLM-4 stops at all three
        pad = self.kv.get(K.Tokenizer.PAD_ID)
        ids = {**({"eos_token_id": eos if several else eos[0]} if eos else {}),
               **({"pad_token_id": int(pad)} if isinstance(pad, int) and not isinstance(pad, bool) else {})}
        return {"_name_or_path": name, "num_layers": int(self._number(K.LLM.BLOCK_COUNT)), **ids,
                "torch_dtype": embd.dtype,
                "hidden_size": hidden, "ffn_hidden_size": int(self._number(K.LLM.FEED_FORWARD_LENGTH)),
                "num_attention_heads": heads,
                "multi_query_group_num": int(self._number(K.Attention.HEAD_COUNT_KV, heads)),
                "kv_channels": int(self._number(K.Attention.KEY_LENGTH, hidden // max(heads, 1))),
                "padded_vocab_size": embd.shape[0],
                "layernorm_epsilon": float(self._number(K.Attention.LAYERNORM_RMS_EPS)),
                "rope_ratio": ratio, "add_qkv_bias": QKV_BIAS_NAME.format(i=0) in self.tensors,
                "seq_length": int(self._number(K.LLM.CONTEXT_LENGTH))}

    def check_complete(self) -> None:
        """Every tensor read was checked against its digest as it was read."""
