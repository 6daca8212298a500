"""`glm2-convert to-gguf`: any model the converters read, as one GGUF file that llama.cpp runs.

Written with the `gguf` package (llama.cpp's own: its writer, constants and numpy quantizers), in four steps:
plan (each tensor's GGUF name, shape and type), the metadata (architecture, sizes, RoPE, the vocabulary and chat
template), the tensors one at a time, and the checksums. The model's tensors are THUDM's, renamed (the `gguf`
layout of `glm2_core.names`): llama.cpp's `chatglm` architecture reads the fused qkv and gate/up as THUDM stores
them, and their interleaved RoPE pairs are its "normal" RoPE, so no row moves. GLM-4-0414 is its `glm4`
architecture, which adds the two sandwich norms.

Which tensors keep a float type follows llama.cpp's converter (`convert_hf_to_gguf.py`): 1-D tensors, norms and
biases are float32; every other weight takes the requested type, the embedding and output layer included. Its
converter writes no q4_0 (llama-quantize does, with a Q6_K output layer, which the `gguf` package cannot write):
here the output layer of a q4_0 file is q8_0. A row whose length is not a multiple of the 32-value block falls
back to float16, as in llama.cpp.

GGUF carries no checksums. Ours are in the file's metadata (`glm2_toolkit.sha256`: each tensor's data, in the
file's order), written as placeholders with the header and filled in once the data is written; every read of the
file by this toolkit (converters/formats/gguf_io.py) is held to them.
"""
from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from glm2_core import PACKAGE, __version__
from glm2_core.dtypes import GGUF_QUANTS
from glm2_core.errors import CheckpointError, UserError
from glm2_core.families import FAMILIES, SENTENCEPIECE, family_of, read_ranks
from glm2_core.files import TOKENIZER_CONFIG, TOKENIZER_MODEL
from glm2_core.jsonio import read_json
from glm2_core.names import BY_TEMPLATE, OUTPUT, Layout
from glm2_core.outputs import check_output
from glm2_core.quants import CHUNK_VALUES, KINDS, block_kind, quantized_slices
from glm2_core.releases import RELEASES, rope_rule

from .convert import Conversion, Summary, _check_expressible, _progress, refuse_unmerged_lora, request
from .formats.gguf_io import SHA_KEY, SOURCE_KEY, TOOL_KEY, scan
from .model_folder import tokenizer_or_bundled
from .output import fingerprints, staged_file
from .source import Source, apply_dtype, out_dtype

T = gguf.GGMLQuantizationType
TYPES = {"float32": T.F32, "float16": T.F16, "bfloat16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}
NAMES = {t: name for name, t in TYPES.items()}
FLOAT_NAMES = {t: NAMES[t] for t in (T.F32, T.F16, T.BF16)}  # the float types, as our dtypes name them
LAYOUT = Layout("gguf")
OUTPUT_NAME = LAYOUT.targets(BY_TEMPLATE[OUTPUT])[0][0]
SHA_ENTRY = 8 + 64  # a string in a GGUF array: its uint64 length, then 64 hex digits


def arch_of(cfg) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for a model: `glm4` for GLM-4-0414's sandwich-norm layers, else `chatglm`."""
    return gguf.MODEL_ARCH.GLM4 if cfg.sandwich_norms else gguf.MODEL_ARCH.CHATGLM


def tensor_type(name: str, shape: tuple[int, ...], want: T) -> T:
    """A tensor's GGUF type by llama.cpp's converter's rules (the module docstring says which)."""
    if len(shape) == 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return T.F32
    if want not in NAMES or NAMES[want] not in KINDS:
        return want
    kind = block_kind(NAMES[want], shape, name == OUTPUT_NAME)
    return T.F16 if kind is None else TYPES[kind]


@dataclass(frozen=True)
class Planned:
    name: str
    shape: tuple[int, ...]
    type: T

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.type]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.shape[-1] // block * size


def is_ours(path: Path) -> bool:
    """Whether `path` is a GGUF file this toolkit wrote (its metadata names our version): what --overwrite replaces."""
    try:
        return TOOL_KEY in scan(path, CheckpointError)[0]
    except (CheckpointError, OSError):  # a file that is not a GGUF, or cannot be read, is not ours
        return False


def to_gguf(src, dst, how: Conversion | None = None, **options) -> Summary:
    """Write the model at `src` (any folder or file the converters read) as the GGUF file `dst`, its weights in
    `how.dtype` (keep, float32, float16, bfloat16, q8_0 or q4_0)."""
    started = time.perf_counter()
    how = Conversion(target=LAYOUT, **options) if how is None else request(how, options)
    if how.target != LAYOUT:
        raise UserError(f"to-gguf writes the gguf layout, not {how.target.describe()}")
    src, dst = Path(src), Path(dst)
    protected = [src, how.config]
    check_output(dst, how.overwrite, protected, ours_file=is_ours)  # before the source is read
    with Source.open(src, how.rearranged_rope, how.config, None, how.verify_checksums, how.release) as source:
        refuse_unmerged_lora(src, source, how.config)
        _check_expressible(src, source.cfg, LAYOUT)
        groups, _ = source.groups(LAYOUT)
        want = TYPES[out_dtype(source.dtype, how.dtype) if how.dtype == "keep" else how.dtype]
        planned = [Planned(name, shape, tensor_type(name, shape, want)) for g in groups for name, shape in g.dst()]
        writer, vocab_note = _metadata(source, src, want, len(planned))
        for p in planned:
            writer.add_tensor_info(p.name, gguf.quant_shape_to_byte_shape(p.shape, p.type), np.dtype(np.uint8),
                                   p.nbytes, raw_dtype=p.type)
        total = sum(p.nbytes for p in planned)
        with staged_file(dst, how.overwrite, protected, total + (1 << 24), is_ours,
                         fingerprints(source.ckpt.files)) as tmp:
            _write(writer, tmp, source, groups, planned, how, total, desc=f"{src.name} -> {dst.name}")
        source.ckpt.check_complete()
    fallback = sorted({p.name for p in planned if p.type == T.F16 and want in (T.Q8_0, T.Q4_0)})
    notes = [vocab_note] if vocab_note else []
    notes += [f"float16 (rows not a multiple of 32): {', '.join(fallback[:3])}"] if fallback else []
    dropped = {kind: names for kind, names in source.dropped.items() if names}
    return Summary(str(src), str(dst), source.layout.describe(), f"gguf ({arch_of(source.cfg).name.lower()})",
                   "gguf", NAMES[want], len(planned), total, time.perf_counter() - started, [dst.name], dropped,
                   source.nonfinite, source.overflowed, notes)


def _metadata(source: Source, src: Path, want: T, n_tensors: int) -> tuple[gguf.GGUFWriter, str]:
    """A writer holding every metadata key of the file (its tensors are added by the caller), and a note on the
    tokenizer when it is not the model's own."""
    cfg = source.cfg
    arch = arch_of(cfg)
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(RELEASES[cfg.release].hf or cfg.release)
    w.add_file_type(FILE_TYPES[want])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.seq_length)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.ffn_hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.multi_query_group_num)
    w.add_key_length(cfg.kv_channels)
    w.add_value_length(cfg.kv_channels)
    w.add_layer_norm_rms_eps(cfg.layernorm_epsilon)
    w.add_rope_dimension_count(cfg.kv_channels // 2)  # the releases rotate half of each head
    base, scale = rope_rule(cfg.release, cfg.rope_ratio)
    w.add_rope_freq_base(base)
    if scale != 1:  # ChatGLM2-6B-32k divides the positions: llama.cpp's linear scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scale)
    note = _vocabulary(w, source, src)
    w.add_string(TOOL_KEY, f"{PACKAGE} {__version__}")
    w.add_string(SOURCE_KEY, str(src.resolve()))
    w.add_array(SHA_KEY, ["0" * 64] * n_tensors)  # last: filled in place once the data is written (_write)
    return w, note


def _vocabulary(w: gguf.GGUFWriter, source: Source, src: Path) -> str:
    """The tokenizer keys: the sentencepiece model as llama.cpp's `llama` tokenizer (pre `chatglm-spm`), GLM-4's
    ranks as its byte-level `gpt2` BPE with the merges they imply (pre `chatglm-bpe`); the family's special tokens
    after the base vocabulary, unused ids up to the embedding's rows as `[PADn]`; the chat template of the folder's
    tokenizer_config.json, else the family's."""
    folder = source.ckpt.folder
    files, bundled = tokenizer_or_bundled(folder, source.cfg.family)
    if not files:
        raise CheckpointError(f"{src}: no {TOKENIZER_MODEL} beside the weights, and {source.cfg.family}'s is not "
                              f"bundled: copy the release's {TOKENIZER_MODEL} there (a GGUF file needs its tokenizer)")
    family = FAMILIES[family_of(folder, source.cfg)]
    vocabulary = _sentencepiece if family.vocabulary == SENTENCEPIECE else _bpe
    n, eos, pad = vocabulary(w, files[0], family, source.cfg.padded_vocab_size)
    special = {tok: n + i for i, tok in enumerate(family.specials)}
    w.add_eos_token_id(eos)
    w.add_pad_token_id(pad)
    for stop, add in zip(family.stops, (w.add_eot_token_id, w.add_eom_token_id), strict=False):
        add(special[stop])
    w.add_add_bos_token(False)
    config = folder / TOKENIZER_CONFIG if folder is not None and not bundled else None
    template = (read_json(config) if config is not None and config.is_file() else {}).get("chat_template")
    w.add_chat_template(template if isinstance(template, str) and template else family.template)
    return f"no {TOKENIZER_MODEL} beside the source: wrote the bundled ChatGLM2/3 vocabulary" if bundled else ""


def _padded(size: int, used: int) -> list[str]:
    """The unused ids up to the embedding's rows, named as llama.cpp's converter names them."""
    return [f"[PAD{i}]" for i in range(used, size)]


def _sentencepiece(w: gguf.GGUFWriter, model: Path, family, size: int) -> tuple[int, int, int]:
    """The sentencepiece model's keys; returns (its size, eos id, pad id: its <unk>)."""
    import sentencepiece as spm  # the [mindspore] extra's; missing: the command says so in one line

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{model}: not a sentencepiece model ({e})") from None
    n = sp.vocab_size()
    used = n + len(family.specials)
    if used > size:
        raise CheckpointError(f"{model}: {used} tokens, more than the model's {size} embedding rows")
    kinds = [(sp.is_unknown, gguf.TokenType.UNKNOWN), (sp.is_control, gguf.TokenType.CONTROL),
             (sp.is_unused, gguf.TokenType.UNUSED), (sp.is_byte, gguf.TokenType.BYTE)]
    types = [next((t for test, t in kinds if test(i)), gguf.TokenType.NORMAL) for i in range(n)]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("chatglm-spm")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)] + list(family.specials) + _padded(size, used))
    w.add_token_scores([sp.get_score(i) for i in range(n)] + [0.0] * (size - n))
    w.add_token_types(types + [gguf.TokenType.CONTROL] * len(family.specials) + [gguf.TokenType.UNUSED] * (size - used))
    return n, sp.eos_id(), sp.unk_id()


def _byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable stand-ins for the 256 bytes (GPT-2's: printable Latin-1 bytes stand for
    themselves, the others take the code points from 256 up, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes] | None:
    """The last merge that makes `token`: byte-pair merging of its bytes by rank, using only ranks below its own
    (as tiktoken would), must end in two parts; None for a token no merge makes."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        rank, i = min(pairs)
        if rank >= limit:
            return None
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _bpe(w: gguf.GGUFWriter, model: Path, family, size: int) -> tuple[int, int, int]:
    """GLM-4's ranks as byte-level BPE keys; returns (the ranks' size, eos id, pad id: both <|endoftext|>, also the
    unknown token, as llama.cpp's converter sets it)."""
    ranks = read_ranks(model)
    n = len(ranks)
    used = n + len(family.specials)
    if used > size:
        raise CheckpointError(f"{model}: {used} tokens, more than the model's {size} embedding rows")
    alphabet = _byte_alphabet()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    tokens = sorted(ranks, key=ranks.get)
    merges = [f"{text(a)} {text(b)}" for t in tokens if len(t) > 1 and (m := _merge_of(ranks, t)) for a, b in [m]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("chatglm-bpe")
    w.add_token_list([text(t) for t in tokens] + list(family.specials) + _padded(size, used))
    w.add_token_types([gguf.TokenType.NORMAL] * n + [gguf.TokenType.CONTROL] * len(family.specials)
                      + [gguf.TokenType.UNUSED] * (size - used))
    w.add_token_merges(merges)
    eos = n + family.specials.index(family.eos)
    w.add_unk_token_id(eos)
    return n, eos, eos


def _write(w: gguf.GGUFWriter, path: Path, source: Source, groups, planned: list[Planned], how: Conversion,
           total: int, desc: str) -> None:
    """The header, metadata and tensor infos by the `gguf` writer; then each tensor's data, aligned as the format
    says, converted a slice of rows at a time and hashed as written; then the digests over their placeholders."""
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    digests_at = w.fout[0].tell() - len(planned) * SHA_ENTRY  # the digests array is the last key (_metadata)
    w.write_ti_data_to_file()
    w.close()
    digests, by_name = [], {p.name: p for p in planned}
    with open(path, "r+b") as f, _progress(total, how.progress, desc) as bar:
        f.seek(0, 2)
        for name, arr, dtype in source.stream(groups, "keep", how.allow_overflow):
            p = by_name[name]
            f.write(bytes(-f.tell() % w.data_alignment))
            h = hashlib.sha256()
            for data in _encoded(arr, dtype, p, how.allow_overflow, source):
                h.update(data)
                f.write(data)
                bar.update(len(data))
            digests.append(h.hexdigest())
        f.write(bytes(-f.tell() % w.data_alignment))
        f.seek(digests_at)
        f.write(b"".join(struct.pack("<Q", 64) + d.encode() for d in digests))


def _encoded(arr: np.ndarray, dtype: str, p: Planned, allow_overflow: bool, source: Source):
    """The tensor's bytes in its GGUF type, a slice of rows at a time (bounded memory for any tensor)."""
    rows = arr.reshape(-1, arr.shape[-1])
    step = max(1, CHUNK_VALUES // rows.shape[1])
    for a in range(0, rows.shape[0], step):
        part = rows[a:a + step]
        if p.type in FLOAT_NAMES:
            out = apply_dtype(part, p.name, dtype, FLOAT_NAMES[p.type], allow_overflow, str(source.ckpt.path),
                              source.overflowed)
            yield np.ascontiguousarray(out).tobytes()
        else:
            yield from (q.tobytes() for q in quantized_slices(part, dtype, NAMES[p.type]))


def gguf_dtypes() -> tuple[str, ...]:
    """What --dtype takes for to-gguf: keep, the float types and the block quantizations."""
    return ("keep", *FLOAT_NAMES.values(), *GGUF_QUANTS)

