"""Faults of a user's day around a conversion: a process killed at any point, two processes writing one output.
No half-written output is ever taken for a whole one, and what a killed run left is cleaned up by the next."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tree_digest
from helpers import needs_strace, spread, traced

from converters.output import staged_folder
from converters.synth import synthesize
from glm2_core.config import GLM2Config

CONVERT = [str(Path(sys.executable).parent / "glm2-convert")]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """One layer at the 6B widths (1.5 GB in float16, with the embedding and output layer): a conversion that takes
    long enough to be killed inside."""
    out = tmp_path_factory.mktemp("wide") / "hf"
    synthesize(out, GLM2Config.preset("6b", num_layers=1), "float16", "safetensors")
    return out


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def verify(a: Path, b: Path) -> None:
    result = subprocess.run([*CONVERT, "verify", str(a), str(b)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


CONVERSION_CALLS = "mkdir,write,copy_file_range,fsync,rename"  # what a conversion does to its output
CALL = re.compile(r"^(\d+)\s+(\w+)\(")  # strace pads the pid to a width


def conversion_events(src: Path, dst: Path, log: Path) -> list[tuple[str, str, int]]:
    """The writing thread's system calls from making the staging folder to renaming it into place, as
    ("hf2ms", call, n): the n-th such call of that thread since it began, as strace's `when` counts."""
    done = traced([*CONVERT, "hf2ms", src, dst, "--quiet"], CONVERSION_CALLS, log=log)
    assert done.returncode == 0, done.stderr
    seen, events, writer = {}, [], None
    for line in log.read_text().splitlines():
        m = CALL.match(line)
        if m and writer is None and m[2] == "mkdir" and f".{dst.name}.partial-" in line:
            writer = m[1]
        if not m or m[1] != (writer or m[1]):
            continue
        seen[m[2]] = seen.get(m[2], 0) + 1
        if writer is not None:
            events.append(("hf2ms", m[2], seen[m[2]]))
            if m[2] == "rename" and f'"{dst}"' in line:
                break
    log.unlink()
    return events


@needs_strace
def test_a_conversion_killed_at_any_system_call_leaves_nothing_taken_for_whole(hf_tiny, tmp_path):
    """SIGKILL at system calls of the write (the staging folder made, its files written, flushed, the rename):
    never an output at DST; the next run cleans up what the killed one left and writes the same output."""
    src, ref = hf_tiny("safetensors", "float32"), tmp_path / "ref"
    events = conversion_events(src, ref, tmp_path / "hf2ms.strace")
    want = {n: d for n, d in tree_digest(ref).items() if n != "manifest.json"}
    points = spread(events, events[:: max(len(events) // 6, 1)] + events[-1:])
    for _, call, n in points:
        dst = tmp_path / f"{call}-{n}"
        killed = traced([*CONVERT, "hf2ms", src, dst, "--quiet"], CONVERSION_CALLS, f"{call}:signal=KILL:when={n}")
        assert killed.returncode != 0 and not dst.exists(), (call, n)
        again = subprocess.run([*CONVERT, "hf2ms", str(src), str(dst), "--quiet"], capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr
        assert leftovers(tmp_path, dst.name) == [], (call, n)
        assert {k: d for k, d in tree_digest(dst).items() if k != "manifest.json"} == want, (call, n)
        shutil.rmtree(dst)
    print(f"hf2ms: {len(points)} of the {len(events)} system calls of a conversion's write killed; none left an "
          f"output, each rerun cleaned up and wrote the same files")


@pytest.mark.heavy  # three 1.5 GB conversions killed, then finished
def test_a_killed_conversion_is_never_taken_for_a_whole_one(wide, tmp_path):
    dst = tmp_path / "ms"
    outcomes = []
    for delay in (0.5, 1.5, 3.0):
        proc = subprocess.Popen([*CONVERT, "hf2ms", str(wide), str(dst), "--quiet"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = dst.exists()
        outcomes.append("finished" if finished else f"killed, left {len(leftovers(tmp_path, 'ms'))}")
        if finished:  # the output appears whole or not at all
            verify(wide, dst)
            shutil.rmtree(dst)
        again = subprocess.run([*CONVERT, "hf2ms", str(wide), str(dst), "--quiet"], capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0, again.stderr
        assert leftovers(tmp_path, "ms") == [], outcomes  # the next run removed what the killed one left
        verify(wide, dst)
        shutil.rmtree(dst)
    assert any(o.startswith("killed, left 1") for o in outcomes), outcomes  # some kills did land mid-write


def test_an_output_moved_aside_by_a_killed_run_is_put_back(hf_tiny, tmp_path):
    """Killed between moving the old output aside and renaming the new one in: the old one comes back."""
    dst = tmp_path / "ms"
    assert subprocess.run([*CONVERT, "hf2ms", str(hf_tiny()), str(dst), "--quiet"]).returncode == 0
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    dst.rename(tmp_path / f".ms.old-{dead.pid}")
    (tmp_path / f".ms.partial-{dead.pid}-abcd1234").mkdir()
    result = subprocess.run([*CONVERT, "hf2ms", str(hf_tiny()), str(dst)], capture_output=True, text=True)
    assert result.returncode == 1 and "already exists" in result.stderr.splitlines()[-1], result.stderr
    assert "put back" in result.stderr and "removed" in result.stderr
    assert leftovers(tmp_path, "ms") == [] and (dst / "mindspore_model.ckpt").is_file()
    verify(hf_tiny(), dst)


def test_a_live_writers_staging_is_left_alone(tmp_path):
    live = tmp_path / f".out.partial-{os.getpid()}-abcd1234"
    live.mkdir()
    with staged_folder(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert live.is_dir() and (tmp_path / "out" / "x").is_file()


def test_two_processes_writing_one_output(hf_tiny, tmp_path):
    """Started together, again and again: one wins, the other is refused in one line; no mixed files."""
    for i in range(4):
        dst = tmp_path / f"ms{i}"
        procs = [subprocess.Popen([*CONVERT, "hf2ms", str(hf_tiny()), str(dst), "--quiet"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        assert sorted(code for code, _ in results) == [0, 1], results
        refused = next(err for code, err in results if code == 1).strip().splitlines()
        assert len(refused) == 1 and ("already exists" in refused[0] or "appeared while" in refused[0]), refused
        assert leftovers(tmp_path, f"ms{i}") == []
        verify(hf_tiny(), dst)
