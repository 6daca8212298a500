"""GGUF out (`glm2-convert to-gguf`) and in (a .gguf file as a source): checked with the `gguf` package's own reader
and quantizers, against the source's tensors, an independent forward (tests/numpy_glm2.py) and, where the
llama-cpp-python extra is installed, llama.cpp itself running the files written here."""
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from helpers import glm4_ranks, optional
from numpy_glm2 import NumpyGLM2

from converters.checkpoint import open_checkpoint
from converters.convert import convert
from converters.formats.ckpt import CkptWriter
from converters.formats.gguf_io import scan
from converters.gguf_out import SHA_KEY, SOURCE_KEY, to_gguf
from converters.source import Source
from converters.synth import synthesize
from glm2_core.config import GLM2Config
from glm2_core.dtypes import cast, to_float32
from glm2_core.errors import CheckpointError, UserError
from glm2_core.files import TOKENIZER_MODEL
from glm2_core.names import Layout
from glm2_ms.tokenizer import GLM2Tokenizer

BIN = Path(sys.executable).parent
T = gguf.GGMLQuantizationType
TEXT = "你好，请介绍一下你自己。Hello world 123"


def canonical(folder) -> dict[str, tuple[np.ndarray, str]]:
    """The model's tensors under the GGUF names, as stored (array, dtype)."""
    with Source.open(folder) as s:
        groups, _ = s.groups(Layout("gguf"))
        return {name: s.canonical(g) for g in groups for name, _ in g.dst()}


@dataclass
class Stored:
    """A tensor of a GGUF file as the tests look at it (the names of gguf.GGUFReader's tensors)."""
    tensor_type: int
    shape: np.ndarray  # GGUF's order: the fastest dimension first
    data: np.ndarray  # its bytes
    data_offset: int


def read_gguf(path) -> tuple[dict, dict[str, Stored]]:
    """The metadata and tensors, by the scan GGUF in uses, which test_the_scan_reads_what_the_gguf_package_reads
    holds to the gguf package's reader (that one takes seconds on a vocabulary, so it is not used everywhere)."""
    kv, table = scan(Path(path), AssertionError)
    raw = np.fromfile(path, np.uint8)
    sizes = {t.name: int(np.prod(t.shape)) // gguf.GGML_QUANT_SIZES[T(t.type)][0] * gguf.GGML_QUANT_SIZES[T(t.type)][1]
             for t in table}
    return kv, {t.name: Stored(t.type, np.array(t.shape[::-1]), raw[t.offset:t.offset + sizes[t.name]], t.offset)
                for t in table}


def fields(path) -> dict:
    return scan(Path(path), AssertionError)[0]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Tiny float32 HF folders of each kind of release: ChatGLM2, its 32k (positions divided), ChatGLM3-32k (base
    multiplied), GLM-4 (a BPE vocabulary) and GLM-4-0414 (llama.cpp's glm4 architecture)."""
    made = {}

    def get(release: str) -> Path:
        if release not in made:
            glm4 = release.startswith("glm-4")
            extra = dict(padded_vocab_size=151552, eos_token_id=(151329, 151336, 151338), pad_token_id=151329) \
                if glm4 else {}
            ratio = {"chatglm2-6b-32k": 16, "chatglm3-6b-32k": 50, "glm-4-9b-chat": 500}.get(release)
            cfg = GLM2Config.preset("tiny", release=release, rope_ratio=ratio, **extra)
            out = tmp_path_factory.mktemp(release) / "hf"
            synthesize(out, cfg, "float32", "safetensors", seed=7)
            if glm4:
                glm4_ranks(out / TOKENIZER_MODEL, words=("你好", "Hello"))
            made[release] = out
        return made[release]

    return get


@pytest.mark.parametrize("source, dtype", [("float32", "keep"), ("float16", "keep"), ("bfloat16", "keep"),
                                           ("float32", "float16"), ("float32", "q8_0"), ("float16", "q4_0")])
def test_every_tensor_is_written_in_its_type(hf_tiny, tmp_path, source, dtype):
    """Names and types by llama.cpp's rules; float tensors exactly the source's values in their type; the block
    types exactly what the gguf package's quantizer makes of the whole tensor (so writing a slice of rows at a time
    changes nothing), and within half a step of the source; each tensor's sha256 recorded."""
    src = hf_tiny("safetensors", source)
    summary = to_gguf(src, tmp_path / "m.gguf", dtype=dtype, progress=False)
    reader, got = read_gguf(tmp_path / "m.gguf")
    want = canonical(src)
    assert list(got) == list(want) and summary.tensors == len(want)
    main = {"keep": {"float32": T.F32, "float16": T.F16, "bfloat16": T.BF16}[source], "float16": T.F16,
            "q8_0": T.Q8_0, "q4_0": T.Q4_0}[dtype]
    digests = reader[SHA_KEY]
    for (name, t), digest in zip(got.items(), digests, strict=True):
        arr, stored = want[name]
        kind = T(t.tensor_type)
        expected = T.F32 if arr.ndim == 1 else T.Q8_0 if (main == T.Q4_0 and name == "output.weight") else main
        assert kind == expected, name
        assert list(reversed(t.shape.tolist())) == list(arr.shape)
        data = np.asarray(t.data)
        assert hashlib.sha256(data.tobytes()).hexdigest() == digest
        if kind in (T.F32, T.F16, T.BF16):
            dt = {T.F32: "float32", T.F16: "float16", T.BF16: "bfloat16"}[kind]
            assert data.tobytes() == np.ascontiguousarray(cast(arr, stored, dt)).tobytes(), name
            continue
        f32 = to_float32(arr, stored)
        assert data.tobytes() == gguf.quants.quantize(f32, kind).tobytes(), name
        blocks = f32.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / (127 if kind == T.Q8_0 else 8)
        error = np.abs(gguf.quants.dequantize(data, kind).reshape(-1, 32) - blocks)
        assert (error <= 1.01 * step).all(), name


def test_metadata_is_what_llama_cpp_reads(releases, tmp_path):
    """Architecture, sizes, RoPE (the base, or llama.cpp's linear scaling for ChatGLM2-6B-32k), the vocabulary
    with its specials and padding, stop tokens and chat template, for each kind of release."""
    seen = {}
    for release in ("chatglm2-6b", "chatglm2-6b-32k", "chatglm3-6b-32k", "glm-4-9b-chat", "glm-4-9b-0414"):
        to_gguf(releases(release), tmp_path / f"{release}.gguf", dtype="q8_0", progress=False)
        seen[release] = fields(tmp_path / f"{release}.gguf")
        if release not in ("chatglm2-6b-32k", "glm-4-9b-chat"):  # the library's reader takes seconds: both kinds
            continue  # of vocabulary, RoPE scaling keys and GLM-4's merges
        # GGUF in's scan and the gguf package's own reader agree on every key and every tensor
        library = gguf.GGUFReader(tmp_path / f"{release}.gguf")
        assert seen[release] == {k: f.contents() for k, f in library.fields.items() if not k.startswith("GGUF.")}
        ours = read_gguf(tmp_path / f"{release}.gguf")[1]
        assert [(n, t.tensor_type, t.shape.tolist(), t.data_offset, t.data.tobytes()) for n, t in ours.items()] == \
            [(t.name, t.tensor_type, t.shape.tolist(), int(t.data_offset), bytes(t.data)) for t in library.tensors]
    g2, g2_32k, g3, g4, g0414 = seen.values()
    assert g2["general.architecture"] == "chatglm" and g0414["general.architecture"] == "glm4"
    assert {k: g2[f"chatglm.{k}"] for k in ("embedding_length", "feed_forward_length", "block_count",
                                             "attention.head_count", "attention.head_count_kv",
                                             "rope.dimension_count", "context_length")} == \
        {"embedding_length": 64, "feed_forward_length": 160, "block_count": 2, "attention.head_count": 4,
         "attention.head_count_kv": 2, "rope.dimension_count": 8, "context_length": 2048}
    assert g2_32k["chatglm.rope.freq_base"] == 10000 and g2_32k["chatglm.rope.scaling.type"] == "linear"
    assert g2_32k["chatglm.rope.scaling.factor"] == 16
    assert g3["chatglm.rope.freq_base"] == 500000 and "chatglm.rope.scaling.type" not in g3
    assert g4["chatglm.rope.freq_base"] == 5000000
    for meta, tokens in ((g2, 65024), (g3, 65024), (g4, 151552)):
        assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == tokens
        assert meta["tokenizer.ggml.add_bos_token"] is False
    assert (g2["tokenizer.ggml.model"], g2["tokenizer.ggml.pre"]) == ("llama", "chatglm-spm")
    assert g2["tokenizer.ggml.tokens"][64790:64793] == ["[gMASK]", "[sMASK]", "sop"]
    assert g2["tokenizer.ggml.tokens"][64794] == "[PAD64794]" and g2["tokenizer.ggml.eos_token_id"] == 2
    assert g3["tokenizer.ggml.tokens"][64795] == "<|user|>"
    assert (g3["tokenizer.ggml.eot_token_id"], g3["tokenizer.ggml.eom_token_id"]) == (64795, 64797)
    assert "[gMASK]sop" in g3["tokenizer.chat_template"] and "[gMASK]<sop>" in g4["tokenizer.chat_template"]
    assert (g4["tokenizer.ggml.model"], g4["tokenizer.ggml.pre"]) == ("gpt2", "chatglm-bpe")
    assert g4["tokenizer.ggml.tokens"][198] == "Ċ" and g4["tokenizer.ggml.tokens"][151331] == "[gMASK]"
    assert (g4["tokenizer.ggml.eos_token_id"], g4["tokenizer.ggml.eot_token_id"]) == (151329, 151336)
    merges = g4["tokenizer.ggml.merges"]
    # the ranks file makes 你好 (e4 bd a0 e5 a5 bd) by adding one byte at a time: the merges, in GPT-2's alphabet
    assert merges[:5] == ["ä ½", "ä½ ł", "ä½ł å", "ä½łå ¥", "ä½łå¥ ½"]
    assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= \
        set(read_gguf(tmp_path / "glm-4-9b-0414.gguf")[1])


def test_a_folder_without_its_tokenizer_gets_its_familys_vocabulary(releases, tmp_path):
    """A ChatGLM3 folder without tokenizer files: the bundled sentencepiece model, with ChatGLM3's role tokens."""
    src = tmp_path / "chatglm3"
    shutil.copytree(releases("chatglm3-6b-32k"), src)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (src / name).unlink(missing_ok=True)
    summary = to_gguf(src, tmp_path / "m.gguf", progress=False)
    assert any("bundled" in note for note in summary.notes)
    meta = fields(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.tokens"][64795] == "<|user|>" and meta["tokenizer.ggml.eot_token_id"] == 64795
    assert "[gMASK]sop" in meta["tokenizer.chat_template"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gguf_to_mindspore_and_back_is_bit_exact(hf_tiny, tmp_path, dtype):
    """GGUF in: the MindSpore folder holds the source's tensors exactly; written as GGUF again, every tensor and
    every metadata key but the source's path are the same."""
    src = hf_tiny("safetensors", dtype)
    to_gguf(src, tmp_path / "a.gguf", progress=False)
    convert(tmp_path / "a.gguf", tmp_path / "ms", target=Layout("mindformers"), progress=False)
    assert GLM2Config.from_pretrained(tmp_path / "ms") == GLM2Config.from_pretrained(src)
    to_gguf(tmp_path / "ms", tmp_path / "b.gguf", progress=False)
    a, b = read_gguf(tmp_path / "a.gguf")[1], read_gguf(tmp_path / "b.gguf")[1]
    assert [(n, t.tensor_type, np.asarray(t.data).tobytes()) for n, t in a.items()] == \
        [(n, t.tensor_type, np.asarray(t.data).tobytes()) for n, t in b.items()]
    fa, fb = fields(tmp_path / "a.gguf"), fields(tmp_path / "b.gguf")
    assert fa.pop(SOURCE_KEY) != fb.pop(SOURCE_KEY) and fa == fb
    r = subprocess.run([BIN / "glm2-convert", "verify", src, tmp_path / "ms"], capture_output=True, text=True)
    assert r.returncode == 0 and "0 mismatched" in r.stdout, r.stdout + r.stderr


def test_a_quantized_gguf_comes_back_dequantized(hf_tiny, tmp_path):
    to_gguf(hf_tiny("safetensors", "float32"), tmp_path / "q.gguf", dtype="q4_0", progress=False)
    convert(tmp_path / "q.gguf", tmp_path / "ms", target=Layout("mindformers"), progress=False)
    back = canonical(tmp_path / "ms")
    for name, t in read_gguf(tmp_path / "q.gguf")[1].items():
        want = gguf.quants.dequantize(np.asarray(t.data), T(t.tensor_type)).reshape(back[name][0].shape)
        assert back[name][1] == "float32" and np.array_equal(back[name][0], want), name


def test_a_corrupt_tensor_is_named_and_nothing_is_written(hf_tiny, tmp_path):
    to_gguf(hf_tiny("safetensors", "float16"), tmp_path / "m.gguf", progress=False)
    t = read_gguf(tmp_path / "m.gguf")[1]["blk.1.ffn_up.weight"]
    with open(tmp_path / "m.gguf", "r+b") as f:
        f.seek(int(t.data_offset) + 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    for args in (["inspect", tmp_path / "m.gguf"], ["hf2ms", tmp_path / "m.gguf", tmp_path / "out"]):
        r = subprocess.run([BIN / "glm2-convert", *args], capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "blk.1.ffn_up.weight" in r.stderr and "sha256" in r.stderr
    assert not (tmp_path / "out").exists()
    r = subprocess.run([BIN / "glm2-convert", "inspect", "--no-crc-check", tmp_path / "m.gguf"], capture_output=True,
                       text=True)
    assert r.returncode == 0


def test_the_output_rules_hold_for_a_file(hf_tiny, tmp_path):
    """Refused before a byte is written: an existing file without --overwrite, a file this toolkit did not write
    even with it, an unknown dtype, a layout the tool does not write; a failure half-way leaves no file."""
    src = hf_tiny("safetensors", "float32")
    mine, foreign = tmp_path / "mine.gguf", tmp_path / "foreign.gguf"
    to_gguf(src, mine, progress=False)
    foreign.write_bytes(b"GGUF not ours")
    with pytest.raises(UserError, match="already exists"):
        to_gguf(src, mine, progress=False)
    with pytest.raises(UserError, match="not a file this toolkit wrote"):
        to_gguf(src, foreign, overwrite=True, progress=False)
    assert foreign.read_bytes() == b"GGUF not ours"
    before = mine.stat().st_mtime_ns
    to_gguf(src, mine, overwrite=True, dtype="q8_0", progress=False)
    assert mine.stat().st_mtime_ns != before and fields(mine)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    r = subprocess.run([BIN / "glm2-convert", "to-gguf", src, tmp_path / "x.gguf", "--dtype", "q5_k"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "q5_k" in r.stderr
    hot = tmp_path / "hot"  # the last tensor holds a value float16 cannot: found after the others are written
    shutil.copytree(src, hot)
    with open_checkpoint(hot) as c:
        ref = c.tensors["transformer.output_layer.weight"]
        where, at = ref.file, ref.offset
    with open(where, "r+b") as f:
        f.seek(at)
        f.write(np.float32(1e6).tobytes())
    with pytest.raises(CheckpointError, match="overflows float16"):
        to_gguf(hot, tmp_path / "y.gguf", dtype="float16", verify_checksums=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.gguf", "hot", "mine.gguf"]


def test_what_a_killed_run_left_is_removed_by_the_next(hf_tiny, tmp_path, capfd):
    """A run killed mid-write leaves only its hidden staging file; the next run to that output removes it, says so,
    and leaves anything else (another live run's file, the user's) alone."""
    dead = tmp_path / ".m.gguf.partial-4194305-abcd1234"  # the kernel gives no pid above 2^22
    live = tmp_path / f".m.gguf.partial-{os.getpid()}-abcd1234"
    dead.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    to_gguf(hf_tiny("safetensors", "float32"), tmp_path / "m.gguf", progress=False)
    assert not dead.exists() and live.read_bytes() == b"being written"
    assert f"removed {dead.name}" in capfd.readouterr().err


def test_a_checkpoint_with_unmerged_lora_is_refused(hf_tiny, tmp_path):
    """Written without its adapters it would be another model: refused before anything is written."""
    ms = tmp_path / "ms"
    convert(hf_tiny("safetensors", "float32"), ms, target=Layout("mindformers"), progress=False)
    qkv = "transformer.encoder.layers.0.self_attention.query_key_value"
    with open(tmp_path / "lora.ckpt", "wb") as f, open_checkpoint(ms) as c:
        w = CkptWriter(f)
        for name, ref in c.tensors.items():
            w.write(name, ref.read(), ref.dtype)
            if name == f"{qkv}.weight":
                w.write(f"{qkv}.mindpet_delta_lora_a", np.zeros((2, ref.shape[1]), np.float32), "float32")
                w.write(f"{qkv}.mindpet_delta_lora_b", np.zeros((ref.shape[0], 2), np.float32), "float32")
        w.finish()
    with pytest.raises(CheckpointError, match="holds LoRA adapters"):
        to_gguf(tmp_path / "lora.ckpt", tmp_path / "m.gguf", config=ms / "config.json", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = optional("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)  # float32 caches: the comparison is of the weights and the math
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


@pytest.mark.parametrize("release", ["chatglm2-6b", "chatglm2-6b-32k", "chatglm3-6b-32k", "glm-4-9b-chat",
                                     "glm-4-9b-0414"])
def test_llama_cpp_computes_the_model(releases, tmp_path, release):
    """llama.cpp runs each GGUF written here with the logits of an independent float64 forward of the source, over
    a prompt long enough for RoPE's rule to matter."""
    optional("llama_cpp")
    src = releases(release)
    to_gguf(src, tmp_path / "m.gguf", progress=False)
    with Source.open(src) as s:
        groups, _ = s.groups(Layout("gguf"))
        weights = {g.source.canonical: to_float32(*s.canonical(g)) for g in groups}
        cfg = s.cfg
    ids = [int(i) for i in np.random.default_rng(3).integers(3, 60000, 120)]
    want = NumpyGLM2(weights, cfg).logits(ids)
    got = llama_logits(tmp_path / "m.gguf", ids)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())


def test_llama_cpp_tokenizes_as_the_release(releases, tmp_path):
    """Plain text becomes the same ids in llama.cpp as in the release's own tokenizer (sentencepiece, and GLM-4's
    BPE from its ranks), and the specials are parsed as specials."""
    llama_cpp = optional("llama_cpp")
    for release in ("chatglm2-6b", "glm-4-9b-chat"):
        src = releases(release)
        to_gguf(src, tmp_path / f"{release}.gguf", progress=False)
        ours = GLM2Tokenizer.from_pretrained(src)
        llm = llama_cpp.Llama(model_path=str(tmp_path / f"{release}.gguf"), vocab_only=True, verbose=False)
        text = TEXT if release == "chatglm2-6b" else "你好 Hello"
        assert llm.tokenize(text.encode(), add_bos=False) == ours.encode(text, add_special_tokens=False), release
        prefix = "".join(ours.family.prefix)
        assert llm.tokenize(prefix.encode(), add_bos=False, special=True) == ours.prefix(), release
