"""GLM-4-0414 (transformers' Glm4ForCausalLM): GLM's network plus a norm on each branch's output before its residual
add. Its HF folder in, every MindSpore layout and back bit for bit; the runtime, the PyTorch reference and
transformers' own Glm4ForCausalLM compute what an independent forward (tests/numpy_glm2.py) computes."""
import json
import math

import numpy as np
import pytest
from conftest import DATA
from helpers import glm4_ranks
from numpy_glm2 import NumpyGLM2

from converters.checkpoint import open_checkpoint
from converters.convert import convert
from converters.mindformers_yaml import MINDFORMERS_YAML
from converters.source import Source
from converters.synth import synthesize
from glm2_core.config import GLM2Config
from glm2_core.dtypes import to_float32
from glm2_core.errors import UserError
from glm2_core.names import Layout, canonical_shapes
from glm2_ms.api import from_pretrained
from glm2_ms.generation import Decoder
from glm2_ms.train import Trainer, export
from glm2_ms.train_config import TrainConfig
from validation.parity import run_parity
from validation.torch_reference import load_reference

PROMPT = [int(i) for i in np.random.default_rng(11).integers(3, 151000, 100)]


@pytest.fixture(scope="module")
def glm4_0414(tmp_path_factory):
    """A tiny float32 GLM-4-9B-0414 as the release publishes it: transformers' names, model_type glm4."""
    cfg = GLM2Config.preset("tiny", release="glm-4-9b-0414", padded_vocab_size=151552, layernorm_epsilon=1e-5,
                            eos_token_id=(151329, 151336, 151338), pad_token_id=151329)
    out = tmp_path_factory.mktemp("glm4-0414") / "hf"
    synthesize(out, cfg, "float32", "safetensors", seed=5)
    with open_checkpoint(out) as c, Source.open(out) as src:
        groups, _ = src.groups(Layout("chatglm"))
        weights = {name: to_float32(arr, dt) for name, arr, dt in src.stream(groups, "float32")}
        assert {n for n in c.tensors if "post_self_attn" in n} == {
            f"model.layers.{i}.post_self_attn_layernorm.weight" for i in range(cfg.num_layers)}
    return out, cfg, NumpyGLM2(weights, cfg).logits(PROMPT)


def _close(got, want):
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_the_folder_is_transformers_glm4_and_reads_back(glm4_0414):
    src, cfg, _ = glm4_0414
    config = json.loads((src / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("glm4", ["Glm4ForCausalLM"])
    assert GLM2Config.from_pretrained(src) == cfg and cfg.sandwich_norms
    unnamed = {k: v for k, v in config.items() if k != "_name_or_path"}  # as the hub's config.json is
    assert GLM2Config.from_mapping(unnamed).release == "glm-4-9b-0414"


def test_transformers_glm4_the_runtime_and_the_reference_agree_with_the_forward(glm4_0414):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ms = pytest.importorskip("mindspore")

    src, cfg, want = glm4_0414
    glm4 = transformers.Glm4ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        _close(glm4(torch.tensor([PROMPT])).logits[0].double().numpy(), want)
        _close(load_reference(src, "float32")(torch.tensor([PROMPT]))[0].double().numpy()[0], want)
    _close(from_pretrained(src, dtype="float32")(ms.Tensor([PROMPT], ms.int32)).asnumpy()[0], want)


def test_greedy_generation_matches_transformers(glm4_0414):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("mindspore")

    src, cfg, _ = glm4_0414
    glm4 = transformers.Glm4ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = glm4.generate(torch.tensor([PROMPT[:40]]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                               eos_token_id=None, pad_token_id=cfg.pad_token_id)[0, 40:].tolist()
    ours = Decoder(from_pretrained(src, dtype="float32")).generate(np.array([PROMPT[:40]]), max_new_tokens=6,
                                                                   eos_token_id=-1)[0, 40:].tolist()
    assert ours == theirs


@pytest.mark.parametrize("layout", [Layout("mindformers"), Layout("mindformers", True, True, True),
                                    Layout("mindformers-legacy"), Layout("mindformers-mcore")],
                         ids=lambda lay: lay.describe())
def test_every_mindspore_layout_and_back_bit_exact(glm4_0414, tmp_path, layout):
    src, cfg, _ = glm4_0414
    summary = convert(src, tmp_path / "ms", target=layout, fmt=layout.spec.formats[0], progress=False)
    assert GLM2Config.from_pretrained(tmp_path / "ms") == cfg
    assert not (tmp_path / "ms" / MINDFORMERS_YAML).exists() or layout.name != "mindformers"
    if layout.name == "mindformers":
        assert any("no sandwich norms" in n for n in summary.notes)
        assert "none written (glm4's is not bundled: copy the release's tokenizer.model beside the weights" in \
            "\n".join(summary.notes)
    convert(tmp_path / "ms", tmp_path / "back", target=Layout("glm"), fmt="safetensors", progress=False)
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "back") as b:
        assert set(a.tensors) == set(b.tensors)
        assert all(t.read().tobytes() == b.tensors[n].read().tobytes() for n, t in a.tensors.items())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "glm4"


MCORE_LAYER = ("input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
               "self_attention.linear_proj.weight", "post_self_attn_layernorm.weight", "pre_mlp_layernorm.weight",
               "mlp.linear_fc1.weight", "mlp.linear_fc2.weight", "post_mlp_layernorm.weight")


def test_mcore_names_and_fused_rows_are_those_mindformers_loader_reads(glm4_0414, tmp_path):
    """MindFormers 2.1.0 reads a folder of safetensors in its mcore names with `deal_training_qkv_weight` (linear_qkv
    reshaped to [groups, (q heads per group + 2)·head, …]: each group's q heads, then its k, then its v head) and
    `deal_training_ffn_weight` (linear_fc1 reshaped to [ffn, 2, …]: gate and up row by row); restated here from its
    source, applied to the release's own q/k/v and gate/up tensors, and inverted back to them."""
    src, cfg, want = glm4_0414
    ms = pytest.importorskip("mindspore")

    convert(src, tmp_path / "mcore", target=Layout("mindformers-mcore"), fmt="safetensors", progress=False)
    assert sorted(p.name for p in (tmp_path / "mcore").glob("*.safetensors")) == ["mindspore_model.safetensors"]
    assert json.loads((tmp_path / "mcore" / "config.json").read_text())["architectures"] == ["Glm4ForCausalLM"]
    groups, d, ffn = cfg.multi_query_group_num, cfg.kv_channels, cfg.ffn_hidden_size
    with open_checkpoint(src) as hf, open_checkpoint(tmp_path / "mcore") as mc:
        assert set(mc.tensors) == {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                                   "output_layer.weight"} | {f"decoder.layers.{i}.{n}" for i in range(cfg.num_layers)
                                                             for n in MCORE_LAYER}
        for i, kind in ((i, k) for i in range(cfg.num_layers) for k in ("weight", "bias")):
            q, k, v = (hf.tensors[f"model.layers.{i}.self_attn.{x}_proj.{kind}"].read() for x in "qkv")
            qkv = mc.tensors[f"decoder.layers.{i}.self_attention.linear_qkv.{kind}"].read()
            theirs = np.concatenate([q.reshape(groups, -1, *q.shape[1:]), k.reshape(groups, d, *k.shape[1:]),
                                     v.reshape(groups, d, *v.shape[1:])], axis=1).reshape(qkv.shape)
            assert qkv.tobytes() == theirs.tobytes()
            per_group = qkv.reshape(groups, -1, *qkv.shape[1:])
            n_rep_d = q.shape[0] // groups
            assert per_group[:, :n_rep_d].reshape(q.shape).tobytes() == q.tobytes()
            assert per_group[:, n_rep_d + d:].reshape(v.shape).tobytes() == v.tobytes()
        for i in range(cfg.num_layers):
            gate_up = hf.tensors[f"model.layers.{i}.mlp.gate_up_proj.weight"].read()
            fc1 = mc.tensors[f"decoder.layers.{i}.mlp.linear_fc1.weight"].read()
            rows = fc1.reshape(ffn, 2, -1)
            assert rows[:, 0].tobytes() == gate_up[:ffn].tobytes() and rows[:, 1].tobytes() == gate_up[ffn:].tobytes()
    _close(from_pretrained(tmp_path / "mcore", dtype="float32")(ms.Tensor([PROMPT], ms.int32)).asnumpy()[0], want)


def test_mcore_names_refuse_a_model_without_sandwich_norms(tmp_path):
    src = tmp_path / "glm4"
    synthesize(src, GLM2Config.preset("tiny", release="glm-4-9b-chat"), "float32", "safetensors", seed=2)
    with pytest.raises(UserError, match="mindformers-mcore holds GLM-4-0414's layers only"):
        convert(src, tmp_path / "out", target=Layout("mindformers-mcore"), fmt="safetensors", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_thudm_form_is_refused_before_anything_is_written(glm4_0414, tmp_path):
    src, _, _ = glm4_0414
    with pytest.raises(UserError, match="glm-4-9b-0414 has no THUDM ChatGLM form .* --layout glm"):
        convert(src, tmp_path / "out", target=Layout("chatglm"), fmt="safetensors", progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def lora_0414(glm4_0414, tmp_path_factory):
    """A LoRA finetune of the tiny GLM-4-0414 on real ADGEN lines (its tokenizer: a ranks file of GLM-4's size)."""
    pytest.importorskip("mindspore")

    src, _, _ = glm4_0414
    base = tmp_path_factory.mktemp("base") / "hf"
    convert(src, base, target=Layout("glm"), fmt="safetensors", progress=False)
    glm4_ranks(base / "tokenizer.model")
    out = tmp_path_factory.mktemp("lora")
    cfg = TrainConfig.load(None, method="lora", max_steps=8, learning_rate=2e-2, lr_end=1e-3, warmup_steps=2,
                           batch_size=4, max_source_length=32, max_target_length=32, seed=0,
                           target_modules="query_key_value,dense")
    trainer = Trainer(base, DATA / "adgen_train_head200.json", out, cfg, progress=False)
    losses = trainer.train()
    return base, trainer, losses, export(trainer, merge=True)


def test_a_lora_finetune_learns_merges_and_exports_to_transformers(lora_0414, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import mindspore as ms

    base, trainer, losses, paths = lora_0414
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    trainer.model.set_train(False)
    want = trainer.model(ms.Tensor([PROMPT[:48]], ms.int32)).asnumpy()[0]
    merged = from_pretrained(paths["merged"], dtype="float32")
    np.testing.assert_allclose(merged(ms.Tensor([PROMPT[:48]], ms.int32)).asnumpy()[0], want, atol=1e-5)
    convert(paths["merged"], tmp_path / "hf", target=Layout("glm"), fmt="safetensors", progress=False)
    with torch.no_grad():
        got = transformers.Glm4ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()(
            torch.tensor([PROMPT[:48]])).logits[0].numpy()
        assert np.abs(got - want).max() <= 1e-4
        glm4 = transformers.Glm4ForCausalLM.from_pretrained(base, dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(glm4, paths["adapter"]).eval()
        assert np.abs(adapted(torch.tensor([PROMPT[:48]])).logits[0].numpy() - want).max() <= 1e-4


@pytest.mark.parametrize("reference, streamed", [("torch", True), ("glm", True), ("glm", False)])
def test_parity_passes_against_our_reference_and_transformers_glm4(lora_0414, tmp_path, reference, streamed):
    """The whole report, and the streamed one (transformers' Glm4DecoderLayer and Glm4RMSNorm, layer by layer)."""
    base = lora_0414[0]  # the HF folder with a GLM-4-sized tokenizer
    convert(base, tmp_path / "ms", target=Layout("mindformers"), fmt="ckpt", progress=False)
    report = run_parity(base, tmp_path / "ms", ["你好", "Write a short poem about the sea."], "float32",
                        new_tokens=0, reference=reference, streamed=streamed)
    assert report["passed"], json.dumps(report["prompts"][0]["stages"])
    assert report["reference"] == ("transformers Glm4ForCausalLM" if reference == "glm" else report["reference"])
    assert len(report["prompts"][0]["stages"]) == 2 * 2 + 2


def test_presets_have_the_published_sizes():
    sizes = {name: sum(map(math.prod, canonical_shapes(GLM2Config.preset(name)).values()))
             for name in ("glm4-9b-0414", "glm4-32b-0414")}
    assert round(sizes["glm4-9b-0414"] / 1e9, 2) == 9.40  # GLM-4-9B's 9.40B + two norms a layer
    assert round(sizes["glm4-32b-0414"] / 1e9, 2) == 32.57  # llama.cpp's count of GLM-4-32B-0414
    assert GLM2Config.preset("glm4-9b-0414").sandwich_norms


def test_a_full_finetune_learns_and_exports_to_transformers(lora_0414, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import mindspore as ms

    base = lora_0414[0]
    cfg = TrainConfig.load(None, method="full", max_steps=6, learning_rate=1e-3, warmup_steps=1, batch_size=4,
                           max_source_length=32, max_target_length=32, seed=0)
    trainer = Trainer(base, DATA / "adgen_train_head200.json", tmp_path / "run", cfg, progress=False)
    losses = trainer.train()
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    trainer.model.set_train(False)
    want = trainer.model(ms.Tensor([PROMPT[:48]], ms.int32)).asnumpy()[0]
    convert(export(trainer)["model"], tmp_path / "hf", target=Layout("glm"), fmt="safetensors", progress=False)
    with torch.no_grad():
        got = transformers.Glm4ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()(
            torch.tensor([PROMPT[:48]])).logits[0].numpy()
    assert np.abs(got - want).max() <= 1e-4
