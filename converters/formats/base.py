"""What every reader hands out: a tensor's name, shape and dtype, and a way to read its bytes later."""
from __future__ import annotations

import errno
import io
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glm2_core.dtypes import nbytes
from glm2_core.errors import CheckpointError


class Closing:
    """`with` support for anything that has close()."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class WeightsFile(Closing):
    """A weights file held open while its tensors are read: `_index()` lists them into `tensors` (and the file is
    closed again if that fails)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorRef] = {}
        self._f = open(self.path, "rb")  # noqa: SIM115 (held until close())
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def _index(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._f.close()


@dataclass
class TensorRef:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    reader: Callable[[], np.ndarray] = field(repr=False)
    release: Callable[[], None] = field(default=lambda: None, repr=False)
    into: Callable[[np.ndarray], object] | None = field(default=None, repr=False)  # read into a C-contiguous buffer
    offset: int | None = None  # where the bytes lie contiguous and as stored in `file`, when they do
    check: Callable[[int], None] | None = field(default=None, repr=False)  # given the CRC-32 of the bytes at
    # `offset` once a writer has copied them: raises when they are not what the file's checksum says
    rows: Callable[[int, int], np.ndarray] | None = field(default=None, repr=False)  # rows [a, b) of the first
    # dimension alone, read from the file (and counted into its checksum), where the format can
    sha256: str | None = None  # what the bytes must hash to, where only our manifest can tell (see FileSpan)
    blocks: tuple[str, Callable[[], np.ndarray]] | None = field(default=None, repr=False)  # a matrix stored in
    # llama.cpp's blocks (glm2_core.quants): their kind, and a reader of them as uint8 [rows, row bytes]
    mapped: Callable[[], np.ndarray] | None = field(default=None, repr=False)  # the bytes as stored (blocks as
    # uint8 rows), a view of a copy-on-write mapping of the file: nothing is read until the view is used, and the
    # file is never written
    prefetch: Callable[[], None] | None = field(default=None, repr=False)  # for whoever took `mapped`: reads the
    # bytes into the page cache ahead of their use (`read_through`)
    prove: Callable[[], None] | None = field(default=None, repr=False)  # owed by whoever took `mapped`, where the
    # file records a checksum: checks the mapped bytes against it (raises CheckpointError); after `prefetch`

    def __post_init__(self):
        try:
            self.name.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(f"{self.file}: tensor name {self.name!r} is not valid UTF-8 text") from None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)

    def read(self) -> np.ndarray:
        """The tensor as a numpy array of the storage dtype (bfloat16 as uint16 bits)."""
        return self.reader()

    def span(self, on_block=None) -> FileSpan | None:
        return None if self.offset is None else FileSpan(self.file, self.offset, self.shape, self.dtype, on_block,
                                                         self.check, self.sha256, self.name)


BLOCK = 1 << 20  # bytes per checksum step: small enough to stay in cache between the CRC and `on_block`


@dataclass(frozen=True)
class FileSpan:
    """A tensor that stays in its file: writers copy it file to file (`copy_file_range`, in the kernel, as `cp`
    does) and hashing reads it back from the page cache, so its bytes never pass through a numpy array."""
    file: Path
    offset: int
    shape: tuple[int, ...]
    dtype: str
    on_block: Callable[[memoryview], object] | None = field(default=None, compare=False, repr=False)  # sees each
    # block as the writer reads it back (beside the CRC): the source counts NaN/Inf there
    check: Callable[[int], None] | None = field(default=None, compare=False, repr=False)  # the source's proof:
    # given the CRC-32 of the bytes copied, raises when the file's checksum disagrees
    sha256: str | None = None  # the source's proof where only a sha256 we recorded can tell (a manifest, a GGUF's
    # metadata): the writer compares the sha256 it takes of the bytes copied
    name: str = ""  # the tensor's name in its file, for that message

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)

    def blocks(self):
        """The bytes, BLOCK at a time, read from the page cache into one buffer (each block valid until the next
        is asked for). Read, not mapped: a mapped file cut short while it is read kills the process (SIGBUS),
        where a short read is one error."""
        buf = memoryview(bytearray(min(BLOCK, self.nbytes)))
        with open(self.file, "rb", buffering=0) as f:
            for start in range(0, self.nbytes, BLOCK):
                n = min(BLOCK, self.nbytes - start)
                if os.preadv(f.fileno(), [buf[:n]], self.offset + start) != n:
                    raise _cut(self.file, self.offset + start + n)
                yield buf[:n]

    def copy_to(self, out, start: int, n: int) -> None:
        """Append bytes [start, start + n) to the open file `out`."""
        out.flush()
        at = out.tell()
        with open(self.file, "rb", buffering=0) as f:
            done = 0
            try:
                while done < n:
                    step = os.copy_file_range(f.fileno(), out.fileno(), n - done, self.offset + start + done,
                                              at + done)
                    if step == 0:
                        raise _cut(self.file, self.offset + start + n)
                    done += step
            except OSError as exc:  # another file system, or one without it: plain reads and writes
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                out.seek(at + done)
                for view in FileSpan(self.file, self.offset + start + done, (n - done,), "uint8").blocks():
                    out.write(view)
        out.seek(at + n)


def _cut(path: Path, end: int):
    return CheckpointError(f"{path}: cut short while it was read: the bytes up to {end:,} are no longer there")


def byte_blocks(data: np.ndarray | FileSpan, observed: bool = True):
    """A tensor's bytes BLOCK at a time, wherever they are (shown to a span's `on_block` when `observed`)."""
    if isinstance(data, FileSpan):
        for block in data.blocks():
            if observed and data.on_block is not None:
                data.on_block(block)
            yield block
        return
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    for at in range(0, len(view), BLOCK):
        yield view[at:at + BLOCK]


def write_bytes(out, data: np.ndarray | FileSpan, start: int = 0, n: int | None = None) -> None:
    """Append bytes [start, start + n) of a tensor to `out`."""
    n = data.nbytes - start if n is None else n
    if isinstance(data, FileSpan):
        data.copy_to(out, start, n)
    else:
        out.write(memoryview(np.ascontiguousarray(data)).cast("B")[start:start + n])


READ_CHUNK = 1 << 26  # bytes read at a time into a tensor's buffer
PAGE = 4096


def read_exact(f, offset: int, arr: np.ndarray, path: Path, what: str, digest=None) -> None:
    """Fill `arr` (C-contiguous) with the bytes at `offset`; a short read means the file was cut off. With `digest`
    (a hashlib object), each chunk is hashed on a second thread while the next one is read.

    Each chunk's pages are touched before the read: on these virtual machines a read into pages not yet mapped is
    several times slower than the faults and the read apart. From a file larger than half the memory available,
    the bytes read are dropped from the page cache (`posix_fadvise`, the file untouched): the cache cannot keep
    such a file beside the copy being made of it, and reclaiming it as the copy grows slowed a 6B load (figures:
    benchmarks/results/2026-12-04-side-by-side-llama-cpp-6b.md)."""
    flat = arr.reshape(-1).view(np.uint8)
    f.seek(offset)
    drop = _outgrows_memory(f)
    hashing = None
    with _hasher() if digest is not None else _no_pool() as pool:
        for at in range(0, flat.size, READ_CHUNK):
            chunk = flat[at:at + READ_CHUNK]
            chunk[::PAGE] = 0
            got = f.readinto(memoryview(chunk))
            if got != chunk.size:
                raise CheckpointError(f"{path}: truncated file: tensor {what!r} needs {flat.size} bytes at offset "
                                      f"{offset}, only {at + (got or 0)} present")
            if pool is not None:
                if hashing is not None:
                    hashing.result()
                hashing = pool.submit(digest.update, chunk)
            if drop:
                os.posix_fadvise(f.fileno(), offset + at, chunk.size, os.POSIX_FADV_DONTNEED)
        if hashing is not None:
            hashing.result()


READ_THROUGH_STEP = 1 << 23  # bytes per read of `read_through`


def read_through(path: Path, inode: int, offset: int, size: int, digest=None) -> None:
    """Read bytes [offset, offset + size) of `path` into the page cache in large sequential reads, as `cp` does
    (touching a mapping's pages one fault at a time reads in small pieces), into one reused buffer; with `digest` (a
    hashlib object) hashing them as they come, the GIL free while each is hashed. `inode`: the file a mapping was
    made of; another file at `path` now is an error.

    A check of a mapped tensor reads its bytes so, not through the mapping: what the mapping's arithmetic never
    touches (the embedding's rows no prompt looks up) then never becomes part of the process's memory."""
    buf = memoryview(bytearray(min(READ_THROUGH_STEP, size)))
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_ino != inode:
            raise CheckpointError(f"{path}: replaced by another file while the model was loaded from it")
        for at in range(0, size, READ_THROUGH_STEP):
            n = min(READ_THROUGH_STEP, size - at)
            if os.preadv(f.fileno(), [buf[:n]], offset + at) != n:
                raise _cut(path, offset + at + n)
            if digest is not None:
                digest.update(buf[:n])


def _outgrows_memory(f) -> bool:
    """Whether the open file `f` is larger than half the memory available now (Linux's MemAvailable; False where
    that cannot be read)."""
    try:
        with open("/proc/meminfo") as info:
            available = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
        return os.fstat(f.fileno()).st_size > available // 2
    except (OSError, StopIteration, ValueError, AttributeError, io.UnsupportedOperation):
        return False


def _hasher() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="hash")


@contextmanager
def _no_pool():
    yield None
