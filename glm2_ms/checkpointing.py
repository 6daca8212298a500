"""Training checkpoints in MindFormers' layout, written atomically, and the model's files beside them.

`OUT/checkpoint/rank_{r}/glm2_rank_{r}-{epoch}_{step}.ckpt` holds the network, the AdamW moments as `adam_m.*` /
`adam_v.*` and the step counters; `OUT/checkpoint_network/rank_{r}/…` the network only. A `.json` beside each
training file keeps what MindFormers' names have no place for (the position in the epoch, the loss scaler, the
run's settings). The folder's layout is described in converters/runs.py, which reads it back.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from converters.formats.ckpt import CkptFile, CkptWriter
from converters.model_folder import copy_files, tokenizer_or_bundled, write_config
from converters.runs import NAME, ckpt_path, newest_complete, record_path
from converters.strategy import strategy_bytes
from glm2_core.dtypes import stored
from glm2_core.errors import UserError
from glm2_core.files import NETWORK, STRATEGY, TRAINABLE, TRAINING
from glm2_core.outputs import absolute


def write_ckpt(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """All or nothing: a temporary file beside `path`, fsync'ed, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_of(path)
    try:
        with open(tmp, "wb") as f:
            writer = CkptWriter(f)
            for name, arr in tensors.items():
                data, dtype = stored(np.ascontiguousarray(arr))
                writer.write(name, data, dtype)
            writer.finish()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def partial_of(path: Path) -> Path:
    """Where a file is written before it is renamed into place."""
    return path.with_name(f".{path.name}.partial")


def remove_partials(out: Path, rank: int) -> None:
    """The files a killed save of this rank left half written (never taken for saves: they keep their hidden
    names); called while this rank's lock is held, so no live writer owns them."""
    for kind in (TRAINING, NETWORK, TRAINABLE):
        for f in (Path(out) / kind / f"rank_{rank}").glob(".glm2_rank_*.partial"):
            f.unlink(missing_ok=True)


@contextmanager
def run_lock(out: Path, rank: int):
    """While held, no other glm2-finetune writes this rank of `out`: a second run is refused in one line. The lock
    lives in the temporary folder (nothing is written to --out before the first step) and dies with its process,
    however it ends."""
    key = hashlib.sha256(str(absolute(out)).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"glm2-finetune-{key}-rank{rank}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{out}: another glm2-finetune (pid {owner}) is writing this folder; wait for it to "
                            f"end, or choose another --out") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed by the owner that just ended: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_of(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2).encode())


def write_strategy(out: Path, layouts: dict) -> Path:
    """`OUT/strategy/ckpt_strategy_rank_0.ckpt`, MindSpore's protobuf strategy of the rank checkpoints."""
    path = out / STRATEGY / "ckpt_strategy_rank_0.ckpt"
    write_atomic(path, strategy_bytes(layouts))
    return path


def saved_steps(out: Path, rank: int) -> set[tuple[int, int]]:
    """(epoch, step) of every training checkpoint of this rank that is complete (file and record)."""
    return {(int(m.group(2)), int(m.group(3))) for p in (Path(out) / TRAINING / f"rank_{rank}").glob("*.ckpt")
            if (m := NAME.search(p.name)) and int(m.group(1)) == rank and record_path(p).is_file()}


def latest(out: Path, rank: int, world: int = 1) -> Path | None:
    """This rank's file of the newest training checkpoint that every rank completed (file and sidecar), by
    (epoch, step) as MindSpore orders them: a rank that died while saving leaves the previous set."""
    best = newest_complete({r: saved_steps(out, r) for r in range(world)})
    return None if best is None else ckpt_path(out, TRAINING, rank, *best)


def read_ckpt(path: Path) -> dict[str, np.ndarray]:
    with CkptFile(path) as f:
        return {name: ref.read() for name, ref in f.tensors.items()}


def write_model_files(out: Path, cfg, dtype: str, tokenizer_from: Path | None) -> list[Path]:
    """config.json and the tokenizer files (those beside `tokenizer_from`, else the bundled ChatGLM2 ones); returns
    the files written."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    write_config(out, cfg, "chatglm", dtype)
    copy_files(out, tokenizer_or_bundled(tokenizer_from, cfg.family)[0])
    return sorted(set(out.iterdir()) - before)
