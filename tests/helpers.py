"""What several test files share: a checkpoint's tensors read whole, the MindSpore layouts, the optional extras, and
strace's fault injection (a real process stopped, or failed, at an exact system call).

The backends the toolkit is built on (MindSpore, torch, transformers, sentencepiece, pyyaml) are imported plainly:
when one is missing or broken the suite fails. Only the genuinely optional extras (`optional`) skip their tests,
and the summary names them (conftest.py)."""
import os
import shutil
import subprocess

import numpy as np
import pytest

from converters.checkpoint import open_checkpoint
from glm2_core.names import Layout

LAYOUTS = [Layout("mindformers"), Layout("mindformers-legacy"), Layout("mindformers", qkv_split=True),
           Layout("mindformers", mlp_split=True), Layout("mindformers", rearrange_rope=True),
           Layout("mindformers", True, True, True)]
OPTIONAL = {"peft": "validation", "safetensors": "validation", "safetensors.torch": "validation",
            "jieba": "metrics", "rouge_chinese": "metrics", "nltk": "metrics"}  # module → the extra that has it
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
