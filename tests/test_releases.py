"""Every release computes its own RoPE rule, named once in glm2_core.releases: ChatGLM2-6B-32k divides the
positions by rope_ratio (THUDM's `seq_idx / rope_ratio`), ChatGLM3's long releases and GLM-4 multiply the base. Each
is checked against an independent forward (tests/numpy_glm2.py, written from THUDM's code) and, for ChatGLM2-32k,
against transformers' GlmForCausalLM with linear RoPE scaling on a prompt of 100 tokens."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DATA
from numpy_glm2 import NumpyGLM2
from strategy_fixtures import write_pb
from test_finetune import TRAIN
from test_shards import dp_mp

from converters.checkpoint import open_checkpoint
from converters.cli import main
from converters.convert import convert
from converters.inspect_verify import inspect
from converters.mindformers_yaml import MINDFORMERS_YAML
from converters.shards import split
from converters.shards_cli import main as merge_shards
from converters.synth import synthesize
from glm2_core.config import GLM2Config
from glm2_core.dtypes import to_float32
from glm2_core.errors import CheckpointError
from glm2_core.names import Layout
from glm2_core.releases import RELEASES, identify
from glm2_ms.api import from_pretrained
from glm2_ms.cli import generate
from glm2_ms.finetune_cli import main as finetune
from validation.cli import main as parity
from validation.eval_cli import main as evaluate
from validation.torch_reference import load_reference

PROMPT = [int(i) for i in np.random.default_rng(7).integers(3, 64000, 100)]


@pytest.mark.parametrize("name, vocab, ratio, release", [
    ("THUDM/chatglm2-6b", 65024, 1, "chatglm2-6b"),
    ("THUDM/chatglm2-6b-32k", 65024, 16, "chatglm2-6b-32k"),
    ("/root/.cache/huggingface/hub/models--THUDM--chatglm2-6b-32k/snapshots/a2065f5", 65024, 16, "chatglm2-6b-32k"),
    ("/data/chatglm2-finetune", 65024, 16, "chatglm2-6b"),
    ("THUDM/chatglm3-6b-32k", 65024, 50, "chatglm3-6b-32k"),
    ("zai-org/chatglm3-6b-128k", 65024, 500, "chatglm3-6b-128k"),
    ("THUDM/glm-4-9b-chat-1m", 151552, 10000, "glm-4-9b-chat-1m"),
    ("/data/my-finetune", 151552, 500, "glm-4-9b-chat"),
    ("/hub/models--zai-org--GLM-4-9B-Chat-HF/snapshots/8599336", 151552, 500, "glm-4-9b-chat-hf"),
    (None, 65024, 1, "chatglm2-6b")])
def test_a_folder_names_its_release(name, vocab, ratio, release):
    assert identify(name, vocab, ratio)[0] == release


def test_an_unnamed_rope_ratio_is_refused_not_guessed():
    with pytest.raises(CheckpointError, match="rope_ratio 16 but _name_or_path None names no release: ChatGLM2-6B-32k"):
        GLM2Config.from_dict({**GLM2Config.preset("6b").chatglm_json(), "_name_or_path": None, "rope_ratio": 16})


@pytest.mark.parametrize("field, value, needle", [
    ("pre_seq_len", 128, "a P-Tuning v2 prefix of 128 virtual tokens"),
    ("prefix_projection", True, "a P-Tuning v2 prefix projection")])
def test_fields_that_change_the_network_are_refused(field, value, needle):
    cfg = GLM2Config.preset("6b").chatglm_json()
    assert GLM2Config.from_dict({**cfg, field: None if field == "pre_seq_len" else 0 * value}) == GLM2Config()
    with pytest.raises(CheckpointError, match=f"{field}={value!r}: {needle}"):
        GLM2Config.from_dict({**cfg, field: value})


@pytest.mark.parametrize("release", list(RELEASES))
def test_every_release_reads_back_from_both_field_sets(release):
    ratio = 16 if release == "chatglm2-6b-32k" else 500 if RELEASES[release].family == "glm4" else 1
    cfg = GLM2Config.preset("tiny", release=release, rope_ratio=ratio)
    for written in (cfg.chatglm_json(), cfg.glm_json()):
        assert GLM2Config.from_mapping(json.loads(json.dumps(written))) == cfg


def test_the_glm_form_says_linear_scaling_and_a_wrong_export_is_refused():
    cfg = GLM2Config.preset("chatglm2-6b-32k")
    assert cfg.glm_json()["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 16.0,
                                                 "partial_rotary_factor": 0.5}
    base_scaled = {**cfg.glm_json(), "rope_theta": 160000.0,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 160000.0, "partial_rotary_factor": 0.5}}
    with pytest.raises(CheckpointError, match="default RoPE with rope_theta 160000.0 .* is not chatglm2-6b-32k's rule"):
        GLM2Config.from_mapping(base_scaled)


@pytest.fixture(scope="module", params=["chatglm2-6b-32k", "chatglm3-6b-32k"])
def long_release(request, tmp_path_factory):
    """A tiny float32 model of a long-context release, with the rope_ratio its config.json has."""
    ratio = {"chatglm2-6b-32k": 16, "chatglm3-6b-32k": 50}[request.param]
    cfg = GLM2Config.preset("tiny", release=request.param, rope_ratio=ratio)
    out = tmp_path_factory.mktemp(request.param) / "hf"
    synthesize(out, cfg, "float32", "safetensors", seed=3)
    with open_checkpoint(out) as c:
        weights = {n: to_float32(t.read(), t.dtype) for n, t in c.tensors.items()}
    return out, cfg, NumpyGLM2(weights, cfg).logits(PROMPT)


def _close(got, want):
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_the_runtime_and_the_torch_reference_follow_the_release(long_release):
    ms = pytest.importorskip("mindspore")

    src, cfg, want = long_release
    _close(from_pretrained(src, dtype="float32")(ms.Tensor([PROMPT], ms.int32)).asnumpy()[0], want)
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        _close(load_reference(src, "float32")(torch.tensor([PROMPT]))[0].double().numpy()[0], want)
    other = GLM2Config.preset("tiny", release="chatglm3-6b-32k" if cfg.family == "chatglm2" else "chatglm2-6b-32k",
                              rope_ratio=cfg.rope_ratio)
    assert np.abs(np.asarray(other.rope_inv_freq()) - cfg.rope_inv_freq()).max() > 1e-3  # the rules do differ


def test_transformers_glm_computes_the_exported_rule(long_release, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src, cfg, want = long_release
    convert(src, tmp_path / "glm", target=Layout("glm"), fmt="safetensors", progress=False)
    glm = transformers.GlmForCausalLM.from_pretrained(tmp_path / "glm", dtype=torch.float32).eval()
    with torch.no_grad():
        _close(glm(torch.tensor([PROMPT])).logits[0].double().numpy(), want)
    assert GLM2Config.from_pretrained(tmp_path / "glm") == cfg


def test_mindformers_gets_no_config_it_would_misread(long_release, tmp_path):
    """MindFormers' ChatGLM2 multiplies RoPE's base by rope_ratio: a ChatGLM2-32k checkpoint gets no yaml and the
    summary says why; ChatGLM3-32k's yaml carries its rope_ratio."""
    src, cfg, _ = long_release
    summary = convert(src, tmp_path / "ms", target=Layout("mindformers"), fmt="ckpt", progress=False)
    written = (tmp_path / "ms" / MINDFORMERS_YAML).is_file()
    if cfg.release == "chatglm2-6b-32k":
        assert not written and any("divides RoPE's positions by rope_ratio 16" in n for n in summary.notes)
    else:
        assert written and f"rope_ratio: {cfg.rope_ratio}" in (tmp_path / "ms" / MINDFORMERS_YAML).read_text()
    assert GLM2Config.from_pretrained(tmp_path / "ms") == cfg


def test_manifests_written_before_the_releases_still_read():
    """Our manifests' "config" named the family before releases existed."""
    old = {**{k: v for k, v in GLM2Config.preset("chatglm3-6b").__dict__.items() if k != "release"},
           "family": "chatglm3"}
    assert GLM2Config.from_dict(old, "manifest.json") == GLM2Config.preset("chatglm3-6b")


@pytest.mark.parametrize("name, told", [
    ("THUDM/chatglm2-6b-32k", "chatglm2-6b-32k (named in _name_or_path 'THUDM/chatglm2-6b-32k')"),
    ("/data/chatglm3-finetune", "chatglm3-6b ('chatglm3' in _name_or_path '/data/chatglm3-finetune')")])
def test_inspect_names_the_release_and_what_told_it(tmp_path, name, told):
    cfg = GLM2Config.preset("tiny", release=identify(name, 65024)[0])
    synthesize(tmp_path / "m", cfg, "float32", "safetensors")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "_name_or_path": name}))
    assert inspect(tmp_path / "m")["release"] == told


def test_convert_asks_for_the_release_an_unnamed_folder_cannot_tell(tmp_path):
    """hf2ms of a config with rope_ratio and no release named: one line, nothing written; with --release the output's
    config.json names it, so the folder tells from then on."""
    synthesize(tmp_path / "hf", GLM2Config.preset("tiny"), "float32", "safetensors")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "_name_or_path": None, "rope_ratio": 16}))
    refused = CliRunner().invoke(main, ["hf2ms", str(tmp_path / "hf"), str(tmp_path / "ms"), "--quiet"])
    assert refused.exit_code == 1 and "names no release" in refused.output and not (tmp_path / "ms").exists()
    told = CliRunner().invoke(main, ["hf2ms", str(tmp_path / "hf"), str(tmp_path / "ms"), "--quiet",
                                     "--release", "chatglm2-6b-32k"])
    assert told.exit_code == 0, told.output
    cfg = GLM2Config.from_pretrained(tmp_path / "ms")
    assert (cfg.release, cfg.rope_ratio, cfg.told_by) == ("chatglm2-6b-32k", 16, "named in _name_or_path "
                                                                                 "'THUDM/chatglm2-6b-32k'")


@pytest.mark.parametrize("bad", [{"family": []}, {"pre_seq_len": "x" * 100_000},
                                 {"rope_ratio": "r" * 100_000, "_name_or_path": None}, {"rmsnorm": "y" * 100_000}],
                         ids=["unhashable-family", "huge-pre-seq-len", "huge-rope-ratio", "huge-rmsnorm"])
def test_hostile_release_fields_end_in_one_short_line(bad):
    """The fields this registry reads: a value of any type ends in a CheckpointError of bounded length (an old
    manifest's `family` that is not a family name is ignored: the config tells its release otherwise)."""
    config = {**GLM2Config.preset("6b").chatglm_json(), **bad}
    try:
        GLM2Config.from_dict(config)
    except CheckpointError as exc:
        assert len(str(exc)) < 400 and "\n" not in str(exc)
    else:
        assert list(bad) == ["family"]


@pytest.fixture(scope="module")
def unnamed_32k(tmp_path_factory):
    """A ChatGLM2-6B-32k finetune saved under a local name, as a HF and a MindSpore folder: rope_ratio 16 and a
    `_name_or_path` that names no release, so only the user can tell which RoPE rule it has."""
    root = tmp_path_factory.mktemp("unnamed-32k")
    synthesize(root / "hf", GLM2Config.preset("tiny", release="chatglm2-6b-32k", rope_ratio=16), "float32",
               "safetensors")
    convert(root / "hf", root / "ms", target=Layout("mindformers"), fmt="ckpt", progress=False)
    for side in ("hf", "ms"):
        config = json.loads((root / side / "config.json").read_text())
        (root / side / "config.json").write_text(json.dumps({**config, "_name_or_path": "my-finetune"}))
    return root


def _tool_runs(unnamed, out):
    """Each tool that opens a model folder: its command and arguments on the unnamed folders, writing into `out`."""
    ms, hf = str(unnamed / "ms"), str(unnamed / "hf")
    return {
        "glm2-generate": (generate, [ms, "--prompt", "你好", "--max-new-tokens", "2"]),
        "glm2-eval": (evaluate, [ms, "--data", str(DATA / "adgen_dev.json"), "--max-samples", "2", "--batch-size", "2",
                                 "--max-new-tokens", "2", "--quiet", "--out", str(out)]),
        "glm2-parity": (parity, [hf, ms, "--max-new-tokens", "2", "--whole", "--report", str(out)]),
        "glm2-finetune": (finetune, [ms, "--train-data", str(TRAIN), "--out", str(out), "--max-steps", "1",
                                     "--batch-size", "2", "--max-source-length", "8", "--max-target-length", "8",
                                     "--quiet"]),
    }


@pytest.mark.parametrize("tool", ["glm2-generate", "glm2-eval", "glm2-parity", "glm2-finetune"])
def test_every_tool_takes_the_release_a_folder_cannot_tell(unnamed_32k, tmp_path, tool):
    """Without --release: one line that says so, nothing written; with it: the run completes."""
    out = tmp_path / "out"
    command, args = _tool_runs(unnamed_32k, out)[tool]
    refused = CliRunner().invoke(command, args)
    assert refused.exit_code == 1 and "names no release" in refused.output, refused.output
    assert refused.output.count("\n") == 1 and not out.exists()
    told = CliRunner().invoke(command, [*args, "--release", "chatglm2-6b-32k"])
    assert told.exit_code == 0, told.output
    assert tool == "glm2-generate" or out.is_dir()


def test_merge_shards_takes_the_release_a_folder_cannot_tell(unnamed_32k, tmp_path):
    full = unnamed_32k / "ms" / "mindspore_model.ckpt"
    with open_checkpoint(full) as c:
        strategy = write_pb(tmp_path / "strategy.ckpt", dp_mp(list(c.tensors)))
    split(full, strategy, tmp_path / "shards", progress=False)
    args = [str(tmp_path / "shards"), "--strategy", str(strategy), str(tmp_path / "merged"), "--quiet"]
    refused = CliRunner().invoke(merge_shards, args)
    assert refused.exit_code == 1 and "names no release" in refused.output and not (tmp_path / "merged").exists()
    told = CliRunner().invoke(merge_shards, [*args, "--release", "chatglm2-6b-32k"])
    assert told.exit_code == 0, told.output
    assert GLM2Config.from_pretrained(tmp_path / "merged").release == "chatglm2-6b-32k"
