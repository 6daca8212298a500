"""The one-line contract where the machine, not the input, is at fault: a missing optional extra, and paths the
tool may not read or write. Each ends in one line `error: …`, exit status 1, with nothing left behind."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import DATA

BIN = Path(sys.executable).parent
# the extras' modules (pyyaml is not among them: gguf, a core dependency, brings it)
EXTRAS_MODULES = ("mindspore", "torch", "transformers", "peft", "sentencepiece", "tiktoken", "psutil",
                  "jieba", "rouge_chinese", "nltk", "matplotlib", "safetensors")


def one_line(result: subprocess.CompletedProcess, *needles) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ms_folder(ms_tiny):
    return ms_tiny()


@pytest.mark.parametrize("tool, args, extra", [
    ("glm2-generate", ["{ms}", "--prompt", "hi"], "mindspore"),
    ("glm2-chat", ["{ms}"], "mindspore"),
    ("glm2-finetune", ["{ms}", "--train-data", "{data}", "--out", "{tmp}/run"], "mindspore"),
    ("glm2-eval", ["{ms}", "--data", "{data}", "--out", "{tmp}/eval"], "mindspore"),
    ("glm2-parity", ["{ms}", "{ms}"], None),
    ("glm2-demo", [], "mindspore"),
])
def test_a_missing_extra_is_named(ms_folder, tmp_path, tool, args, extra):
    """As after `pip install -e .` (conversion only): the command says which extra it needs, in one line."""
    filled = [a.format(ms=ms_folder, data=DATA / "adgen_dev.json", tmp=tmp_path) for a in args]
    script = textwrap.dedent(f"""
        import sys
        for name in {EXTRAS_MODULES!r}:
            sys.modules[name] = None  # as if the extras were not installed
        from importlib.metadata import entry_points
        (ep,) = [e for e in entry_points(group="console_scripts") if e.name == {tool!r}]
        sys.argv = [{tool!r}, *{filled!r}]
        ep.load()()
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    line = one_line(result, f"{tool} needs the [", "pip install 'glm2-toolkit[")
    if extra:
        assert f"[{extra}]" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_conversion_needs_no_extra(hf_tiny, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        for name in {EXTRAS_MODULES!r}:
            sys.modules[name] = None
        from converters.cli import main
        main(["hf2ms", {str(hf_tiny())!r}, {str(tmp_path / "ms")!r}, "--quiet"])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---- permissions: root passes every permission check, so the tools run with those capabilities dropped
def as_user(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: cannot drop the capabilities that bypass file permissions")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    return subprocess.run(prefix + args, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def locked(tmp_path):
    """A read-only folder (restored for the clean-up)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("tool, args", [
    ("glm2-convert", ["hf2ms", "{hf}", "{locked}/out"]),
    ("glm2-convert", ["ms2hf", "{ms}", "{locked}/out"]),
    ("glm2-convert", ["synth", "{locked}/out"]),
    ("glm2-convert", ["merge-lora", "{ms}", "{ms}", "{locked}/out"]),
    ("glm2-merge-shards", ["split", "{ms}/mindspore_model.ckpt", "{locked}/out", "--strategy", "{strategy}"]),
    ("glm2-finetune", ["{ms}", "--train-data", "{data}", "--out", "{locked}/run"]),
    ("glm2-eval", ["{ms}", "--data", "{data}", "--out", "{locked}/eval", "--max-samples", "1"]),
    ("glm2-parity", ["{hf}", "{ms}", "--report", "{locked}/report"]),
    ("glm2-demo", ["--workdir", "{locked}/demo"]),
])
def test_an_unwritable_output_is_one_line(hf_tiny, ms_folder, locked, tool, args):
    strategy = locked.parent / "strategy.ckpt"
    strategy.write_bytes(b"")  # never read: the output is checked first
    filled = [a.format(hf=hf_tiny(), ms=ms_folder, data=DATA / "adgen_dev.json", locked=locked, strategy=strategy)
              for a in args]
    one_line(as_user([str(BIN / tool), *filled], locked.parent), str(locked), "ermission denied")
    assert list(locked.iterdir()) == []


def test_the_default_eval_output_in_a_read_only_folder(ms_folder, locked):
    one_line(as_user([str(BIN / "glm2-eval"), str(ms_folder), "--data", str(DATA / "adgen_dev.json"),
                      "--max-samples", "1"], locked), "eval-out", "ermission denied")


def test_an_unreadable_shard_is_one_line(hf_tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_tiny(), src)
    shard = sorted(src.glob("*.bin"))[0]
    shard.chmod(0)
    try:
        one_line(as_user([str(BIN / "glm2-convert"), "hf2ms", str(src), str(tmp_path / "out")], tmp_path),
                 str(shard), "ermission denied")
    finally:
        shard.chmod(0o644)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
