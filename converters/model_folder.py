"""A model folder as the tools read and write it: its tokenizer (and the bundled fallback), and the files written
beside the weights (config.json, the HF index, MindFormers' yaml, manifest.json). The files' names:
glm2_core/files.py."""
from __future__ import annotations

import shutil
from pathlib import Path

from glm2_core.assets import bundled_tokenizer
from glm2_core.config import GLM2Config
from glm2_core.dtypes import nbytes
from glm2_core.errors import UserError
from glm2_core.files import CONFIG, HF_WEIGHTS, MS_WEIGHTS, TOKENIZER_FILES, TOKENIZER_MODEL
from glm2_core.jsonio import write_json
from glm2_core.names import LAYOUTS, Layout
from glm2_core.outputs import MODEL, stamp

from .mindformers_yaml import MINDFORMERS_YAML, mindformers_yaml, unexpressible
from .output import PLAN

DEFAULT_SHARD_BYTES = 2 * 10**9  # transformers' default max_shard_size "2GB"


def weights_format(fmt: str | None, layout: str) -> str:
    """The weights format of an output in the `layout`'s names (default: the layout's first); refused when the two
    do not go together."""
    formats = LAYOUTS[layout].formats
    if fmt is not None and fmt not in formats:
        raise UserError(f"--format {fmt} does not go with --layout {layout} (it is written as "
                        f"{' or '.join(formats)})")
    return fmt or formats[0]


def weight_files(plan: PLAN, fmt: str, layout: str, max_shard_bytes: int | None = None) -> list[tuple[str, PLAN]]:
    """The weights files of a folder and the tensors each holds: HF shards, or MindSpore's one file."""
    if not LAYOUTS[layout].hf:
        return [(MS_WEIGHTS[fmt], plan)]
    groups: list[PLAN] = [[]]
    size = 0
    for item in plan:
        n = nbytes(item[1], item[2])
        if groups[-1] and size + n > (max_shard_bytes or DEFAULT_SHARD_BYTES):  # a larger tensor: a shard alone
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    stem, suffix = HF_WEIGHTS[fmt].rsplit(".", 1)
    if len(groups) == 1:
        return [(HF_WEIGHTS[fmt], groups[0])]
    k = len(groups)
    return [(f"{stem}-{i + 1:05d}-of-{k:05d}.{suffix}", g) for i, g in enumerate(groups)]


def _write_index(folder: Path, shards: list[tuple[str, PLAN]], fmt: str) -> None:
    """The index of a sharded HF folder."""
    total = sum(nbytes(s, d) for _, plan in shards for _, s, d in plan)
    weight_map = {name: file for file, plan in shards for name, _, _ in plan}
    write_json(folder / f"{HF_WEIGHTS[fmt]}.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


# ---- the tokenizer
def trusted(path: Path) -> bool:
    """A file copied verbatim into the output may be a symlink only into the checkpoint folder or, for a
    Hugging Face hub cache snapshot (…/models--ORG--NAME/snapshots/REV/), into that model's cache folder (its
    blobs/). A link to anywhere else — a key, a config file — would put that file's bytes into a folder users
    publish, so it is left out and said so."""
    if not path.is_symlink():
        return True
    folder = path.parent.resolve()
    roots = [folder] + ([folder.parent.parent] if folder.parent.name == "snapshots" else [])
    target = path.resolve()
    return any(root in target.parents for root in roots)


def tokenizer_candidates(folder: Path | None) -> list[Path]:
    """The tokenizer files in a model folder, trusted or not."""
    return [] if folder is None else [p for n in TOKENIZER_FILES for p in [Path(folder) / n] if p.is_file()]


def tokenizer_or_bundled(folder: Path | None, family: str = "chatglm2") -> tuple[list[Path], bool]:
    """The tokenizer to write for a model, tokenizer.model first: the files beside it when they hold one, else
    the bundled ones, which every ChatGLM2-6B and ChatGLM3-6B checkpoint shares (True: bundled; none for GLM-4,
    whose tokenizer is not bundled)."""
    found = [p for p in tokenizer_candidates(folder) if trusted(p)]
    if any(p.name == TOKENIZER_MODEL for p in found):
        return found, False
    return bundled_tokenizer(family), True


def tokenizer_model(folder: Path | None, family: str = "chatglm2") -> Path:
    """The tokenizer.model to load for a model: its own, else the bundled one (`tokenizer_or_bundled`)."""
    files = tokenizer_or_bundled(folder, family)[0]
    if not files:
        raise UserError(f"{folder}: no tokenizer.model, and {family}'s is not bundled: put the release's "
                        f"tokenizer.model in the folder")
    return files[0]


# ---- writing
def write_config(folder: Path, cfg: GLM2Config, layout: str, dtype: str) -> None:
    """config.json in the layout's field set: transformers' GLM, or THUDM's."""
    write_json(folder / CONFIG, cfg.glm_json(dtype) if LAYOUTS[layout].config == "glm" else cfg.chatglm_json(dtype))


def copy_files(folder: Path, files: list[Path]) -> None:
    for f in files:
        shutil.copyfile(f, folder / f.name)


def write_beside_weights(folder: Path, cfg: GLM2Config, target: Layout, dtype: str, fmt: str,
                         shards: list[tuple[str, PLAN]], tokenizer: list[Path]) -> list[str]:
    """What a folder holds besides its weights and manifest: config.json, MindFormers' yaml (MindSpore output in
    its current names), the tokenizer, and the HF index of a sharded folder; returns a note for each file left out
    and why (a release MindFormers' ChatGLM2 cannot run gets no yaml)."""
    write_config(folder, cfg, target.name, dtype)
    why_not = unexpressible(cfg) if target.name == "mindformers" else ""
    if target.name == "mindformers" and not why_not:
        (folder / MINDFORMERS_YAML).write_text(mindformers_yaml(cfg, target, dtype, shards[0][0], fmt))
    copy_files(folder, tokenizer)
    if target.spec.hf and len(shards) > 1:
        _write_index(folder, shards, fmt)
    return [why_not] if why_not else []


def write_manifest(folder: Path, manifest: dict) -> None:
    """manifest.json of a model folder, written last: what the folder holds, tensor by tensor, and every entry this
    toolkit wrote into it (what `--overwrite` may replace: glm2_core.outputs)."""
    stamp(folder, MODEL, **manifest)
