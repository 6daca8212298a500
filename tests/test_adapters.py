"""LoRA adapters read in every naming and written back (converters/adapters.py), without a runtime."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from converters.adapters import read_adapter, write_peft
from converters.cli import main
from converters.convert import convert
from converters.formats.safetensors_io import SafetensorsWriter
from glm2_core.errors import CheckpointError, UserError
from glm2_core.names import Layout

QKV = "transformer.encoder.layers.0.self_attention.query_key_value"


def write_glm_adapter(folder, cfg, parts, rank=2, alpha=4.0):
    """A PEFT adapter in transformers-GLM names with its own A and B on each of `parts` of layer 0's q/k/v."""
    rng = np.random.default_rng(0)
    rows = {"q": cfg.q_rows, "k": cfg.kv_rows, "v": cfg.kv_rows}
    tensors = {}
    for part in parts:
        name = f"base_model.model.model.layers.0.self_attn.{part}_proj"
        tensors[f"{name}.lora_A.weight"] = rng.standard_normal((rank, cfg.hidden_size), np.float32)
        tensors[f"{name}.lora_B.weight"] = rng.standard_normal((rows[part], rank), np.float32)
    folder.mkdir()
    with open(folder / "adapter_model.safetensors", "wb") as f:
        w = SafetensorsWriter(f, [(n, a.shape, "float32") for n, a in tensors.items()], {"format": "pt"})
        for n, a in tensors.items():
            w.write(n, a, "float32")
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": alpha}))
    return tensors


@pytest.mark.runtime
def test_glm_adapter_with_distinct_q_k_v_factors_is_fused_exactly(tmp_path, tiny_cfg):
    tensors = write_glm_adapter(tmp_path / "glm", tiny_cfg, "qkv")
    adapter = read_adapter(tmp_path / "glm")
    pairs = [(tensors[f"base_model.model.model.layers.0.self_attn.{p}_proj.lora_A.weight"],
              tensors[f"base_model.model.model.layers.0.self_attn.{p}_proj.lora_B.weight"]) for p in "qkv"]
    want = np.concatenate([2.0 * (b @ a) for a, b in pairs])  # alpha / r = 2
    assert adapter.rank == 6 and list(adapter.deltas) == [QKV]
    np.testing.assert_allclose(adapter.delta(QKV), want, rtol=1e-5, atol=1e-6)
    # written in transformers-GLM names again (one A for q, k and v; B's row blocks), it reads back the same
    write_peft(adapter, tmp_path / "again", "glm", tiny_cfg)
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    np.testing.assert_allclose(read_adapter(tmp_path / "again").delta(QKV), want, rtol=1e-5, atol=1e-6)


def test_glm_adapter_without_every_part_is_refused(tmp_path, tiny_cfg):
    write_glm_adapter(tmp_path / "glm", tiny_cfg, "qk")
    with pytest.raises(CheckpointError, match=r"query_key_value has LoRA on \['k', 'q'\] only"):
        read_adapter(tmp_path / "glm")


@pytest.mark.parametrize("spelling", [["--hf", "chatglm"], ["--layout", "chatglm"]])
def test_merge_lora_refuses_a_format_the_layout_cannot_take(hf_tiny, tiny_cfg, tmp_path, spelling):
    """A HF layout is never written as a MindSpore .ckpt: one line, exit 1, nothing written."""
    write_glm_adapter(tmp_path / "adapter", tiny_cfg, "qkv")
    res = CliRunner().invoke(main, ["merge-lora", str(hf_tiny()), str(tmp_path / "adapter"), str(tmp_path / "out"),
                                    *spelling, "--format", "ckpt"])
    assert res.exit_code == 1 and not (tmp_path / "out").exists()
    warning = "warning: --hf is an old spelling of --layout, and will be removed\n" if spelling[0] == "--hf" else ""
    assert res.output == warning + ("error: --format ckpt does not go with --layout chatglm (it is written as "
                                    "safetensors or bin)\n")


def test_convert_refuses_a_format_the_layout_cannot_take(hf_tiny, tmp_path):
    with pytest.raises(UserError, match="--format ckpt does not go with --layout glm"):
        convert(hf_tiny(), tmp_path / "out", target=Layout("glm"), fmt="ckpt", progress=False)
    assert not (tmp_path / "out").exists()
