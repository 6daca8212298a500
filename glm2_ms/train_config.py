"""Finetuning settings, with MindFormers-like field names, from a YAML/JSON file and CLI overrides.

Every field says its type, its allowed values (`choices`, or a `Range`) and its help in its `setting`; glm2-finetune
makes a flag of each from these (click refuses a bad flag value), and `TrainConfig` checks every value, from a file
or from code, before anything uses it: a bad one is one line naming the field.
"""
from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path

import click
import yaml

from glm2_core.dtypes import COMPUTE_DTYPES
from glm2_core.errors import UserError
from glm2_core.options import Number

SHARED = None  # the help of a setting whose flag other tools share too: the CLI vocabulary's (glm2_core/options.py)
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # a GLM block's Linear cells


@dataclass(frozen=True)
class Range:
    """The numbers a setting takes: [low, high], either end open or absent."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return not (below or above)

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)

    def click_type(self, kind):
        """click's IntRange / FloatRange for this range (click then refuses a bad flag in one line)."""
        ranged = click.IntRange if kind is int else Number
        return ranged(self.low, self.high, min_open=self.low_open, max_open=self.high_open)


AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)


def setting(default, help: str | None, choices: tuple[str, ...] | None = None, none: str | None = None,
            range: Range | None = None):
    """A field with its help, allowed values (choices or a numeric range), and what a default of None means:
    glm2-finetune makes a flag of every field from these."""
    return field(default=default, metadata={"help": help, "choices": choices, "none": none, "range": range})


@dataclass(frozen=True)
class TrainConfig:
    method: str = setting("lora", "lora: train LoRA factors on a frozen base; full: train every weight.",
                          ("lora", "full"))
    # LoRA (the MindFormers GLM2 recipe)
    lora_rank: int = setting(8, "LoRA rank r.", range=AT_LEAST_1)
    lora_alpha: float = setting(32.0, SHARED, range=POSITIVE)
    lora_dropout: float = setting(0.1, "Dropout on the LoRA branch's input, in [0, 1).", range=FRACTION)
    target_modules: str = setting("query_key_value", "Modules that get LoRA factors: comma-separated names of a "
                                                    f"block's Linear cells ({', '.join(LORA_TARGETS)}), as "
                                                    "PEFT's target_modules lists them.")
    # optimizer: AdamW with bias correction — fused-adamw (the update of mindspore.experimental.optim.AdamW on
    # MindSpore's fused kernel: faster, no per-step temporaries; see glm2_ms/fused_adamw.py) or adamw (that class)
    optimizer: str = setting("fused-adamw", "AdamW with bias correction: on MindSpore's fused kernel (the same "
                                            "update, faster, less memory), or MindSpore's experimental AdamW class "
                                            "itself.", ("fused-adamw", "adamw"))
    learning_rate: float = setting(5e-5, "Peak learning rate (after warmup).", range=POSITIVE)
    lr_end: float = setting(1e-6, "Learning rate at the last step (polynomial decay; at most --learning-rate).",
                            range=AT_LEAST_0)
    warmup_steps: int = setting(0, "Steps of linear warmup from 0 to --learning-rate.", range=AT_LEAST_0)
    lr_power: float = setting(1.0, "Exponent of the polynomial decay (1: linear).", range=POSITIVE)
    weight_decay: float = setting(0.1, "AdamW weight decay (not on norms and biases).", range=AT_LEAST_0)
    beta1: float = setting(0.9, "AdamW β1.", range=FRACTION)
    beta2: float = setting(0.95, "AdamW β2.", range=FRACTION)
    eps: float = setting(1e-8, "AdamW ε.", range=POSITIVE)
    max_grad_norm: float = setting(1.0, "Clip the gradients' global norm to this.", range=POSITIVE)
    # schedule and batches
    batch_size: int = setting(8, SHARED, range=AT_LEAST_1)
    gradient_accumulation_steps: int = setting(1, "Batches whose gradients are added up per optimizer step.",
                                                range=AT_LEAST_1)
    epochs: int = setting(1, "Passes over the training data.", range=AT_LEAST_1)
    max_steps: int | None = setting(None, "Stop after this many optimizer steps.", none="all epochs",
                                    range=AT_LEAST_1)
    seed: int = setting(0, SHARED, range=AT_LEAST_0)
    # data
    max_source_length: int = setting(64, "Prompt tokens kept (longer prompts are cut).", range=AT_LEAST_1)
    max_target_length: int = setting(128, "Answer tokens kept (longer answers are cut).", range=AT_LEAST_1)
    seq_length: int | None = setting(None, "Sequence length: max_source_length + max_target_length + 1 (another "
                                           "value is refused).", none="that sum", range=Range(3))
    prompt_column: str = setting("content", "JSON key of the prompt in the training lines.")
    response_column: str = setting("summary", "JSON key of the answer in the training lines.")
    # numerics
    compute_dtype: str = setting("float32", SHARED, COMPUTE_DTYPES)  # float16: dynamic loss scaling
    loss_scale: float = setting(2.0 ** 16, "float16: the initial loss scale.", range=AT_LEAST_1)
    loss_scale_factor: float = setting(2.0, "float16: the loss scale is divided by this on an overflow and "
                                            "multiplied by it after --loss-scale-window good steps.",
                                     range=Range(1, low_open=True))
    loss_scale_window: int = setting(1000, "float16: good steps before the loss scale grows.", range=AT_LEAST_1)
    recompute: bool = setting(True, "Train block by block: keep only each block's input from the forward pass and "
                                    "run each block again in the backward pass (one block's graph buffers instead "
                                    "of the whole model's; see glm2_ms/train_step.py).")
    # distributed (MindFormers: parallel.enable_parallel_optimizer)
    shard_optimizer: bool = setting(False, "Under msrun: shard the AdamW state and update across the ranks (each "
                                           "holds 1/N).")
    # bookkeeping
    save_steps: int = setting(0, "Save a checkpoint every this many steps (0: only at the end, and where Ctrl-C "
                                  "stops the run).", range=AT_LEAST_0)
    log_steps: int = setting(1, "Write a train_log.jsonl row every this many steps.", range=AT_LEAST_1)
    keep_checkpoints: int = setting(3, "Keep the newest this many checkpoints of the run, deleting older ones it "
                                       "saved (0: keep all).", range=AT_LEAST_0)

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, checked(f.name, getattr(self, f.name)))
        if self.lr_end > self.learning_rate:
            raise UserError(f"lr_end {self.lr_end:g} exceeds learning_rate {self.learning_rate:g}: the schedule "
                            f"decays to lr_end")

    @property
    def target_module_names(self) -> tuple[str, ...]:
        return tuple(self.target_modules.split(","))

    @classmethod
    def load(cls, path: Path | None = None, **overrides) -> TrainConfig:
        """The file's settings (or the defaults) with `overrides` (those not None) over them; each value checked,
        a bad one in the file named with the file."""
        given = {k: v for k, v in overrides.items() if v is not None}
        data = {} if path is None else _read_file(Path(path))
        for name, value in data.items():
            if name not in given:
                try:
                    data[name] = checked(name, _number_from_yaml(name, value))
                except UserError as exc:
                    raise UserError(f"{path}: {exc}") from None
        return cls(**{**data, **given})

    def as_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int, total: int) -> float:
        """Linear warmup to learning_rate, then polynomial decay to lr_end at `total` steps."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        span = max(total - self.warmup_steps, 1)
        frac = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return (self.learning_rate - self.lr_end) * (1 - frac) ** self.lr_power + self.lr_end


@cache
def _kinds() -> dict[str, tuple[type, bool]]:
    """Each field's type and whether it may be None (from the annotations)."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint) or (hint,)
        out[name] = (next(t for t in args if t is not type(None)), type(None) in args)
    return out


def _meta(name: str):
    return next(f.metadata for f in fields(TrainConfig) if f.name == name)


KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def checked(name: str, value):
    """`value` for field `name`, checked against its type, choices and range (an int for a float field becomes a
    float); a UserError naming the field otherwise."""
    kind, optional = _kinds()[name]
    meta = _meta(name)
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} must be {KIND_WORDS[kind]}, not none")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{name} must be {KIND_WORDS[kind]}, not {value!r}")
    if kind is float and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, not {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{name} must be {' or '.join(meta['choices'])}, not {value!r}")
    if meta["range"] is not None and value not in meta["range"]:
        raise UserError(f"{name} must be {meta['range']}, not {value!r}")
    if kind is str and not value.strip():
        raise UserError(f"{name} must not be empty")
    if name == "target_modules":
        return lora_targets(value)
    return value


def lora_targets(text: str) -> str:
    """A comma list of LoRA target module names, each one of LORA_TARGETS exactly, in LORA_TARGETS' order."""
    names = {n.strip() for n in text.split(",")}
    unknown = sorted(n for n in names if n not in LORA_TARGETS)
    if unknown:
        raise UserError(f"target_modules: no module {unknown[0]!r} (a comma list of {', '.join(LORA_TARGETS)})")
    return ",".join(n for n in LORA_TARGETS if n in names)


def _number_from_yaml(name: str, value):
    """YAML 1.1 reads `5e-5` (no dot) as a string: a float field takes such a string as the number it spells."""
    if _kinds()[name][0] is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _read_file(path: Path) -> dict:
    """The settings of a YAML or JSON file, its names checked."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the config ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = (yaml.safe_load(text) or {}) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except Exception as exc:  # yaml and json raise their own families; either way the file is bad
        raise UserError(f"{path}: cannot parse config ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: config must be a mapping")
    unknown = sorted(set(map(str, data)) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise UserError(f"{path}: unknown fields {', '.join(unknown)}")
    return data
