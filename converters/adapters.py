"""LoRA adapters in both ecosystems' forms, read into one shape and written back out.

- mindpet (MindFormers): `<module>.mindpet_delta_lora_a` [r, in] and `…_lora_b` [out, r] in a .ckpt
  (mindpet < 1.0.2 / MindFormers r0.7: `tk_delta_lora_a/_b`); alpha lives in the run's yaml, so we keep an
  `adapter_config.json` beside the file.
- PEFT: `base_model.model.<module>.lora_A.weight` / `lora_B.weight` in `adapter_model.safetensors` with
  `adapter_config.json` (r, lora_alpha, target_modules, …). Modules named as in THUDM's ChatGLM2
  (`query_key_value`) or as in transformers' GLM (`q_proj`/`k_proj`/`v_proj`, one LoRA each).

The delta is scaling · B · A with scaling = lora_alpha / r taken from the adapter's config — never a default of 1.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glm2_core.errors import CheckpointError
from glm2_core.jsonio import read_json

MINDPET = re.compile(r"^(.*)\.(?:mindpet_delta|tk_delta)_lora_([ab])$")
PEFT = re.compile(r"^base_model\.model\.(.*)\.lora_([AB])(?:\.default)?\.weight$")
GLM_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj$")
QKV = "transformer.encoder.layers.{}.self_attention.query_key_value"


@dataclass
class Adapter:
    """Deltas keyed by the canonical (THUDM) module name: (A [r, in], B [out, r]) float32, and one scaling."""
    rank: int
    alpha: float
    deltas: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta(self, module: str) -> np.ndarray | None:
        """scaling · B · A for a module, float32, or None when the adapter does not touch it."""
        if module not in self.deltas:
            return None
        a, b = self.deltas[module]
        return (np.float32(self.scaling) * (b @ a)).astype(np.float32)


def _settings(path: Path, folder: Path) -> tuple[Path, dict] | None:
    """(where, {r, lora_alpha, …}): `adapter_config.json` beside the adapter, or for a checkpoint of one of our
    LoRA runs, what the run recorded (converters/runs.py)."""
    from .runs import recorded_lora

    config = folder / "adapter_config.json"
    if config.is_file():
        return config, read_json(config, "adapter config")
    return recorded_lora(path) if path.is_file() else None


def _fuse_glm(parts: dict[str, dict[str, tuple]], rank: int) -> tuple[dict, int]:
    """transformers-GLM LoRAs on q/k/v → one LoRA on the fused query_key_value (rows q, k, v). When the three A
    matrices are equal (as we export them) the fused rank is r; otherwise A's are stacked (rank 3r) and B is block
    diagonal, which is the same delta exactly."""
    fused, out_rank = {}, rank
    for layer, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise CheckpointError(f"adapter: layer {layer} has LoRA on {sorted(qkv)} only; need q, k and v")
        (aq, bq), (ak, bk), (av, bv) = qkv["q"], qkv["k"], qkv["v"]
        if np.array_equal(aq, ak) and np.array_equal(aq, av):
            fused[QKV.format(layer)] = (aq, np.concatenate([bq, bk, bv]))
        else:
            b = np.zeros((bq.shape[0] + bk.shape[0] + bv.shape[0], 3 * rank), np.float32)
            b[:bq.shape[0], :rank] = bq
            b[bq.shape[0]:bq.shape[0] + bk.shape[0], rank:2 * rank] = bk
            b[bq.shape[0] + bk.shape[0]:, 2 * rank:] = bv
            fused[QKV.format(layer)] = (np.concatenate([aq, ak, av]), b)
            out_rank = 3 * rank
    return fused, out_rank


def _pairs(names_arrays, pattern: re.Pattern, where: str) -> dict[str, dict[str, np.ndarray]]:
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in names_arrays:
        m = pattern.match(name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2).lower()] = np.asarray(arr, np.float32)
    for module, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise CheckpointError(f"{where}: LoRA of {module} lacks its {'B' if 'a' in ab else 'A'} matrix")
        if ab["a"].shape[0] != ab["b"].shape[1]:
            raise CheckpointError(f"{where}: LoRA of {module}: A {list(ab['a'].shape)} and B {list(ab['b'].shape)} "
                                  f"disagree on the rank")
    return pairs


def _lora_arrays(ckpt) -> list[tuple[str, np.ndarray]]:
    """The LoRA factors of a checkpoint (not the optimizer's moments of them, which a training checkpoint holds)."""
    from glm2_core.dtypes import to_float32
    from glm2_core.names import OPTIMIZER_PREFIXES

    return [(n, to_float32(t.read(), t.dtype)) for n, t in ckpt.tensors.items()
            if (MINDPET.match(n) or PEFT.match(n)) and not n.startswith(OPTIMIZER_PREFIXES)]


def read_adapter(path, alpha: float | None = None, opened=None) -> Adapter:
    """A PEFT folder, a mindpet .ckpt (or its folder), or any MindSpore checkpoint holding mindpet tensors (also
    one already `opened`, e.g. merged rank shards)."""
    from .checkpoint import open_checkpoint

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    where, config = (_settings(path, folder) if opened is None else None) or (None, None)
    peft_file = folder / "adapter_model.safetensors"
    source = peft_file if path.is_dir() and peft_file.is_file() else path
    if opened is not None:
        arrays = _lora_arrays(opened)
    else:
        with open_checkpoint(source) as ckpt:
            arrays = _lora_arrays(ckpt)
            ckpt.check_complete()
    if not arrays:
        raise CheckpointError(f"{path}: holds no LoRA tensors (mindpet_delta_lora_*, tk_delta_lora_*, or PEFT "
                              f"lora_A/lora_B)")
    is_peft = PEFT.match(arrays[0][0]) is not None
    pairs = _pairs(arrays, PEFT if is_peft else MINDPET, str(path))
    ranks = {ab["a"].shape[0] for ab in pairs.values()}
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: LoRA ranks differ across modules ({sorted(ranks)})")
    rank = ranks.pop()
    if alpha is None:
        if config is None or "lora_alpha" not in config:
            raise CheckpointError(f"{path}: no adapter_config.json with lora_alpha beside it, and no record of the "
                                  f"run that wrote it; pass the run's alpha (--lora-alpha): the scaling alpha/r is "
                                  f"never assumed")
        alpha, r = config["lora_alpha"], config.get("r", rank)
        if type(alpha) not in (int, float) or not math.isfinite(alpha) or type(r) is not int:
            raise CheckpointError(f"{where}: lora_alpha must be a number and r an integer")
        if r != rank:
            raise CheckpointError(f"{where}: r={r}, but the tensors have rank {rank}")
    deltas = {m: (ab["a"], ab["b"]) for m, ab in pairs.items()}
    glm = {m: GLM_QKV.match(m) for m in deltas}
    if all(glm.values()):
        by_layer: dict[str, dict[str, tuple]] = {}
        for m, hit in glm.items():
            by_layer.setdefault(hit.group(1), {})[hit.group(2)] = deltas[m]
        fused, fused_rank = _fuse_glm(by_layer, rank)
        # keep the delta exact: scaling is alpha/r of the original rank
        return Adapter(fused_rank, alpha * fused_rank / rank, fused, float((config or {}).get("lora_dropout", 0)))
    if any(glm.values()):
        raise CheckpointError(f"{path}: mixes transformers-GLM and ChatGLM module names")
    return Adapter(rank, alpha, deltas, float((config or {}).get("lora_dropout", 0)))


def peft_config(adapter: Adapter, target: str, base_model: str = "") -> dict:
    modules = ["query_key_value"] if target == "chatglm" else ["q_proj", "k_proj", "v_proj"]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
            "lora_dropout": adapter.dropout, "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "base_model_name_or_path": base_model, "modules_to_save": None}


def peft_tensors(adapter: Adapter, target: str, q_rows: int, kv_rows: int) -> dict[str, np.ndarray]:
    out = {}
    for module, (a, b) in adapter.deltas.items():
        if target == "chatglm":
            out[f"base_model.model.{module}.lora_A.weight"] = a
            out[f"base_model.model.{module}.lora_B.weight"] = b
            continue
        layer = re.search(r"layers\.(\d+)\.", module).group(1)
        for part, rows in (("q", slice(0, q_rows)), ("k", slice(q_rows, q_rows + kv_rows)),
                           ("v", slice(q_rows + kv_rows, q_rows + 2 * kv_rows))):
            name = f"base_model.model.model.layers.{layer}.self_attn.{part}_proj"
            out[f"{name}.lora_A.weight"] = a  # the same A for q, k and v: B's row blocks carry the split
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[rows])
    return out


def write_peft(adapter: Adapter, out: Path, target: str, q_rows: int, kv_rows: int, base_model: str = "") -> None:
    from .formats.safetensors_io import SafetensorsWriter

    out.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(adapter, target, q_rows, kv_rows)
    with open(out / "adapter_model.safetensors", "wb") as f:
        w = SafetensorsWriter(f, [(n, a.shape, "float32") for n, a in tensors.items()], {"format": "pt"})
        for n, a in tensors.items():
            w.write(n, np.ascontiguousarray(a, np.float32), "float32")
    (out / "adapter_config.json").write_text(json.dumps(peft_config(adapter, target, base_model), indent=2))


def write_mindpet(adapter: Adapter, out: Path) -> None:
    """`adapter.ckpt` with mindpet names and `adapter_config.json` (rank, alpha) beside it."""
    from .formats.ckpt import CkptWriter

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "adapter.ckpt", "wb") as f:
        w = CkptWriter(f)
        for module, (a, b) in adapter.deltas.items():
            w.write(f"{module}.mindpet_delta_lora_a", np.ascontiguousarray(a, np.float32), "float32")
            w.write(f"{module}.mindpet_delta_lora_b", np.ascontiguousarray(b, np.float32), "float32")
    (out / "adapter_config.json").write_text(json.dumps(
        {"format": "mindpet", "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
         "target_modules": ["query_key_value"]}, indent=2))
