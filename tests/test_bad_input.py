"""Every bad input: a one-line error naming the file or tensor, exit 1, no DST left behind, the source untouched."""
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tree_digest
from helpers import tensors

from converters.checkpoint import open_checkpoint
from converters.cli import main
from converters.formats.ckpt import CkptWriter
from converters.formats.safetensors_io import SafetensorsWriter


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, *needles, dst=None):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines() if hasattr(result, "stderr") else result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    if dst is not None:
        assert not dst.exists()
        assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial")]


@pytest.fixture
def copy_of(hf_tiny, tmp_path):
    def make(fmt="bin", dtype="float16"):
        dst = tmp_path / f"src-{fmt}-{dtype}"
        shutil.copytree(hf_tiny(fmt, dtype), dst)
        return dst
    return make


@pytest.fixture
def ms_ckpt(hf_tiny, tmp_path):
    run("hf2ms", hf_tiny(), tmp_path / "ms", "--quiet")
    return tmp_path / "ms"


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])


def test_truncated_ckpt(ms_ckpt, tmp_path):
    truncate(ms_ckpt / "mindspore_model.ckpt", -1000)
    before = tree_digest(ms_ckpt)
    assert_refused(run("ms2hf", ms_ckpt, tmp_path / "out"), "mindspore_model.ckpt", "truncated", dst=tmp_path / "out")
    assert tree_digest(ms_ckpt) == before


def test_corrupt_protobuf(ms_ckpt, tmp_path):
    path = ms_ckpt / "mindspore_model.ckpt"
    data = bytearray(path.read_bytes())
    data[0:4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    assert_refused(run("ms2hf", ms_ckpt, tmp_path / "out"), "not a valid MindSpore checkpoint", dst=tmp_path / "out")


def test_truncated_safetensors(copy_of, tmp_path):
    src = copy_of("safetensors")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    truncate(shard, -10)
    before = tree_digest(src)
    assert_refused(run("hf2ms", src, tmp_path / "out"), shard.name, "truncated", dst=tmp_path / "out")
    assert tree_digest(src) == before


def test_safetensors_header_that_lies(copy_of, tmp_path):
    src = copy_of("safetensors")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 4  # claims more bytes than its shape holds
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    assert_refused(run("hf2ms", src, tmp_path / "out"), shard.name, first, dst=tmp_path / "out")


def test_truncated_bin(copy_of, tmp_path):
    src = copy_of("bin")
    shard = sorted(src.glob("pytorch_model-*.bin"))[0]
    truncate(shard, shard.stat().st_size // 2)
    assert_refused(run("hf2ms", src, tmp_path / "out"), shard.name, dst=tmp_path / "out")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_deflated_record_that_inflates_past_its_stated_size(copy_of, tmp_path):
    """The record's stated size is right for its tensor, but its deflated bytes inflate to more: found when the
    tensor is read (long after indexing), and still one line."""
    src = copy_of()
    shard = sorted(src.glob("*.bin"))[0]
    with zipfile.ZipFile(shard) as z:
        items = {i.filename: z.read(i.filename) for i in z.infolist()}
    target = next(n for n in items if "/data/" in n)
    with zipfile.ZipFile(shard, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in items.items():
            z.writestr(name, data + b"\0" * 64 if name == target else data)
    raw, name = bytearray(shard.read_bytes()), target.encode()
    stated = struct.pack("<I", len(items[target]))
    at = raw.find(name)
    while at >= 0:  # the local header's and the central directory's uncompressed size, back to the tensor's
        for sig, head, field in ((b"PK\x03\x04", 30, 22), (b"PK\x01\x02", 46, 24)):
            if raw[at - head:at - head + 4] == sig:
                raw[at - head + field:at - head + field + 4] = stated
        at = raw.find(name, at + 1)
    shard.write_bytes(bytes(raw))
    before = tree_digest(src)
    assert_refused(run("hf2ms", src, tmp_path / "out"), str(shard), "inflates past its stated size",
                   dst=tmp_path / "out")
    assert tree_digest(src) == before


@pytest.mark.runtime
def test_bin_whose_pickle_would_run_code_is_refused(tmp_path, copy_of):
    import torch
    src = copy_of("bin")
    shard = sorted(src.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    state["evil"] = _RunsCode()
    torch.save(state, shard)
    result = run("hf2ms", src, tmp_path / "out")
    assert_refused(result, shard.name, "refused to unpickle", dst=tmp_path / "out")
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "missing-shard.bin"])
def test_index_naming_bad_shards(copy_of, tmp_path, bad):
    src = copy_of("bin")
    (tmp_path / "outside.bin").write_bytes(b"x")
    index_path = src / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["transformer.output_layer.weight"] = bad
    index_path.write_text(json.dumps(index))
    why = "does not exist" if bad == "missing-shard.bin" else "outside the checkpoint folder"
    assert_refused(run("hf2ms", src, tmp_path / "out"), "pytorch_model.bin.index.json", why, dst=tmp_path / "out")


def _rewrite_single(src, drop=None, add=None, reshape=None, patch=None):
    """Replace a sharded safetensors folder by one model.safetensors with a tensor dropped, added, reshaped, or
    one value changed (patch=(name, index, value))."""
    with open_checkpoint(src) as c:
        tensors = {n: (t.read(), t.dtype) for n, t in c.tensors.items() if n != drop}
    if add:
        tensors[add] = (np.zeros(4, np.float16), "float16")
    if reshape:
        a, d = tensors[reshape]
        tensors[reshape] = (a.reshape(-1)[: a.size // 2].reshape(a.shape[0] // 2, -1), d)
    if patch:
        name, index, value = patch
        tensors[name][0].reshape(-1)[index] = value
    for p in [*src.glob("model*.safetensors*"), src / "manifest.json"]:  # a hand-made folder: none of ours
        p.unlink(missing_ok=True)
    with open(src / "model.safetensors", "wb") as f:
        w = SafetensorsWriter(f, [(n, a.shape, d) for n, (a, d) in tensors.items()])
        for n, (a, d) in tensors.items():
            w.write(n, a, d)


@pytest.mark.parametrize("change, needles", [
    (dict(drop="transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"),
     ("missing", "layers.1.mlp.dense_4h_to_h.weight")),
    (dict(add="transformer.encoder.layers.0.mystery.weight"), ("unexpected", "mystery")),
    (dict(reshape="transformer.encoder.layers.0.self_attention.dense.weight"),
     ("layers.0.self_attention.dense.weight", "config")),
], ids=["missing key", "unexpected key", "shape disagrees with config"])
def test_names_and_shapes_must_fit_the_config(copy_of, tmp_path, change, needles):
    src = copy_of("safetensors")
    _rewrite_single(src, **change)
    assert_refused(run("hf2ms", src, tmp_path / "out"), *needles, dst=tmp_path / "out")


def test_float16_overflow(copy_of, tmp_path):
    src = copy_of("safetensors", "float32")
    name = "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"
    _rewrite_single(src, patch=(name, 5, 1e6))
    assert_refused(run("hf2ms", src, tmp_path / "out", "--dtype", "float16"), name, "overflows float16",
                   str(src / "model.safetensors"), dst=tmp_path / "out")
    ok = run("hf2ms", src, tmp_path / "out", "--dtype", "float16", "--allow-overflow", "--quiet")
    assert ok.exit_code == 0, ok.output
    assert f"warning: wrote 1 values of {name} as inf" in ok.output


@pytest.mark.runtime
def test_another_architecture_is_named(tmp_path):
    """transformers' Llama shares GLM's embedding name: its folder is not taken for a GLM one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(llama)
    assert_refused(run("hf2ms", llama, tmp_path / "out"), "not a GLM checkpoint", "llama-style", "mlp.gate_proj",
                   dst=tmp_path / "out")
    shown = run("inspect", llama)
    assert "not a GLM checkpoint" in shown.output and "layout glm" not in shown.output


def test_a_source_without_tokenizer_is_said(copy_of, tmp_path):
    src = copy_of()
    (src / "tokenizer.model").unlink()
    result = run("hf2ms", src, tmp_path / "out")
    assert result.exit_code == 0 and "no tokenizer.model beside the source: none written" in result.output


def test_the_merge_lora_hint_works_as_printed(ms_ckpt, tmp_path):
    """A checkpoint holding LoRA factors and no config.json beside it (given with --config): the suggested
    command, --config and all, runs."""
    run_dir = tmp_path / "run" / "checkpoint" / "rank_0"
    run_dir.mkdir(parents=True)
    shutil.copyfile(ms_ckpt / "config.json", tmp_path / "run" / "config.json")
    qkv = "transformer.encoder.layers.0.self_attention.query_key_value"
    with open(run_dir / "lora.ckpt", "wb") as f:
        w = CkptWriter(f)
        for name, arr in tensors(ms_ckpt / "mindspore_model.ckpt").items():
            w.write(name, arr, "float16")
            if name == f"{qkv}.weight":
                w.write(f"{qkv}.mindpet_delta_lora_a", np.full((2, arr.shape[1]), 0.01, np.float32), "float32")
                w.write(f"{qkv}.mindpet_delta_lora_b", np.full((arr.shape[0], 2), 0.01, np.float32), "float32")
        w.finish()
    refused = run("ms2hf", run_dir / "lora.ckpt", tmp_path / "out", "--config", tmp_path / "run" / "config.json")
    hint = refused.stderr.split("`")[1]
    assert hint.startswith("glm2-convert merge-lora") and f"--config {tmp_path / 'run' / 'config.json'}" in hint
    done = run(*hint.replace("DST", str(tmp_path / "merged")).split()[1:], "--lora-alpha", "4", "--quiet")
    assert done.exit_code == 0 and (tmp_path / "merged" / "mindspore_model.ckpt").is_file(), done.output


def test_existing_destination_needs_overwrite(hf_tiny, tmp_path):
    """--overwrite replaces a folder this toolkit wrote, never one that holds anything else."""
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert_refused(run("hf2ms", hf_tiny(), dst), "already exists", "--overwrite")
    assert_refused(run("hf2ms", hf_tiny(), dst, "--overwrite"), "keep.txt", "no manifest.json")
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    (dst / "keep.txt").unlink()
    assert run("hf2ms", hf_tiny(), dst, "--overwrite", "--quiet").exit_code == 0  # an empty folder
    assert run("hf2ms", hf_tiny(), dst, "--overwrite", "--quiet").exit_code == 0  # one of ours
    (dst / "notes.txt").write_text("mine too")
    assert_refused(run("hf2ms", hf_tiny(), dst, "--overwrite"), "notes.txt", "not listed in its manifest.json")
    assert (dst / "notes.txt").read_text() == "mine too" and (dst / "mindspore_model.ckpt").is_file()


@pytest.mark.runtime
def test_cli_process_prints_one_line_and_exits_nonzero(tmp_path):
    bogus = tmp_path / "nothing.ckpt"
    bogus.write_bytes(b"\x0a\x05abc")
    proc = subprocess.run([sys.executable, "-m", "converters", "ms2hf", str(bogus), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.runtime
def test_conversion_needs_neither_torch_nor_mindspore(hf_tiny, tmp_path):
    """Every format converts, both ways, with torch, mindspore and safetensors unimportable (.bin is read and
    written by our own zip and pickle framing), and with zlib's CRC-32 in place of ISA-L's."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['mindspore'] = None; sys.modules['safetensors'] = None\n"
        "sys.modules['isal'] = None\n"
        "from converters.cli import main; main()")
    src = hf_tiny("safetensors", "bfloat16")
    for args in (["hf2ms", src, tmp_path / "ms"], ["ms2hf", tmp_path / "ms", tmp_path / "hf"],
                 ["verify", src, tmp_path / "hf"], ["ms2hf", tmp_path / "ms", tmp_path / "hf-bin", "--format", "bin"],
                 ["hf2ms", tmp_path / "hf-bin", tmp_path / "ms-from-bin"], ["verify", src, tmp_path / "ms-from-bin"],
                 ["inspect", tmp_path / "hf-bin"]):
        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    import torch
    for f in (tmp_path / "hf-bin").glob("*.bin"):
        assert torch.load(f, weights_only=True)  # written without torch, loads in torch
    assert subprocess.run([sys.executable, "-m", "converters", "verify", str(src), str(tmp_path / "hf-bin")],
                          capture_output=True).returncode == 0
