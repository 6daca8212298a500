"""Nothing lost: whatever output path a tool is given, it never deletes or changes a file it did not create, and
our own files carry checksums that every read path checks."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import tensors
from strategy_fixtures import glm2_maps, layout_entry, write_pb

from converters.adapters import Adapter, write_mindpet
from converters.cli import main as convert_cli
from converters.shards_cli import main as shards_cli
from glm2_core import launch
from glm2_core.names import L

QKV = L.format(i=0) + "self_attention.query_key_value"


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: a file by its bytes' sha256 and mode, a symlink by its target, a folder by name."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = f"-> {os.readlink(p)}"
            elif p.is_dir():
                out[key] = "dir"
            else:
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
    return out


@pytest.fixture(scope="module")
def tree(hf_tiny, tmp_path_factory):
    """A user's folder: a HF model, its MindSpore conversion, a LoRA adapter, a strategy, unrelated files and
    symlinks to them."""
    root = tmp_path_factory.mktemp("user")
    shutil.copytree(hf_tiny(), root / "hf")
    assert CliRunner().invoke(convert_cli, ["hf2ms", str(root / "hf"), str(root / "ms"), "--quiet"]).exit_code == 0
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 64), np.float32), rng.standard_normal((192, 4), np.float32)
    write_mindpet(Adapter(4, 8.0, {QKV: (a, b)}), root / "adapter")
    names = list(tensors(root / "ms" / "mindspore_model.ckpt"))
    write_pb(root / "strategy.ckpt", {n: layout_entry((1, 2), m) for n, m in glm2_maps(names).items()})
    split = CliRunner().invoke(shards_cli, ["split", str(root / "ms" / "mindspore_model.ckpt"), str(root / "shards"),
                                            "--strategy", str(root / "strategy.ckpt"), "--quiet"])
    assert split.exit_code == 0, split.output
    (root / "notes.txt").write_text("the user's notes\n")
    (root / "work").mkdir()
    (root / "work" / "todo.txt").write_text("keep me\n")
    os.symlink(root / "hf", root / "link-hf")
    os.symlink(root / "ms", root / "link-ms")
    os.symlink(root / "notes.txt", root / "link-notes")
    os.symlink(root / "shards", root / "link-shards")
    return root


def hostile_outputs(root: Path, src: str, reads: bool = True) -> list[str]:
    """Output paths that would destroy or change something if a tool wrote or replaced them: the input, a path
    inside it, a folder that contains it (through symlinks too), the current folder, files and folders of the
    user's (for synth, which reads nothing, only the paths that exist)."""
    paths = [src, f"{src}/inside", f"{src}/..", f"link-{src}", f"link-{src}/inside", ".", "notes.txt",
             "link-notes", "work", "hf/tokenizer.model"]
    return paths if reads else [p for p in paths if (root / p).exists()]


COMMANDS = {  # (tool, arguments before DST, arguments after DST, the input DST is made from)
    "hf2ms": (convert_cli, ["hf2ms", "hf"], [], "hf"),
    "ms2hf": (convert_cli, ["ms2hf", "ms"], [], "ms"),
    "merge-lora": (convert_cli, ["merge-lora", "ms", "adapter"], [], "ms"),
    "split": (shards_cli, ["split", "ms/mindspore_model.ckpt"], ["--strategy", "strategy.ckpt"],
              "ms/mindspore_model.ckpt"),
    "synth": (convert_cli, ["synth"], [], "hf"),
    "merge-shards": (shards_cli, ["shards"], ["--strategy", "strategy.ckpt"], "shards"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_no_output_path_loses_a_file(tree, command, overwrite, monkeypatch):
    tool, before, after, src = COMMANDS[command]
    monkeypatch.chdir(tree)
    kept = snapshot(tree)
    for dst in hostile_outputs(tree, src, reads=command != "synth"):
        result = CliRunner().invoke(tool, [*before, dst, *after, "--quiet"] + (["--overwrite"] if overwrite else []))
        assert result.exit_code == 1, (dst, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (dst, result.output)
        assert snapshot(tree) == kept, dst


RUNTIME = {  # tool, its arguments with {dst}, its inputs, and whether it takes --overwrite
    "glm2-finetune": (["ms", "--train-data", "hf/../data.json", "--out", "{dst}", "--max-steps", "1"],
                      ["ms", "data.json"], False),
    "glm2-eval": (["ms", "--data", "data.json", "--out", "{dst}", "--max-samples", "1"], ["ms", "data.json"], True),
    "glm2-parity": (["hf", "ms", "--report", "{dst}", "--max-new-tokens", "1"], ["hf", "ms"], True),
    "glm2-demo": (["--workdir", "{dst}"], [], True),
}


@pytest.mark.parametrize("tool", sorted(RUNTIME))
def test_no_runtime_output_path_loses_a_file(tree, tool, monkeypatch):
    command = launch.command(tool)
    shutil.copyfile(Path(__file__).parent / "data" / "adgen_train_head200.json", tree / "data.json")
    args, inputs, takes_overwrite = RUNTIME[tool]
    monkeypatch.chdir(tree)
    kept = snapshot(tree)
    candidates = {p for src in inputs + ["hf", "ms"] for p in hostile_outputs(tree, src)} | {"data.json", "shards"}
    inside = [(tree / i).resolve() for i in inputs]  # a new path elsewhere is a fine output: only these are hostile
    for dst in sorted(p for p in candidates if (tree / p).exists() or any(
            i in (tree / p).resolve().parents for i in inside)):
        for extra in (["--overwrite"], []) if takes_overwrite else ([],):
            result = CliRunner().invoke(command, [a.format(dst=dst) for a in args] + extra)
            lines = result.stderr.strip().splitlines()
            assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (dst, result.output)
            assert snapshot(tree) == kept, dst
    (tree / "data.json").unlink()


def test_dst_apart_from_sources_in_one_line(tree, monkeypatch):
    monkeypatch.chdir(tree)
    runner = CliRunner()
    cases = {("hf", "hf"): "is the input", ("hf", "hf/x"): "lies inside the input", ("hf", "."): "contains the input",
             ("hf", "link-hf/x"): "lies inside the input"}
    for (src, dst), says in cases.items():
        line = runner.invoke(convert_cli, ["hf2ms", src, dst, "--overwrite"]).stderr.strip()
        assert says in line, line
    line = runner.invoke(convert_cli, ["merge-lora", "ms", "adapter", "adapter/merged"]).stderr.strip()
    assert "lies inside the input" in line and "adapter" in line
    line = runner.invoke(shards_cli, ["ms/mindspore_model.ckpt", "work", "--strategy", "strategy.ckpt",
                                      "--overwrite"]).stderr.strip()
    assert "--overwrite replaces only a folder this toolkit wrote" in line and "todo.txt" in line
    line = runner.invoke(convert_cli, ["hf2ms", "hf", "shards", "--overwrite"]).stderr.strip()
    assert "holds a rank shards this toolkit wrote, not a model" in line, line


def test_dot_as_the_output_folder(tree, tmp_path, monkeypatch):
    """`.` is a folder with a name: a new output beside the inputs is written; replacing the current folder is
    refused (the shell would be left in a deleted folder)."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    line = CliRunner().invoke(convert_cli, ["hf2ms", str(tree / "hf"), ".", "--overwrite"]).stderr.strip()
    assert line.startswith(f"error: {out}: is or holds the current folder"), line
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(convert_cli, ["hf2ms", str(tree / "hf"), "./out/../new", "--quiet"])
    assert result.exit_code == 0 and (tmp_path / "new" / "mindspore_model.ckpt").is_file(), result.output


def test_overwrite_replaces_only_what_we_wrote(tree, tmp_path):
    runner = CliRunner()
    dst = tmp_path / "out"
    assert runner.invoke(convert_cli, ["ms2hf", str(tree / "ms"), str(dst), "--quiet"]).exit_code == 0
    assert runner.invoke(convert_cli, ["ms2hf", str(tree / "ms"), str(dst), "--quiet", "--overwrite"]).exit_code == 0
    (dst / "README.md").write_text("my model card")
    line = runner.invoke(convert_cli, ["ms2hf", str(tree / "ms"), str(dst), "--overwrite"]).stderr.strip()
    assert "README.md" in line and "not listed in its manifest.json" in line
    assert (dst / "README.md").read_text() == "my model card"


# ---- our own files carry checksums, and every read path checks them
def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))


def test_our_ckpt_has_mindspores_crc_trailer(tree, tmp_path):
    import mindspore as ms

    ckpt = tree / "ms" / "mindspore_model.ckpt"
    assert ckpt.read_bytes()[-17:-10] == b"crc_num"
    assert len(ms.load_checkpoint(str(ckpt), crc_check=True)) > 0  # MindSpore checks our trailer
    bad = tmp_path / "bad.ckpt"
    shutil.copyfile(ckpt, bad)
    flip(bad, ckpt.stat().st_size // 2)
    assert len(ms.load_checkpoint(str(bad), crc_check=False)) > 0  # still a well-formed file: only the CRC tells
    with pytest.raises(ValueError):
        ms.load_checkpoint(str(bad), crc_check=True)


@pytest.fixture
def flipped_ms(tree, tmp_path):
    bad = tmp_path / "ms-flipped"
    shutil.copytree(tree / "ms", bad)
    flip(bad / "mindspore_model.ckpt", (bad / "mindspore_model.ckpt").stat().st_size // 2)
    return bad


def test_a_flipped_byte_in_our_ckpt_is_refused_by_every_reader(flipped_ms, tmp_path):
    before = snapshot(flipped_ms)
    for args in (["ms2hf", flipped_ms, tmp_path / "hf"], ["ms2hf", flipped_ms, tmp_path / "hf", "--dtype", "float32"],
                 ["verify", flipped_ms, flipped_ms]):
        line = CliRunner().invoke(convert_cli, [str(a) for a in args]).stderr.strip()
        assert "CRC trailer" in line and "corrupt" in line, (args, line)
    assert not (tmp_path / "hf").exists() and snapshot(flipped_ms) == before


@pytest.mark.parametrize("tool, args", [
    ("glm2-generate", ["--prompt", "hi", "--max-new-tokens", "2"]),
    ("glm2-finetune", ["--train-data", "{data}", "--out", "{tmp}/run", "--max-steps", "1", "--batch-size", "1"]),
])
def test_the_runtime_refuses_a_flipped_byte_too(flipped_ms, tmp_path, tool, args):
    data = Path(__file__).parent / "data" / "adgen_train_head200.json"
    filled = [a.format(data=data, tmp=tmp_path) for a in args]
    result = subprocess.run([str(Path(sys.executable).parent / tool), str(flipped_ms), *filled], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "CRC trailer" in result.stderr


def test_safetensors_we_wrote_are_checked_against_the_manifest(tree, tmp_path):
    runner = CliRunner()
    hf = tmp_path / "hf"
    assert runner.invoke(convert_cli, ["ms2hf", str(tree / "ms"), str(hf), "--quiet"]).exit_code == 0
    weights = next(hf.glob("*.safetensors"))
    flip(weights, weights.stat().st_size - 100)
    for extra in ([], ["--dtype", "float32"]):  # copied file to file, and read into memory
        line = runner.invoke(convert_cli, ["hf2ms", str(hf), str(tmp_path / "ms"), *extra]).stderr.strip()
        assert "sha256" in line and "corrupt" in line, line
        assert not (tmp_path / "ms").exists()
    ok = runner.invoke(convert_cli, ["hf2ms", str(hf), str(tmp_path / "ms"), "--no-crc-check", "--quiet"])
    assert ok.exit_code == 0, ok.output
