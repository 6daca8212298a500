"""Synthetic ChatGLM2 checkpoints laid out exactly like the THUDM release, at any size, streamed to disk."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from glm2_core.assets import bundled_tokenizer
from glm2_core.config import GLM2Config
from glm2_core.dtypes import BY_NAME, cast, nbytes
from glm2_core.errors import UserError
from glm2_core.names import EMBEDDING, INV_FREQ, Layout, inv_freq, weight_map
from glm2_core.outputs import MODEL
from glm2_core.releases import RELEASES

from .model_folder import weight_files, write_beside_weights, write_manifest
from .output import WeightsWriter, staged_folder

BLOCK_ELEMENTS = 1 << 24  # generate 16M values at a time: memory stays near one tensor


def _values(name: str, shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """Deterministic per (seed, name): N(0, 0.02) for matrices and biases, 1 + N(0, 0.02) for norm weights."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out = np.empty(shape, BY_NAME[dtype].storage)
    flat = out.reshape(-1)
    offset = 1.0 if "layernorm" in name else 0.0
    for start in range(0, flat.size, BLOCK_ELEMENTS):
        n = min(BLOCK_ELEMENTS, flat.size - start)
        block = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02) + np.float32(offset)
        flat[start:start + n] = cast(block, "float32", dtype)
    return out


def synthesize(out: Path, cfg: GLM2Config, dtype: str = "float16", fmt: str = "bin", seed: int = 0,
               max_shard_bytes: int | None = None, overwrite: bool = False, script=None) -> list[str]:
    """Write a HF folder as the release publishes it (config, sharded weights + index, tokenizer): THUDM's ChatGLM
    names, or transformers' GLM names for GLM-4-0414; returns the weight files. GLM-4's tokenizer is not bundled:
    its folders get none. `script(canonical name, shape)`: a tensor's values where it returns an array (a model
    whose behaviour a test sets), else the seeded random ones."""
    if fmt not in ("bin", "safetensors"):
        raise UserError(f"unknown format {fmt!r}; expected bin or safetensors")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise UserError(f"unknown dtype {dtype!r}; expected float16, bfloat16 or float32")
    layout = Layout(RELEASES[cfg.release].native)
    maps = weight_map(layout, cfg)
    assert maps[0].canonical == EMBEDDING
    plan = [(p.name, m.piece_shape(p), dtype) for m in maps for p in m.pieces]
    if layout.name == "chatglm":  # THUDM's folders carry RoPE's buffer after the embedding
        plan.insert(1, (INV_FREQ, (cfg.kv_channels // 4,), dtype))
    shards = weight_files(plan, fmt, layout.name, max_shard_bytes)
    need = sum(nbytes(shape, dt) for _, shape, dt in plan)
    with staged_folder(Path(out), overwrite, need=need, kind=MODEL) as tmp:
        with WeightsWriter(tmp, fmt, shards, {"format": "pt"} if fmt == "safetensors" else None) as writer:
            for i, m in enumerate(maps):
                chosen = script and script(m.canonical, m.shape)
                parts = m.gather(_values(m.canonical, m.shape, dtype, seed) if chosen is None
                                 else cast(np.asarray(chosen, np.float32), "float32", dtype))
                for piece, values in zip(m.pieces, parts, strict=True):
                    writer.write(piece.name, values, dtype)
                if i == 0 and layout.name == "chatglm":
                    writer.write(INV_FREQ, inv_freq(cfg, dtype), dtype)
        write_beside_weights(tmp, cfg, layout, dtype, fmt, shards, bundled_tokenizer(cfg.family))
        write_manifest(tmp, {"synthesized": {"seed": seed}, "format": fmt, "dtype": dtype,
                             "files": [f for f, _ in shards], "tensors": writer.records})
    return [f for f, _ in shards]
