"""Which folders a tool may write, and which it may replace: the rules every glm2-* output follows.

- An output never is, contains or lies inside one of the tool's inputs (symlinks resolved): replacing DST must
  not be able to delete a source.
- An existing output is refused unless `--overwrite` is given, and even then only a folder this toolkit wrote is
  replaced: it holds our `manifest.json` and nothing that manifest does not list (a user's notes.txt beside our
  files stops the replacement). An empty folder may be replaced too.
- These checks run before the first byte is written.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from . import PACKAGE
from .errors import UserError, listed
from .jsonio import write_json

MANIFEST = "manifest.json"
TOOL = PACKAGE  # the "tool" our manifest.json files name
MODEL = "model"  # the kind of a model folder (a manifest without a kind is one: the converters' first manifests)
MAX_MANIFEST = 64 << 20


def absolute(path) -> Path:
    """`path` made absolute without resolving symlinks ('.' and '..' folded), so that `.` has a name."""
    return Path(os.path.abspath(os.fspath(path)))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def refuse_overlap(dst, sources: Iterable, what: str = "the output") -> None:
    """Refuse `dst` when it is, contains or lies inside any of `sources` (compared with symlinks resolved, and
    also as written)."""
    dst = absolute(dst)
    targets = {dst, dst.resolve()}
    for src in sources:
        if src is None:
            continue
        src = absolute(src)
        for s in {src, src.resolve()}:
            for d in targets:
                if _within(d, s) or _within(s, d):
                    relation = "is" if d == s else "lies inside" if _within(d, s) else "contains"
                    raise UserError(f"{dst}: {what} {relation} the input {src}; choose a folder apart from the "
                                    f"inputs")


def our_manifest(folder: Path) -> dict | None:
    """`folder`'s manifest.json when this toolkit wrote it (None otherwise)."""
    path = Path(folder) / MANIFEST
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MANIFEST:
            return None
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) and doc.get("tool") == TOOL else None


def written_entries(folder: Path) -> set[str] | None:
    """The names this toolkit wrote into `folder`, as its manifest lists them (None: no manifest of ours)."""
    return _written(our_manifest(folder))


def _written(doc: dict | None) -> set[str] | None:
    names = None if doc is None else doc.get("written")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return set(names) | {MANIFEST}


def check_output(dst, overwrite: bool, sources: Iterable = (), what: str = "the output",
                 kind: str | None = None, ours_file: Callable[[Path], bool] | None = None) -> Path:
    """The checks on an output path before anything is written; returns it absolute. A missing parent folder is
    refused (nothing is created on the way); with a `kind`, --overwrite replaces only a folder of that kind (a
    report never replaces a model); an output that is one file replaces only a file `ours_file` recognises."""
    dst = absolute(dst)
    refuse_overlap(dst, sources, what)
    if not dst.parent.is_dir():
        raise UserError(f"{dst}: the folder {dst.parent} does not exist")
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise UserError(f"{dst}: cannot write in {dst.parent} (permission denied)")
    if not (dst.exists() or dst.is_symlink()):
        return dst
    if not overwrite:
        raise UserError(f"{dst}: already exists (pass --overwrite to replace it)")
    if _within(absolute(Path.cwd()), dst):
        raise UserError(f"{dst}: is or holds the current folder; replacing it would leave this shell in a deleted "
                        f"folder: run from outside it")
    if ours_file is not None and dst.is_file() and not dst.is_symlink() and ours_file(dst):
        return dst
    if dst.is_symlink() or not dst.is_dir() or ours_file is not None:
        thing = "file" if ours_file is not None else "folder"
        raise UserError(f"{dst}: exists and is not a {thing} this toolkit wrote; --overwrite replaces only those "
                        f"(remove it yourself, or choose another path)")
    try:
        present = {p.name for p in dst.iterdir()}
    except OSError as exc:
        raise UserError(f"{dst}: cannot list it ({exc.strerror or exc})") from None
    if not present:
        return dst
    doc = our_manifest(dst)
    ours = _written(doc)
    foreign = sorted(present - ours) if ours is not None else sorted(present)
    if foreign:
        why = "not listed in its manifest.json" if ours is not None else "no manifest.json of this toolkit"
        raise UserError(f"{dst}: --overwrite replaces only a folder this toolkit wrote, and this one holds "
                        f"{listed(foreign)} ({why}); remove it yourself, or choose another path")
    found = doc.get("kind", MODEL)
    if kind is not None and found != kind:
        raise UserError(f"{dst}: holds a {found} this toolkit wrote, not a {kind}: --overwrite replaces only a "
                        f"folder of what it writes; remove it yourself, or choose another path")
    return dst


def stamp(folder, kind: str, **extra) -> None:
    """Mark `folder` as this toolkit's output: manifest.json listing every entry now in it (written last)."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    write_json(folder / MANIFEST, {"tool": TOOL, "kind": kind, **extra, "written": names})
