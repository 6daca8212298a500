"""The packages import each other without cycles: every import of a project module, at the top of a file or inside a
function, is an edge, and the graph of the four packages' modules has no loop. (A loop hides who depends on whom
from readers and tools, and works only while the function-local imports stay where they are.)"""
import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from glm2_core import files
from glm2_core.outputs import MANIFEST

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("glm2_core", "converters", "glm2_ms", "validation")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (a name imported from a package counts as its module when it is one)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imported(p, modules) for p in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_packages_import_each_other_without_cycles():
    edges = graph()
    assert len(edges) > 60 and sum(map(len, edges.values())) > 200  # the graph was read
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_packages_are_layered():
    """glm2_core imports no other package; converters only glm2_core; glm2_ms not validation."""
    below = {"glm2_core": set(), "converters": {"glm2_core"}, "glm2_ms": {"glm2_core", "converters"},
             "validation": {"glm2_core", "converters", "glm2_ms"}}
    for module, targets in graph().items():
        package = module.split(".")[0]
        assert {t.split(".")[0] for t in targets} <= below[package] | {package}, (module, targets)


FILE_OWNERS = {"glm2_core/files.py", "glm2_core/outputs.py"}  # the file names of model and run folders; manifest.json
NAME_OWNER = "glm2_core/names.py"  # every layout's weight names
WEIGHT_PREFIXES = ("transformer.", "model.layers", "model.embed_tokens", "model.norm", "lm_head.", "decoder.",
                   "embedding.word_embeddings", "output_layer.", "blk.", "token_embd.")


def _file_names() -> set[str]:
    names = {MANIFEST, *files.INDEX_FILES}
    for key, value in vars(files).items():
        if not key.startswith("_"):
            items = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else [value]
            names |= {v for v in items if isinstance(v, str)}
    return {n for n in names if isinstance(n, str) and "." in n}


def _literals(path: Path):
    """(line, value) of every string constant of a file that is not a docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_file_names_and_weight_names_are_typed_by_their_owners_only():
    """A file name of a model or run folder is a string only in glm2_core/files.py (manifest.json in outputs.py); a
    weight name or prefix only in glm2_core/names.py. Messages may say them; a constant that is one is refused."""
    names, found = _file_names(), []
    assert {"config.json", "tokenizer.model", "train_log.jsonl", "model.safetensors", "manifest.json"} <= names
    for path in (p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        where = str(path.relative_to(ROOT))
        for line, value in _literals(path):
            if value in names and where not in FILE_OWNERS:
                found.append(f"{where}:{line}: {value!r}")
            if value.startswith(WEIGHT_PREFIXES) and where != NAME_OWNER:
                found.append(f"{where}:{line}: {value!r}")
    assert not found, found


UNIT = r"(?:ms|s|min|minutes?|h|hours?|[KMGT]i?B|tok/s|tokens/s|it/s|[KMG]B/s|x|×|%)"
FIGURE = rf"\d[\d,]*(?:\.\d+)?\s?{UNIT}(?![\w/])"
MEASURED = re.compile("|".join([
    rf"[~≈]\s?{FIGURE}",  # approximate: read off a run
    rf"\b(?:took|takes|cost|costs|measured|peaked)\b[^.;]{{0,40}}?{FIGURE}",
    rf"\+{FIGURE}",  # a difference seen
    rf"{FIGURE}\s+(?:instead of|against|vs\.?)\s+\d",
    r"\d+(?:\.\d+)?\s?[x×]\s+(?:faster|slower|the time|less|more)\b",
]))


def _prose(path: Path):
    """(line, text) of every comment and docstring of a file."""
    text = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                ast.get_docstring(node, clean=False):
            yield node.body[0].lineno, " ".join(ast.get_docstring(node, clean=False).split())


def test_measured_figures_live_in_the_results_not_in_the_code():
    """A comment or docstring states a decision and points at the benchmark or results file that shows it; the
    figure itself (read off one run, stale with the next machine or change) lives in benchmarks/results/."""
    sources = [p for pkg in (*PACKAGES, "tests") for p in (ROOT / pkg).rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}:{line}: {m.group(0)!r}" for p in sources for line, text in _prose(p)
             for m in MEASURED.finditer(text)]
    assert len(sources) > 90 and not found, found


@pytest.mark.parametrize("text, measured", [
    ("a 6B index is ~20 KB", True), ("it took 21 s and 2 GB", True), ("costs a conversion ~5 s per 12.5 GB", True),
    ("+2.45 GB after a 1.88 GB model", True), ("8.1 s instead of 10.6 s", True), ("~4x zlib's", True),
    ("float16 matmuls are 13x slower than float32 ones", True), ("+636 MB against +128 MB", True),
    ("MindSpore cuts tensors over 512 MiB", False), ('max_shard_size "2GB"', False), ("30 s by default", False),
    ("1.5 GB in float16", False), ("x^(2^k): x^1, x^2", False)])
def test_the_figure_finder_tells_a_measurement_from_a_fact(text, measured):
    assert bool(MEASURED.search(text)) == measured
