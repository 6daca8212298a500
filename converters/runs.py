"""The output folder of a `glm2-finetune` run, as the trainer writes it and the converters read it back.

    OUT/config.json, OUT/tokenizer.model …                  the model's config and tokenizer (with the first save)
    OUT/checkpoint/rank_{r}/glm2_rank_{r}-{epoch}_{step}.ckpt  what training changes + optimizer state + counters
    OUT/checkpoint/rank_{r}/glm2_rank_{r}-{epoch}_{step}.json  its record: position, loss scaler, settings, base
    OUT/checkpoint_network/rank_{r}/…ckpt                     full runs: the network alone (record: the training one's)
    OUT/checkpoint_trainable/rank_{r}/glm2_rank_{r}-trainable_params.ckpt
                                                               LoRA runs: the newest save's adapter alone
    OUT/train_log.jsonl                                        a row per step (from the first step on)

A full run's saves hold the whole network; a LoRA run's hold only the adapter (its frozen base is the base folder,
which the record names by path and hash: `base_identity`), as MindFormers' CheckpointMonitor with
save_trainable_params names its trainable file. So `glm2-merge-shards OUT` finds the config, tokenizer and (LoRA)
base, and `merge-lora` on a run's checkpoint finds the run's lora_alpha, without being told. The newest
--keep-checkpoints saves are kept; older ones (their files) are deleted as new ones come."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from glm2_core.errors import CheckpointError
from glm2_core.files import CONFIG, NETWORK, TRAINABLE, TRAINING
from glm2_core.outputs import MANIFEST

HUB_BLOB = re.compile(r"^[0-9a-f]{64}$")  # a Hugging Face hub cache blob is named by its content's sha256
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


def trainable_path(out: Path, rank: int) -> Path:
    """MindFormers' name for a rank's trainable parameters (`{prefix}_rank_{r}-trainable_params.ckpt`)."""
    return Path(out) / TRAINABLE / f"rank_{rank}" / f"glm2_rank_{rank}-trainable_params.ckpt"


def record_path(ckpt: Path) -> Path:
    """Where the record of a training checkpoint lives (beside it)."""
    return ckpt.with_suffix(".json")


def record_of(ckpt: Path) -> tuple[Path, dict] | None:
    """(where, record) of a run's training or network checkpoint file; None for a file no run of ours wrote."""
    ckpt = Path(ckpt)
    places = [record_path(ckpt)]
    training = ckpt.parent.parent.parent / TRAINING / ckpt.parent.name
    if ckpt.parent.parent.name == NETWORK:
        places.append(record_path(training / ckpt.name))
    elif ckpt.parent.parent.name == TRAINABLE:  # the run's settings are every save's: the newest record says them
        places += sorted(training.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)[:1]
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


def base_identity(model_dir: Path) -> dict:
    """The base model as a run records it: its resolved path, and a hash of its weights that does not read them.
    A folder glm2-convert wrote has a manifest.json listing each tensor's sha256: its hash names the weights
    wherever the folder lies. Another folder (a Hugging Face download) is named by its files' names and sizes and,
    per file, the hub blob it links to (named by its content's sha256) or else its modification time."""
    path = Path(model_dir).resolve()
    identity = {"path": str(path), "manifest_sha256": None, "files_sha256": None}
    try:
        if (path / MANIFEST).is_file():
            identity["manifest_sha256"] = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
        elif path.is_dir():
            identity["files_sha256"] = hashlib.sha256(json.dumps(_listing(path)).encode()).hexdigest()
    except OSError:
        pass
    return identity


def _listing(folder: Path) -> list:
    rows = []
    for f in sorted(folder.iterdir()):
        if f.is_file():
            target = f.resolve()
            rows.append([f.name, f.stat().st_size,
                         target.name if HUB_BLOB.match(target.name) else f.stat().st_mtime_ns])
    return rows


def check_base(where: Path, recorded: dict | None, base: dict,
               remedy: str = "use the run's base model, or start a new --out") -> None:
    """The base model must be the run's: the same manifest (the same weights) or the same files, as the record
    hashed them; the same folder for a record older than the hashes."""
    if not isinstance(recorded, dict) or not recorded.get("path"):
        return
    hashes = [key for key in ("manifest_sha256", "files_sha256") if recorded.get(key)]
    same = any(recorded[key] == base.get(key) for key in hashes) if hashes else recorded["path"] == base["path"]
    if not same:
        raise CheckpointError(f"{where}: the run trained on the base model {_named(recorded)}, this is "
                              f"{_named(base)}; {remedy}")


def _named(base: dict) -> str:
    for key, what in (("manifest_sha256", "manifest sha256"), ("files_sha256", "files sha256")):
        if base.get(key):
            return f"{base['path']} ({what} {base[key][:12]}…)"
    return base["path"]
