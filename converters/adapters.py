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

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glm2_core.dtypes import to_float32
from glm2_core.errors import CheckpointError
from glm2_core.jsonio import read_json, write_json
from glm2_core.names import BY_TEMPLATE, LORA_A, LORA_B, MINDPET, OPTIMIZER_PREFIXES, Layout, layer_template, weight_map

from .checkpoint import open_checkpoint
from .formats.ckpt import CkptWriter
from .formats.safetensors_io import SafetensorsWriter
from .runs import recorded_lora

PEFT = re.compile(r"^base_model\.model\.(.*)\.lora_([AB])(?:\.default)?\.weight$")
PEFT_PREFIX = "base_model.model."
GLM = Layout("glm")  # the names of transformers' GLM, whose q/k/v projections are three modules


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
    config = folder / "adapter_config.json"
    if config.is_file():
        return config, read_json(config, "adapter config")
    return recorded_lora(path) if path.is_file() else None


def _glm_module(module: str) -> tuple[str, int, str] | None:
    """A transformers-GLM module → (the canonical weight holding it, the layer, the part of its rows), e.g.
    `model.layers.3.self_attn.k_proj` → (`transformer.encoder.layers.{i}.self_attention.query_key_value.weight`,
    3, "k"); None for another name."""
    template, layer = layer_template(f"{module}.weight")
    found = GLM.pieces().get(template)
    return None if found is None else (found[0].template, layer, found[1])


def _fuse(parts: dict[str, tuple], order: list[str], module: str, rank: int) -> tuple[tuple, int]:
    """LoRAs on the row blocks of one canonical module (transformers-GLM's q/k/v) → one LoRA on the whole. When
    their A matrices are equal (as we export them) the fused rank is r; otherwise A's are stacked (rank n·r) and
    B is block diagonal, which is the same delta exactly."""
    if set(parts) != set(order):
        raise CheckpointError(f"adapter: {module} has LoRA on {sorted(parts)} only; need {', '.join(order)}")
    a_s, b_s = zip(*(parts[p] for p in order), strict=True)
    if all(np.array_equal(a_s[0], a) for a in a_s):
        return (a_s[0], np.concatenate(b_s)), rank
    b = np.zeros((sum(x.shape[0] for x in b_s), len(b_s) * rank), np.float32)
    row = 0
    for k, x in enumerate(b_s):
        b[row:row + x.shape[0], k * rank:(k + 1) * rank] = x
        row += x.shape[0]
    return (np.concatenate(a_s), b), len(b_s) * rank


def _from_glm(deltas: dict[str, tuple], rank: int) -> tuple[dict, int]:
    """Deltas keyed by transformers-GLM modules → keyed by the canonical modules (q/k/v fused), and the rank."""
    by_weight: dict[tuple[str, int], dict[str, tuple]] = {}
    for module, ab in deltas.items():
        template, layer, part = _glm_module(module)
        by_weight.setdefault((template, layer), {})[part] = ab
    fused, out_rank = {}, rank
    for (template, layer), parts in by_weight.items():
        module = template.format(i=layer).removesuffix(".weight")
        order = [part for _, part in GLM.targets(BY_TEMPLATE[template])]
        fused[module], r = _fuse(parts, order, module, rank)
        out_rank = max(out_rank, r)
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
    return [(n, to_float32(t.read(), t.dtype)) for n, t in ckpt.tensors.items()
            if (MINDPET.match(n) or PEFT.match(n)) and not n.startswith(OPTIMIZER_PREFIXES)]


def adapter_from_mindpet(tensors: dict[str, np.ndarray], alpha: float, dropout: float = 0.0,
                         where: str = "the model") -> Adapter:
    """An adapter from its mindpet-named factors in memory (a LoRA model's state), with the run's alpha."""
    pairs = _pairs(tensors.items(), MINDPET, where)
    rank = next(iter(pairs.values()))["a"].shape[0]
    return Adapter(rank, alpha, {m: (ab["a"], ab["b"]) for m, ab in pairs.items()}, dropout)


def read_adapter(path, alpha: float | None = None, opened=None) -> Adapter:
    """A PEFT folder, a mindpet .ckpt (or its folder), or any MindSpore checkpoint holding mindpet tensors (also
    one already `opened`, e.g. merged rank shards)."""
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
    glm = [_glm_module(m) is not None for m in deltas]
    if all(glm):
        fused, fused_rank = _from_glm(deltas, rank)
        # keep the delta exact: scaling is alpha/r of the original rank
        return Adapter(fused_rank, alpha * fused_rank / rank, fused, float((config or {}).get("lora_dropout", 0)))
    if any(glm):
        raise CheckpointError(f"{path}: mixes transformers-GLM and ChatGLM module names")
    return Adapter(rank, alpha, deltas, float((config or {}).get("lora_dropout", 0)))


def _short_names(modules) -> list[str]:
    """The modules' last names, as PEFT's target_modules lists them (`query_key_value`, `q_proj`…)."""
    return list(dict.fromkeys(m.rsplit(".", 1)[-1] for m in modules))


def layout_modules(adapter: Adapter, target: str, cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The adapter's LoRA per module of the `target` layout's names: for transformers-GLM's q/k/v, the same A for
    each and the row blocks of B (which carry the split), as the weight map splits query_key_value."""
    maps = {m.canonical: m for m in weight_map(Layout(target), cfg)}
    out = {}
    for module, (a, b) in adapter.deltas.items():
        mapping = maps.get(f"{module}.weight")
        if mapping is None:
            raise CheckpointError(f"adapter: {module} is not a module of the model")
        for piece in mapping.pieces:
            rows = b if piece.rows is None else np.ascontiguousarray(b[piece.rows])
            out[piece.name.removesuffix(".weight")] = (a, rows)
    return out


def peft_config(adapter: Adapter, modules, base_model: str = "") -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
            "lora_dropout": adapter.dropout, "target_modules": _short_names(modules), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model,
            "modules_to_save": None}


def write_peft(adapter: Adapter, out: Path, target: str, cfg, base_model: str = "") -> None:
    """A PEFT adapter folder (adapter_model.safetensors, adapter_config.json) in the `target` layout's names
    (chatglm or glm)."""
    out.mkdir(parents=True, exist_ok=True)
    modules = layout_modules(adapter, target, cfg)
    tensors = {f"{PEFT_PREFIX}{m}.lora_{k}.weight": x for m, (a, b) in modules.items() for k, x in (("A", a), ("B", b))}
    with open(out / "adapter_model.safetensors", "wb") as f:
        w = SafetensorsWriter(f, [(n, a.shape, "float32") for n, a in tensors.items()], {"format": "pt"})
        for n, a in tensors.items():
            w.write(n, np.ascontiguousarray(a, np.float32), "float32")
    write_json(out / "adapter_config.json", peft_config(adapter, modules, base_model))


def write_mindpet(adapter: Adapter, out: Path) -> None:
    """`adapter.ckpt` with mindpet names and `adapter_config.json` (rank, alpha) beside it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "adapter.ckpt", "wb") as f:
        w = CkptWriter(f)
        for module, (a, b) in adapter.deltas.items():
            w.write(f"{module}.{LORA_A}", np.ascontiguousarray(a, np.float32), "float32")
            w.write(f"{module}.{LORA_B}", np.ascontiguousarray(b, np.float32), "float32")
        w.finish()
    write_json(out / "adapter_config.json", {"format": "mindpet", "r": adapter.rank, "lora_alpha": adapter.alpha,
                                             "lora_dropout": adapter.dropout,
                                             "target_modules": _short_names(adapter.deltas)})
