"""Weights into the runtime's parameters, one tensor at a time, and the device they run on (the folder is opened
by `glm2_ms.api.open_model`)."""
from __future__ import annotations

import ctypes
import mmap
import threading

import mindspore as ms
import numpy as np
import psutil

from converters.source import Source
from glm2_core.errors import UserError
from glm2_core.names import BY_TEMPLATE, OUTPUT, Layout
from glm2_core.quants import KINDS, block_kind, quantize

from .kernels import native_linear, why_not
from .model import Embedding, block_holders, use_native_kernels

RUNTIME_LAYOUT = Layout("mindformers")  # the runtime's parameter names
OUTPUT_NAME = RUNTIME_LAYOUT.targets(BY_TEMPLATE[OUTPUT])[0][0]
MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def use_device(target: str = "CPU") -> None:
    """Select MindSpore's device (CPU, Ascend or GPU); a no-op when this process already runs kernels there (the
    device can be chosen only once)."""
    try:
        ms.set_device(target)
    except RuntimeError:
        if ms.get_context("device_target") != target:
            raise


def use_cpu() -> None:
    use_device("CPU")


def fits_in_memory(nbytes: int, share: float) -> bool:
    """Whether `nbytes` fit in `share` of the memory available now (psutil), the rest left to what runs beside."""
    return nbytes <= share * psutil.virtual_memory().available


def to_tensor(arr: np.ndarray, dtype: str) -> ms.Tensor:
    """A MindSpore tensor of `arr` (bfloat16 arrives as uint16 bits). It shares the memory of an array the reader
    allocated for this tensor or of a copy-on-write file mapping (`_shareable`), and copies any other (a read-only
    mapping, a buffer that lives on): MindSpore's own copy (`Tensor(arr)`) is slower than the disk."""
    if not _shareable(arr):
        arr = np.array(arr, order="C", copy=True)
    if dtype == "bfloat16":
        return ms.Tensor.from_numpy(arr.view(np.uint16)).view(ms.bfloat16)
    return ms.Tensor.from_numpy(arr)


def _shareable(arr: np.ndarray) -> bool:
    """Whether `arr` is C-contiguous, writeable and, through its views, numpy's own allocation or a mapping (a
    writeable mapping is a copy-on-write one: no reader maps a file for writing)."""
    if not (arr.flags.c_contiguous and arr.flags.writeable):
        return False
    root = _root(arr)
    return _mapped(root) or (root.base is None and root.flags.owndata)


def _root(arr: np.ndarray) -> np.ndarray:
    while isinstance(arr.base, np.ndarray):
        arr = arr.base
    return arr


def _mapped(arr: np.ndarray) -> bool:
    base = _root(arr).base
    return isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)


class PageDropper:
    """Drops the whole pages of a view of a copy-on-write file mapping from this process's memory (`madvise`
    MADV_DONTNEED); the page cache keeps them, and a read maps them back. For a table read a few rows at a time:
    the kernel maps a page cache's large folio whole around each row read, so a table whose pages stay mapped
    grows in memory far beyond the rows it gave. Only for weights nothing writes: a page dropped comes back as the
    file has it. Holds the view, so the mapping outlives it."""

    def __init__(self, view: np.ndarray):
        self.view, page = view, mmap.PAGESIZE
        start = view.ctypes.data
        self.start = -(-start // page) * page
        self.length = max(0, (start + view.nbytes) // page * page - self.start)
        self.madvise = ctypes.CDLL(None, use_errno=True).madvise
        self.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    def __call__(self) -> None:
        if self.length and self.madvise(self.start, self.length, mmap.MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) of an embedding's pages failed")


class Proofs:
    """What is owed on weights loaded as views of their files' mappings ((prefetch, prove) pairs, `TensorRef`), run
    while the model starts on its first prompt: one thread reads the files in ahead of the arithmetic, in large
    sequential reads, and a second checks each tensor against its file's checksum once it is read, so a cold start
    costs about the larger of reading and computing, not their sum. `wait` gives the verdict; nothing computed
    from the weights is handed out before it (`GLM2Network.settle`)."""

    def __init__(self, owed: list):
        self.owed, self.error = owed, None
        self.read = [threading.Event() for _ in owed]
        self.threads = [threading.Thread(target=self._guarded, args=(fn,), name=name, daemon=True)
                        for fn, name in ((self._prefetch, "read-weights"), (self._prove, "prove-weights"))]
        for t in self.threads:
            t.start()

    def _guarded(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # handed to wait(), in the thread that uses the weights
            self.error = self.error or exc
        finally:
            for event in self.read:  # a failed read frees the checker, which then stops
                event.set()

    def _prefetch(self) -> None:
        for (prefetch, _), event in zip(self.owed, self.read, strict=True):
            prefetch()
            event.set()

    def _prove(self) -> None:
        for (_, prove), event in zip(self.owed, self.read, strict=True):
            event.wait()
            if self.error is not None:
                return
            if prove is not None:
                prove()

    def wait(self) -> None:
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error


def block_plan(src: Source, groups, want: str | None) -> dict[str, str]:
    """Which weights to hold in llama.cpp's blocks, by runtime parameter name → kind. With `want` (q8_0 or q4_0):
    every weight matrix whose rows are whole blocks, the output layer by `block_kind`. Without: those the source
    stores in blocks (a q8_0/q4_0 GGUF file, THUDM's int4/int8) as they are stored, where the native kernel can be
    built (elsewhere they are read as the float weights they stand for). The embedding too: its rows are
    dequantized as they are looked up."""
    if want is not None:
        check_quantize(want)
    elif native_linear() is None:
        return {}
    plan = {}
    for g in groups:
        (name, shape), *rest = g.dst()
        if len(shape) != 2:
            continue
        if want is not None:
            kinds = {n: block_kind(want, s, n == OUTPUT_NAME) for n, s in [(name, shape), *rest]}
            plan.update({n: kind for n, kind in kinds.items() if kind})
            continue
        ref = src.as_stored(g)
        if ref is not None and ref.blocks is not None:
            plan[name] = ref.blocks[0]
    return plan


def check_quantize(want: str) -> None:
    """A quantization the runtime can hold here: q8_0 or q4_0, with the native kernel built."""
    if want not in KINDS:
        raise UserError(f"unknown quantization {want!r}; expected one of {', '.join(KINDS)}")
    if native_linear() is None:
        raise UserError(f"quantize={want} needs the native kernel, which cannot be built here: {why_not()}")


def quantized(cell, arrays: dict, want: str, output: bool = False) -> dict:
    """`arrays` ({parameter name of `cell`: (array, dtype)}) with each weight matrix of `cell` whose rows are whole
    blocks quantized to `want` (an `output` layer's by `block_kind`) and its cell holding them: a part of a model
    built as `from_pretrained(…, quantize=want)` builds it."""
    check_quantize(want)
    out = dict(arrays)
    for name, (sub, weight) in block_holders(cell, holding=False).items():
        kind = block_kind(want, weight.shape, output) if name in out else None
        if kind:
            sub.hold_blocks(kind)
            out[name] = (quantize(*out[name], kind), kind)
    return out


def hold_blocks(cell, plan: dict[str, str]) -> None:
    """Make each cell of `cell` whose weight `plan` names (parameter name → block kind, as `block_plan` gives it)
    hold that weight in blocks of its kind, before the weights are loaded."""
    for name, (sub, _) in block_holders(cell, holding=False).items():
        if name in plan:
            sub.hold_blocks(plan[name])


def load_into(cell, weights, blocking: bool = True) -> None:
    """Set every parameter of `cell` from `weights` ((name, array, dtype) by the cell's parameter names), for
    inference (with the native kernels, where they can be built), and (`blocking`) launch this process's kernels
    blocking: MindSpore's asynchronous launch keeps a thread spinning beside the one that runs a kernel, which on a
    2-core machine takes the core the kernel's second thread needs (figures: benchmarks/results)."""
    params = {p.name: p for p in cell.get_parameters()}
    tables = {id(c.embedding_weight): c for _, c in cell.cells_and_names() if isinstance(c, Embedding)}
    for name, arr, dt in weights:
        param = params.pop(name)
        param.set_data(to_tensor(arr, "uint8" if dt in KINDS else dt))
        if id(param) in tables and _mapped(arr):  # (a lookup maps the rows it reads: `Embedding.drop_pages`)
            tables[id(param)].drop_pages = PageDropper(arr)
    if params:
        raise AssertionError(f"parameters left unset: {sorted(params)[:3]}")
    cell.set_train(False)
    use_native_kernels(cell)
    if blocking:
        ms.runtime.launch_blocking()
