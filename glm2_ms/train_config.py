"""Finetuning settings, with MindFormers-like field names, from a YAML/JSON file and CLI overrides."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from converters.errors import CheckpointError


@dataclass(frozen=True)
class TrainConfig:
    method: str = "lora"                 # lora | full
    # LoRA (the MindFormers GLM2 recipe)
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    target_modules: str = "query_key_value"
    # optimizer: AdamW with bias correction — adamw (mindspore.experimental.optim.AdamW) or fused-adamw (the same
    # update on MindSpore's fused kernel: faster, no per-step temporaries; see glm2_ms/fused_adamw.py)
    optimizer: str = "adamw"
    learning_rate: float = 5e-5
    lr_end: float = 1e-6
    warmup_steps: int = 0
    lr_power: float = 1.0               # polynomial decay exponent (1 = linear)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    # schedule and batches
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    # data
    max_source_length: int = 64
    max_target_length: int = 128
    seq_length: int | None = None
    prompt_column: str = "content"
    response_column: str = "summary"
    # numerics
    compute_dtype: str = "float32"      # float32 | float16 (then dynamic loss scaling)
    loss_scale: float = 2.0 ** 16
    loss_scale_factor: float = 2.0
    loss_scale_window: int = 1000
    # distributed (MindFormers: parallel.enable_parallel_optimizer)
    shard_optimizer: bool = False        # AdamW state and update sharded across data-parallel ranks
    # bookkeeping
    save_steps: int = 0                 # 0: only at the end
    log_steps: int = 1

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise CheckpointError(f"method must be lora or full, not {self.method!r}")
        if self.optimizer not in ("adamw", "fused-adamw"):
            raise CheckpointError(f"optimizer must be adamw or fused-adamw, not {self.optimizer!r}")
        if self.compute_dtype not in ("float32", "float16"):
            raise CheckpointError(f"compute_dtype must be float32 or float16, not {self.compute_dtype!r}")
        for f in ("batch_size", "gradient_accumulation_steps", "epochs", "lora_rank", "max_source_length",
                  "max_target_length"):
            if getattr(self, f) < 1:
                raise CheckpointError(f"{f} must be at least 1, got {getattr(self, f)}")
        if not 0 <= self.lora_dropout < 1:
            raise CheckpointError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @classmethod
    def load(cls, path: Path | None = None, **overrides) -> "TrainConfig":
        data = {}
        if path is not None:
            text = Path(path).read_text()
            try:
                if Path(path).suffix in (".yaml", ".yml"):
                    import yaml

                    data = yaml.safe_load(text) or {}
                else:
                    data = json.loads(text)
            except Exception as exc:  # yaml and json raise their own families; either way the file is bad
                raise CheckpointError(f"{path}: cannot parse config ({exc})") from None
            if not isinstance(data, dict):
                raise CheckpointError(f"{path}: config must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{path}: unknown fields {', '.join(unknown)}")
        cfg = cls(**data)
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int, total: int) -> float:
        """Linear warmup to learning_rate, then polynomial decay to lr_end at `total` steps."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        span = max(total - self.warmup_steps, 1)
        frac = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return (self.learning_rate - self.lr_end) * (1 - frac) ** self.lr_power + self.lr_end
