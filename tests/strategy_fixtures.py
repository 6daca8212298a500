"""Strategy files for GLM2 parallel layouts, built with MindSpore's own `node_strategy_pb2` messages, and rank
shards cut from a full checkpoint by MindSpore itself (`transform_checkpoints`), never by the code under test."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# tensor maps of a dp × mp device matrix [dp, mp]: 0 = the mp dim, 1 = the dp dim
COLUMN, ROW, VOCAB, REPLICATED, BIAS = [0, -1], [-1, 0], [0, -1], [-1], [0]


def glm2_maps(names: list[str]) -> dict[str, list[int]]:
    """Megatron-style GLM2 model parallelism: column-parallel qkv / h→4h, row-parallel dense / 4h→h,
    vocab-parallel embedding and output layer, replicated norms."""
    maps = {}
    for n in names:
        if "layernorm" in n:
            maps[n] = REPLICATED
        elif n.endswith(".bias"):
            maps[n] = BIAS
        elif "dense_4h_to_h" in n or n.endswith("self_attention.dense.weight"):
            maps[n] = ROW
        elif "embedding" in n or "output_layer" in n:
            maps[n] = VOCAB
        else:
            maps[n] = COLUMN
    return maps


def layout_entry(dev_matrix, tensor_map, opt=(0, 0), split_shape=()) -> dict:
    return {"dev_matrix": list(dev_matrix), "tensor_map": list(tensor_map), "opt": list(opt),
            "split_shape": list(split_shape)}


def write_pb(path: Path, layouts: dict[str, dict], stage: int = 0) -> Path:
    from mindspore.train import node_strategy_pb2 as pb

    msg = pb.ParallelStrategyMap()
    msg.current_stage = 1
    item = msg.parallel_strategy_item.add()
    item.node_name = "fixture"
    item.parallel_strategys.stage = stage
    for name, e in layouts.items():
        li = msg.parallel_layout_item.add()
        li.param_name = name
        lay = li.parallel_layouts
        lay.dev_matrix.add().dim.extend(e["dev_matrix"])
        lay.tensor_map.add().dim.extend(e["tensor_map"])
        lay.param_split_shape.add().dim.extend(e["split_shape"])
        lay.field = 0
        lay.opt_weight_shard_step, lay.opt_weight_shard_size = e["opt"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msg.SerializeToString())
    return path


def write_json(path: Path, layouts: dict[str, dict], stage: int = 0) -> Path:
    doc = {"current_stage": 1, "parallel_strategy_item": {"fixture": {"stage": stage, "parallel_strategy": []}},
           "parallel_layout_item": {
               n: {"dev_matrix": e["dev_matrix"], "tensor_map": e["tensor_map"], "param_split_shape": e["split_shape"],
                   "field": 0, "opt_weight_shard_step": e["opt"][0], "opt_weight_shard_size": e["opt"][1]}
               for n, e in layouts.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def ms_split(full_ckpt: Path, strategy: Path, out: Path, prefix: str = "glm2_rank_") -> Path:
    """MindSpore's own split of a full checkpoint into `out/rank_{r}/{prefix}{r}.ckpt` for `strategy`."""
    import mindspore as ms

    src = out.parent / (out.name + "-full")
    (src / "rank_0").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(full_ckpt, src / "rank_0" / "full.ckpt")
    ms.transform_checkpoints(str(src), str(out), prefix, None, str(strategy))
    shutil.rmtree(src)
    return out
