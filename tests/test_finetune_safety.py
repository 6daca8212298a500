"""glm2-finetune never harms its inputs or a folder it did not make, checks every setting before it writes, resumes
only the run it finds, and an interrupt keeps the step it stops at (issue 30: items 2, 5, 6, 7 and 11)."""
import json
import os
import shutil
import signal
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tree_digest
from test_finetune import TRAIN

from glm2_core.errors import UserError
from glm2_ms.api import from_pretrained
from glm2_ms.checkpointing import latest
from glm2_ms.finetune_cli import main as finetune_cli
from glm2_ms.lora import LoRAConfig, apply_lora
from glm2_ms.train import Trainer
from glm2_ms.train_config import TrainConfig
from validation.eval_cli import main as eval_cli

TINY = ["--batch-size", "2", "--max-source-length", "8", "--max-target-length", "8", "--quiet"]
TINY_CFG = dict(batch_size=2, max_source_length=8, max_target_length=8, seed=0)


@pytest.fixture(scope="module")
def base(hf_tiny):
    return hf_tiny("safetensors", "float32")


def finetune(*args):
    return CliRunner().invoke(finetune_cli, [str(a) for a in args])


def one_line(res, *needles):
    assert res.exit_code == 1 and res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
    for needle in needles:
        assert needle in res.output, res.output
    return res.output


# ---- item 2: --out apart from the inputs, checked before anything is written

@pytest.mark.parametrize("where", ["model", "inside model", "above model", "above data", "link to model"])
def test_out_overlapping_an_input_is_refused_before_anything_is_written(base, tmp_path, where):
    model = tmp_path / "m"
    shutil.copytree(base, model)
    data = tmp_path / "d" / "train.json"
    data.parent.mkdir()
    shutil.copyfile(TRAIN, data)
    (tmp_path / "link").symlink_to(model)
    out = {"model": model, "inside model": model / "run", "above model": tmp_path, "above data": data.parent,
           "link to model": tmp_path / "link"}[where]
    before = tree_digest(tmp_path)
    one_line(finetune(model, "--train-data", data, "--out", out, "--max-steps", "1", *TINY), "--out")
    assert tree_digest(tmp_path) == before


def test_a_new_run_needs_a_new_or_empty_out(base, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_line(finetune(base, "--train-data", TRAIN, "--out", busy, "--max-steps", "1", *TINY), "notes.txt",
             "not empty")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    # a check that fails after the data is read (too few examples for one step) leaves no --out either
    one_line(finetune(base, "--train-data", TRAIN, "--out", tmp_path / "o", "--batch-size", "512", "--quiet"),
             "do not fill one step")
    assert not (tmp_path / "o").exists()


# ---- item 5: --target-modules is PEFT's list of module names

def test_target_modules_are_exact_module_names(base, tmp_path):
    wrapped = apply_lora(from_pretrained(base), LoRAConfig(target_modules="dense"))
    assert [n.rsplit(".", 1)[-1] for n in wrapped] == ["dense", "dense"]  # not dense_h_to_4h, dense_4h_to_h
    wrapped = apply_lora(from_pretrained(base), LoRAConfig(target_modules="query_key_value, dense_4h_to_h"))
    assert sorted({n.rsplit(".", 1)[-1] for n in wrapped}) == ["dense_4h_to_h", "query_key_value"]
    assert len(wrapped) == 4
    line = one_line(finetune(base, "--train-data", TRAIN, "--out", tmp_path / "o", "--target-modules",
                             "query_key_value,mlp", *TINY), "'mlp'")
    assert all(name in line for name in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"))
    assert not (tmp_path / "o").exists()


# ---- item 7: every setting typed and ranged, from flags and from the file

@pytest.mark.parametrize("flag, value", [
    ("--learning-rate", "-1"), ("--learning-rate", "nan"), ("--max-steps", "0"), ("--lora-dropout", "1"),
    ("--batch-size", "0"), ("--seed", "-1"), ("--lora-alpha", "0"), ("--log-steps", "0"), ("--beta2", "1"),
    ("--keep-checkpoints", "-1"), ("--lora-rank", "x"), ("--loss-scale-factor", "1"),
])
def test_a_bad_flag_value_is_one_line(base, tmp_path, flag, value):
    one_line(finetune(base, "--train-data", TRAIN, "--out", tmp_path / "o", *TINY, flag, value))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, needle", [
    ('learning_rate: "fast"', "learning_rate must be a number, not 'fast'"),
    ("lora_rank: 2.5", "lora_rank must be a whole number, not 2.5"),
    ("max_steps: 0", "max_steps must be >= 1, not 0"),
    ("recompute: maybe", "recompute must be true or false"),
    ("learning_rate: -1", "learning_rate must be > 0, not -1.0"),
    ("lr_end: 0.1\nlearning_rate: 0.01", "lr_end 0.1 exceeds learning_rate 0.01"),
    ("target_modules: dense|query_key_value", "no module 'dense|query_key_value'"),
])
def test_a_bad_config_value_is_one_line_naming_the_field(base, tmp_path, text, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text + "\n")
    one_line(finetune(base, "--train-data", TRAIN, "--out", tmp_path / "o", "--train-config", cfg, *TINY), needle)
    assert not (tmp_path / "o").exists()


def test_config_values_are_checked_in_code_too():
    assert TrainConfig.load(None, lora_alpha=8).lora_alpha == 8.0  # an int where a float goes is that float
    assert TrainConfig(target_modules="dense, query_key_value").target_modules == "query_key_value,dense"
    for bad in (dict(epochs=0), dict(lora_rank=1.5), dict(method="qlora"), dict(prompt_column=" ")):
        with pytest.raises(UserError, match=next(iter(bad))):
            TrainConfig(**bad)


@pytest.mark.parametrize("lines, needle", [
    ('{"prediction": "a", "reference": "a"}\n{"prediction": "b"}\n', "line 2: no 'reference' key"),
    ('{"prediction": "a", "reference": "a"}\nnot json\n', "line 2: not JSON"),
    ('[1, 2]\n', "line 1: no 'prediction' or 'reference' key"),
    ('{"prediction": 1, "reference": "a"}\n', "line 1: prediction and reference must be strings"),
])
def test_eval_score_names_the_bad_line(tmp_path, lines, needle):
    path = tmp_path / "predictions.jsonl"
    path.write_text(lines)
    res = CliRunner().invoke(eval_cli, ["score", str(path)])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert res.output.startswith(f"error: {path}: {needle}"), res.output


# ---- item 6: --resume continues only the run it finds

@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    res = finetune(base, "--train-data", TRAIN, "--out", out, "--max-steps", "2", "--save-steps", "1", *TINY)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("flag, value, recorded, given", [
    ("--lora-rank", "4", "8", "4"), ("--method", "full", "lora", "full"), ("--batch-size", "4", "2", "4"),
    ("--lora-alpha", "8", "32.0", "8.0"), ("--lora-dropout", "0", "0.1", "0.0"),
    ("--target-modules", "query_key_value,dense", "query_key_value", "query_key_value,dense"),
    ("--gradient-accumulation-steps", "2", "1", "2"), ("--seed", "1", "0", "1"),
    ("--max-target-length", "9", "8", "9"), ("--response-column", "content", "summary", "content"),
    ("--compute-dtype", "float16", "float32", "float16"), ("--optimizer", "adamw", "fused-adamw", "adamw"),
    ("--beta2", "0.9", "0.95", "0.9"), ("--weight-decay", "0", "0.1", "0.0"),
])
def test_resume_refuses_another_setting_in_one_line(base, lora_run, flag, value, recorded, given):
    before = tree_digest(lora_run)
    name = flag[2:].replace("-", "_")
    args = dict(zip(TINY[:-1:2], TINY[1::2], strict=True)) | {flag: value}
    res = finetune(base, "--train-data", TRAIN, "--out", lora_run, "--max-steps", "2", "--resume", "--quiet",
                   *[x for kv in args.items() for x in kv])
    one_line(res, f"the run used {name}={recorded}, resumed with {given}")
    assert tree_digest(lora_run) == before


def test_resume_refuses_another_base_and_allows_bookkeeping_changes(base, hf_tiny, lora_run, tmp_path):
    before = tree_digest(lora_run)
    other = hf_tiny("safetensors", "float16")  # another manifest: other weights
    res = finetune(other, "--train-data", TRAIN, "--out", lora_run, "--max-steps", "2", "--resume", *TINY)
    one_line(res, "the run trained on the base model", str(base.resolve()), str(other.resolve()), "manifest sha256")
    assert tree_digest(lora_run) == before
    moved = tmp_path / "moved-base"  # the same weights elsewhere: the same base
    shutil.copytree(base, moved)
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    res = finetune(moved, "--train-data", TRAIN, "--out", run, "--max-steps", "2", "--resume", "--save-steps", "5",
                   "--log-steps", "2", "--keep-checkpoints", "1", "--no-recompute", *TINY)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 2


# ---- item 11: an interrupt keeps the step it stops at; --keep-checkpoints

class SignalDuring:
    """A trainer's step function that sends this process `sig` while step `at` runs (or, with `raise_now`, stops
    it at once there, as a second Ctrl-C does)."""

    def __init__(self, trainer, at: int, sig=signal.SIGTERM, raise_now: bool = False):
        self.trainer, self.step, self.at, self.sig, self.raise_now = trainer, trainer.train_step, at, sig, raise_now

    def __call__(self, *args):
        if self.trainer.state.step + 1 == self.at and self.raise_now:
            raise KeyboardInterrupt
        result = self.step(*args)
        if self.trainer.state.step + 1 == self.at:  # a handler of the trainer's must be there, or this kills pytest
            assert signal.getsignal(self.sig) not in (signal.SIG_DFL, signal.SIG_IGN, None), "no handler"
            os.kill(os.getpid(), self.sig)
        return result


def test_an_interrupt_saves_its_step_and_resume_continues_exactly(base, tmp_path):
    cfg = TrainConfig.load(None, method="lora", max_steps=4, learning_rate=2e-2, **TINY_CFG)
    whole = Trainer(base, TRAIN, tmp_path / "a", replace(cfg, save_steps=1, keep_checkpoints=2), progress=False)
    ranks = tmp_path / "a" / "checkpoint" / "rank_0"
    ranks.mkdir(parents=True)
    (ranks / "notes.txt").write_text("mine")
    (ranks / "other.ckpt").write_bytes(b"not ours")
    losses = whole.train()
    left = sorted(p.name for p in ranks.iterdir())
    assert left == ["glm2_rank_0-0_3.ckpt", "glm2_rank_0-0_3.json", "glm2_rank_0-0_4.ckpt", "glm2_rank_0-0_4.json",
                    "notes.txt", "other.ckpt"]
    assert not (tmp_path / "a" / "checkpoint_network").exists()  # LoRA: the adapter alone, in one file
    assert [p.name for p in (tmp_path / "a" / "checkpoint_trainable" / "rank_0").iterdir()] == \
        ["glm2_rank_0-trainable_params.ckpt"]

    stopped = Trainer(base, TRAIN, tmp_path / "b", cfg, progress=False)  # --save-steps 0: only where it stops
    stopped.train_step = SignalDuring(stopped, at=2)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    assert latest(tmp_path / "b", 0).name == "glm2_rank_0-0_2.ckpt" and stopped.saved_step == 2
    assert signal.getsignal(signal.SIGTERM) == handler  # the trainer's handler is gone again
    resumed = Trainer(base, TRAIN, tmp_path / "b", cfg, progress=False, resume=True).train()
    np.testing.assert_allclose(resumed, losses, rtol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_stopping_before_the_first_save_leaves_a_fresh_out_as_it_was(base, tmp_path):
    cfg = TrainConfig.load(None, method="lora", max_steps=3, **TINY_CFG)
    for out, at in ((tmp_path / "new", 1), (tmp_path / "new", 2), (tmp_path / "empty", 2)):
        if out.name == "empty":
            out.mkdir()
        trainer = Trainer(base, TRAIN, out, cfg, progress=False)
        trainer.train_step = SignalDuring(trainer, at=at, raise_now=True)  # stopped at once, before any save
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        assert (list(out.iterdir()) == []) if out.name == "empty" else not out.exists()
