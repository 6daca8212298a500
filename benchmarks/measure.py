"""What every benchmark measures with: a step in its own process under /usr/bin/time -v (page cache dropped first),
the machine it ran on, and the kernel anchors its speed ratios are read against."""
from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def busy_cores(n: int):
    """`n` processes that spin for as long as the block runs: another program's load on the cores a run shares."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def warm(*paths: Path) -> None:
    """Read files into the page cache: a source just written or downloaded."""
    files = [str(p) for path in paths for p in sorted(Path(path).rglob("*")) if p.is_file()]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def timed(cmd: str, hot: tuple[Path, ...] = ()) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a shell command, write-back included; the page cache is dropped first,
    then the `hot` paths are read back into it (none: a cold start)."""
    drop_caches()
    if hot:
        warm(*hot)
    proc = subprocess.run(["/usr/bin/time", "-v", "bash", "-c", f"{cmd} && sync"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {cmd}\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = wall.groups()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return int(h or 0) * 3600 + int(m) * 60 + float(s), int(rss.group(1)) / 1024


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# The configs the speed benchmarks run (GLM2Config.preset("tiny", **CONFIGS[name])).
CONFIGS = {
    "small": dict(num_layers=4, hidden_size=512, ffn_hidden_size=1376, num_attention_heads=8, kv_channels=64),
    # about 0.5B parameters (0.27B of them in the embedding and output layer)
    "medium": dict(num_layers=6, hidden_size=2048, ffn_hidden_size=5504, num_attention_heads=16, kv_channels=128),
}
# CPU flags that decide which matmul kernels torch's MKL/oneDNN and MindSpore's own can use
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
RATIO = "ratio = MindSpore speed / torch speed (= torch time / MindSpore time): > 1 means MindSpore is faster"


def cpu_info(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """The CPU's model name and which of KERNEL_FLAGS it has, from /proc/cpuinfo (or its text)."""
    text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)  # the last CPU's lines
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", "unknown CPU"), [f for f in KERNEL_FLAGS if f in flags]


def largest_cache(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Bytes of the CPU's largest cache, as sysfs gives it (64 MiB where it gives none)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for f in root.glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text or 0))
    return max(sizes, default=64 << 20)


def uncached(tensor, cache: int, op=None, x=None) -> list:
    """`tensor` and enough copies of it that, used in turn, each meets its next use after the others have moved
    twice the cache: a matrix smaller than the cache is timed from memory, as a decoding step (which reads every
    other weight in between) meets it, not from the cache a repeat of the same call leaves it in. A copy's first
    call runs slower than the next ones (MindSpore readies its memory then): with `op`, each copy's first call,
    op(x, copy), is made here, untimed."""
    nbytes = tensor.nbytes
    extra = 0 if nbytes >= 2 * cache else -(-2 * cache // nbytes)
    copies = [tensor] + [tensor.copy() for _ in range(extra)]
    for c in copies if op is not None else ():
        op(x, c).asnumpy()
    return copies


def set_ms_threads(n: int) -> None:
    """MindSpore's CPU kernel threads (its documented setting; once per process, before any kernel runs)."""
    import mindspore as ms

    from glm2_ms.loading import use_cpu

    use_cpu()
    ms.device_context.cpu.op_tuning.threads_num(n)


def set_threads(n: int) -> None:
    """The same number of CPU threads for torch and MindSpore."""
    import torch

    torch.set_num_threads(n)
    set_ms_threads(n)


def ms_thread_pool() -> dict[str, int]:
    """MindSpore's runtime threads that run kernels, by name (ActorThread_*, KernelThread_*), counted in
    /proc/self/task: MindSpore has no getter for them."""
    pool: dict[str, int] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            name = (task / "comm").read_text().strip().rstrip("0123456789")
            if name in ("ActorThread_", "KernelThread_"):
                pool[name.rstrip("_")] = pool.get(name.rstrip("_"), 0) + 1
    return pool


def machine() -> dict:
    """What a timing needs beside it to be read on another machine: CPU model and flags, cores, load, each
    library's version and threads (MindSpore's: its pool counted after one MatMul has run)."""
    import mindspore as ms
    import torch

    from glm2_ms.loading import use_cpu

    use_cpu()
    model, flags = cpu_info()
    a = ms.Tensor(np.ones((64, 64), np.float32))
    (a @ a).asnumpy()
    return {"cpu": model, "flags": flags, "cores": len(os.sched_getaffinity(0)), "load": os.getloadavg(),
            "torch": torch.__version__, "mindspore": ms.__version__, "torch_threads": torch.get_num_threads(),
            "ms_pool": ms_thread_pool()}


def print_machine(threads: int | None = None) -> None:
    """Print the machine block, measured in a child process (`threads` each side, else the libraries' defaults), so
    that the caller's memory and MindSpore's once-per-process thread setting stay untouched."""
    print(flush=True)
    subprocess.run([sys.executable, __file__, *([str(threads)] if threads else [])], check=True)


def main(threads: int | None) -> None:
    if threads:
        set_threads(threads)
    m = machine()
    print(f"CPU: {m['cpu']}; flags: {' '.join(m['flags']) or 'none of ' + ', '.join(KERNEL_FLAGS)}; "
          f"{m['cores']} cores usable; load average {' '.join(f'{x:.2f}' for x in m['load'])} (1, 5, 15 min)\n"
          f"torch {m['torch']}: {m['torch_threads']} threads (torch.get_num_threads); MindSpore {m['mindspore']}: "
          f"threads_num {threads or 'default'}, its kernel threads in /proc/self/task after a MatMul: "
          f"{', '.join(f'{n} {k}' for k, n in m['ms_pool'].items())}", flush=True)


def projection_shapes(cfg, tokens: int, out_tokens: int) -> list[tuple[str, int, int, int, int]]:
    """(name, m, k, n, times per forward) of the model's matmuls with weights: each layer's four projections on
    `tokens` rows, the output layer on `out_tokens` rows."""
    h, layers = cfg.hidden_size, cfg.num_layers
    return [("query_key_value", tokens, h, cfg.qkv_rows, layers), ("dense", tokens, cfg.q_rows, h, layers),
            ("dense_h_to_4h", tokens, h, 2 * cfg.ffn_hidden_size, layers),
            ("dense_4h_to_h", tokens, cfg.ffn_hidden_size, h, layers),
            ("output_layer", out_tokens, h, cfg.padded_vocab_size, 1)]


def alternating(sides: dict, repeat: int) -> dict:
    """Median seconds of each callable, called in turn (A B A B …) `repeat` times after one warm-up round."""
    times = {side: [] for side in sides}
    for i in range(repeat + 1):
        for side, fn in sides.items():
            t = time.perf_counter()
            fn()
            if i:
                times[side].append(time.perf_counter() - t)
    return {side: float(np.median(t)) for side, t in times.items()}


def backward_shapes(forward, trained: bool) -> list[tuple[str, int, int, int, int, str]]:
    """The backward pass's products for the `forward` products (name, m, k, n, count) of y = x Wᵀ, as torch's
    autograd and the runtime's (Replay, MatMul's own bprop) both run them: dx = dy W (m × n × k, layout "nn") for
    each, and dW = dyᵀ x (n × m × k, "tn") where the weights are `trained`."""
    rows = [(f"{name}, dx = dy W", m, n, k, count, "nn") for name, m, k, n, count, *_ in forward]
    if trained:
        rows += [(f"{name}, dW = dyᵀ x", n, m, k, count, "tn") for name, m, k, n, count, *_ in forward]
    return rows


def kernel_anchors(shapes, repeat: int = 5, native: bool = False) -> list[dict]:
    """Each (name, m, k, n, count[, layout]) product in float32 on both sides, alternating. Layout "nt" (the
    default): x Wᵀ, through the runtime's own `Linear` (MatMul, transpose_b) under jit against torch's `F.linear`;
    "nn" and "tn" (the backward's, `backward_shapes`): `MatMul` under jit against `torch.mm`. `native`: also the
    `Linear` over float16 weights through the native kernel ("ms16"). A jit call on CPU returns once its result
    is computed, so its time includes the call's fixed cost (~1 ms here), as every call of the runtime's compiled
    step does."""
    rows = []
    for name, m, k, n, count, *layout in shapes:
        layout = layout[0] if layout else "nt"
        times = linear_times(m, k, n, repeat, native) if layout == "nt" else \
            matmul_times(m, k, n, layout == "tn", repeat)
        rows.append(dict(name=name, shape=(m, k, n), count=count, layout=layout, **times))
    return rows


def linear_times(m: int, k: int, n: int, repeat: int, native: bool = False) -> dict:
    import torch

    rng = np.random.default_rng(0)
    x, w = rng.random((m, k), np.float32), rng.random((n, k), np.float32)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    sides = {"ms": linear_call(x, w, False), "pt": lambda: torch.nn.functional.linear(xt, wt)}
    if native:
        sides["ms16"] = linear_call(x, w, True)
    t = alternating(sides, repeat)
    return {**t, "ratio": t["pt"] / t["ms"], **({"ratio16": t["pt"] / t["ms16"]} if native else {})}


def linear_call(x, w, native: bool):
    """x Wᵀ through the runtime's `Linear` under jit: float32, or float16 weights on the native kernel."""
    import mindspore as ms

    from glm2_ms.model import Linear, use_native_kernels

    dtype = ms.float16 if native else ms.float32
    linear = Linear(w.shape[1], w.shape[0], False, dtype)
    linear.weight.set_data(ms.Tensor(w, dtype))
    if native and not use_native_kernels(linear):
        raise SystemExit("the native kernel cannot be built here (see glm2_ms/kernels)")
    linear.construct = ms.jit(linear.construct)
    xm = ms.Tensor(x)
    return lambda: linear(xm)


def matmul_times(m: int, k: int, n: int, transpose_a: bool, repeat: int) -> dict:
    """An m × k × n product a b (aᵀ b, a stored k × m, when `transpose_a`): MindSpore's MatMul under jit against
    torch.mm, alternating."""
    import mindspore as ms
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.random((k, m) if transpose_a else (m, k), np.float32), rng.random((k, n), np.float32)
    matmul = jit_matmul(transpose_a)
    am, bm, at, bt = ms.Tensor(a), ms.Tensor(b), torch.from_numpy(a), torch.from_numpy(b)
    sides = {"ms": lambda: matmul(am, bm), "pt": lambda: torch.mm(at.t() if transpose_a else at, bt)}
    t = alternating(sides, repeat)
    return {**t, "ratio": t["pt"] / t["ms"]}


@functools.cache
def jit_matmul(transpose_a: bool):
    """One jit function per layout, for every shape (MindSpore warns of each new one compiling the same code)."""
    import mindspore as ms
    from mindspore import ops

    op = ops.MatMul(transpose_a=transpose_a)

    @ms.jit
    def matmul(a, b):
        return op(a, b)

    return matmul


def kernel_ratio(rows, side: str = "ms") -> float:
    """torch / MindSpore time (`side`: "ms16" for the native kernel's) of all the anchors' products, each as often as
    its count says (its calls in a forward or a step)."""
    return sum(r["pt"] * r["count"] for r in rows) / sum(r[side] * r["count"] for r in rows)


def print_anchors(title: str, rows) -> float:
    """The anchors as a table, with their forward-weighted ratio (returned); GFLOP/s beside each time, and the
    native kernel's column when measured."""
    native = "ms16" in rows[0]
    print(f"\nkernel anchors, {title} (float32, alternating, median of the timed calls; {RATIO}):")
    print("| product | m × k × n | calls | MindSpore (Linear; MatMul) | torch (F.linear; mm) | ratio |"
          + (" MindSpore Linear, float16 weights, native kernel | ratio |" if native else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if native else ""))
    for r in rows:
        flop = 2 * np.prod(r["shape"]) / 1e9
        cells = [f"{r[s] * 1e3:.2f} ms ({flop / r[s]:.0f} GFLOP/s)" for s in ("ms", "pt", "ms16")[:2 + native]]
        print(f"| {r['name']} | {' × '.join(map(str, r['shape']))} | {r['count']} | {cells[0]} | {cells[1]} | "
              f"{r['ratio']:.2f}x |" + (f" {cells[2]} | {r['ratio16']:.2f}x |" if native else ""))
    ratio = kernel_ratio(rows)
    print(f"| all, weighted by calls | | | | | **{ratio:.2f}x** |"
          + (f" | **{kernel_ratio(rows, 'ms16'):.2f}x** |" if native else ""), flush=True)
    return ratio


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
