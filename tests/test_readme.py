"""The user's pages cannot drift from the code: every ```python snippet in README.md and docs/*.md runs as written
(on a tiny converted checkpoint in place of the folder the commands make, "ms-6b"; a client's snippet against
glm2-serve of that checkpoint in place of the server at SERVED), every option their shell
examples give a tool exists, every module and tool they name exists, the CLI reference is what the tools print,
and no page carries a date, a commit hash or an issue number (those belong in benchmarks/results/)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from helpers import serving

from glm2_core import launch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {page: page.read_text(encoding="utf-8") for page in PAGES}
SNIPPETS = [s for text in TEXT.values() for s in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)]
PLACEHOLDER = '"ms-6b"'
SERVED = "http://127.0.0.1:8000"  # a client snippet's server: glm2-serve ms-6b, with its defaults
TOOLS = launch.TOOLS


def test_the_readme_has_python_snippets():
    assert SNIPPETS and all(PLACEHOLDER in s or SERVED in s for s in SNIPPETS)


@pytest.fixture(scope="module")
def served(ms_tiny):
    """glm2-serve of the tiny checkpoint, its folder named as the pages name it."""
    with serving(ms_tiny("float32"), "--name", "ms-6b") as (_, url):
        yield url


@pytest.mark.runtime
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(snippet, ms_tiny, tmp_path, request):
    model = ms_tiny("float32")
    work = tmp_path / "cwd"
    work.mkdir()
    code = snippet.replace(PLACEHOLDER, repr(str(model)))
    if SERVED in snippet:
        code = code.replace(SERVED, request.getfixturevalue("served"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(work.iterdir())


BASH = [b for text in TEXT.values() for b in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)]


def _tool_calls(block: str):
    """(tool, its words) for every glm2-* command in a bash block: continuation lines joined, comments dropped."""
    text = re.sub(r"#[^\n]*", "", block.replace("\\\n", " "))
    for line in re.split(r"\n|&&|;|\|", text):
        words = line.replace("$(which ", "").replace(")", " ").split()
        at = next((i for i, w in enumerate(words) if w.startswith("glm2-")), None)
        if at is not None:
            yield words[at], words[at + 1:]


@pytest.mark.runtime  # loading the tools imports MindSpore and torch
def test_the_readme_commands_use_options_that_exist():
    """Every --option the pages' shell examples give a glm2-* tool is one that tool (or its subcommand) has."""
    tools = {name: launch.command(name) for name in TOOLS}
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


def test_the_readme_is_a_page_a_newcomer_reads():
    assert len(TEXT[README].splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_carries_a_date_a_hash_or_an_issue(page):
    """Dated runs, commits and issues belong in benchmarks/results/; a page may link to such a record (the link's
    target is not read)."""
    text = re.sub(r"\]\([^)]*\)", "]()", TEXT[page])
    found = re.findall(r"20\d\d-\d\d-\d\d|\bissues? \d+|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", text)
    assert not found, found[:3]


def _named_paths(text: str) -> set[str]:
    """The repository paths a page names: `dir/…/file.py` (or .cc, .md) in code spans and links."""
    spans = re.findall(r"`([^`\n]+)`", text) + re.findall(r"\]\(([^)#]+)", text)
    return {m for span in spans for m in re.findall(r"(?:\.\./)?[\w.-]+(?:/[\w.-]+)+\.(?:py|cc|md)", span)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_module_and_tool_a_page_names_exists(page):
    paths = _named_paths(TEXT[page])
    missing = [p for p in paths if not (page.parent / p).exists() and not (ROOT / p).exists()]
    assert not missing, missing
    tools = set(re.findall(r"\bglm2-[a-z-]+[a-z]\b", TEXT[page])) - {"glm2-toolkit"}
    assert tools <= set(TOOLS), tools - set(TOOLS)


@pytest.mark.runtime  # loading the tools imports MindSpore and torch
def test_the_cli_reference_is_what_the_tools_print():
    spec = importlib.util.spec_from_file_location("make_cli_reference", ROOT / "docs" / "make_cli_reference.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert (ROOT / "docs" / "cli-reference.md").read_text(encoding="utf-8") == make.reference(), \
        "docs/cli-reference.md is stale: python docs/make_cli_reference.py > docs/cli-reference.md"
