"""A finetune run's saves under faults (issue 31): a LoRA save is the adapter's size and names its base; a save
killed at any system call is never taken for a whole one and the resumed run goes on to the uninterrupted run's
losses; a full disk ends the run in one line keeping the newest whole checkpoint; two runs never write one --out.

Kills and disk-full errors are delivered by strace at an exact system call of the save (`-P FILE -e
inject=SYSCALL:signal=KILL:when=N`): the process is the real glm2-finetune, only the kernel's answer changes.
GLM2_KILL_POINTS=N tries N system calls of a save, for LoRA and full runs (benchmarks/results/)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms  # noqa: TID253
import numpy as np
import pytest
from conftest import tree_digest
from helpers import needs_strace, spread, traced
from test_finetune import TRAIN
from test_finetune_safety import TINY, TINY_CFG, finetune, one_line

from converters.formats.ckpt import CkptFile
from converters.runs import record_path, trainable_path
from converters.strategy import ParamLayout, strategy_bytes
from glm2_ms.checkpointing import latest, run_lock
from glm2_ms.lora import lora_state
from glm2_ms.train import Trainer
from glm2_ms.train_config import TrainConfig

BIN = Path(sys.executable).parent
CALLS = "openat,write,fsync,rename"  # what a save does to its files
STEPS = 4
COUNTERS = {"global_step", "epoch_num", "step_num", "loss_scale"}


@pytest.fixture(scope="module")
def base(hf_tiny):
    return hf_tiny("safetensors", "float32")


def args(base: Path, out: Path, method: str = "lora", *extra) -> list[str]:
    return [str(BIN / "glm2-finetune"), str(base), "--train-data", str(TRAIN), "--out", str(out), "--method", method,
            "--max-steps", str(STEPS), "--save-steps", "1", "--keep-checkpoints", "0", *TINY, *extra]


def logged(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]


# ---- adapter-sized saves

def test_a_lora_save_holds_the_adapter_and_names_its_base(base, tmp_path):
    """Each save: the adapter, its AdamW moments and the counters (MindSpore reads it), the adapter alone in
    MindFormers' trainable-parameters file, and a record naming the base by path and manifest hash; no copy of
    the frozen base anywhere."""
    cfg = TrainConfig.load(None, method="lora", max_steps=2, save_steps=1, **TINY_CFG)
    trainer = Trainer(base, TRAIN, tmp_path / "run", cfg, progress=False)
    trainer.train()
    adapter = lora_state(trainer.model)
    saved = ms.load_checkpoint(str(latest(tmp_path / "run", 0)))
    assert set(saved) == set(adapter) | {f"adam_{m}.{n}" for n in adapter for m in "mv"} | COUNTERS
    trainable = ms.load_checkpoint(str(trainable_path(tmp_path / "run", 0)))
    assert set(trainable) == set(adapter)
    assert all(np.array_equal(trainable[n].asnumpy(), a) for n, a in adapter.items())
    assert not (tmp_path / "run" / "checkpoint_network").exists()
    adapter_bytes = sum(a.nbytes for a in adapter.values())
    per_save = [p.stat().st_size for p in (tmp_path / "run" / "checkpoint" / "rank_0").glob("*.ckpt")]
    assert len(per_save) == 2 and all(size < 3 * adapter_bytes + 4096 for size in per_save), (per_save, adapter_bytes)
    record = json.loads(record_path(latest(tmp_path / "run", 0)).read_text())
    assert record["base"]["path"] == str(base.resolve()) and len(record["base"]["manifest_sha256"]) == 64


def test_a_base_changed_in_place_is_refused_by_resume_and_merge(base, tmp_path):
    """A Hugging Face folder (no manifest) is named by its files: a weights file rewritten in place (same size,
    other values) is another base, which resume and glm2-merge-shards refuse in one line naming both hashes."""
    hub = tmp_path / "hub-base"
    shutil.copytree(base, hub)
    (hub / "manifest.json").unlink()
    run = tmp_path / "run"
    assert finetune(hub, "--train-data", TRAIN, "--out", run, "--max-steps", "2", "--save-steps", "1",
                    *TINY).exit_code == 0
    recorded = json.loads(record_path(latest(run, 0)).read_text())["base"]
    assert recorded["manifest_sha256"] is None and len(recorded["files_sha256"]) == 64
    shard = sorted(hub.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8)  # the last weight's last values
    shard.write_bytes(bytes(data))
    before = tree_digest(run)
    res = finetune(hub, "--train-data", TRAIN, "--out", run, "--max-steps", "2", "--resume", *TINY)
    text = one_line(res, "the run trained on the base model", "files sha256", "use the run's base model")
    assert len(re.findall(r"files sha256 [0-9a-f]{12}", text)) == 2
    merged = subprocess.run([BIN / "glm2-merge-shards", run, "--strategy", _one_rank_strategy(run, tmp_path),
                             tmp_path / "merged"], capture_output=True, text=True)
    assert merged.returncode == 1 and merged.stderr.count("\n") == 1, merged.stderr  # no MindSpore here
    assert "the run's base changed" in merged.stderr and "merge-lora BASE" in merged.stderr
    assert not (tmp_path / "merged").exists() and tree_digest(run) == before


def _one_rank_strategy(run: Path, where: Path) -> Path:
    with CkptFile(latest(run, 0)) as f:
        layouts = {n: ParamLayout((1,), (-1,) * len(t.shape)) for n, t in f.tensors.items() if t.shape}
    (where / "s.ckpt").write_bytes(strategy_bytes(layouts))
    return where / "s.ckpt"


def error_line(stderr: str) -> str:
    """A failed run's one error line: its last, and the only one saying `error:` (MindSpore may warn before it)."""
    lines = stderr.splitlines()
    assert [x for x in lines if x.startswith("error:")] == lines[-1:], stderr
    return lines[-1]


# ---- two runs, one --out

def test_a_second_run_on_a_busy_out_is_refused_in_one_line(base, tmp_path):
    out = tmp_path / "out"
    with run_lock(out, 0):
        res = finetune(base, "--train-data", TRAIN, "--out", out, "--max-steps", "2", *TINY)
    one_line(res, f"{out}: another glm2-finetune (pid {os.getpid()}) is writing this folder")
    assert not out.exists()


def test_two_runs_started_together_on_one_out(base, tmp_path):
    """Two processes: one trains to the end, the other is refused in one line; --out holds one run's files."""
    out = tmp_path / "out"
    procs = [subprocess.Popen(args(base, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted((p.wait(timeout=300), *p.communicate()) for p in procs)
    (ok, report, _), (refused, _, error) = results
    assert (ok, refused) == (0, 1), results
    assert "another glm2-finetune (pid" in error_line(error), error
    assert json.loads(report)["steps"] == STEPS
    assert [s for s, _ in logged(out)] == list(range(1, STEPS + 1))


# ---- kills and a full disk at exact system calls of a save

def save_files(out: Path, method: str, step: int) -> dict[str, Path]:
    """The files a save of `step` writes, by their staging (hidden) names."""
    rank = out / "checkpoint" / "rank_0"
    network = trainable_path(out, 0) if method == "lora" else \
        out / "checkpoint_network" / "rank_0" / f"glm2_rank_0-0_{step}.ckpt"
    files = {"training": rank / f"glm2_rank_0-0_{step}.ckpt", "network": network,
             "record": rank / f"glm2_rank_0-0_{step}.json"}
    return {k: p.with_name(f".{p.name}.partial") for k, p in files.items()}


EVENT = re.compile(r"^\d+\s+(openat|write|fsync|rename)\((?:AT_FDCWD, )?\"?([^\",)]*)")


def save_events(base: Path, whole: Path, method: str) -> list[tuple[str, str, int]]:
    """Every system call of the save of step 2, in order, as (file, syscall, n) — the n-th call of its kind on
    that file since the run began, as strace's `when` counts — from an uninterrupted run at `whole`, traced on
    those files."""
    log = whole.with_suffix(".strace")
    files = save_files(whole, method, 2)
    done = traced(args(base, whole, method), CALLS, paths=files.values(), log=log)
    assert done.returncode == 0, done.stderr
    fds, events, seen = {}, [], {}
    by_path = {str(p): k for k, p in files.items()}
    for line in log.read_text().splitlines():
        m = EVENT.match(line)
        kind = m and (by_path.get(m[2]) if m[1] in ("openat", "rename") else fds.get(m[2]))
        if not kind:
            continue
        if m[1] == "openat":
            fds[line.rsplit("= ", 1)[1]] = kind
        seen[kind, m[1]] = seen.get((kind, m[1]), 0) + 1
        events.append((kind, m[1], seen[kind, m[1]]))
    log.unlink()
    # a LoRA run's network file is rewritten by every save: step 2's save runs from its training file's first call
    # to its record's last
    first = next(i for i, e in enumerate(events) if e[0] == "training")
    last = max(i for i, e in enumerate(events) if e[0] == "record")
    return events[first:last + 1]


def check_after_kill(out: Path, killed_step: int) -> None:
    """What a killed save leaves is never taken for a checkpoint, and every checkpoint with a record is whole."""
    newest = latest(out, 0)
    assert newest is not None and newest.name == f"glm2_rank_0-0_{killed_step - 1}.ckpt", newest
    for ckpt in (out / "checkpoint" / "rank_0").glob("*.ckpt"):
        if record_path(ckpt).is_file():
            with CkptFile(ckpt) as f:  # reading checks MindSpore's CRC-32 of every record
                assert all(t.read() is not None for t in f.tensors.values())


POINTS = {  # the suite's sample: mid-write, a whole unnamed file, a named file without its record, the record (as
    # strace counts: the LoRA network file is renamed at every save, so step 2's rename is its second)
    "lora": [("training", "write", 3), ("training", "rename", 1), ("network", "rename", 2), ("record", "rename", 1)],
}


def kill_points(base: Path, whole: Path, method: str) -> list[tuple[str, str, int]]:
    """The system calls to kill a save at, after the uninterrupted run at `whole`. The suite's sample needs no
    listing of the save's calls (a point the save does not reach would not kill its run, which the test asserts),
    so that run is not traced; with GLM2_KILL_POINTS, the calls are listed from it, traced, and spread."""
    if os.environ.get("GLM2_KILL_POINTS"):
        return spread(save_events(base, whole, method), POINTS.get(method, []))
    done = subprocess.run(args(base, whole, method), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return POINTS[method]


@needs_strace
@pytest.mark.parametrize("method", ["lora", "full"] if os.environ.get("GLM2_KILL_POINTS") else ["lora"])
def test_a_save_killed_at_any_system_call_resumes_to_the_uninterrupted_losses(base, tmp_path, method):
    whole = tmp_path / "whole"
    points = kill_points(base, whole, method)
    assert points
    for kind, call, n in points:
        out = tmp_path / f"{kind}-{call}-{n}"
        killed = traced(args(base, out, method), CALLS, f"{call}:signal=KILL:when={n}",
                        [save_files(out, method, 2)[kind]])
        assert killed.returncode != 0, (kind, call, n)
        check_after_kill(out, 2)
        resumed = subprocess.run([*args(base, out, method), "--resume"], capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert logged(out) == logged(whole), (kind, call, n)  # each step once, the losses bit for bit
        assert not list(out.rglob("*.partial")), (kind, call, n)
        shutil.rmtree(out)
    print(f"{method}: {len(points)} system calls of a save killed; each resumed to the uninterrupted losses")


@needs_strace
def test_a_disk_that_fills_during_a_save_ends_the_run_in_one_line(base, tmp_path):
    """ENOSPC at the second write of step 2's checkpoint: one line with the bytes needed and free and the newest
    whole checkpoint (step 1, intact); nothing half written left; after space is freed, --resume goes on."""
    out = tmp_path / "out"
    files = save_files(out, "lora", 2)
    full = traced(args(base, out), CALLS, "write:error=ENOSPC:when=2", [files["training"]])
    assert full.returncode == 1 and error_line(full.stderr), full.stderr
    assert re.fullmatch(rf"error: {out}: no space for the checkpoint of step 2: it needed [\d.,]+ kB, [\d.,]+ GB were "
                        rf"free; the newest whole checkpoint is \S+/glm2_rank_0-0_1\.ckpt", error_line(full.stderr))
    assert not list(out.rglob("*.partial"))
    check_after_kill(out, 2)
    assert subprocess.run([*args(base, out), "--resume"], capture_output=True, timeout=300).returncode == 0
    assert [s for s, _ in logged(out)] == list(range(1, STEPS + 1))


def test_a_save_that_cannot_fit_is_refused_before_its_first_byte(base, tmp_path, small_disk):
    """--out on a disk too small for the first save: one line with the bytes needed and free, and the fresh
    --out is left as it was (gone)."""
    out = small_disk(256 * 1024) / "out"
    res = finetune(base, "--train-data", TRAIN, "--out", out, "--max-steps", "2", "--method", "full", *TINY)
    assert res.exit_code == 1
    assert re.fullmatch(rf"error: {out}: no space for the checkpoint of step 2: it needs [\d.,]+ MB, [\d.,]+ kB are "
                        rf"free; no checkpoint was saved yet", error_line(res.output)), res.output
    assert not out.exists()



class _UserWritesDuringTheRun(Trainer):
    """A Trainer beside which a user saves a file of their own into --out after the first step."""

    def _record(self, loss, seconds, bar):
        super()._record(loss, seconds, bar)
        (self.out / "notes.txt").write_text("a user's notes\n")


@pytest.mark.parametrize("existed", [True, False])
def test_a_run_stopped_before_its_first_save_removes_only_what_it_wrote(base, small_disk, existed):
    """A fresh --out (empty, or not there) is left as the run found it when it stops before its first save (here:
    no room for it), except for a user's file put there meanwhile, which is kept with its folder."""
    out = small_disk(256 * 1024) / "out"
    if existed:
        out.mkdir()
    cfg = TrainConfig.load(None, method="full", max_steps=2, save_steps=0, **TINY_CFG)
    with pytest.raises(Exception, match="no space for the checkpoint"):
        _UserWritesDuringTheRun(base, TRAIN, out, cfg, progress=False).train()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
