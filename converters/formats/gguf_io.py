"""A GGUF file read as a checkpoint (GGUF in): its metadata and tensor table parsed by the `gguf` package's reader,
its tensors read by offset, the block types dequantized by that package. What a converted folder needs that GGUF
keeps elsewhere is read back from the metadata: the sizes and RoPE into a THUDM config, and our checksums
(`glm2_toolkit.sha256`, which `converters.gguf_out` writes) held against every tensor read."""
from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np

from glm2_core.errors import CheckpointError
from glm2_core.releases import RELEASES, SANDWICH_RELEASE

from .base import TensorRef, WeightsFile, read_exact

T = gguf.GGMLQuantizationType
STORED = {T.F32: "float32", T.F16: "float16", T.BF16: "bfloat16"}  # read as stored (bfloat16 as its bits)
DEQUANTIZED = (T.Q8_0, T.Q4_0)  # read as float32 values
ARCHES = {"chatglm": False, "glm4": True}  # llama.cpp's GLM architectures → whether the layers have sandwich norms
SHA_KEY = "glm2_toolkit.sha256"


class GGUFFile(WeightsFile):
    """The tensors of a GGUF file of llama.cpp's `chatglm` or `glm4` architecture, and `config`: the model's THUDM
    config as the metadata gives it."""

    def __init__(self, path: Path, verify: bool = True):
        self.verify = verify
        super().__init__(path)

    def _index(self) -> None:
        reader = self._parse()
        self.arch = self._string(reader, "general.architecture")
        if self.arch not in ARCHES:
            raise self._bad(f"architecture {self.arch!r:.40} is not a GLM (expected {' or '.join(ARCHES)})")
        digests = self._digests(reader) if self.verify else {}
        self.has_crc = bool(digests)  # what inspect counts: the file carries checksums (ours, sha256)
        for t in reader.tensors:
            self._add(t, digests.get(t.name))
        self.config = self._config(reader)

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a GGUF file of a GLM ({why})")

    def _parse(self) -> gguf.GGUFReader:
        try:
            return gguf.GGUFReader(self.path)
        except Exception as exc:  # the reader's own errors are ValueError, struct and index errors, …
            raise self._bad(f"{type(exc).__name__}: {str(exc)[:120]}") from None

    def _field(self, reader: gguf.GGUFReader, key: str):
        field = reader.fields.get(key)
        try:
            return None if field is None else field.contents()
        except Exception:  # a malformed value
            raise self._bad(f"metadata {key!r} cannot be read") from None

    def _string(self, reader: gguf.GGUFReader, key: str) -> str:
        value = self._field(reader, key)
        if not isinstance(value, str):
            raise self._bad(f"no {key}")
        return value

    def _number(self, reader: gguf.GGUFReader, key: str, default=None):
        value = self._field(reader, f"{self.arch}.{key}")
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(f"{self.arch}.{key} is {value!r:.40}, not a number")
        return float(str(np.float32(value))) if isinstance(value, float) else value  # 1e-05, not 9.99999974e-06

    def _digests(self, reader: gguf.GGUFReader) -> dict[str, str]:
        """Our per-tensor sha256s, by tensor name (none in a file another tool wrote)."""
        listed = self._field(reader, SHA_KEY)
        if listed is None:
            return {}
        if not isinstance(listed, list) or len(listed) != len(reader.tensors):
            raise self._bad(f"{SHA_KEY} does not list one digest for each of its {len(reader.tensors)} tensors")
        return {t.name: d for t, d in zip(reader.tensors, listed, strict=True)}

    def _add(self, t, digest: str | None) -> None:
        kind = T(t.tensor_type)
        if kind not in STORED and kind not in DEQUANTIZED:
            raise self._bad(f"tensor {t.name!r} is {kind.name}; this reader takes "
                            f"{', '.join(k.name for k in (*STORED, *DEQUANTIZED))}")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
        offset, size = int(t.data_offset), int(t.n_bytes)
        if offset + size > self.path.stat().st_size:
            raise CheckpointError(f"{self.path}: truncated file: tensor {t.name!r} ends at byte {offset + size}")

        def raw() -> np.ndarray:
            data = np.empty(size, np.uint8)
            read_exact(self._f, offset, data, self.path, t.name)
            if digest is not None and hashlib.sha256(data).hexdigest() != digest:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} does not match the sha256 the file records: "
                                      f"the file is corrupt (--no-crc-check reads it anyway)")
            return data

        if kind in STORED:
            dtype = STORED[kind]
            read = lambda: raw().view(np.uint16 if dtype == "bfloat16" else dtype).reshape(shape)
            self.tensors[t.name] = TensorRef(t.name, shape, dtype, self.path, read, offset=offset, sha256=digest)
        else:
            read = lambda: gguf.quants.dequantize(raw().reshape(*shape[:-1], -1), kind).reshape(shape)
            self.tensors[t.name] = TensorRef(t.name, shape, "float32", self.path, read)

    def _config(self, reader: gguf.GGUFReader) -> dict:
        """THUDM's config fields from the metadata. The release comes from general.name (which to-gguf writes as
        the release's repository name); RoPE from the base or llama.cpp's linear scaling."""
        heads = int(self._number(reader, "attention.head_count"))
        hidden = int(self._number(reader, "embedding_length"))
        embd = self.tensors.get("token_embd.weight")
        if embd is None or len(embd.shape) != 2:
            raise self._bad("no token_embd.weight matrix")
        scaling = self._field(reader, f"{self.arch}.rope.scaling.type")
        base = float(self._number(reader, "rope.freq_base", 10000.0))
        ratio = float(self._number(reader, "rope.scaling.factor")) if scaling == "linear" else base / 10000.0
        name = self._field(reader, "general.name")
        name = name if isinstance(name, str) else ""
        sandwich = ARCHES[self.arch]
        if sandwich and not any(r in name.lower() for r, rel in RELEASES.items() if rel.sandwich):
            name = RELEASES[SANDWICH_RELEASE].repo
        eos = [self._field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos = [int(e) for e in eos if isinstance(e, int) and not isinstance(e, bool)]
        several = self._field(reader, "tokenizer.ggml.model") == "gpt2"  # GLM-4 stops at all three
        pad = self._field(reader, "tokenizer.ggml.padding_token_id")
        ids = {**({"eos_token_id": eos if several else eos[0]} if eos else {}),
               **({"pad_token_id": int(pad)} if isinstance(pad, int) and not isinstance(pad, bool) else {})}
        return {"_name_or_path": name, "num_layers": int(self._number(reader, "block_count")), **ids,
                "torch_dtype": embd.dtype,
                "hidden_size": hidden, "ffn_hidden_size": int(self._number(reader, "feed_forward_length")),
                "num_attention_heads": heads,
                "multi_query_group_num": int(self._number(reader, "attention.head_count_kv", heads)),
                "kv_channels": int(self._number(reader, "attention.key_length", hidden // max(heads, 1))),
                "padded_vocab_size": embd.shape[0],
                "layernorm_epsilon": float(self._number(reader, "attention.layer_norm_rms_epsilon")),
                "rope_ratio": ratio, "add_qkv_bias": "blk.0.attn_qkv.bias" in self.tensors,
                "seq_length": int(self._number(reader, "context_length"))}

    def check_complete(self) -> None:
        """Every tensor read was checked against its digest as it was read."""
