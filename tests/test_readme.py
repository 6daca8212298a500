"""Every ```python snippet in README.md runs as written, on a tiny converted checkpoint in place of the folder the
README's commands make ("ms-6b")."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from converters.convert import convert
from glm2_core.names import Layout

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
PLACEHOLDER = '"ms-6b"'


def test_the_readme_has_python_snippets():
    assert SNIPPETS and all(PLACEHOLDER in s for s in SNIPPETS)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(snippet, hf_tiny, tmp_path):
    model = tmp_path / "ms"
    convert(hf_tiny(dtype="float32"), model, target=Layout("mindformers"), fmt="ckpt", progress=False)
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", snippet.replace(PLACEHOLDER, repr(str(model)))], cwd=work,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(work.iterdir())
