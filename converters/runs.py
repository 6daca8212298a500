"""The output folder of a `glm2-finetune` run, as the trainer writes it and the converters read it back.

    OUT/config.json, OUT/tokenizer.model …                  the model's config and tokenizer (with the first save)
    OUT/checkpoint/rank_{r}/glm2_rank_{r}-{epoch}_{step}.ckpt  network + optimizer state (MindFormers' layout)
    OUT/checkpoint/rank_{r}/glm2_rank_{r}-{epoch}_{step}.json  its record: position, loss scaler, the run's settings
    OUT/checkpoint_network/rank_{r}/…ckpt                     the network alone (its record is the training one's)
    OUT/train_log.jsonl                                        a row per step (from the first step on)

So `glm2-merge-shards OUT` finds the config and tokenizer, and `merge-lora` on a network checkpoint finds the
run's lora_alpha, without being told. The newest --keep-checkpoints saves are kept; older ones (their three
files) are deleted as new ones come."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .model_folder import CONFIG

TRAINING, NETWORK = "checkpoint", "checkpoint_network"
NAME = re.compile(r"glm2_rank_(\d+)-(\d+)_(\d+)\.ckpt$")
EPOCH_STEP = re.compile(r"-(\d+)_(\d+)\.(?:ckpt|safetensors)$")  # MindSpore's `{prefix}-{epoch}_{step}` files


def epoch_step(path: Path) -> tuple[int, int] | None:
    """(epoch, step) of a checkpoint file named as MindSpore's callback names them; None for another name."""
    m = EPOCH_STEP.search(Path(path).name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def newest_complete(steps: dict[int, set[tuple[int, int]]]) -> tuple[int, int] | None:
    """The newest (epoch, step) that every rank holds, by MindSpore's order: a rank that died while saving leaves
    the previous complete set. None when the ranks share none."""
    common = set.intersection(*steps.values()) if steps else set()
    return max(common, default=None)


def ckpt_path(out: Path, kind: str, rank: int, epoch: int, step: int) -> Path:
    return Path(out) / kind / f"rank_{rank}" / f"glm2_rank_{rank}-{epoch}_{step}.ckpt"


def record_path(ckpt: Path) -> Path:
    """Where the record of a training checkpoint lives (beside it)."""
    return ckpt.with_suffix(".json")


def record_of(ckpt: Path) -> tuple[Path, dict] | None:
    """(where, record) of a run's training or network checkpoint file; None for a file no run of ours wrote."""
    ckpt = Path(ckpt)
    places = [record_path(ckpt)]
    if ckpt.parent.parent.name == NETWORK:
        places.append(record_path(ckpt.parent.parent.parent / TRAINING / ckpt.parent.name / ckpt.name))
    for place in places:
        if place.is_file():
            try:
                data = json.loads(place.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                return None
            return (place, data) if isinstance(data, dict) and isinstance(data.get("config"), dict) else None
    return None


def recorded_lora(ckpt: Path) -> tuple[Path, dict] | None:
    """(where, {r, lora_alpha, lora_dropout}) as the LoRA run that wrote `ckpt` recorded them, in the names of
    adapter_config.json; None when no LoRA run of ours wrote it."""
    found = record_of(ckpt)
    if found is None or found[1]["config"].get("method") != "lora":
        return None
    where, cfg = found[0], found[1]["config"]
    return where, {"r": cfg["lora_rank"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"]}


def run_folder(ranks_root: Path) -> Path | None:
    """The folder beside the rank folders under `ranks_root` that holds the model's config.json: `ranks_root`
    itself (a run folder, or what `split` wrote), or OUT when `ranks_root` is OUT/checkpoint."""
    for folder in (ranks_root, ranks_root.parent) if ranks_root.name == TRAINING else (ranks_root,):
        if (folder / CONFIG).is_file():
            return folder
    return None
