"""GLM2Config from the real config.json, from our folders, presets, and refusals."""
import json

import pytest
from conftest import DATA

from glm2_core.config import GLM2Config
from glm2_core.errors import CheckpointError
from glm2_core.names import LAYOUTS, Layout, canonical_shapes, detect_layout, infer_config, weight_map


def test_real_config_json_is_the_6b_preset():
    cfg = GLM2Config.from_pretrained(DATA / "chatglm2-6b_config.json")
    assert cfg == GLM2Config.preset("6b")
    shapes = canonical_shapes(cfg)
    assert len(shapes) == 199  # the release's 200 keys less inv_freq
    assert shapes["transformer.encoder.layers.27.self_attention.query_key_value.weight"] == (4608, 4096)
    assert shapes["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] == (27392, 4096)
    total = sum(2 * a * (b if len(s) > 1 else 1) for s in shapes.values() for a, b in [(s[0], s[-1])])
    assert total + 2 * 32 == 12_487_168_064  # the release's total_size (fp16, with inv_freq)


def test_written_configs_read_back(tmp_path):
    cfg = GLM2Config.preset("tiny", rope_ratio=16.0)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg.chatglm_json()))
    (tmp_path / "g.json").write_text(json.dumps(cfg.glm_json()))
    assert GLM2Config.from_pretrained(tmp_path / "a") == cfg
    assert GLM2Config.from_pretrained(tmp_path / "g.json") == cfg
    real = json.loads((DATA / "chatglm2-6b_config.json").read_text())
    assert set(GLM2Config.preset("6b").chatglm_json()) == set(real)


@pytest.mark.parametrize("change, needle", [
    ({"mystery_field": 1}, "unknown config fields mystery_field"),
    ({"add_bias_linear": True}, "add_bias_linear"),
    ({"multi_query_group_num": 3}, "not a multiple"),
    ({"multi_query_attention": False, "multi_query_group_num": 2}, "multi_query_attention is false"),
])
def test_contradictions_are_refused(change, needle):
    data = json.loads((DATA / "chatglm2-6b_config.json").read_text())
    data.update(change)
    with pytest.raises(CheckpointError, match=needle):
        GLM2Config.from_dict(data)


def test_sizes_inferred_from_the_shapes_of_every_layout():
    """A bare weights file without config.json: the sizes come from its shapes, in any layout (head size given)."""
    cfg = GLM2Config.preset("tiny", add_qkv_bias=False, num_layers=3)
    layouts = [Layout(f) for f in LAYOUTS] + [Layout("mindformers", True, True, True)]
    for layout in layouts:
        shapes = {p.name: m.piece_shape(p) for m in weight_map(layout, cfg) for p in m.pieces}
        assert detect_layout(shapes, layout.rearrange_rope) == layout
        got = infer_config(shapes, layout, kv_channels=cfg.kv_channels)
        sizes = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "multi_query_group_num",
                 "kv_channels", "padded_vocab_size", "add_qkv_bias")
        assert [getattr(got, f) for f in sizes] == [getattr(cfg, f) for f in sizes], layout
    shapes = {p.name: m.piece_shape(p) for m in weight_map(Layout("glm"), cfg) for p in m.pieces}
    with pytest.raises(CheckpointError, match="cannot infer the model sizes"):
        infer_config(shapes, Layout("glm"), kv_channels=5)
    with pytest.raises(CheckpointError, match="no embedding among its names"):
        detect_layout([n for n in shapes if "embed" not in n])
