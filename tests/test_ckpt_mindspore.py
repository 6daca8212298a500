"""Our .ckpt reader and writer against MindSpore's own save_checkpoint / load_checkpoint."""
import zlib

import mindspore as ms  # noqa: TID253
import numpy as np
import pytest
from click.testing import CliRunner

from converters.checkpoint import open_checkpoint
from converters.cli import main as convert_cli
from converters.convert import convert
from converters.formats import ckpt as ckpt_mod
from converters.formats.ckpt import CkptFile, CkptWriter
from converters.model_folder import weight_files
from converters.output import WeightsWriter
from glm2_core.errors import CheckpointError
from glm2_core.names import Layout
from glm2_ms.api import from_pretrained


def ms_bits(t) -> np.ndarray:
    return t.view(ms.uint16).asnumpy() if t.dtype == ms.bfloat16 else t.asnumpy()


def to_ms(a: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        return ms.Tensor(a.view(np.uint16)).view(ms.bfloat16)
    return ms.Tensor(a)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_our_ckpt_loads_bit_exactly_in_mindspore(hf_tiny, tmp_path, dtype):
    convert(hf_tiny(dtype=dtype), tmp_path / "m", target=Layout("mindformers", qkv_split=True), fmt="ckpt",
            progress=False)
    loaded = ms.load_checkpoint(str(tmp_path / "m" / "mindspore_model.ckpt"))
    with open_checkpoint(tmp_path / "m") as ours:
        assert set(loaded) == set(ours.tensors)
        for name, ref in ours.tensors.items():
            assert str(loaded[name].dtype).lower() == dtype
            np.testing.assert_array_equal(ms_bits(loaded[name]), ref.read())


def test_ms_safetensors_output_loads_in_mindspore(hf_tiny, tmp_path):
    convert(hf_tiny(dtype="bfloat16"), tmp_path / "m", target=Layout(), fmt="safetensors", progress=False)
    loaded = ms.load_checkpoint(str(tmp_path / "m" / "mindspore_model.safetensors"), format="safetensors")
    with open_checkpoint(tmp_path / "m") as ours:
        assert ours.metadata.get("format") == "ms"
        for name, ref in ours.tensors.items():
            np.testing.assert_array_equal(ms_bits(loaded[name]), ref.read())


def test_mindspore_training_checkpoint_converts_back(hf_tiny, tmp_path):
    """A checkpoint as MindSpore training saves it: weights, Adam moments, step counters, a string, a CRC."""
    src = hf_tiny(dtype="bfloat16")
    convert(src, tmp_path / "m", target=Layout("mindformers"), fmt="ckpt", progress=False)
    with open_checkpoint(tmp_path / "m") as c:
        params = [{"name": n, "data": to_ms(t.read(), t.dtype)} for n, t in c.tensors.items()]
        emb = c.tensors["transformer.embedding.embedding_weight"]
        params.append({"name": "adam_m.transformer.embedding.embedding_weight",
                       "data": ms.Tensor(np.ones(emb.shape, np.float32))})
    params.append({"name": "global_step", "data": ms.Tensor(np.array([7], np.int32))})
    params.append({"name": "transformer.encoder.layers.0.self_attention.key_past",
                   "data": ms.Tensor(np.zeros((1, 2, 4, 16), np.float16))})
    train = tmp_path / "train.ckpt"
    ms.save_checkpoint(params, str(train), append_dict={"run_id": "abc"}, crc_check=True)

    with CkptFile(train) as f:
        assert f.has_crc and f.strings == {"run_id": "abc"}
        for ref in f.tensors.values():
            ref.read()
        f.check_complete()  # the trailer matches what was read
    summary = convert(train, tmp_path / "hf", target=Layout("chatglm"), fmt="safetensors",
                      config=src / "config.json", progress=False)
    assert summary.dropped["optimizer state"] == ["adam_m.transformer.embedding.embedding_weight", "global_step"]
    assert summary.dropped["KV-cache entries"] == ["transformer.encoder.layers.0.self_attention.key_past"]
    assert summary.dropped["non-tensor entries"] == ["run_id"]
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "hf") as b:
        for name, ref in a.tensors.items():
            np.testing.assert_array_equal(b.tensors[name].read(), ref.read())

    # --keep-optimizer carries the moments through the name map (here into split q/k/v names too)
    convert(train, tmp_path / "ms2", target=Layout("mindformers-legacy"), fmt="ckpt", keep_optimizer=True,
            config=src / "config.json", progress=False)
    kept = ms.load_checkpoint(str(tmp_path / "ms2" / "mindspore_model.ckpt"))
    assert kept["adam_m.transformer.embedding.embedding_table"].asnumpy().sum() == emb.numel
    assert int(kept["global_step"].asnumpy()[0]) == 7


@pytest.mark.heavy  # a 540 MB tensor
def test_tensor_over_512_mib_is_chunked_like_mindspore(tmp_path):
    """MindSpore cuts a tensor over 512 MiB into several records; we read those and write the same bytes."""
    rows = 16500  # 16500 x 8192 fp32 = 540.7 MB > 512 MiB
    big = np.arange(rows * 8192, dtype=np.float32).reshape(rows, 8192)
    theirs = tmp_path / "ms.ckpt"
    ms.save_checkpoint([{"name": "big", "data": ms.Tensor(big)}, {"name": "small", "data": ms.Tensor(big[0, :3])}],
                       str(theirs))
    ours = tmp_path / "ours.ckpt"
    with CkptFile(theirs) as f, open(ours, "wb") as out:
        assert f.tensors["big"].shape == big.shape
        got = f.tensors["big"].read()
        np.testing.assert_array_equal(got, big)
        del got
        writer = CkptWriter(out)
        for name, ref in f.tensors.items():
            writer.write(name, ref.read(), ref.dtype)
    assert ours.read_bytes() == theirs.read_bytes()


def test_rows_are_read_alone_across_records_and_held_to_the_crc_trailer(tmp_path, monkeypatch):
    """Streamed parity reads an output layer a slice of rows at a time: rows [a, b) come from whichever records
    hold them, each piece read counts toward the file's CRC trailer (intact: it matches), and a flipped byte among
    the rows read is still caught."""
    monkeypatch.setattr(ckpt_mod, "CHUNK_BYTES", 1000)  # 7 records, rows of 64 bytes straddling their ends
    weight = np.arange(97 * 16, dtype=np.float32).reshape(97, 16)
    path = tmp_path / "rows.ckpt"
    with open(path, "wb") as out:
        CkptWriter(out).write("w", weight, "float32")
        CkptWriter(out).write("b", weight[0, :3], "float32")
    data = path.read_bytes()
    path.write_bytes(data + b"crc_num" + zlib.crc32(data).to_bytes(10, "big"))
    slices = [(0, 0), (0, 5), (5, 40), (40, 97)]
    with CkptFile(path) as f:
        assert f.has_crc
        for a, b in slices:
            np.testing.assert_array_equal(f.tensors["w"].rows(a, b), weight[a:b])
        f.check_complete()
    _flip = bytearray(path.read_bytes())
    _flip[data.index(weight[60].tobytes()) + 3] ^= 0x10
    path.write_bytes(bytes(_flip))
    with CkptFile(path) as f:
        for a, b in slices:
            f.tensors["w"].rows(a, b)
        with pytest.raises(CheckpointError, match="CRC trailer"):
            f.check_complete()


def test_mindformers_paged_attention_buffers_are_dropped_and_listed(hf_tiny, tmp_path):
    """MindFormers 2.x saves each layer's paged-attention KV cache with the weights (`save_pretrained`, or
    `mindspore.save_checkpoint(net)`): ms2hf and from_pretrained drop them as cache and say so."""
    src = hf_tiny(dtype="float32")
    convert(src, tmp_path / "m", target=Layout("mindformers"), fmt="ckpt", progress=False)
    params = [ms.Parameter(t, n) for n, t in ms.load_checkpoint(str(tmp_path / "m" / "mindspore_model.ckpt")).items()]
    caches = [f"transformer.encoder.layers.{i}.self_attention.infer_attention.paged_attention_mgr.{kv}_cache"
              for i in range(2) for kv in ("key", "value")]
    for name in caches:  # MindFormers' shape: (num_blocks, block_size, kv heads, head dim), compute dtype
        params.append(ms.Parameter(ms.Tensor(np.zeros((4, 16, 2, 16), np.float16)), name, requires_grad=False))
    mf = tmp_path / "mf" / "glm2.ckpt"
    mf.parent.mkdir()
    ms.save_checkpoint(params, str(mf))

    res = CliRunner().invoke(convert_cli, ["ms2hf", str(mf), str(tmp_path / "hf"), "--config",
                                           str(src / "config.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert f"dropped KV-cache entries (4): {caches[0]}" in res.output
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "hf") as b:
        assert set(a.tensors) == set(b.tensors)
        for name, ref in a.tensors.items():
            np.testing.assert_array_equal(b.tensors[name].read(), ref.read())
    ids = ms.Tensor([[64790, 64792, 36474, 54591]], ms.int32)
    np.testing.assert_array_equal(from_pretrained(mf, config=src / "config.json")(ids).asnumpy(),
                                  from_pretrained(src)(ids).asnumpy())


def test_trailer_of_a_tensor_cut_into_records_is_the_files_crc_and_mindspore_checks_it(tmp_path, monkeypatch):
    """A tensor over CHUNK_BYTES is written as several records: the trailer's CRC-32 covers them in file order (each
    record's header, then its data; the order was once headers first, a wrong trailer for every tensor over 512 MiB,
    which GLM-4's embedding is), as the converters write it (CRCs handed in from the checksum thread), and
    MindSpore's own crc_check accepts the file."""
    monkeypatch.setattr(ckpt_mod, "CHUNK_BYTES", 2 << 20)  # a multiple of the checksum thread's 1 MiB blocks
    monkeypatch.setattr(CkptWriter, "PIECE", 2 << 20)
    big = np.random.default_rng(0).standard_normal((5 * 2**18 + 3,), np.float32)  # 3 records
    small = np.arange(7, dtype=np.float32)
    plan = [("big", big.shape, "float32"), ("small", small.shape, "float32")]
    with WeightsWriter(tmp_path, "ckpt", weight_files(plan, "ckpt", "mindformers"), None) as writer:
        writer.write("big", big, "float32")
        writer.write("small", small, "float32")
    path = tmp_path / "mindspore_model.ckpt"
    data = path.read_bytes()
    assert data.count(b"big") == 3 and data[-17:-10] == b"crc_num"
    assert int.from_bytes(data[-10:], "big") == zlib.crc32(data[:-17])
    loaded = ms.load_checkpoint(str(path), crc_check=True)
    np.testing.assert_array_equal(loaded["big"].asnumpy(), big)
    with CkptFile(path) as f:
        np.testing.assert_array_equal(f.tensors["big"].read(), big)
        f.check_complete()
