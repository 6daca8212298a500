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


BASH = re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def _tool_calls(block: str):
    """(tool, its words) for every glm2-* command in a bash block: continuation lines joined, comments dropped."""
    text = re.sub(r"#[^\n]*", "", block.replace("\\\n", " "))
    for line in re.split(r"\n|&&|;|\|", text):
        words = line.replace("$(which ", "").replace(")", " ").split()
        at = next((i for i, w in enumerate(words) if w.startswith("glm2-")), None)
        if at is not None:
            yield words[at], words[at + 1:]


def test_the_readme_commands_use_options_that_exist():
    """Every --option the README's shell examples give a glm2-* tool is one that tool (or its subcommand) has."""
    from importlib.metadata import entry_points

    import click

    tools = {ep.name: ep.load() for ep in entry_points(group="console_scripts") if ep.name.startswith("glm2-")}
    checked = 0
    for block in BASH:
        for tool, words in _tool_calls(block):
            cmd = tools[tool]
            subs = dict(getattr(cmd, "commands", {}), **getattr(cmd, "subcommands", {}))
            if words and words[0] in subs:
                cmd = subs[words[0]]
            known = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
            for word in words:
                if word.startswith("--"):
                    assert word.split("=")[0] in known | {"--help"}, (tool, word)
                    checked += 1
    assert checked > 20
