"""The bad-input contract under mutation fuzzing (fuzzer.py): a short seeded session, and every kept input."""
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from converters.cli import main

FUZZER = Path(__file__).with_name("fuzzer.py")
SESSION_SECONDS = 25


def _run(*args, timeout):
    proc = subprocess.run([sys.executable, str(FUZZER), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parent)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.heavy  # SESSION_SECONDS of fuzzing
def test_mutation_fuzzing_holds_the_contract():
    """Every reader and file kind, round-robin, for SESSION_SECONDS; the counts are printed (pytest -s)."""
    code, out = _run("--seconds", str(SESSION_SECONDS), "--seed", "0", timeout=SESSION_SECONDS + 180)
    print(out)
    assert code == 0, out[-3000:]
    assert "0 violations" in out.splitlines()[-1]


def test_every_input_that_ever_failed_still_holds_the_contract():
    code, out = _run("--corpus", timeout=300)
    assert code == 0, out[-3000:]


def test_a_huge_safetensors_header_is_refused_at_once(tmp_path):
    """A 100 MB header of 1.4 M entries is refused before it is parsed (anything over 16 MiB is)."""
    path = tmp_path / "model.safetensors"
    n = 17 << 20
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{" + b" " * (n - 2) + b"}")
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and "larger than" in result.output and str(path) in result.output
    assert time.perf_counter() - started < 2


def test_the_fuzzers_memory_bound_is_real():
    """An allocation beyond the limit the fuzzer sets fails in that process (so unbounded ones are caught)."""
    limit = 2 << 30
    code = (f"import sys; sys.path.insert(0, {str(FUZZER.parent)!r}); import fuzzer; fuzzer.limit_memory({limit}); "
            f"import numpy as np; np.ones({2 * limit}, np.uint8)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "MemoryError" in proc.stderr
