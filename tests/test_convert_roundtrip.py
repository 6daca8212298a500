"""hf2ms → ms2hf gives back the same bytes, for every source format, dtype and MindFormers layout."""
import hashlib
import io
import json
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import LAYOUTS, optional, tensor_bytes

from converters.checkpoint import open_checkpoint
from converters.cli import main as convert_cli
from converters.convert import Conversion, convert
from converters.formats.safetensors_io import SafetensorsWriter
from converters.formats.torch_bin import _int
from converters.mindformers_yaml import MINDFORMERS_YAML
from glm2_core.errors import UserError
from glm2_core.names import Layout


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_roundtrip_every_layout_is_bit_identical(hf_tiny, tmp_path, fmt, dtype):
    src = hf_tiny(fmt, dtype)
    original = tensor_bytes(src)
    for i, layout in enumerate(LAYOUTS):
        ms_fmt = "safetensors" if i % 2 else "ckpt"
        ms_dir, back = tmp_path / f"ms{i}", tmp_path / f"hf{i}"
        convert(src, ms_dir, target=layout, fmt=ms_fmt, progress=False)
        convert(ms_dir, back, target=Layout("chatglm"), fmt=fmt, max_shard_bytes=6 * 10**6,
                progress=False)
        assert tensor_bytes(back) == original, layout.describe()
        manifest = json.loads((back / "manifest.json").read_text())
        assert manifest["source_layout"] == layout.as_dict()


def test_unchanged_tensors_copied_file_to_file_within_and_across_file_systems(hf_tiny, tmp_path):
    """Tensors the target keeps byte for byte go file to file: copy_file_range within a file system; across
    (ext4 → tmpfs, where the kernel answers EXDEV) plain reads and writes. Both give the same bytes."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to copy across")
    src = hf_tiny("safetensors", "float16")
    across = Path(tempfile.mkdtemp(dir=shm))
    try:
        for fmt in ("ckpt", "safetensors"):
            convert(src, tmp_path / fmt, target=Layout(), fmt=fmt, progress=False)
            convert(src, across / fmt, target=Layout(), fmt=fmt, progress=False)
            for f in (tmp_path / fmt).iterdir():
                assert f.read_bytes() == (across / fmt / f.name).read_bytes(), f.name
        convert(tmp_path / "ckpt", across / "back", target=Layout("chatglm"), fmt="bin",
                progress=False)
        assert tensor_bytes(across / "back") == tensor_bytes(src)
    finally:
        shutil.rmtree(across)


def test_ms_output_has_the_layout_names(hf_tiny, tmp_path):
    src = hf_tiny()
    convert(src, tmp_path / "a", target=Layout("mindformers", True, True, True), fmt="ckpt", progress=False)
    names = set(tensor_bytes(tmp_path / "a"))
    assert "transformer.embedding.embedding_weight" in names
    assert "transformer.encoder.layers.1.self_attention.wk.bias" in names
    assert "transformer.encoder.layers.0.mlp.dense_right.weight" in names
    assert not any("query_key_value" in n or "dense_h_to_4h" in n or "inv_freq" in n for n in names)
    convert(src, tmp_path / "b", target=Layout("mindformers-legacy"), fmt="ckpt", progress=False)
    assert "transformer.embedding.embedding_table" in set(tensor_bytes(tmp_path / "b"))


@pytest.mark.runtime
def test_rearranged_rope_permutes_rows_as_mindformers_does(hf_tiny, tmp_path, tiny_cfg):
    src = hf_tiny(dtype="float32")
    convert(src, tmp_path / "r", target=Layout("mindformers", rearrange_rope=True), fmt="ckpt", progress=False)
    a, b = tensor_bytes(src), tensor_bytes(tmp_path / "r")
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    orig = np.frombuffer(a[name][2], np.float32).reshape(a[name][1])
    rearr = np.frombuffer(b[name][2], np.float32).reshape(b[name][1])
    d = tiny_cfg.kv_channels
    inverse = np.arange(d) // 2
    inverse[1::2] += d // 2  # the reference's inverse: original row j = rearranged row inverse[j]
    q_k_rows = tiny_cfg.q_rows + tiny_cfg.kv_rows
    for head in range(q_k_rows // d):
        block = slice(head * d, (head + 1) * d)
        np.testing.assert_array_equal(rearr[block][inverse], orig[block])
    np.testing.assert_array_equal(rearr[q_k_rows:], orig[q_k_rows:])  # v untouched


def test_dtype_conversion_and_manifest(hf_tiny, tmp_path):
    src = hf_tiny(dtype="bfloat16")
    convert(src, tmp_path / "f32", target=Layout(), fmt="ckpt", dtype="float32", progress=False)
    manifest = json.loads((tmp_path / "f32" / "manifest.json").read_text())
    assert {t["dtype"] for t in manifest["tensors"]} == {"float32"}
    assert manifest["source"] == str(src.resolve()) and manifest["dtype"] == "float32"
    # bf16 → fp32 is exact, so going back to bf16 restores the bytes
    convert(tmp_path / "f32", tmp_path / "bf", target=Layout("chatglm"), fmt="safetensors", dtype="bfloat16",
            progress=False)
    back, original = tensor_bytes(tmp_path / "bf"), tensor_bytes(src)
    assert back == original


def test_verify_after_a_dtype_change_compares_the_cast_values(hf_tiny, tmp_path):
    """float32 → float16/bfloat16: verify casts the wider side to the narrower dtype (either argument order) and
    says so; two roundings of the same values that disagree (float16 vs bfloat16) are still caught."""
    src = hf_tiny("safetensors", "float32")
    for dtype in ("float16", "bfloat16"):
        convert(src, tmp_path / dtype, target=Layout(), fmt="ckpt", dtype=dtype, progress=False)
    for a, b, cast in ((src, tmp_path / "float16", "float32 vs float16: cast to float16"),
                       (tmp_path / "bfloat16", src, "bfloat16 vs float32: cast to bfloat16")):
        res = CliRunner().invoke(convert_cli, ["verify", str(a), str(b)])
        assert res.exit_code == 0, res.output
        assert f"17 tensors, dtypes differ ({cast}), so the values were compared after the cast: 17 equal, " \
               f"max abs diff 0, 0 mismatched" in res.output
    res = CliRunner().invoke(convert_cli, ["verify", str(tmp_path / "float16"), str(tmp_path / "bfloat16")])
    assert res.exit_code == 1 and "17 mismatched" in res.output
    assert "MISMATCH transformer.output_layer.weight: max abs diff" in res.output and "(in bfloat16)" in res.output


# MindFormers 2.1.0's ChatGLM2Config.__init__ parameters (mindformers/models/glm2/glm2_config.py), which the
# written model_config may use ("type" names the class for MindFormers' registry)
CHATGLM2_CONFIG_FIELDS = set("""type batch_size num_layers padded_vocab_size hidden_size ffn_hidden_size kv_channels
num_attention_heads seq_length hidden_dropout attention_dropout layernorm_epsilon rope_ratio rmsnorm
apply_residual_connection_post_layernorm post_layer_norm add_bias_linear add_qkv_bias bias_dropout_fusion
multi_query_attention multi_query_group_num apply_query_key_layer_scaling attention_softmax_in_fp32
fp32_residual_connection quantization_bit pre_seq_len prefix_projection param_init_type compute_dtype
layernorm_compute_type residual_dtype rotary_dtype use_past use_flash_attention enable_high_performance block_size
num_blocks is_dynamic eos_token_id pad_token_id gmask_token_id bos_token_id repetition_penalty
checkpoint_name_or_path parallel_config offset pp_interleave_num mlp_concat qkv_concat use_rearrange_rope
mask_generate fine_grain_interleave use_ring_attention post_self_attn_layernorm post_mlp_layernorm""".split())  # noqa: SIM905 (the words as MindFormers' source lists them)


@pytest.mark.parametrize("layout,dtype,fmt", [(Layout(), "float16", "ckpt"),
                                              (Layout("mindformers", True, True, True), "bfloat16", "safetensors")],
                         ids=["plain-fp16", "split-rearranged-bf16"])
def test_mindformers_model_config_beside_the_weights(hf_tiny, tmp_path, tiny_cfg, layout, dtype, fmt):
    convert(hf_tiny("safetensors", dtype), tmp_path / "ms", target=layout, fmt=fmt, progress=False)
    doc = yaml.safe_load((tmp_path / "ms" / MINDFORMERS_YAML).read_text())
    mc = doc["model"]["model_config"]
    assert set(mc) <= CHATGLM2_CONFIG_FIELDS and doc["model"]["arch"]["type"] == "ChatGLM2ForConditionalGeneration"
    assert doc["load_ckpt_format"] == fmt and mc["type"] == "ChatGLM2Config"
    assert {k: mc[k] for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
                               "multi_query_group_num", "padded_vocab_size", "add_qkv_bias")} == \
        {k: getattr(tiny_cfg, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                           "kv_channels", "multi_query_group_num", "padded_vocab_size", "add_qkv_bias")}
    assert mc["layernorm_epsilon"] == tiny_cfg.layernorm_epsilon and isinstance(mc["layernorm_epsilon"], float)
    assert (mc["qkv_concat"], mc["mlp_concat"], mc["use_rearrange_rope"]) == \
        (not layout.qkv_split, not layout.mlp_split, layout.rearrange_rope)
    assert mc["param_init_type"] == dtype and mc["multi_query_attention"] is True
    names = set(tensor_bytes(tmp_path / "ms"))  # the flags describe the names actually written
    assert mc["qkv_concat"] == any("query_key_value" in n for n in names)
    assert mc["mlp_concat"] == any("dense_h_to_4h" in n for n in names)
    convert(tmp_path / "ms", tmp_path / "hf", target=Layout("chatglm"), fmt="safetensors",
            progress=False)
    assert not (tmp_path / "hf" / MINDFORMERS_YAML).exists()


def test_manifest_hashes_match_the_written_bytes(hf_tiny, tmp_path):
    convert(hf_tiny(), tmp_path / "m", target=Layout(), fmt="ckpt", progress=False)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    written = tensor_bytes(tmp_path / "m")
    assert len(manifest["tensors"]) == len(written)
    for rec in manifest["tensors"]:
        assert hashlib.sha256(written[rec["name"]][2]).hexdigest() == rec["sha256"]


def test_output_is_deterministic(hf_tiny, tmp_path):
    for name in ("x", "y"):
        convert(hf_tiny(), tmp_path / name, target=Layout(), fmt="ckpt", progress=False)
    assert (tmp_path / "x/mindspore_model.ckpt").read_bytes() == (tmp_path / "y/mindspore_model.ckpt").read_bytes()


@pytest.mark.runtime
def test_bin_we_write_loads_in_torch_with_and_without_mmap(hf_tiny, tmp_path):
    """Our own zip framing (CRCs patched in after the fact, zip64 fields) against torch and zipfile."""
    import torch
    src = hf_tiny("safetensors", "bfloat16")
    convert(src, tmp_path / "b", target=Layout("chatglm"), fmt="bin", max_shard_bytes=6 * 10**6,
            progress=False)
    original = tensor_bytes(src)
    index = json.loads((tmp_path / "b" / "pytorch_model.bin.index.json").read_text())
    seen = {}
    for shard in sorted(set(index["weight_map"].values())):
        for mmap in (False, True):
            state = torch.load(tmp_path / "b" / shard, weights_only=True, mmap=mmap)
            for name, t in state.items():
                assert t.is_contiguous() and t.dtype == torch.bfloat16
                seen[name] = t.view(torch.int16).numpy().tobytes()
        with zipfile.ZipFile(tmp_path / "b" / shard) as ours:
            assert ours.testzip() is None  # every record's CRC-32 checks
            records = {n.split("/", 1)[1] for n in ours.namelist()}
        theirs = io.BytesIO()
        torch.save(state, theirs)
        assert records == {n.split("/", 1)[1] for n in zipfile.ZipFile(theirs).namelist()}
    assert seen == {n: b for n, (_, _, b) in original.items()}


@pytest.mark.runtime
def test_hf_safetensors_output_reads_in_the_safetensors_library(hf_tiny, tmp_path):
    safetensors_torch = optional("safetensors.torch")
    import torch
    src = hf_tiny("bin", "bfloat16")
    convert(src, tmp_path / "ms", target=Layout(), fmt="safetensors", progress=False)
    convert(tmp_path / "ms", tmp_path / "hf", target=Layout("chatglm"), fmt="safetensors",
            max_shard_bytes=6 * 10**6, progress=False)
    original = tensor_bytes(src)
    seen = {}
    for f in sorted((tmp_path / "hf").glob("*.safetensors")):
        for name, t in safetensors_torch.load_file(f).items():
            assert t.dtype == torch.bfloat16
            seen[name] = t.view(torch.int16).numpy().tobytes()
    assert seen == {n: b for n, (_, _, b) in original.items()}


def test_nan_and_inf_in_a_source_are_reported(hf_tiny, tmp_path):
    with open_checkpoint(hf_tiny("safetensors", "float32")) as c:
        tensors = {n: (t.read(), t.dtype) for n, t in c.tensors.items()}
    name = "transformer.encoder.layers.1.self_attention.dense.weight"
    tensors[name][0].reshape(-1)[[3, 7, 9]] = [np.nan, np.inf, -np.inf]
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((hf_tiny("safetensors", "float32") / "config.json").read_bytes())
    with open(src / "model.safetensors", "wb") as f:
        w = SafetensorsWriter(f, [(n, a.shape, d) for n, (a, d) in tensors.items()])
        for n, (a, d) in tensors.items():
            w.write(n, a, d)
    summary = convert(src, tmp_path / "out", target=Layout(), fmt="ckpt", progress=False)
    assert summary.nonfinite == {name: 3}
    assert f"  warning: source tensor {name} holds 3 NaN/Inf values" in summary.lines()


def test_bin_pickle_integers_of_every_width():
    """The hand-written data.pkl encodes shapes, strides and element counts of any size as pickle reads them."""
    for v in (0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**40 + 7, 12 * 2**33, -1):
        assert pickle.loads(b"\x80\x02" + _int(v) + b".") == v


def test_a_conversion_request_reads_the_flags_and_refuses_what_needs_no_file(tmp_path):
    """The CLI's flags become one Conversion (the flags named unlike their field read there); what can be refused
    without opening a file is refused on creation; a call takes the request or its fields, not both."""
    how = Conversion.from_flags("mindformers", qkv_split=True, max_shard_size="2GB", no_crc_check=True, quiet=True,
                                fmt=None, dtype="bfloat16", keep_optimizer=True)
    assert (how.target, how.fmt, how.max_shard_bytes, how.verify_checksums, how.progress) == \
        (Layout("mindformers", qkv_split=True), "ckpt", 2 * 10**9, False, False)
    assert Conversion(Layout("mindformers-mcore")).fmt == "safetensors"  # the layout's default format
    for bad, message in [(dict(dtype="float8"), "unknown dtype"), (dict(keep_optimizer=True), "optimizer state"),
                         (dict(fmt="ckpt"), "does not go with --layout chatglm")]:
        with pytest.raises(UserError, match=message):
            Conversion(Layout("chatglm"), **bad)
    with pytest.raises(TypeError, match="one or the other"):
        convert(tmp_path / "src", tmp_path / "dst", how, dtype="float16")
    assert not (tmp_path / "dst").exists()
