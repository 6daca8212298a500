"""Where converted tensors go: an output folder that appears only when complete, and weights files that take one
tensor at a time, each hashed as it is written (the manifest's records)."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from glm2_core.errors import CheckpointError, UserError, sized
from glm2_core.outputs import absolute, check_output

from .formats import FORMATS
from .formats.base import FileSpan, byte_blocks
from .formats.checksums import crc32, crc32_combine

PLAN = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) in write order


@contextmanager
def staged_folder(dst: Path, overwrite: bool = False, sources=(), need: int = 0, kind: str | None = None,
                  watched: dict | None = None):
    """Yield a temporary folder beside `dst`; on success it replaces `dst`, on any failure it is removed. The
    output rules (`glm2_core.outputs.check_output`: apart from the `sources`, an existing `dst` replaced only with
    `overwrite`, and only a folder of that `kind` this toolkit wrote) and the free space for the `need` bytes it
    will hold are checked first. `watched`: the `fingerprints` of the files the output is made from, taken when
    they were opened; one that changed since fails the run (whatever else failed: the change is the cause)."""
    dst, free = _before_staging(dst, overwrite, sources, need, kind=kind)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
    except OSError as exc:
        raise CheckpointError(f"{dst}: cannot write in {dst.parent} ({exc.strerror or exc})") from None
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would otherwise become the output's mode
        yield tmp
        changed = _changed(watched or {})
        if changed:
            raise CheckpointError(changed)
        _flush(tmp)
        _into_place(tmp, dst, overwrite, kind=kind)
        _fsync(dst.parent)  # the rename itself lasts
    except BaseException as exc:
        said = _what_failed(exc, watched, dst, tmp, need, free)
        if not isinstance(exc, _Kept):
            shutil.rmtree(tmp, ignore_errors=True)
        if said is None:
            raise
        raise CheckpointError(said) from None


def _before_staging(dst: Path, overwrite: bool, sources, need: int, **rules) -> tuple[Path, int]:
    """What every staged output checks first: the leftovers of killed runs beside it put right, the output rules
    (`rules`: check_output's kind or ours_file), and the free space for `need` bytes; returns (dst, free bytes)."""
    target = absolute(dst)
    if target.parent.is_dir() and os.access(target.parent, os.W_OK | os.X_OK):
        _recover(target)  # first: an output a killed run had moved aside is the one the rules then look at
    dst = check_output(dst, overwrite, sources, **rules)
    free = shutil.disk_usage(dst.parent).free
    if need > free:
        raise CheckpointError(f"{dst.parent}: not enough free space: the output needs {sized(need)}, "
                              f"{sized(free)} are free")
    return dst, free


def _what_failed(exc: BaseException, watched: dict | None, dst: Path, tmp: Path, need: int, free: int) -> str | None:
    """The one line a staged output's failure ends in (None: the exception says it): a source that changed meanwhile
    is the cause whatever else failed; then a full disk or an unreadable or unwritable file."""
    said = _changed(watched or {}) if isinstance(exc, Exception) else None
    if said is None and isinstance(exc, OSError):
        said = _failed(exc, dst, tmp, need, free)
    return said


@contextmanager
def staged_file(dst: Path, overwrite: bool = False, sources=(), need: int = 0, ours=None,
                watched: dict | None = None):
    """Yield the path of an empty temporary file beside `dst`; on success it is flushed to disk and renamed to `dst`
    (replacing it only with `overwrite`, and only a file `ours(path)` says this toolkit wrote); on any failure it is
    removed. The checks and the `watched` sources as for `staged_folder`."""
    dst, free = _before_staging(dst, overwrite, sources, need, ours_file=ours)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent)
    except OSError as exc:
        raise CheckpointError(f"{dst}: cannot write in {dst.parent} ({exc.strerror or exc})") from None
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would otherwise become the output's mode
        os.close(fd)
        yield tmp
        _fsync(tmp)
        changed = _changed(watched or {})
        if changed:
            raise CheckpointError(changed)
        _into_place(tmp, dst, overwrite, ours_file=ours)
        _fsync(dst.parent)
    except BaseException as exc:
        said = _what_failed(exc, watched, dst, tmp, need, free)
        if not isinstance(exc, _Kept):
            tmp.unlink(missing_ok=True)
        if said is None:
            raise
        raise CheckpointError(said) from None


def _into_place(tmp: Path, dst: Path, overwrite: bool, **rules) -> None:
    """The staged folder or file renamed to `dst`: over an existing one only with `overwrite`, and only what the
    output `rules` (check_output's kind or ours_file) let it replace; never over anything that appeared meanwhile
    without it."""
    if overwrite and os.path.lexists(dst):
        _replace(tmp, dst, lambda path: check_output(path, True, **rules))
    else:
        _claim(tmp, dst)


def _claim(tmp: Path, dst: Path) -> None:
    """`tmp` renamed to `dst` unless `dst` exists, in one step; else the one line that says another took it."""
    try:
        rename_exclusive(tmp, dst)
    except FileExistsError:
        raise CheckpointError(f"{dst}: appeared while this run was writing it (another process?); left as it is, "
                              f"nothing was written") from None


def _replace(tmp: Path, dst: Path, check) -> None:
    """--overwrite: `tmp` put at `dst` and what was there removed, only when `check(path)` (which raises UserError)
    passes on it. Where the file system can, the two are swapped in one step and what came out is checked then, so
    that nothing put at `dst` after a check can be removed (a refused one is swapped back). Elsewhere `dst` is
    checked, then moved aside (a kill in between leaves it for the next run to put back)."""
    check(dst)  # the common refusal, before anything moves
    try:
        swapped = exchange(tmp, dst)
    except FileNotFoundError:  # removed since: nothing to replace
        return _claim(tmp, dst)
    if not swapped:
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        _claim(tmp, dst)
        _remove(old)
        return
    try:
        check(tmp)  # what was at `dst` until the swap
    except UserError:
        if not exchange(tmp, dst):
            raise _Kept(f"{dst}: changed while this run was writing it, and could not be put back: it is now "
                        f"{tmp}; move it back before running again (the next run would remove it)") from None
        raise CheckpointError(f"{dst}: changed while this run was writing it (another process?); left as it is, "
                              f"nothing was written") from None
    _remove(tmp)


class _Kept(CheckpointError):
    """A refusal after which the staging path holds what was at the output: it is not removed."""


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


_LIBC = ctypes.CDLL(None, use_errno=True)
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)  # glibc 2.28 and newer
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)  # a kernel or file system without the flag


def _renameat2(src: Path, dst: Path, flag: int) -> bool:
    """Linux's renameat2(src, dst, flag); False where the C library, kernel or file system lacks it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths in one step (RENAME_EXCHANGE); False where that is not available."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_exclusive(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, raising FileExistsError when `dst` exists, however it got there: one step
    (RENAME_NOREPLACE) where the file system has it. A plain rename would silently replace an empty folder or a
    file, and a check before it leaves a moment in which another's output appears and is replaced; where the flag
    is missing, that is the fallback, and the rename still refuses a folder with files."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:  # a folder with files (or a file over a folder, or the reverse) took the name since
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def _flush(folder: Path) -> None:
    """Everything under `folder` on the disk, its folders' entries too: the output is renamed into place only once
    its bytes are there (a power cut never leaves a whole-looking output of empty files)."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        if not path.is_symlink():
            _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprints(files) -> dict[Path, tuple[int, int, int, int]]:
    """Device, inode, size and modification time of each file a run reads, taken when it opens them: a file cut,
    rewritten (even to the same size: its mtime moves) or replaced (its inode) while it is read differs in one."""
    return {Path(f): _fingerprint(f) for f in files}


def _fingerprint(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _changed(watched: dict) -> str | None:
    """The one line for the first watched file that is not as its fingerprint says (None: none changed): the
    output may mix its old and new bytes, so it is not kept."""
    for path, before in watched.items():
        try:
            now = _fingerprint(path)
        except OSError:
            now = None
        if now == before:
            continue
        how = "removed" if now is None else "replaced by another file" if now[:2] != before[:2] else \
            f"cut from {before[2]:,} to {now[2]:,} bytes" if now[2] < before[2] else \
            f"grown from {before[2]:,} to {now[2]:,} bytes" if now[2] > before[2] else "rewritten"
        return f"{path}: {how} while this run read it; nothing was written (convert it once it is complete)"
    return None


def _recover(dst: Path) -> None:
    """What killed runs left beside `dst` (their owner's pid in the name, no longer alive): a staging folder is
    removed; a replaced output that was moved aside (killed between the two renames) is put back when `dst` is
    missing, else removed. Said on stderr. A live owner's are left alone."""
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.(partial|old)-(\d+)(?:-[a-z0-9_]{{8}})?$")
    said = []
    for entry in sorted(dst.parent.iterdir()):
        m = pattern.match(entry.name)
        if m is None or _alive(int(m.group(2))) or entry.is_symlink():
            continue
        if entry.is_file() and m.group(1) == "partial":  # a staged file (staged_file)
            size = entry.stat().st_size
            entry.unlink()
            said.append(f"removed {entry.name} ({size / 1e6:,.1f} MB), left by a killed run")
            continue
        if not entry.is_dir():
            continue
        if m.group(1) == "old" and _put_back(entry, dst):
            said.append(f"put back {dst}, which a killed run had moved aside to {entry.name}")
        else:
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(entry)
            said.append(f"removed {entry.name} ({size / 1e6:,.1f} MB), left by a killed run")
    for line in said:
        print(f"note: {line}", file=sys.stderr)


def _put_back(old: Path, dst: Path) -> bool:
    """A moved-aside output renamed back to `dst`, unless `dst` exists (then False: the newer one stays)."""
    try:
        rename_exclusive(old, dst)
    except FileExistsError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _failed(exc: OSError, dst: Path, tmp: Path, need: int, free: int) -> str:
    """The one line for an OSError while an output was staged: a full disk (with what was written, needed and free),
    a file that could not be read (it names the file), or the output that could not be written."""
    if exc.errno == errno.ENOSPC:
        return f"{dst}: {no_space(tmp, need, free, dst.parent)}; nothing was written"
    name = Path(exc.filename) if exc.filename else None
    if name is not None and tmp not in name.parents and name != tmp:
        return f"{name}: cannot read ({exc.strerror or exc}); nothing was written"
    return f"{dst}: cannot write ({exc.strerror or exc}); nothing was written"


def no_space(folder: Path, need: int, free: int, where: Path) -> str:
    """What a user needs to know of a disk that filled while `folder` was written: how far it got, what the whole
    needs (when known) and what was free in `where` when it began (the rest went to another process's files)."""
    written = folder.stat().st_size if folder.is_file() else \
        sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
    whole = f" of the {sized(need)} the output needs" if need else ""
    return f"no space left on device after writing {sized(written)}{whole}; {sized(free)} were free in {where} " \
           f"when it began"


def _combined(pieces: list[tuple[int, int]]) -> int:
    """The CRC-32 of a whole tensor from those of its pieces."""
    total = 0
    for crc, n in pieces:
        total = crc32_combine(total, crc, n)
    return total


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_size(text: str) -> int:
    """'2GB' → 2·10⁹ as transformers reads shard sizes; 'GiB' is binary."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        value = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise UserError(f"cannot read size {text!r}; expected e.g. 2GB, 500MB, 1GiB") from None
    if value <= 0:
        raise UserError(f"size {text!r} must be positive")
    return value


class WeightsWriter:
    """Writes a planned list of tensors into one or more files of one format, hashing each tensor's bytes; used
    as a context manager.

    `shards` groups the plan into files (`model_folder.weight_files`); every format streams tensor by tensor.
    """

    def __init__(self, folder: Path, fmt: str, shards: list[tuple[str, PLAN]], metadata: dict | None = None):
        self.folder, self.fmt, self.metadata = folder, fmt, metadata
        self.shards = shards
        self.records: list[dict] = []
        self._file_of = {name: file for file, plan in shards for name, _, _ in plan}
        self._queue = [(file, plan) for file, plan in shards]
        self._open = None  # (file name, handle, writer, remaining names)
        self._pool: ThreadPoolExecutor | None = None
        self._pending = None  # the checksums of the last tensor written, still being computed

    def _checksums(self, data: np.ndarray | FileSpan, crc: bool, piece: int | None):
        """sha256 of the tensor's bytes on one thread; on another, the CRC-32s a writer's records need (one per
        `piece` bytes, or of the whole tensor: a zip record's, a .ckpt record's for its trailer) and the look a
        FileSpan's `on_block` takes (hashlib and zlib release the GIL) — all while this thread writes."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="checksum")

        def sha256():
            h = hashlib.sha256()
            for block in byte_blocks(data, observed=False):
                h.update(block)
            return h.hexdigest()

        def crcs_and_scan():  # [(crc, length)] of each piece
            pieces, c, n = [], 0, 0
            for block in byte_blocks(data):  # blocks are BLOCK long but the last: pieces end at block boundaries
                c, n = crc32(block, c), n + len(block)
                if n == piece:
                    pieces.append((c, n))
                    c, n = 0, 0
            return pieces + [(c, n)] if n or not pieces else pieces
        span = data if isinstance(data, FileSpan) else None
        crc = crc or span is not None and span.check is not None  # a span is proven by the CRC of what was copied
        observed = span is not None and span.on_block is not None
        return self._pool.submit(sha256), self._pool.submit(crcs_and_scan) if crc or observed else None

    def _start(self):
        file, plan = self._queue.pop(0)
        handle = open(self.folder / file, "wb")  # noqa: SIM115 (closed by _finish_file or abort)
        writer = FORMATS[self.fmt].writer(handle, plan, file, self.metadata)
        self._open = (file, handle, writer, [n for n, _, _ in plan])

    def _finish_file(self):
        self._settle()
        file, handle, writer, _ = self._open
        if hasattr(writer, "finish"):
            writer.finish()
        handle.close()
        self._open = None

    def write(self, name: str, arr: np.ndarray | FileSpan, dtype: str) -> None:
        if self._open is None:
            self._start()
        file, handle, writer, remaining = self._open
        if remaining[0] != name:
            raise AssertionError(f"write order broken: {name} before {remaining[0]}")
        if not isinstance(arr, FileSpan):
            arr = np.ascontiguousarray(arr)
        set_crc = getattr(writer, "crc", None)  # a zip record's CRC-32, a .ckpt's pieces for its trailer
        digest = self._checksums(arr, set_crc is not None, getattr(writer, "PIECE", None))
        writer.write(name, arr, dtype)
        self._settle()  # the previous tensor's checksums; this one's overlap the next write
        self.records.append({"name": name, "shape": list(arr.shape), "dtype": dtype, "file": file})
        self._pending = (digest, set_crc, name, arr if isinstance(arr, FileSpan) else None)
        remaining.pop(0)
        if not remaining:
            self._finish_file()

    def _settle(self) -> None:
        if self._pending is not None:
            (sha256, scan), set_crc, name, span = self._pending
            self._pending = None
            self.records[-1]["sha256"] = sha256.result()
            pieces = scan.result() if scan is not None else None  # also waits for the NaN/Inf count
            if span is not None:  # the bytes copied must be the ones the source's checksum covers
                if span.check is not None:
                    span.check(_combined(pieces))
                if span.sha256 is not None and span.sha256 != self.records[-1]["sha256"]:
                    raise CheckpointError(f"{span.file}: tensor {span.name or name!r} does not match the sha256 "
                                          f"recorded for it: the file is corrupt (--no-crc-check reads it anyway)")
            if set_crc is not None:
                set_crc(name, [c for c, _ in pieces])

    def __enter__(self) -> WeightsWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        """Closed when every planned tensor was written, aborted (files closed, threads stopped) on a failure."""
        if kind is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        self._settle()
        self._shutdown()
        if self._open is not None or self._queue:
            raise AssertionError("not every planned tensor was written")

    def abort(self) -> None:
        self._shutdown()
        if self._open and self._open[1]:
            self._open[1].close()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
