"""`hf2ms` / `ms2hf` / `merge-lora`: a Source streamed through the weight map into a new model folder, in three
steps: plan (which tensors go into which files), write (the weights, then what the folder holds beside them), and
the manifest (what was written, tensor by tensor).

Any supported layout converts to any other; the source layout is read from the names.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from glm2_core import __version__
from glm2_core.assets import bundled_tokenizer
from glm2_core.config import GLM2Config
from glm2_core.dtypes import DTYPES, GGUF_QUANTS, nbytes, stored
from glm2_core.errors import CheckpointError, UserError, listed
from glm2_core.files import CONFIG, TOKENIZER_MODEL
from glm2_core.names import EMBEDDING, INV_FREQ, Layout, inv_freq
from glm2_core.outputs import MODEL, check_output
from glm2_core.releases import RELEASES

from .checkpoint import Checkpoint
from .formats.base import TensorRef
from .model_folder import (
    tokenizer_or_bundled,
    weight_files,
    weights_format,
    write_beside_weights,
    write_manifest,
)
from .output import PLAN, WeightsWriter, fingerprints, parse_size, staged_folder
from .runs import run_folder
from .source import Group, Source, out_dtype


@dataclass(frozen=True)
class Conversion:
    """How a checkpoint is written: every option of a conversion (hf2ms, ms2hf, merge-lora, a shard merge, a
    finetune's export) in one request, so that a new option is a field here and a flag in the CLI. What needs no file
    is checked on creation, before anything is opened."""
    target: Layout
    fmt: str | None = None  # None: the layout's first format
    dtype: str = "keep"
    max_shard_bytes: int | None = None
    overwrite: bool = False
    allow_overflow: bool = False
    keep_optimizer: bool = False
    rearranged_rope: bool | None = None
    config: Path | None = None
    release: str | None = None  # the release the source holds where its config cannot tell (--release)
    verify_checksums: bool = True
    progress: bool = True
    bundled_tokenizer: bool = False  # a source without a tokenizer.model gets its family's bundled one

    def __post_init__(self):
        allowed = DTYPES if self.target.spec.folder else DTYPES + GGUF_QUANTS
        if self.dtype not in allowed:
            raise UserError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(allowed)}")
        if self.keep_optimizer and self.target.spec.hf:
            raise UserError("--keep-optimizer: optimizer state has no place in a HF folder")
        object.__setattr__(self, "fmt", weights_format(self.fmt, self.target.name))

    @classmethod
    def from_flags(cls, layout: str, *, qkv_split: bool = False, mlp_split: bool = False,
                   rearrange_rope: bool = False, max_shard_size: str | None = None, no_crc_check: bool = False,
                   quiet: bool = False, **same) -> Conversion:
        """From the CLI's flags: those named unlike their field are read here, the rest (`same`) pass as they are."""
        return cls(Layout(layout, qkv_split, mlp_split, rearrange_rope),
                   max_shard_bytes=None if max_shard_size is None else parse_size(max_shard_size),
                   verify_checksums=not no_crc_check, progress=not quiet, **same)


def request(how: Conversion | None, options: dict) -> Conversion:
    """The request of a call given either one `how` or its fields as keywords, not both."""
    if how is not None and options:
        raise TypeError(f"a Conversion and its fields as keywords ({', '.join(options)}): give one or the other")
    return how or Conversion(**options)


@dataclass
class Summary:
    src: str
    dst: str
    source_layout: str
    target_layout: str
    format: str
    dtype: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)
    overflowed: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the output lacks or holds in place of the source's own

    def lines(self) -> list[str]:
        rate = self.bytes / self.seconds / 1e6 if self.seconds else 0.0
        out = [f"{self.src} ({self.source_layout}) -> {self.dst} ({self.target_layout}, {self.format}, "
               f"dtype {self.dtype})",
               f"  {self.tensors} tensors, {self.bytes / 1e6:.1f} MB in {self.seconds:.2f} s ({rate:.0f} MB/s), "
               f"files: {', '.join(self.files)}"]
        for kind, names in self.dropped.items():
            out.append(f"  dropped {kind} ({len(names)}): {listed(names)}")
        for name, n in self.nonfinite.items():
            out.append(f"  warning: source tensor {name} holds {n} NaN/Inf values")
        for name, n in self.overflowed.items():
            out.append(f"  warning: wrote {n} values of {name} as inf: they overflow float16 (--allow-overflow)")
        out += [f"  {note}" for note in self.notes]
        return out


def _progress(total: int, enabled: bool, desc: str):
    # disable=None: a bar only on a terminal, never in logs
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None if enabled else True, file=sys.stderr, leave=False, mininterval=0.5)


@dataclass
class Plan:
    """What a conversion writes: the source's weight groups in order, the optimizer entries that keep their
    names, the weights files with the tensors each holds, and the model's dtype in the output."""
    groups: list[Group]
    extras: list[str]
    shards: list[tuple[str, PLAN]]
    dtype: str
    restore_inv_freq: bool  # THUDM's folders hold the RoPE buffer after the embedding

    @property
    def files(self) -> list[str]:
        return [f for f, _ in self.shards]

    @property
    def total(self) -> int:
        return sum(nbytes(s, d) for _, plan in self.shards for _, s, d in plan)


def plan(source: Source, how: Conversion) -> Plan:
    """Every tensor of the output, in write order, with its shape and dtype, grouped into its files."""
    tensors = source.ckpt.tensors
    groups, extras = source.groups(how.target, how.keep_optimizer)
    model_dtype = out_dtype(source.dtype, how.dtype)
    restore = how.target.name == "chatglm"
    items = []
    for g in groups:
        items += [(name, shape, out_dtype(tensors[g.src_names()[0]].dtype, how.dtype)) for name, shape in g.dst()]
        if restore and g.source.canonical == EMBEDDING and not g.prefix:
            items.append((INV_FREQ, (source.cfg.kv_channels // 4,), model_dtype))
    items += [(n, tensors[n].shape, tensors[n].dtype) for n in extras]
    return Plan(groups, extras, weight_files(items, how.fmt, how.target.name, how.max_shard_bytes), model_dtype,
                restore)


def write_weights(source: Source, planned: Plan, folder: Path, how: Conversion, adapter, desc: str) -> list[dict]:
    """The weights files of the plan (with an `adapter`, its deltas merged); returns the records of every tensor
    written (name, shape, dtype, file, sha256), after the source's whole-file checksums held."""
    metadata = None if how.fmt != "safetensors" else {"format": "pt" if how.target.spec.hf else "ms"}
    tensors, first = source.ckpt.tensors, planned.shards[0][1][0][0]
    with WeightsWriter(folder, how.fmt, planned.shards, metadata) as writer, \
            _progress(planned.total, how.progress, desc) as bar:
        for name, arr, dt in source.stream(planned.groups, how.dtype, how.allow_overflow, bar.update, adapter,
                                           spans=True):
            writer.write(name, arr, dt)
            if planned.restore_inv_freq and name == first:  # the buffer follows the embedding
                writer.write(INV_FREQ, inv_freq(source.cfg, planned.dtype), planned.dtype)
        for name in planned.extras:
            writer.write(name, tensors[name].read(), tensors[name].dtype)
            tensors[name].release()
    source.ckpt.check_complete()
    return writer.records


def manifest(src: Path, source: Source, target: Layout, fmt: str, planned: Plan, records: list[dict], adapter,
             dropped: dict[str, list[str]]) -> dict:
    """What manifest.json records: the source, both layouts, the config, and every tensor with its sha256."""
    merged = None if adapter is None else {"r": adapter.rank, "lora_alpha": adapter.alpha,
                                           "modules": len(adapter.deltas)}
    return {"version": __version__, "source": str(src.resolve()), "source_layout": source.layout.as_dict(),
            "layout": target.as_dict(), "format": fmt, "dtype": planned.dtype, "config": asdict(source.cfg),
            "files": planned.files, "merged_lora": merged, "dropped": dropped, "tensors": records}


def convert(src, dst, how: Conversion | None = None, *, adapter=None, opened=None, inputs: tuple = (),
            **options) -> Summary:
    """Convert the checkpoint at `src` (or the Checkpoint `opened` from it) into a new folder `dst` (MindSpore, or
    a HF folder for a HF layout) as the request `how` says (or its fields given as keywords: `target=Layout(…)`, …);
    with an `adapter` (converters.adapters.Adapter), its LoRA deltas are merged into the weights. The tokenizer files
    written are those beside the source. DST may not overlap `src`, the files of `opened`, the config or the other
    `inputs` (an adapter, a strategy): a weights file's folder cannot be replaced (it holds the file), a new folder
    beside the file is fine."""
    started = time.perf_counter()
    how = request(how, options)
    src, dst = Path(src), Path(dst)
    protected = [*([src] if opened is None else opened.files), *inputs, how.config]
    check_output(dst, how.overwrite, protected, kind=MODEL)
    with Source.open(src, how.rearranged_rope, how.config, opened, how.verify_checksums, how.release) as source:
        if adapter is None:
            refuse_unmerged_lora(src, source, how.config)
        _check_expressible(src, source.cfg, how.target)
        watched = fingerprints(source.ckpt.files)
        planned = plan(source, how)
        tokenizer, note = _tokenizer(source, how.bundled_tokenizer)
        need = planned.total + sum(f.stat().st_size for f in tokenizer)
        with staged_folder(dst, how.overwrite, protected, need, MODEL, watched) as tmp:
            records = write_weights(source, planned, tmp, how, adapter, desc=f"{src.name} -> {dst.name}")
            notes = ([note] if note else []) + write_beside_weights(tmp, source.cfg, how.target, planned.dtype, how.fmt,
                                                                    planned.shards, tokenizer)
            kept = {"optimizer state"} if how.keep_optimizer else set()
            kept |= {"LoRA adapters"} if adapter is not None else set()  # merged, not dropped
            dropped = {k: v for k, v in source.dropped.items() if v and k not in kept}
            write_manifest(tmp, manifest(src, source, how.target, how.fmt, planned, records, adapter, dropped))
    return Summary(str(src), str(dst), source.layout.describe(), how.target.describe(), how.fmt, planned.dtype,
                   len(records), planned.total, time.perf_counter() - started, planned.files, dropped,
                   source.nonfinite, source.overflowed, notes)


def refuse_unmerged_lora(src: Path, source: Source, config: Path | None) -> None:
    """A checkpoint that holds LoRA adapters is not written without them (that would be another model)."""
    lora = source.dropped["LoRA adapters"]
    if lora:
        raise CheckpointError(f"{src}: holds LoRA adapters ({lora[0]}, …): merge them with "
                              f"`glm2-convert merge-lora {src} {src} DST{_config_hint(src, source, config)}`, "
                              f"or convert the base alone")


def _check_expressible(src: Path, cfg, target: Layout) -> None:
    """A model the target layout cannot describe is refused, not written as another model."""
    if target.expresses(cfg):
        return
    if cfg.sandwich_norms:
        raise UserError(f"{src}: {cfg.release} has no THUDM ChatGLM form (its modeling code has no sandwich norms); "
                        f"--layout {RELEASES[cfg.release].native} writes its own (transformers' Glm4ForCausalLM)")
    raise UserError(f"{src}: --layout {target.name} holds GLM-4-0414's layers only (MindFormers' mcore Glm4 always "
                    f"applies its sandwich norms); {cfg.release} has none: write --layout mindformers")


def _config_hint(src: Path, source: Source, config: Path | None) -> str:
    """The --config a command suggested for `src` needs: the one given, the run folder's, or a placeholder."""
    if config is not None:
        return f" --config {config}"
    if source.ckpt.config is not None:
        return ""
    run = run_folder(src.parent.parent)
    return f" --config {run / CONFIG if run is not None else 'CONFIG.json'}"


def _tokenizer(source: Source, fallback: bool) -> tuple[list[Path], str]:
    """The tokenizer files to write and, when they are not the model's own, a note saying so."""
    if not fallback:
        files = source.ckpt.tokenizer_files
        family = source.cfg.family
        instead = "the runtime falls back to the bundled ChatGLM2/3 one" if bundled_tokenizer(family) else \
            f"{family}'s is not bundled: copy the release's tokenizer.model beside the weights to run them"
        return files, "" if any(f.name == TOKENIZER_MODEL for f in files) else \
            f"no tokenizer.model beside the source: none written ({instead})"
    files, bundled = tokenizer_or_bundled(source.ckpt.folder, source.cfg.family)
    if not bundled:
        return files, ""
    return files, "no tokenizer beside the source: " + ("wrote the bundled ChatGLM2 tokenizer" if files else
                                                        f"none written ({source.cfg.family}'s is not bundled)")


def write_model_folder(tensors: dict[str, np.ndarray], cfg: GLM2Config, dst: Path, *, source: Path,
                       tokenizer_from: Path | None, overwrite: bool = False):
    """A model folder from tensors in memory (in any layout's names; a finetuned model's parameters), written
    by the converter exactly as it writes a checkpoint read from disk: MindFormers names in a .ckpt, config.json,
    MindFormers' yaml, the tokenizer (`tokenizer_or_bundled(tokenizer_from)`) and manifest.json, whose source is
    `source`. Returns the converter's Summary."""
    refs = {}
    for name, arr in tensors.items():
        data, dtype = stored(np.ascontiguousarray(arr))
        refs[name] = TensorRef(name, data.shape, dtype, Path(source), reader=lambda data=data: data)
    # the tokenizer beside the weights is tokenizer_from's (convert's fallback: the family's bundled one)
    in_memory = Checkpoint(Path(source), [], "memory", refs, config=cfg.chatglm_json(), folder=tokenizer_from)
    return convert(source, dst, target=Layout("mindformers"), fmt="ckpt", opened=in_memory, overwrite=overwrite,
                   bundled_tokenizer=True, progress=False)
