"""`hf2ms` / `ms2hf`: a Source streamed through the weight map into a new folder of weights files.

Any supported layout converts to any other; the source layout is read from the names.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glm2_core.dtypes import BY_NAME, DTYPES
from glm2_core.errors import CheckpointError, UserError
from glm2_core.jsonio import write_json
from glm2_core.names import EMBEDDING, INV_FREQ, Layout, inv_freq

from . import __version__
from .mindformers_yaml import MINDFORMERS_YAML, mindformers_yaml
from .output import WeightsWriter, hf_index, plan_shards, staged_folder
from .source import Source, out_dtype

MS_WEIGHTS = {"ckpt": "mindspore_model.ckpt", "safetensors": "mindspore_model.safetensors"}


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

    def lines(self) -> list[str]:
        rate = self.bytes / self.seconds / 1e6 if self.seconds else 0.0
        out = [f"{self.src} ({self.source_layout}) -> {self.dst} ({self.target_layout}, {self.format}, "
               f"dtype {self.dtype})",
               f"  {self.tensors} tensors, {self.bytes / 1e6:.1f} MB in {self.seconds:.2f} s ({rate:.0f} MB/s), "
               f"files: {', '.join(self.files)}"]
        for kind, names in self.dropped.items():
            shown = ", ".join(names[:4]) + (f", … (+{len(names) - 4})" if len(names) > 4 else "")
            out.append(f"  dropped {len(names)} {kind}: {shown}")
        for name, n in self.nonfinite.items():
            out.append(f"  warning: source tensor {name} holds {n} NaN/Inf values")
        return out


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    # disable=None: a bar only on a terminal, never in logs
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None if enabled else True, file=sys.stderr, leave=False, mininterval=0.5)


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * BY_NAME[dtype].itemsize


def convert(src, dst, *, target: Layout, fmt: str, dtype: str = "keep", hf_folder: bool = False,
            max_shard_bytes: int | None = None, overwrite: bool = False, allow_overflow: bool = False,
            keep_optimizer: bool = False, rearranged_rope: bool | None = None, config: Path | None = None,
            progress: bool = True, adapter=None, opened=None, tokenizer: list[Path] | None = None,
            verify_checksums: bool = True) -> Summary:
    """Convert the checkpoint at `src` (or the Checkpoint `opened` from it) into a new folder `dst` (MindSpore, or
    a HF folder when `hf_folder`); with an `adapter` (converters.adapters.Adapter), its LoRA deltas are merged
    into the weights. The tokenizer files written are `tokenizer`, by default those beside the source."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if keep_optimizer and hf_folder:
        raise UserError("--keep-optimizer: optimizer state has no place in a HF folder")
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise UserError(f"{dst}: the destination must not be the source or lie inside it")
    with Source.open(src, rearranged_rope, config, opened, verify_checksums) as source:
        cfg, tensors = source.cfg, source.ckpt.tensors
        lora = source.dropped["LoRA adapters"]
        if lora and adapter is None:
            raise CheckpointError(f"{src}: holds LoRA adapters ({lora[0]}, …): merge them with "
                                  f"`glm2-convert merge-lora {src} {src} DST`, or convert the base alone")
        groups, extras = source.groups(target, keep_optimizer)
        if keep_optimizer:
            source.dropped["optimizer state"] = []
        model_dtype = out_dtype(source.dtype, dtype)
        restore_inv_freq = hf_folder and target.family == "chatglm"
        plan = []
        for g in groups:
            plan += [(name, shape, out_dtype(tensors[g.src_names()[0]].dtype, dtype)) for name, shape in g.dst()]
            if restore_inv_freq and g.source.canonical == EMBEDDING and not g.prefix:
                plan.append((INV_FREQ, (cfg.kv_channels // 4,), model_dtype))
        plan += [(n, tensors[n].shape, tensors[n].dtype) for n in extras]
        shards = plan_shards(plan, max_shard_bytes or 2 * 10**9, fmt) if hf_folder else [(MS_WEIGHTS[fmt], plan)]
        metadata = None if fmt != "safetensors" else {"format": "pt" if hf_folder else "ms"}
        total = sum(_nbytes(s, d) for _, s, d in plan)

        with staged_folder(dst, overwrite) as tmp:
            writer = WeightsWriter(tmp, fmt, shards, metadata)
            try:
                with _progress(total, progress, f"{src.name} -> {dst.name}") as bar:
                    for name, arr, dt in source.stream(groups, dtype, allow_overflow, bar.update, adapter, spans=True):
                        writer.write(name, arr, dt)
                        if restore_inv_freq and name == plan[0][0]:  # the buffer follows the embedding
                            writer.write(INV_FREQ, inv_freq(cfg, model_dtype), model_dtype)
                    for name in extras:
                        writer.write(name, tensors[name].read(), tensors[name].dtype)
                        tensors[name].release()
                writer.close()
                source.ckpt.check_complete()
            except BaseException:
                writer.abort()
                raise
            write_json(tmp / "config.json",
                       cfg.glm_json(model_dtype) if target.family == "glm" else cfg.chatglm_json(model_dtype))
            if not hf_folder and target.family == "mindformers":
                (tmp / MINDFORMERS_YAML).write_text(mindformers_yaml(cfg, target, model_dtype, MS_WEIGHTS[fmt], fmt))
            for f in source.ckpt.tokenizer_files if tokenizer is None else tokenizer:
                shutil.copyfile(f, tmp / f.name)
            index = hf_index(shards, fmt) if hf_folder else None
            if index:
                write_json(tmp / index[0], index[1])
            if adapter is not None:
                source.dropped["LoRA adapters"] = []  # merged, not dropped
            dropped = {k: v for k, v in source.dropped.items() if v}
            summary = Summary(str(src), str(dst), source.layout.describe(), target.describe(), fmt, model_dtype,
                              len(writer.records), total, 0.0, [f for f, _ in shards], dropped, source.nonfinite)
            write_json(tmp / "manifest.json", {
                "tool": "glm2-toolkit", "version": __version__, "source": str(src.resolve()),
                "source_layout": source.layout.as_dict(), "layout": target.as_dict(), "format": fmt,
                "dtype": model_dtype, "config": asdict(cfg), "files": [f for f, _ in shards],
                "merged_lora": None if adapter is None else {"r": adapter.rank, "lora_alpha": adapter.alpha,
                                                             "modules": len(adapter.deltas)},
                "dropped": dropped, "tensors": writer.records})
    summary.seconds = time.perf_counter() - started
    return summary
