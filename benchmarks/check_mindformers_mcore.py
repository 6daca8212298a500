"""Our `--layout mindformers-mcore` output read back by MindFormers' own loader functions.

MindFormers 2.1.0 reads a folder in its mcore names through `deal_training_qkv_weight` and `deal_training_ffn_weight`
(mindformers/parallel_core/inference/weights_utils.py), and builds the fused tensors in training with
`concat_qkv_interleaved` and `concat_linear_fc1_interleaved` (mindformers/parallel_core/utils/model_mixin.py).
mindformers cannot be imported without an Ascend stack, so this executes those four functions' source, taken from
the unpacked wheel, with tensor parallel size 1, on a random GLM-4-0414 converted by glm2-convert:

    pip download --no-deps mindformers==2.1.0 -d /tmp/mf && unzip -q /tmp/mf/mindformers-2.1.0-*.whl -d /tmp/mf/src
    python benchmarks/check_mindformers_mcore.py /tmp/mf/src/mindformers
"""
from __future__ import annotations

import ast
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from converters.checkpoint import open_checkpoint
from converters.convert import convert
from converters.synth import synthesize
from glm2_core.config import GLM2Config
from glm2_core.names import Layout


def functions(path: Path, names: set[str], cls: str | None = None) -> dict:
    """The named functions (methods of `cls`, called with self=None) of a source file, executed with numpy and a
    tensor-parallel world of one."""
    text = path.read_text()
    body = ast.parse(text).body
    if cls:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    env = {"np": np, "get_tensor_model_parallel_world_size": lambda: 1, "get_tensor_model_parallel_rank": lambda: 0}
    for node in body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            exec(textwrap.dedent(" " * node.col_offset + ast.get_source_segment(text, node)), env)
    return env


def main(mindformers: Path) -> None:
    loader = functions(mindformers / "parallel_core/inference/weights_utils.py",
                       {"deal_training_qkv_weight", "deal_training_ffn_weight", "split_loaded_weight"})
    builder = functions(mindformers / "parallel_core/utils/model_mixin.py",
                        {"concat_qkv_interleaved", "concat_linear_fc1_interleaved"}, "TrainModelMixin")
    cfg = GLM2Config.preset("tiny", release="glm-4-9b-0414", padded_vocab_size=151552, num_attention_heads=8,
                            multi_query_group_num=2, kv_channels=8)  # 2 groups of 4 query heads
    mf = SimpleNamespace(kv_channels=cfg.kv_channels, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                         num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.multi_query_group_num)
    checked = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf, mcore = Path(tmp) / "hf", Path(tmp) / "mcore"
        synthesize(hf, cfg, "float32", "safetensors", seed=5)
        convert(hf, mcore, target=Layout("mindformers-mcore"), fmt="safetensors", progress=False)
        with open_checkpoint(hf) as a, open_checkpoint(mcore) as b:
            h = {n: t.read() for n, t in a.tensors.items()}
            m = {n: t.read() for n, t in b.tensors.items()}
    for i in range(cfg.num_layers):
        for kind in ("weight", "bias"):
            q, k, v = (h[f"model.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv")
            ours = m[f"decoder.layers.{i}.self_attention.linear_qkv.{kind}"]
            assert loader["deal_training_qkv_weight"](ours, mf).tobytes() == np.concatenate([q, k, v]).tobytes()
            built = builder["concat_qkv_interleaved"](None, q, k, v, "linear_q", cfg.kv_channels,
                                                      mf.num_query_groups, mf.num_attention_heads)["linear_qkv"]
            assert built.reshape(ours.shape).tobytes() == ours.tobytes()
            checked += 1
        gate_up = h[f"model.layers.{i}.mlp.gate_up_proj.weight"]
        ours = m[f"decoder.layers.{i}.mlp.linear_fc1.weight"]
        assert loader["deal_training_ffn_weight"](ours, mf).tobytes() == gate_up.tobytes()
        ffn = cfg.ffn_hidden_size
        built = builder["concat_linear_fc1_interleaved"](None, gate_up[:ffn], gate_up[ffn:], "gating", ffn)
        assert built["linear_fc1"].tobytes() == ours.tobytes()
        checked += 1
    print(f"MindFormers' loader and builder agree with our mcore layout on all {checked} fused tensors "
          f"({cfg.num_layers} layers, {mf.num_query_groups} groups of {cfg.num_attention_heads // mf.num_query_groups}"
          f" query heads)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
