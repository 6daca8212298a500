"""Faults of the machine under a conversion or an evaluation: the disk too small for the output (refused before a
byte is written), the disk filling during the write (another process took the space), and a source file cut or
rewritten while it is read. Each ends in one line `error: …`, exit status 1, nothing left of the output and the
source as it was.

The small disks are tmpfs mounts, which need root: without it those tests are skipped, saying so. A write is
caught mid-way deterministically: the run is stopped (SIGSTOP) once its staging folder holds the bytes wanted, the
disk is filled or the source changed, and the run continued."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, tree_digest
from helpers import tensors
from strategy_fixtures import glm2_maps, layout_entry, write_pb

from validation.eval_cli import main as eval_cli
from validation.evaluate import whole_lines

BIN = Path(sys.executable).parent
TOOLS = {  # a command writing {dst} from the sources in the work folder
    "hf2ms": ["glm2-convert", "hf2ms", "{work}/hf", "{dst}"],
    "ms2hf": ["glm2-convert", "ms2hf", "{work}/ms", "{dst}"],
    "merge": ["glm2-merge-shards", "{work}/shards", "{dst}", "--strategy", "{work}/strategy.ckpt"],
    "split": ["glm2-merge-shards", "split", "{work}/ms/mindspore_model.ckpt", "{dst}", "--strategy",
              "{work}/strategy.ckpt"],
}
NUMBER = r"([\d,.]+) (GB|MB|kB|bytes)"
UNITS = {"GB": 1e9, "MB": 1e6, "kB": 1e3, "bytes": 1}


def command(tool: str, work: Path, dst: Path) -> list[str]:
    program, *args = TOOLS[tool]
    return [str(BIN / program), *(a.format(work=work, dst=dst) for a in args), "--quiet"]


def one_line(stderr: str, start: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), stderr
    return lines[0]


def amount(number: str, unit: str) -> float:
    return float(number.replace(",", "")) * UNITS[unit]


def close(said: float, real: int) -> bool:
    """A size as the message rounds it (glm2_core.errors.sized: 3 digits at least)."""
    return abs(said - real) <= 0.006 * real + 1


def free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def files_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def work(hf_tiny, ms_tiny, tmp_path_factory):
    """The sources of every tool (a HF folder, its MindSpore conversion, a 2-way strategy and the rank shards it
    cuts), and the bytes each tool's whole output holds."""
    root = tmp_path_factory.mktemp("sources")
    shutil.copytree(hf_tiny(), root / "hf")
    shutil.copytree(ms_tiny(), root / "ms")
    names = list(tensors(root / "ms" / "mindspore_model.ckpt"))
    write_pb(root / "strategy.ckpt", {n: layout_entry((1, 2), m) for n, m in glm2_maps(names).items()})
    sizes = {}
    for tool in ("split", "hf2ms", "ms2hf", "merge"):  # split first: merge reads what it wrote
        dst = root / ("shards" if tool == "split" else f"out-{tool}")
        done = subprocess.run(command(tool, root, dst), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        sizes[tool] = files_size(dst)
        if tool != "split":
            shutil.rmtree(dst)
    return root, sizes


def stopped_at(proc: subprocess.Popen, held, at_least: int, timeout: float = 60) -> int:
    """Stop `proc` once `held()` (the bytes it has written so far, -1 before it began) reaches `at_least`;
    returns `held()` then."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            if held() < at_least:
                continue
        except FileNotFoundError:  # a file or the folder went between the listing and the stat
            continue
        proc.send_signal(signal.SIGSTOP)
        while not all(Path(f"/proc/{proc.pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
                      for t in os.listdir(f"/proc/{proc.pid}/task")):
            time.sleep(0.001)  # the signal is asynchronous: a thread may still be writing
        return held()
    raise AssertionError(f"the run ended (or took {timeout} s) before it had written {at_least} bytes")


def staged_bytes(folder: Path):
    """What a run's staging folder in `folder` holds (-1 while there is none)."""
    def held() -> int:
        partial = next((p for p in folder.iterdir() if ".partial-" in p.name), None)
        return -1 if partial is None else files_size(partial)
    return held


def filled_while_stopped(cmd: list[str], held, at_least: int, disk: Path, timeout: float = 60) -> tuple[int, str]:
    """Run `cmd`, stop it once `held()` reaches `at_least`, fill `disk`, let it go on; (held then, its stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        at = stopped_at(proc, held, at_least, timeout)
        fill(disk)
    finally:
        proc.send_signal(signal.SIGCONT)
        stderr = proc.communicate(timeout=max(timeout, 120))[1]
    assert proc.returncode == 1, stderr
    return at, stderr


def fill(folder: Path) -> None:
    """Take every free byte of `folder`'s file system, as another process writing there would."""
    fd = os.open(folder / "filler", os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, free(folder))
    finally:
        os.close(fd)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_disk_too_small_is_refused_before_writing(work, small_disk, tool):
    root, sizes = work
    before = tree_digest(root)
    mnt = small_disk(sizes[tool] // 2)
    room = free(mnt)
    done = subprocess.run(command(tool, root, mnt / "out"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    line = one_line(done.stderr, f"{mnt}: not enough free space: ")
    (need, u1), (have, u2) = re.findall(NUMBER, line)
    assert 0.95 * sizes[tool] <= amount(need, u1) <= sizes[tool] and close(amount(have, u2), room), (line, sizes)
    assert list(mnt.iterdir()) == [] and tree_digest(root) == before


@pytest.mark.parametrize("point", [0.0, 0.4], ids=["first-byte", "40%"])
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_disk_that_fills_during_the_write(work, small_disk, tool, point):
    """The space is there when the run begins; another process takes it once the run has written `point` of its
    output. The run stops where the disk filled, says how far it got, and removes what it wrote."""
    root, sizes = work
    before = tree_digest(root)
    mnt = small_disk(2 * sizes[tool])
    room = free(mnt)
    held, stderr = filled_while_stopped(command(tool, root, mnt / "out"), staged_bytes(mnt), int(point * sizes[tool]),
                                        mnt)
    assert held < sizes[tool]  # stopped inside the write
    line = one_line(stderr, f"{mnt / 'out'}: no space left on device after writing ")
    (wrote, u1), (need, u2), (had, u3) = re.findall(NUMBER, line)
    assert held <= amount(wrote, u1) + 1e5 and amount(wrote, u1) <= sizes[tool], (line, held)
    assert 0.95 * sizes[tool] <= amount(need, u2) <= sizes[tool] and close(amount(had, u3), room), (line, sizes)
    assert line.endswith(f"were free in {mnt} when it began; nothing was written"), line
    assert [p.name for p in mnt.iterdir()] == ["filler"] and tree_digest(root) == before


def rewrite(path: Path) -> None:
    """`path` written again in place, same size and inode, with other values in its middle third."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 3)
        data = f.read(size // 3)
        f.seek(size // 3)
        f.write(bytes(b ^ 0x55 for b in data))


CHANGES = {  # how a source file is changed while it is read, and what the one line says
    "cut": (lambda path: os.truncate(path, path.stat().st_size // 2), "cut from "),
    "rewritten": (rewrite, "rewritten while this run read it"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("tool", ["hf2ms", "ms2hf"])
def test_a_source_changed_while_it_is_read_is_refused(hf_tiny, ms_tiny, tmp_path, tool, change):
    """A HF safetensors folder as the hub has it (no checksum of ours to catch a change) and a .ckpt; one of its
    files is changed once the conversion has begun. Without the check, the rewritten safetensors would convert
    into a model that mixes two checkpoints' tensors and succeed."""
    src = tmp_path / "src" / "model"
    shutil.copytree(hf_tiny("safetensors") if tool == "hf2ms" else ms_tiny(), src)
    (src / "manifest.json").unlink()
    victim = max((p for p in src.iterdir() if p.suffix in (".safetensors", ".ckpt")), key=lambda p: p.stat().st_size)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([str(BIN / "glm2-convert"), tool, str(src), str(out / "dst"), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        stopped_at(proc, staged_bytes(out), 0)
        assert not (out / "dst").exists()
        size = victim.stat().st_size
        CHANGES[change][0](victim)
    finally:
        proc.send_signal(signal.SIGCONT)
        stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, stderr
    line = one_line(stderr, f"{victim}: {CHANGES[change][1]}")
    if change == "cut":
        assert f"cut from {size:,} to {size // 2:,} bytes while this run read it" in line, line
    assert line.endswith("nothing was written (convert it once it is complete)"), line
    assert list(out.iterdir()) == []


# ---- glm2-eval --out: its predictions grow after the folder is made, so a full disk keeps the whole lines
EVAL = ["--data", str(DATA / "adgen_dev.json"), "--batch-size", "1", "--quiet"]


def run_eval(model: Path, out: Path, *extra: str):
    return CliRunner().invoke(eval_cli, [str(model), *EVAL, "--out", str(out), *extra])


def test_eval_refuses_a_disk_too_small_for_its_predictions(ms_tiny, small_disk):
    mnt = small_disk(16 << 10)
    result = run_eval(ms_tiny(), mnt / "eval", "--max-samples", "4", "--max-new-tokens", "256")
    assert result.exit_code == 1
    line = one_line(result.stderr, f"{mnt}: not enough free space: the output needs ")
    (need, u1), (have, u2) = re.findall(NUMBER, line)
    assert amount(need, u1) > 4 * 32 * 256 and close(amount(have, u2), 16 << 10), line
    assert list(mnt.iterdir()) == []


def test_eval_on_a_disk_that_fills_keeps_whole_predictions_and_resumes(ms_tiny, small_disk):
    """The disk fills once --out is made, before the first prediction is written: the folder is kept, as a run
    interrupted there would leave it, and --resume continues it once there is room."""
    mnt = small_disk(1 << 20)
    room = free(mnt)
    args = ["--max-samples", "2", "--max-new-tokens", "4"]
    predictions = mnt / "eval" / "predictions.jsonl"
    _, stderr = filled_while_stopped([str(BIN / "glm2-eval"), str(ms_tiny()), *EVAL, "--out", str(mnt / "eval"), *args],
                                     lambda: predictions.stat().st_size if predictions.exists() else -1, 0, mnt, 300)
    line = one_line(stderr, f"{mnt / 'eval'}: no space left on device after writing ")
    assert predictions.read_text() == "" and "; the 0 whole predictions written are kept (--resume" in line, line
    (_, _), (need, unit), (had, u2) = re.findall(NUMBER, line)
    assert amount(need, unit) > 2 * 32 * 4 and close(amount(had, u2), room), line
    (mnt / "filler").unlink()  # the user frees space
    again = run_eval(ms_tiny(), mnt / "eval", *args, "--resume")
    assert again.exit_code == 0, again.output
    assert len(predictions.read_text().splitlines()) == 2


def test_a_line_the_disk_stopped_halfway_is_cut(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"a": 1}\n{"b": 2}\n{"c"')
    assert whole_lines(tmp_path / "p.jsonl") == 2 and (tmp_path / "p.jsonl").read_text() == '{"a": 1}\n{"b": 2}\n'
