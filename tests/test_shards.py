"""glm2-merge-shards against MindSpore's own distributed-checkpoint tools.

Rank shards are cut from a full checkpoint by `mindspore.transform_checkpoints` (or by hand with numpy for an
uneven split, which MindSpore's transform cannot cut); strategies are built with MindSpore's protobuf messages."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tree_digest
from helpers import tensors
from strategy_fixtures import REPLICATED, glm2_maps, layout_entry, ms_split, write_json, write_pb

from converters.convert import convert
from converters.formats.ckpt import CRC_MARK, CRC_TRAILER
from converters.shards import merge, split
from converters.strategy import ParamLayout, load_strategy, strategy_bytes
from glm2_core.assets import bundled_tokenizer
from glm2_core.config import GLM2Config
from glm2_core.errors import CheckpointError
from glm2_core.names import Layout
from glm2_ms.cli import generate
from glm2_ms.loading import use_cpu
from glm2_ms.model import GLM2Network

BIN = Path(sys.executable).parent
MS = Layout("mindformers")


@pytest.fixture(scope="module")
def full(hf_tiny, tmp_path_factory):
    """Full tiny MindSpore checkpoints (fp16 and bf16) and the config they need."""
    out = tmp_path_factory.mktemp("full")
    made = {}
    for dtype in ("float16", "bfloat16"):
        convert(hf_tiny("safetensors", dtype), out / dtype, target=MS, fmt="ckpt", progress=False)
        made[dtype] = out / dtype / "mindspore_model.ckpt"
    made["config"] = hf_tiny("safetensors") / "config.json"
    return made


def dp_mp(names, opt=False, stage_of=lambda n: 0, dev=(2, 4)):
    """dp × mp layouts; with `opt`, optimizer sharding across dp (norms across all devices)."""
    out = {}
    for n, m in glm2_maps(names).items():
        o = (0, 0) if not opt else ((1, -1) if m == REPLICATED else (dev[1], dev[0]))
        out[n] = layout_entry(dev, m, o)
    return out


def layouts_for(kind: str, names: list[str], root: Path) -> Path:
    if kind == "dp2xmp4":
        return write_pb(root / "strategy.ckpt", dp_mp(names))
    if kind == "dp2xmp4-opt-json":
        return write_json(root / "strategy.json", dp_mp(names, opt=True))
    if kind == "dp4xmp2-opt":
        return write_pb(root / "strategy.ckpt", dp_mp(names, opt=True, dev=(4, 2)))
    assert kind == "pipeline2-dp2xmp2-opt"
    late = [n for n in names if "layers.1." in n or "final" in n or "output" in n]
    early = [n for n in names if n not in late]
    write_pb(root / "stages" / "stage0.ckpt", dp_mp(early, opt=True, dev=(2, 2)), stage=0)
    write_pb(root / "stages" / "stage1.ckpt", dp_mp(late, opt=True, dev=(2, 2)), stage=1)
    return root / "stages"


def ms_merge(shards: Path, strategy: Path, out: Path) -> dict[str, np.ndarray]:
    import mindspore as ms

    if strategy.is_dir():
        merged = out.parent / (out.name + "-strategy.ckpt")
        ms.merge_pipeline_strategys(str(strategy), str(merged))
        strategy = merged
    ms.transform_checkpoints(str(shards), str(out), "merged", str(strategy), None)
    return tensors(next(out.rglob("*.ckpt")))


def ms_strategy_file(strategy: Path, tmp: Path) -> Path:
    import mindspore as ms

    if not strategy.is_dir():
        return strategy
    ms.merge_pipeline_strategys(str(strategy), str(tmp / "merged-strategy.ckpt"))
    return tmp / "merged-strategy.ckpt"


@pytest.mark.heavy  # 8-rank transforms against MindSpore's
@pytest.mark.parametrize("kind,dtype", [("dp2xmp4", "float16"), ("dp2xmp4-opt-json", "bfloat16"),
                                        ("dp4xmp2-opt", "float16"), ("pipeline2-dp2xmp2-opt", "bfloat16")])
def test_merge_and_split_equal_mindspore(full, tmp_path, kind, dtype):
    want = tensors(full[dtype])
    strategy = layouts_for(kind, list(want), tmp_path)
    shards = ms_split(full[dtype], ms_strategy_file(strategy, tmp_path), tmp_path / "ms-shards")

    summary, stats = merge([shards], strategy, tmp_path / "ours", target=MS, fmt="ckpt",
                           config=full["config"], progress=False)
    ours = tensors(tmp_path / "ours")
    theirs = ms_merge(shards, strategy, tmp_path / "ms-merged")
    assert set(ours) == set(want) == set(theirs)
    for n in want:
        assert ours[n].dtype == want[n].dtype and np.array_equal(ours[n], want[n]), n
        assert np.array_equal(ours[n], theirs[n]), n
    assert stats.ranks == 8 and stats.parameters == len(want)
    assert stats.bytes_read == sum(a.nbytes for a in want.values())  # every slice read once

    # our split is MindSpore's split, byte for byte, and merges back exactly
    split(full[dtype], strategy, tmp_path / "our-shards", progress=False)
    for r in range(8):
        a = (tmp_path / "our-shards" / f"rank_{r}" / f"glm2_rank_{r}.ckpt").read_bytes()
        assert a[-CRC_TRAILER:].startswith(CRC_MARK)  # ours end with MindSpore's CRC trailer, its split's do not
        assert a[:-CRC_TRAILER] == (shards / f"rank_{r}" / f"glm2_rank_{r}.ckpt").read_bytes(), r
    merge([tmp_path / "our-shards"], tmp_path / "our-shards" / "strategy" if strategy.is_dir() else strategy,
          tmp_path / "roundtrip", target=MS, fmt="ckpt", config=full["config"], progress=False)
    assert all(np.array_equal(a, want[n]) for n, a in tensors(tmp_path / "roundtrip").items())


def test_rank_safetensors_merge_equals_mindspores_transform(full, tmp_path):
    """Rank files as `mindspore.save_checkpoint(..., format="safetensors")` writes them (here: MindSpore's own
    dp2×mp4 split, re-saved per rank as safetensors) merge into what MindSpore's safetensors transform makes of
    them (`transform_checkpoints` on safetensors, i.e. transform_safetensors.py's path to one rank), which is the
    original model. (`unified_safetensors` gives the same but sleeps while the machine's memory is over 50 % used,
    for minutes on a shared machine.)"""
    import mindspore as ms
    from safetensors.numpy import load_file

    want = tensors(full["float16"])
    strategy = write_pb(tmp_path / "s.ckpt", dp_mp(list(want), opt=True))
    shards = ms_split(full["float16"], strategy, tmp_path / "ckpt-shards")
    for r in range(8):
        src = shards / f"rank_{r}" / f"glm2_rank_{r}.ckpt"
        out = tmp_path / "sf-shards" / f"rank_{r}" / f"glm2_rank_{r}-1_4.safetensors"
        out.parent.mkdir(parents=True)
        ms.save_checkpoint(list(ms.load_checkpoint(str(src)).values()), str(out), format="safetensors")
    sf = tmp_path / "sf-shards"
    summary, stats = merge([sf], strategy, tmp_path / "ours", target=MS, fmt="safetensors",
                           config=full["config"], progress=False)
    ours = tensors(tmp_path / "ours")
    ms.transform_checkpoints(str(sf), str(tmp_path / "theirs"), "merged", str(strategy), None,
                             output_format="safetensors")
    theirs = {}
    for f in sorted((tmp_path / "theirs").rglob("*.safetensors")):
        theirs.update(load_file(f))
    assert set(ours) == set(theirs) == set(want) and stats.parameters == len(want)
    for n in want:
        assert np.array_equal(ours[n], theirs[n]) and np.array_equal(ours[n], want[n]), n
    assert stats.files[3].endswith("rank_3/glm2_rank_3-1_4.safetensors")

    (sf / "rank_5" / "glm2_rank_5.ckpt").write_bytes(b"")  # one rank folder holding both kinds is ambiguous
    with pytest.raises(CheckpointError, match="rank_5: holds both .ckpt and .safetensors files"):
        merge([sf], strategy, tmp_path / "x", target=MS, fmt="ckpt", config=full["config"],
              progress=False)


def test_merge_equals_merge_sliced_parameter(full, tmp_path):
    import mindspore as ms

    want = tensors(full["float16"])
    strategy = write_pb(tmp_path / "s.ckpt", dp_mp(list(want)))
    shards = ms_split(full["float16"], strategy, tmp_path / "shards")
    per_rank = [ms.load_checkpoint(str(shards / f"rank_{r}" / f"glm2_rank_{r}.ckpt")) for r in range(8)]
    searched = ms.build_searched_strategy(str(strategy))
    merge([shards], strategy, tmp_path / "ours", target=MS, fmt="ckpt", config=full["config"],
          progress=False)
    ours = tensors(tmp_path / "ours")
    for n in want:
        theirs = ms.merge_sliced_parameter([p[n] for p in per_rank], searched).asnumpy()
        assert np.array_equal(ours[n], theirs), n


def test_uneven_split(full, tmp_path):
    """param_split_shape: qkv rows cut 40/40/24/24 over mp; MindSpore's merge_sliced_parameter is the oracle."""
    import mindspore as ms

    want = tensors(full["float16"])
    layouts = dp_mp(list(want))
    qkv = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    sizes = [40, 40, 24, 24]
    layouts[qkv] = layout_entry((2, 4), [0, -1], split_shape=sizes)
    strategy = write_pb(tmp_path / "s.ckpt", layouts)
    even = ms_split(full["float16"], write_pb(tmp_path / "even.ckpt", dp_mp(list(want))), tmp_path / "shards")
    bounds = np.cumsum([0] + sizes)
    for r in range(8):  # replace the even qkv slices by uneven ones, written with MindSpore
        f = even / f"rank_{r}" / f"glm2_rank_{r}.ckpt"
        params = ms.load_checkpoint(str(f))
        m = r % 4
        params[qkv] = ms.Parameter(ms.Tensor(want[qkv][bounds[m]:bounds[m + 1]]), qkv)
        ms.save_checkpoint(list(params.values()), str(f))
    merge([even], strategy, tmp_path / "ours", target=MS, fmt="ckpt", config=full["config"],
          progress=False)
    ours = tensors(tmp_path / "ours")
    per_rank = [ms.load_checkpoint(str(even / f"rank_{r}" / f"glm2_rank_{r}.ckpt"))[qkv] for r in range(8)]
    theirs = ms.merge_sliced_parameter(per_rank, ms.build_searched_strategy(str(strategy))).asnumpy()
    assert np.array_equal(ours[qkv], theirs) and np.array_equal(ours[qkv], want[qkv])
    split(full["float16"], strategy, tmp_path / "resplit", progress=False)
    assert tensors(tmp_path / "resplit" / "rank_6")[qkv].shape == (24, 64)
    merge([tmp_path / "resplit"], strategy, tmp_path / "back", target=MS, fmt="ckpt",
          config=full["config"], progress=False)
    assert all(np.array_equal(a, want[n]) for n, a in tensors(tmp_path / "back").items())


def test_split_loads_in_load_distributed_checkpoint(full, tmp_path):
    import mindspore as ms

    use_cpu()
    want = tensors(full["float16"])
    strategy = write_pb(tmp_path / "s.ckpt", dp_mp(list(want)))
    split(full["float16"], strategy, tmp_path / "shards", progress=False)
    net = GLM2Network(GLM2Config.from_file(full["config"]), ms.float16)
    files = [str(tmp_path / "shards" / f"rank_{r}" / f"glm2_rank_{r}.ckpt") for r in range(8)]
    ms.load_distributed_checkpoint(net, files, None, str(strategy))
    params = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    for n, a in want.items():
        assert np.array_equal(params[n], a), n


def test_to_hf_and_lora_folded(full, tmp_path):
    """A LoRA run's shards (frozen base + mindpet A/B) merge into the same model as merge-lora on the full one."""
    import mindspore as ms

    want = tensors(full["float16"])
    rng = np.random.default_rng(0)
    params = [ms.Parameter(ms.Tensor(a), n) for n, a in want.items()]
    layouts = dp_mp(list(want))
    for layer in (0, 1):
        base = f"transformer.encoder.layers.{layer}.self_attention.query_key_value"
        for ab, shape, tmap in (("a", (8, 64), [-1, -1]), ("b", (128, 8), [0, -1])):
            name = f"{base}.mindpet_delta_lora_{ab}"
            params.append(ms.Parameter(ms.Tensor(rng.standard_normal(shape).astype(np.float32) * 0.1), name))
            layouts[name] = layout_entry((2, 4), tmap)
    ms.save_checkpoint(params, str(tmp_path / "lora-full.ckpt"))
    strategy = write_pb(tmp_path / "s.ckpt", layouts)
    shards = ms_split(tmp_path / "lora-full.ckpt", strategy, tmp_path / "shards")

    with pytest.raises(CheckpointError, match="--lora-alpha"):
        merge([shards], strategy, tmp_path / "x", target=Layout("chatglm"), fmt="safetensors",
              config=full["config"], progress=False)
    assert not (tmp_path / "x").exists()
    merge([shards], strategy, tmp_path / "hf", target=Layout("chatglm"), fmt="safetensors",
          lora_alpha=32.0, config=full["config"], progress=False)
    r = subprocess.run([BIN / "glm2-convert", "merge-lora", tmp_path / "lora-full.ckpt", tmp_path / "lora-full.ckpt",
                        tmp_path / "ref", "--layout", "chatglm", "--lora-alpha", "32", "--config", full["config"],
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([BIN / "glm2-convert", "verify", tmp_path / "hf", tmp_path / "ref"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "0 mismatched" in r.stdout, r.stdout + r.stderr


def test_strategy_bytes_are_mindspores(tmp_path):
    """What we write for distributed training is what MindSpore's own messages serialize, and reads back."""
    from mindspore.train import node_strategy_pb2 as pb

    layouts = {"w": ParamLayout((2, 4), (0, -1), (), 4, 2), "n": ParamLayout((2, 4), (-1,), (), 1, -1),
               "u": ParamLayout((2, 4), (0, -1), (3, 5, 3, 5))}
    data = strategy_bytes(layouts, stage=1)
    msg = pb.ParallelStrategyMap()
    msg.ParseFromString(data)
    assert msg.SerializeToString() == data
    assert msg.parallel_strategy_item[0].parallel_strategys.stage == 1
    assert list(msg.parallel_layout_item[2].parallel_layouts.param_split_shape[0].dim) == [3, 5] * 2
    (tmp_path / "s.ckpt").write_bytes(strategy_bytes(layouts))
    assert load_strategy(tmp_path / "s.ckpt").layouts == layouts


# ---- refusals: one line, non-zero exit, nothing written, sources untouched ----

@pytest.fixture(scope="module")
def run(full, tmp_path_factory):
    """A dp2×mp4 run with optimizer sharding: shards, strategy."""
    root = tmp_path_factory.mktemp("run")
    names = list(tensors(full["float16"]))
    strategy = write_pb(root / "strategy.ckpt", dp_mp(names, opt=True))
    return ms_split(full["float16"], strategy, root / "shards"), strategy


def cli(*args):
    return subprocess.run([BIN / "glm2-merge-shards", *map(str, args), "--quiet"], capture_output=True, text=True)


def refused(tmp_path, shards, strategy, *extra, config=None) -> str:
    before = tree_digest(shards)
    dst = tmp_path / "out"
    r = cli(shards, "--strategy", strategy, dst, *extra)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not dst.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    assert tree_digest(shards) == before
    return r.stderr


def copy_run(run, tmp_path) -> Path:
    shards = tmp_path / "shards"
    shutil.copytree(run[0], shards)
    return shards


@pytest.mark.heavy  # 8 ranks split and merged through the CLIs, in subprocesses
def test_cli_merge_split_roundtrip(full, run, tmp_path):
    shards, strategy = run
    r = cli(shards, "--strategy", strategy, tmp_path / "hf", "--layout", "chatglm", "--config", full["config"])
    assert r.returncode == 0, r.stderr
    assert "8 ranks, 17 parameters laid out by the strategy" in r.stdout
    r = cli("split", full["float16"], tmp_path / "split", "--strategy", strategy)
    assert r.returncode == 0 and "8 rank files" in r.stdout, r.stderr
    r = subprocess.run([BIN / "glm2-convert", "verify", tmp_path / "hf", full["float16"]], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout
    # split carries config.json and the tokenizer; merging its output needs no --config, and the merged folder
    # carries them on, so the runtime takes it as it is
    beside = {p.name for p in full["float16"].parent.iterdir()} & {"config.json", "tokenizer.model",
                                                                    "tokenizer_config.json"}
    assert beside <= {p.name for p in (tmp_path / "split").iterdir()} and len(beside) == 3
    r = cli(tmp_path / "split", "--strategy", strategy, tmp_path / "merged")
    assert r.returncode == 0 and f"config.json from {tmp_path / 'split'}" in r.stdout, r.stderr
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == \
        (full["float16"].parent / "tokenizer.model").read_bytes()

    res = CliRunner().invoke(generate, [str(tmp_path / "merged"), "--prompt", "你好", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output


def test_merged_shards_without_a_tokenizer_get_the_bundled_one(run, full, tmp_path):
    """MindFormers' output folders hold no tokenizer: the merged model gets ChatGLM2's, and the summary says so."""
    r = cli(run[0], "--strategy", run[1], tmp_path / "merged", "--config", full["config"])
    assert r.returncode == 0 and "wrote the bundled ChatGLM2 tokenizer" in r.stdout, r.stderr
    for f in bundled_tokenizer():
        assert (tmp_path / "merged" / f.name).read_bytes() == f.read_bytes()


def test_refuses_missing_rank(run, tmp_path):
    shards = copy_run(run, tmp_path)
    shutil.rmtree(shards / "rank_5")
    assert "rank 5 is missing" in refused(tmp_path, shards, run[1])


def test_refuses_rank_beyond_strategy(run, tmp_path):
    shards = copy_run(run, tmp_path)
    shutil.copytree(shards / "rank_7", shards / "rank_8")
    assert "beyond the strategy's 8 ranks" in refused(tmp_path, shards, run[1])


def test_refuses_file_of_another_run(full, run, tmp_path):
    """A rank file from a run laid out differently; and the right files with the wrong strategy."""
    shards = copy_run(run, tmp_path)
    other = write_pb(tmp_path / "other.ckpt", dp_mp(list(tensors(full["float16"]))))  # no optimizer sharding
    other_run = ms_split(full["float16"], other, tmp_path / "other-run")
    shutil.copyfile(other_run / "rank_3" / "glm2_rank_3.ckpt", shards / "rank_3" / "glm2_rank_3.ckpt")
    msg = refused(tmp_path, shards, run[1])
    assert "another run" in msg and "glm2_rank_3.ckpt" in msg
    msg = refused(tmp_path, run[0], other, "--config", full["config"])
    assert "do not fit this strategy" in msg and "the config says" in msg and str(other) in msg


def test_refuses_uncovered_parameter(full, run, tmp_path):
    names = list(tensors(full["float16"]))
    layouts = dp_mp(names, opt=True)
    del layouts["transformer.encoder.final_layernorm.weight"]
    partial = write_pb(tmp_path / "partial.ckpt", layouts)
    assert "does not cover parameter 'transformer.encoder.final_layernorm.weight'" in \
        refused(tmp_path, run[0], partial)


def test_refuses_corrupt_strategy_and_lone_stage(full, run, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x12\xff\xff\x03garbage")
    assert "not a valid protobuf ParallelStrategyMap" in refused(tmp_path, run[0], bad)
    lone = write_pb(tmp_path / "stage1.ckpt", dp_mp(list(tensors(full["float16"])), opt=True), stage=1)
    assert "pipeline stage 1 alone" in refused(tmp_path, run[0], lone)


def test_latest_complete_step_is_used(full, run, tmp_path):
    """A rank that died while saving step 20 leaves step 10 as the newest complete set."""
    shards = tmp_path / "shards"
    for r in range(8):
        (shards / f"rank_{r}").mkdir(parents=True)
        src = run[0] / f"rank_{r}" / f"glm2_rank_{r}.ckpt"
        shutil.copyfile(src, shards / f"rank_{r}" / f"glm2_rank_{r}-1_10.ckpt")
        if r != 3:  # rank 3 never finished step 20; its step-20 files on others hold garbage on purpose
            (shards / f"rank_{r}" / f"glm2_rank_{r}-1_20.ckpt").write_bytes(b"\x0a\x05trunc")
    r = cli(shards, "--strategy", run[1], tmp_path / "out", "--config", full["config"])
    assert r.returncode == 0, r.stderr
    assert "epoch 1 step 20 is incomplete" in r.stdout and "using epoch 1 step 10" in r.stdout


@pytest.mark.parametrize("moments_in_strategy", [True, False])
def test_keep_optimizer(full, tmp_path, moments_in_strategy):
    """A training checkpoint: sharded Adam moments merge like their weights (MindSpore's merge is the oracle);
    a strategy that lists only the weights still places the moments; step counters come from rank 0."""
    import mindspore as ms

    want = tensors(full["float16"])
    rng = np.random.default_rng(1)
    params, layouts = [], dp_mp(list(want), opt=True)
    for n, a in want.items():
        params.append(ms.Parameter(ms.Tensor(a), n))
        for prefix in ("adam_m.", "adam_v."):
            params.append(ms.Parameter(ms.Tensor(rng.standard_normal(a.shape).astype(np.float32)), prefix + n))
            layouts[prefix + n] = layouts[n]
    params.append(ms.Parameter(ms.Tensor(np.array([42], np.int32)), "global_step"))
    ms.save_checkpoint(params, str(tmp_path / "train.ckpt"))
    strategy = write_pb(tmp_path / "s.ckpt", layouts)
    shards = ms_split(tmp_path / "train.ckpt", strategy, tmp_path / "shards")
    if not moments_in_strategy:
        strategy = write_pb(tmp_path / "weights-only.ckpt", dp_mp(list(want), opt=True))
    merge([shards], strategy, tmp_path / "ours", target=MS, fmt="ckpt", keep_optimizer=True,
          config=full["config"], progress=False)
    ours = tensors(tmp_path / "ours")
    theirs = ms_merge(shards, tmp_path / "s.ckpt", tmp_path / "ms-merged")
    assert set(ours) == set(theirs) and len(ours) == 3 * len(want) + 1
    for n, a in theirs.items():
        assert np.array_equal(ours[n], a), n
    assert ours["global_step"].tolist() == [42]


def test_merge_and_split_need_neither_mindspore_nor_protobuf(full, run, tmp_path):
    code = ("import sys\n"
            "for m in ('torch', 'mindspore', 'safetensors', 'google', 'google.protobuf'): sys.modules[m] = None\n"
            "from converters.shards_cli import main; main()")
    shards, strategy = run
    for args in ([shards, "--strategy", strategy, tmp_path / "merged", "--config", full["config"], "--quiet"],
                 ["split", full["float16"], tmp_path / "split", "--strategy", strategy, "--quiet"]):
        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert all(np.array_equal(a, tensors(full["float16"])[n]) for n, a in tensors(tmp_path / "merged").items())
