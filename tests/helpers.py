"""What several test files share: a checkpoint's tensors read whole, the MindSpore layouts, the optional extras, and
strace's fault injection (a real process stopped, or failed, at an exact system call).

The backends the toolkit is built on (MindSpore, torch, transformers, sentencepiece, pyyaml) are imported plainly:
when one is missing or broken the suite fails. Only the genuinely optional extras (`optional`) skip their tests,
and the summary names them (conftest.py)."""
import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from converters.checkpoint import open_checkpoint
from glm2_core.names import Layout

LAYOUTS = [Layout("mindformers"), Layout("mindformers-legacy"), Layout("mindformers", qkv_split=True),
           Layout("mindformers", mlp_split=True), Layout("mindformers", rearrange_rope=True),
           Layout("mindformers", True, True, True)]
# module → the extra that has it
OPTIONAL = {"peft": "validation", "safetensors": "validation", "safetensors.torch": "validation",
            "safetensors.numpy": "validation",
            "jieba": "metrics", "rouge_chinese": "metrics", "nltk": "metrics", "llama_cpp": "llama"}
MISSING: set[str] = set()  # the optional modules this run lacked (conftest's summary lists them)


def tensors(path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as c:
        return {n: t.read() for n, t in c.tensors.items()}


def tensor_bytes(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor's dtype, shape and bytes: what a bit-exact comparison needs."""
    with open_checkpoint(path) as c:
        return {n: (t.dtype, t.shape, t.read().tobytes()) for n, t in c.tensors.items()}


def optional(module: str):
    """An optional extra's module; without it the calling test (or module) is skipped, and the summary says so."""
    try:
        return pytest.importorskip(module, reason=f"the optional extra [{OPTIONAL[module]}] is not installed")
    except pytest.skip.Exception:
        MISSING.add(f"{module} [{OPTIONAL[module]}]")
        raise


STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(not STRACE, reason="strace is not installed: it stops a run at an exact system "
                                                     "call")


def traced(cmd: list, calls: str, inject: str | None = None, paths=(), log=None) -> subprocess.CompletedProcess:
    """`cmd` under strace, seeing the system `calls` (on `paths` only, when given); `inject`: strace's -e inject=
    value (`write:signal=KILL:when=3`: killed at its third write), counted per thread."""
    watch = [x for p in paths for x in ("-P", str(p))]
    extra = ["-e", f"inject={inject}"] if inject else []
    return subprocess.run([STRACE, "-f", "-qq", "-o", str(log or os.devnull), *watch, "-e", f"trace={calls}", *extra,
                           *map(str, cmd)], capture_output=True, text=True, timeout=300)


def spread(events: list, sample: list) -> list:
    """The points a kill test tries: its `sample`; with GLM2_KILL_POINTS=N, every event that is not a write and
    writes spread evenly over the rest, N in all."""
    wanted = int(os.environ.get("GLM2_KILL_POINTS", 0))
    if not wanted:
        return [e for e in sample if e in events]
    writes = [e for e in events if e[1] == "write"]
    room = max(wanted - (len(events) - len(writes)), 1)
    kept = set(writes[::-(-len(writes) // room)])
    return [e for e in events if e[1] != "write" or e in kept]


def glm4_ranks(path, words=("你好",), size=151329):
    """A ranks file of GLM-4's size: the 256 bytes in the GPT-2 byte order GLM-4 keeps ("\\n" at 198), each of
    `words` reached by merging its prefixes, with "你好" at its published rank 109377; the rest fillers."""
    first = [*range(33, 127), *range(161, 173), *range(174, 256)]
    tokens = [bytes([b]) for b in first + [b for b in range(256) if b not in first]]
    merges = [w.encode()[:i] for w in words for i in range(2, len(w.encode()) + 1)]
    fillers = iter(f"<filler {i}>".encode() for i in range(size))
    while len(tokens) < 109377 - len(merges) + 1:
        tokens.append(next(fillers))
    tokens += merges
    while len(tokens) < size:
        tokens.append(next(fillers))
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


@contextmanager
def serving(model, *args):
    """A glm2-serve process on a free port of 127.0.0.1: yields (process, base URL) once it says it is ready; its
    stderr is read all along into `process.lines`. At the end SIGTERM, and its exit status must be 0."""
    tool = Path(sys.executable).parent / "glm2-serve"
    proc = subprocess.Popen([tool, model, "--port", "0", *map(str, args)], stderr=subprocess.PIPE, text=True)
    proc.lines, ready = [], threading.Event()

    def drain():
        for line in proc.stderr:
            proc.lines.append(line)
            if "ready at " in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        ready.wait(300)
        url = next((m.group(1) for m in map(re.compile(r"ready at (http://\S+)").search, proc.lines) if m), None)
        assert url, "glm2-serve ended before it was ready:\n" + "".join(proc.lines)[-3000:]
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(proc.lines)[-3000:]
