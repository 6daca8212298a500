"""Bounds on what the runtime tools allocate and write (issue 30, items 3, 12 and 14): a generation that cannot fit
(the model's context, the memory available, fewer than one new token) is refused in one line before its KV cache
is allocated, on every path; parity reports, demo workdirs and evaluation outputs follow the one output rule."""
import json
from collections import namedtuple

import numpy as np
import psutil
import pytest
from click.testing import CliRunner
from conftest import DATA
from helpers import optional

from glm2_core.config import GLM2Config
from glm2_core.errors import UserError
from glm2_ms import cli as runtime_cli
from glm2_ms.api import from_pretrained
from glm2_ms.generation import Decoder, cache_bytes, check_budget
from glm2_ms.tokenizer import GLM2Tokenizer
from validation import cli as parity_cli
from validation import demo, evaluate, parity
from validation.eval_cli import main as eval_cli
from validation.parity import write_report

CONTEXT = GLM2Config.preset("tiny").seq_length  # 2048
HUGE = "100000000"  # the issue's: a cache that, unbounded, was allocated until the OOM killer came
Memory = namedtuple("Memory", "available")


@pytest.fixture(scope="module")
def ms_dir(ms_tiny):
    return ms_tiny("float32")


@pytest.fixture(scope="module")
def model(ms_dir):
    return from_pretrained(ms_dir)


@pytest.fixture
def little_memory(monkeypatch):
    """psutil reporting 1 MiB available: any cache of more than a few hundred positions does not fit."""
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(2**20))


@pytest.fixture
def no_cache(monkeypatch):
    """A KV cache allocated at all fails the test: the refusal must come before it."""
    def refuse(*args):
        raise AssertionError("the cache was allocated")
    monkeypatch.setattr(Decoder, "new_cache", refuse)


def one_line(result, *needles) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def run(command, *args, **kwargs):
    return CliRunner().invoke(command, [str(a) for a in args], **kwargs)


# ---- item 3: one bound for every generation

def test_the_bound_names_the_option_the_limit_and_why(little_memory):
    cfg = GLM2Config.preset("tiny")
    with pytest.raises(UserError, match=rf"^--max-new-tokens {HUGE}: the prompt's 5 tokens and {HUGE} new ones pass "
                                        rf"the model's context of {CONTEXT} tokens .*at most {CONTEXT - 5} new"):
        check_budget(cfg, 5, int(HUGE), option="--max-new-tokens")
    for bad in (0, -1):
        with pytest.raises(UserError, match=f"max_new_tokens must be at least 1, got {bad}"):
            check_budget(cfg, 5, bad)
    with pytest.raises(UserError, match="must be a whole number"):
        check_budget(cfg, 5, 2.5)
    with pytest.raises(UserError, match=r"8 rows × 1005 positions .*memory available; lower --max-new-tokens or "
                                        r"--batch-size"):
        check_budget(cfg, 5, 1000, 8, 4, "--max-new-tokens", "--batch-size")
    assert check_budget(cfg, 5, 1000, 8, 4, memory=False) == 1000
    assert cache_bytes(cfg, 1, 1, 4) == 2 * 2 * 2 * 16 * 4  # layers × (k, v) × groups × head size × float32


def test_decoder_and_api_refuse_before_allocating(model, no_cache, little_memory):
    ids = np.array([GLM2Tokenizer().encode("hi")], np.int32)
    for bad in (int(HUGE), 0, -1):
        with pytest.raises(UserError, match="max_new_tokens"):
            model.decoder.stream(ids, max_new_tokens=bad)  # refused at the call, not when first iterated
        with pytest.raises(UserError, match="max_new_tokens"):
            model.generate(ids, max_new_tokens=bad)
    with pytest.raises(UserError, match="memory available"):
        model.generate(ids, max_new_tokens=1000)
    with pytest.raises(UserError, match=f"max_length {ids.shape[1]} leaves no room"):
        model.generate(ids, max_length=ids.shape[1])
    assert model.chat_length(None) == CONTEXT  # THUDM's 8192 would pass the tiny model's context


def test_generate_refuses_a_huge_or_negative_max_new_tokens_in_one_line(ms_dir, no_cache):
    one_line(run(runtime_cli.generate, ms_dir, "--prompt", "hi", "--max-new-tokens", HUGE), "--max-new-tokens",
             f"context of {CONTEXT} tokens")
    one_line(run(runtime_cli.generate, ms_dir, "--prompt", "hi", "--max-new-tokens", "-1"), "--max-new-tokens")


def test_chat_refuses_a_round_past_the_context_and_goes_on(ms_dir):
    long = "你好" * 3000  # 3016 tokens: the round passes the context of 2048
    result = run(runtime_cli.chat, ms_dir, "--max-new-tokens", "2", input=f"{long}\n你好\n")
    assert result.exit_code == 0, result.output
    assert "not sent: --max-new-tokens 2: the prompt's" in result.stderr and "'clear'" in result.stderr
    assert result.stdout.count("ChatGLM2: ") == 1  # the next round was answered
    one_line(run(runtime_cli.chat, ms_dir, "--max-new-tokens", "5000", input=""), "--max-new-tokens 5000",
             f"context of {CONTEXT}")


def test_chat_ends_its_line_on_ctrl_d(ms_dir):
    result = run(runtime_cli.chat, ms_dir, input="")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("用户: \n"), repr(result.stdout[-20:])


def test_eval_bounds_new_tokens_and_batch_before_writing(ms_dir, tmp_path, monkeypatch):
    common = [ms_dir, "--data", DATA / "adgen_dev.json", "--max-samples", "4", "--out", tmp_path / "out"]
    one_line(run(eval_cli, *common, "--max-new-tokens", "5000"), "--max-new-tokens 5000", f"context of {CONTEXT}")

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(2**20))
    one_line(run(eval_cli, *common, "--max-new-tokens", "1000", "--batch-size", "4"), "memory available",
             "--batch-size")
    assert not (tmp_path / "out").exists()


def test_parity_bounds_new_tokens_before_loading(hf_tiny, ms_dir, monkeypatch):
    monkeypatch.setattr(parity, "_whole", lambda *a: pytest.fail("a model was loaded"))
    monkeypatch.setattr(parity, "_streamed", lambda *a: pytest.fail("a model was loaded"))
    one_line(run(parity_cli.main, hf_tiny(dtype="float32"), ms_dir, "--max-new-tokens", "5000"),
             "--max-new-tokens 5000", f"context of {CONTEXT}")


# ---- item 12: one output rule

def fake_report() -> dict:
    stage = {"stage": "logits", "max_abs": 0.0, "mean_abs": 0.0, "rel": 0.0}
    prompt = {"prompt": "hi", "tokens": 3, "stages": [dict(stage, stage="layer 0 attention"), stage],
              "first_divergence": None, "logits_max_abs": 0.0, "logits_rel": 0.0, "top1_agreement": 1.0, "kl": 0.0,
              "greedy_agreement": 1.0, "greedy_first_diff": None, "passed": True,
              "seconds": {"ms_forward": 0.0, "ref_forward": 0.0}}
    return {"hf_dir": "hf", "ms_dir": "ms", "reference": "torch", "dtype": "float32", "mode": "whole",
            "model": {"layers": 1, "hidden": 8, "vocab": 8}, "new_tokens": 0, "prompts": [prompt], "passed": True,
            "thresholds": {"logits_max_abs": 1e-4, "layer_rel": 1e-5, "top1": 1.0, "greedy": 1.0}}


def test_parity_report_is_refused_when_it_exists_and_replaced_only_when_ours(hf_tiny, ms_dir, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    one_line(run(parity_cli.main, hf_tiny(dtype="float32"), ms_dir, "--report", existing), "already exists",
             "--overwrite")
    one_line(run(parity_cli.main, hf_tiny(dtype="float32"), ms_dir, "--report", ms_dir / "r"), "inside the input")
    report = tmp_path / "report"
    write_report(fake_report(), report)
    assert json.loads((report / "manifest.json").read_text())["written"] == ["parity.png", "report.json",
                                                                             "report.md"]
    with pytest.raises(UserError, match="already exists"):
        write_report(fake_report(), report)
    (report / "report.md").write_text("old")
    write_report(fake_report(), report, overwrite=True)
    assert (report / "report.md").read_text() != "old"
    (report / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        write_report(fake_report(), report, overwrite=True)
    assert (report / "notes.txt").read_text() == "mine"


def test_demo_workdir_follows_the_output_rule(tmp_path, monkeypatch):
    def steps(root, kept):
        (root / "hf-tiny").mkdir()
        return 0
    monkeypatch.setattr(demo, "_run", steps)
    work = tmp_path / "work"
    assert run(demo.main, "--workdir", work).exit_code == 0
    assert {p.name for p in work.iterdir()} == {"hf-tiny", "manifest.json"}
    one_line(run(demo.main, "--workdir", work), "already exists", "--overwrite")
    assert run(demo.main, "--workdir", work, "--overwrite").exit_code == 0
    (work / "notes.txt").write_text("mine")
    one_line(run(demo.main, "--workdir", work, "--overwrite"), "notes.txt")
    assert (work / "notes.txt").read_text() == "mine"
    one_line(run(demo.main, "--workdir", tmp_path / "no" / "such"), "does not exist")

    def failing(root, kept):
        (root / "hf-tiny").mkdir()
        raise UserError("a step failed")
    monkeypatch.setattr(demo, "_run", failing)
    one_line(run(demo.main, "--workdir", tmp_path / "failed"), "a step failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # nothing half-written, no staging folder


def metrics_extra():
    for module in ("jieba", "rouge_chinese", "nltk"):
        optional(module)


def test_eval_out_follows_the_output_rule(ms_dir, tmp_path):
    metrics_extra()
    data = tmp_path / "data" / "dev.json"
    data.parent.mkdir()
    data.write_text((DATA / "adgen_dev.json").read_text(encoding="utf-8"), encoding="utf-8")
    common = [ms_dir, "--data", data, "--max-samples", "2", "--batch-size", "2", "--max-new-tokens", "2", "--quiet"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    one_line(run(eval_cli, *common, "--out", foreign), "already exists", "--overwrite")
    one_line(run(eval_cli, *common, "--out", foreign, "--overwrite"), "notes.txt")
    one_line(run(eval_cli, *common, "--out", foreign, "--resume"), "no run to resume")
    one_line(run(eval_cli, *common, "--out", foreign, "--resume", "--overwrite"), "--resume", "--overwrite")
    one_line(run(eval_cli, *common, "--out", ms_dir), "is the input")
    one_line(run(eval_cli, *common, "--out", ms_dir / "eval"), "inside the input")
    one_line(run(eval_cli, *common, "--out", data.parent), "contains the input")
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out = tmp_path / "out"
    first = run(eval_cli, *common, "--out", out)
    assert first.exit_code == 0, first.output
    assert set(json.loads((out / "manifest.json").read_text())["written"]) == {"metrics.json", "predictions.jsonl",
                                                                               "settings.json"}
    (out / "metrics.json").write_text("{}")
    again = run(eval_cli, *common, "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["samples"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "foreign", "out"]  # no staging folder left


def test_eval_interrupted_says_how_to_continue(ms_dir, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "adgen_scores", interrupted)  # after the predictions are written
    out = tmp_path / "out"
    result = run(eval_cli, ms_dir, "--data", DATA / "adgen_dev.json", "--max-samples", "2", "--max-new-tokens", "2",
                 "--quiet", "--out", out)
    assert result.exit_code == 130, result.output
    assert "--resume" in result.stderr and str(out) in result.stderr, result.stderr
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2


# ---- the one-line contract for the options these tools define themselves

BAD_VALUES = {
    "glm2-parity": [("--logits-atol", "-1"), ("--logits-atol", "nan"), ("--layer-rtol", "-0.5"), ("--min-top1", "2"),
                    ("--min-top1", "nan"), ("--min-greedy", "-0.1"), ("--min-greedy", "x")],
    "glm2-eval": [("--max-samples", "0"), ("--max-samples", "x"), ("--max-source-chars", "0"),
                  ("--max-target-chars", "-1"), ("--min-agreement", "1.5"), ("--min-agreement", "nan"),
                  ("--max-metric-diff", "-1")],
    "glm2-generate": [("--temperature", "nan"), ("--top-p", "nan"), ("--repetition-penalty", "nan")],
}


@pytest.mark.parametrize("tool,flag,value", [(t, f, v) for t, pairs in BAD_VALUES.items() for f, v in pairs])
def test_a_bad_option_value_is_one_line(tool, flag, value, tmp_path):
    command, args = {"glm2-parity": (parity_cli.main, [tmp_path, tmp_path]),
                     "glm2-eval": (eval_cli, [tmp_path, "--data", DATA / "adgen_dev.json"]),
                     "glm2-generate": (runtime_cli.generate, [tmp_path, "--prompt", "hi", "--sample"])}[tool]
    one_line(run(command, *args, flag, value), flag)
