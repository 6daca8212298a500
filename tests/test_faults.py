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
from helpers import STRACE, needs_strace, spread, traced

from converters import output
from converters.output import staged_folder
from converters.synth import synthesize
from glm2_core.config import GLM2Config
from glm2_core.errors import UserError
from glm2_core.outputs import MODEL, stamp

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


CONVERSION_CALLS = "mkdir,write,copy_file_range,fsync,rename,renameat2"  # what a conversion does to its output
RENAMES = ("rename", "renameat2")
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
            if m[2] in RENAMES and f'"{dst}"' in line:
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


def _foreign(dst: Path, kind: str) -> dict[str, bytes]:
    """What a user (or another program) puts at DST: an empty folder, a folder holding a file, or a file; returns
    its contents, to check that they are left as they are."""
    if kind == "file":
        dst.write_bytes(b"a user's file\n")
        return {"": b"a user's file\n"}
    dst.mkdir()
    if kind == "empty folder":
        return {}
    (dst / "notes.txt").write_bytes(b"a user's notes\n")
    return {"notes.txt": b"a user's notes\n"}


def _contents(dst: Path) -> dict[str, bytes]:
    if dst.is_file():
        return {"": dst.read_bytes()}
    return {p.name: p.read_bytes() for p in dst.iterdir()}


def _taken_meanwhile(src: Path, dst: Path, tmp_path: Path, overwrite: bool, meanwhile) -> subprocess.CompletedProcess:
    """hf2ms SRC DST held for two seconds after its last look at DST (a stat of that path) before it renames
    anything onto or from it; `meanwhile()` runs in that hold. A probe run of the same command finds that look."""
    args = [*CONVERT, "hf2ms", src, dst, "--quiet", *(["--overwrite"] if overwrite else [])]
    log = tmp_path / "looks.strace"
    assert traced(args, "%%stat,rename,renameat2", paths=[dst], log=log).returncode == 0
    calls = [m[2] for m in map(CALL.match, log.read_text().splitlines()) if m]
    looks = calls[:next(i for i, c in enumerate(calls) if c in RENAMES)]
    call, n = looks[-1], looks.count(looks[-1])
    log.unlink()
    if not overwrite:
        shutil.rmtree(dst)
    cmd = [STRACE, "-f", "-qq", "-o", str(log), "-P", str(dst), "-e", f"trace={call}", "-e",
           f"inject={call}:delay_exit=2000000:when={n}", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # strace writes a call's line before it holds the call
    while (not log.exists() or len(log.read_text().splitlines()) < n) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    meanwhile()
    out, err = proc.communicate(timeout=300)
    log.unlink()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@needs_strace
@pytest.mark.parametrize("kind", ["empty folder", "folder with a file", "file"])
def test_what_takes_the_output_name_while_a_run_writes_is_left_as_it_is(hf_tiny, tmp_path, kind):
    """A folder or file made at DST after the run last looked at it, just before it renames its output into place,
    is never replaced (a plain rename replaces an empty folder, or a file, without a word; a second look would
    leave a moment too): the run is refused in one line and leaves nothing."""
    dst, made = tmp_path / "ms", {}
    done = _taken_meanwhile(hf_tiny(), dst, tmp_path, False, lambda: made.update(_foreign(dst, kind)))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "appeared while" in lines[0], done.stderr
    assert _contents(dst) == made and leftovers(tmp_path, "ms") == []


@needs_strace
def test_overwrite_replaces_only_what_it_checked_even_when_it_changed_during_the_run(hf_tiny, tmp_path):
    """--overwrite over our own output, which a user replaces with a folder of theirs while the run writes: what
    comes out of DST when the new output goes in is checked again, and the user's folder put back and kept."""
    dst, made = tmp_path / "ms", {}
    assert subprocess.run([*CONVERT, "hf2ms", str(hf_tiny()), str(dst), "--quiet"]).returncode == 0

    def replace_it():
        shutil.rmtree(dst)
        made.update(_foreign(dst, "folder with a file"))

    done = _taken_meanwhile(hf_tiny(), dst, tmp_path, True, replace_it)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "changed while this run" in lines[0], done.stderr
    assert _contents(dst) == made and leftovers(tmp_path, "ms") == []


@pytest.mark.parametrize("where", ["renameat2", "rename"])
@pytest.mark.parametrize("kind", ["empty folder", "folder with a file", "file"])
def test_rename_exclusive_never_replaces(tmp_path, monkeypatch, where, kind):
    """Both ways of taking a name (renameat2's RENAME_NOREPLACE, and the check-then-rename where the file system
    lacks it) refuse whatever is there, and leave both sides as they were; over nothing they rename."""
    if where == "rename":
        monkeypatch.setattr(output, "_RENAMEAT2", None)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_bytes(b"ours")
    made = _foreign(dst, kind)
    with pytest.raises(FileExistsError):
        output.rename_exclusive(src, dst)
    assert _contents(dst) == made and _contents(src) == {"a": b"ours"}
    output.rename_exclusive(src, tmp_path / "free")
    assert not src.exists() and _contents(tmp_path / "free") == {"a": b"ours"}


@pytest.mark.parametrize("where", ["renameat2", "rename"])
def test_overwrite_replaces_our_folder_and_refuses_another_by_either_rename(tmp_path, monkeypatch, where):
    """--overwrite's two ways (swapped in one step, or moved aside where the file system cannot swap): our own
    output is replaced and nothing is left beside it; a folder with a file of the user's is refused and kept."""
    if where == "rename":
        monkeypatch.setattr(output, "_RENAMEAT2", None)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.bin").write_bytes(b"old")
    stamp(dst, MODEL)
    with staged_folder(dst, overwrite=True, kind=MODEL) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    assert _contents(dst) == {"new.bin": b"new"} and leftovers(tmp_path, "out") == []
    (dst / "notes.txt").write_bytes(b"a user's notes\n")
    with pytest.raises(UserError, match="this toolkit wrote"), staged_folder(dst, overwrite=True, kind=MODEL) as tmp:
        (tmp / "newer.bin").write_bytes(b"newer")
    assert _contents(dst) == {"new.bin": b"new", "notes.txt": b"a user's notes\n"}
    assert leftovers(tmp_path, "out") == []
