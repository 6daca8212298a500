"""glm2-generate and glm2-chat as a user runs them: real processes, real tokenizer, a converted tiny model."""
import json
import shutil
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def ms_dir(ms_tiny):
    return ms_tiny("float32")


def run(module_fn, *args, stdin=None):
    code = f"import sys; from glm2_ms.cli import {module_fn}; sys.argv[0] = 'x'; {module_fn}()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_generate_is_greedy_by_default_reproducible_and_reports_stats(ms_dir):
    a = run("generate", ms_dir, "--prompt", "你好", "--chat", "--max-new-tokens", "6")
    b = run("generate", ms_dir, "--prompt", "你好", "--chat", "--max-new-tokens", "6", "--stats")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()  # --stats writes to stderr alone
    stats = [line for line in b.stderr.splitlines() if line.startswith("stats: ")]
    assert len(stats) == 1 and "peak RSS" in stats[0] and "prefill" in stats[0] and "decode" in stats[0], stats
    s1 = run("generate", ms_dir, "--prompt", "Hello", "--sample", "--seed", "3", "--max-new-tokens", "6")
    s2 = run("generate", ms_dir, "--prompt", "Hello", "--sample", "--seed", "3", "--max-new-tokens", "6")
    assert s1.returncode == 0 and s1.stdout == s2.stdout


def test_generate_with_q8_activations_says_so_and_a_float_model_refuses_them(ms_dir, gguf_files):
    """--activations q8_0 over a q4_0 file: --stats names it; over float weights: one line, exit 1, before loading."""
    ok = run("generate", gguf_files["q4_0"], "--prompt", "你好", "--max-new-tokens", "4", "--activations", "q8_0",
             "--stats")
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
    assert "q4_0 and q8_0 weights through the native kernel with q8_0 activations" in ok.stderr
    refused = run("generate", ms_dir, "--prompt", "你好", "--activations", "q8_0")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == ["error: activations q8_0 go with weights in q8_0/q4_0 blocks, and "
                                                   "this model has none (quantize= or --quantize gives them)"]


def test_chat_keeps_history_and_clears_it(ms_dir):
    proc = run("chat", ms_dir, "--max-new-tokens", "4", stdin="你好\n再见\nclear\n你好\nexit\n")
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if "ChatGLM2: " in line]
    assert len(replies) == 3 and "(history cleared)" in proc.stdout
    assert replies[0] == replies[2]  # same first round after `clear`


def test_missing_model_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run("generate", tmp_path / "empty", "--prompt", "x")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_release_option_overrides_what_the_folder_tells(ms_dir):
    """--release: a ChatGLM2 folder chatted with as ChatGLM3-6B (its role format, tokenizer, stops and name)."""
    proc = run("chat", ms_dir, "--release", "chatglm3-6b", "--max-new-tokens", "2", stdin="你好\nexit\n")
    assert proc.returncode == 0, proc.stderr
    assert "ChatGLM3: " in proc.stdout and "ChatGLM2: " not in proc.stdout


def test_a_folder_that_cannot_tell_its_rope_rule_needs_release(ms_dir, tmp_path):
    """A config with rope_ratio and no release named is one line naming the fix; --release runs it."""
    folder = tmp_path / "local"
    shutil.copytree(ms_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "/data/my-finetune", "rope_ratio": 16}))
    refused = run("generate", folder, "--prompt", "你好", "--max-new-tokens", "2")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "rope_ratio 16 but _name_or_path '/data/my-finetune' names no release" in refused.stderr
    told = run("generate", folder, "--prompt", "你好", "--max-new-tokens", "2", "--release", "chatglm2-6b-32k")
    assert told.returncode == 0 and told.stdout.strip(), told.stderr
