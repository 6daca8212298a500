"""Finetuning settings, with MindFormers-like field names, from a YAML/JSON file and CLI overrides."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from glm2_core.dtypes import COMPUTE_DTYPES
from glm2_core.errors import UserError

SHARED = None  # the help of a setting whose flag other tools share too: the CLI vocabulary's (glm2_core/options.py)


def setting(default, help: str | None, choices: tuple[str, ...] | None = None, none: str | None = None):
    """A field with its help, allowed values, and what a default of None means: glm2-finetune makes a flag of
    every field from these."""
    return field(default=default, metadata={"help": help, "choices": choices, "none": none})


@dataclass(frozen=True)
class TrainConfig:
    method: str = setting("lora", "lora: train LoRA factors on a frozen base; full: train every weight.",
                          ("lora", "full"))
    # LoRA (the MindFormers GLM2 recipe)
    lora_rank: int = setting(8, "LoRA rank r.")
    lora_alpha: float = setting(32.0, SHARED)
    lora_dropout: float = setting(0.1, "Dropout on the LoRA branch's input, in [0, 1).")
    target_modules: str = setting("query_key_value", "Modules that get LoRA factors (comma-separated).")
    # optimizer: AdamW with bias correction — fused-adamw (the update of mindspore.experimental.optim.AdamW on
    # MindSpore's fused kernel: faster, no per-step temporaries; see glm2_ms/fused_adamw.py) or adamw (that class)
    optimizer: str = setting("fused-adamw", "AdamW with bias correction: on MindSpore's fused kernel (the same "
                                            "update, faster, less memory), or MindSpore's experimental AdamW class "
                                            "itself.", ("fused-adamw", "adamw"))
    learning_rate: float = setting(5e-5, "Peak learning rate (after warmup).")
    lr_end: float = setting(1e-6, "Learning rate at the last step (polynomial decay).")
    warmup_steps: int = setting(0, "Steps of linear warmup from 0 to --learning-rate.")
    lr_power: float = setting(1.0, "Exponent of the polynomial decay (1: linear).")
    weight_decay: float = setting(0.1, "AdamW weight decay (not on norms and biases).")
    beta1: float = setting(0.9, "AdamW β1.")
    beta2: float = setting(0.95, "AdamW β2.")
    eps: float = setting(1e-8, "AdamW ε.")
    max_grad_norm: float = setting(1.0, "Clip the gradients' global norm to this.")
    # schedule and batches
    batch_size: int = setting(8, SHARED)
    gradient_accumulation_steps: int = setting(1, "Batches whose gradients are added up per optimizer step.")
    epochs: int = setting(1, "Passes over the training data.")
    max_steps: int | None = setting(None, "Stop after this many optimizer steps.", none="all epochs")
    seed: int = setting(0, SHARED)
    # data
    max_source_length: int = setting(64, "Prompt tokens kept (longer prompts are cut).")
    max_target_length: int = setting(128, "Answer tokens kept (longer answers are cut).")
    seq_length: int | None = setting(None, "Sequence length: max_source_length + max_target_length + 1 (another "
                                           "value is refused).", none="that sum")
    prompt_column: str = setting("content", "JSON key of the prompt in the training lines.")
    response_column: str = setting("summary", "JSON key of the answer in the training lines.")
    # numerics
    compute_dtype: str = setting("float32", SHARED, COMPUTE_DTYPES)  # float16: dynamic loss scaling
    loss_scale: float = setting(2.0 ** 16, "float16: the initial loss scale.")
    loss_scale_factor: float = setting(2.0, "float16: the loss scale is divided by this on an overflow and "
                                            "multiplied by it after --loss-scale-window good steps.")
    loss_scale_window: int = setting(1000, "float16: good steps before the loss scale grows.")
    recompute: bool = setting(True, "Train block by block: keep only each block's input from the forward pass and "
                                    "run each block again in the backward pass (one block's graph buffers instead "
                                    "of the whole model's; see glm2_ms/train_step.py).")
    # distributed (MindFormers: parallel.enable_parallel_optimizer)
    shard_optimizer: bool = setting(False, "Under msrun: shard the AdamW state and update across the ranks (each "
                                           "holds 1/N).")
    # bookkeeping
    save_steps: int = setting(0, "Save a checkpoint every this many steps (0: only at the end).")
    log_steps: int = setting(1, "Write a train_log.jsonl row every this many steps.")

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"{f.name} must be {' or '.join(choices)}, not {getattr(self, f.name)!r}")
        for f in ("batch_size", "gradient_accumulation_steps", "epochs", "lora_rank", "max_source_length",
                  "max_target_length"):
            if getattr(self, f) < 1:
                raise UserError(f"{f} must be at least 1, got {getattr(self, f)}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @classmethod
    def load(cls, path: Path | None = None, **overrides) -> TrainConfig:
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
                raise UserError(f"{path}: cannot parse config ({exc})") from None
            if not isinstance(data, dict):
                raise UserError(f"{path}: config must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{path}: unknown fields {', '.join(unknown)}")
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
