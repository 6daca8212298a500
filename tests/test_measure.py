"""The machine block and kernel anchors every benchmark prints (benchmarks/measure.py)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import measure

from glm2_core.config import GLM2Config


def test_cpu_info_names_the_kernel_flags_of_another_cpu():
    text = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_tile\n"
    assert measure.cpu_info(text) == ("Some Xeon", ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"])


def test_kernel_anchor_times_both_sides_at_a_tiny_shape():
    rows = measure.kernel_anchors([("p", 4, 32, 16, 3), ("q", 1, 32, 8, 1)], repeat=2)
    assert [(r["name"], r["shape"], r["count"]) for r in rows] == [("p", (4, 32, 16), 3), ("q", (1, 32, 8), 1)]
    assert all(r["ms"] > 0 and r["pt"] > 0 for r in rows)


def test_the_kernel_ratio_weights_each_product_by_its_calls():
    """Rows made up so that weighting matters: torch at half MindSpore's time on a product called 3 times, at four
    times it on one called once, so both spend 7 in all: a ratio of 1 (unweighted, the two ratios 0.5 and 4 would
    average 2.25)."""
    rows = [{"ms": 2.0, "pt": 1.0, "count": 3}, {"ms": 1.0, "pt": 4.0, "count": 1}]
    assert measure.kernel_ratio(rows) == pytest.approx(1.0)


def test_kernel_anchor_times_the_native_kernel_beside_when_asked(capsys):
    rows = measure.kernel_anchors([("p", 2, 32, 16, 1)], repeat=2, native=True)
    assert rows[0]["ms16"] > 0
    measure.print_anchors("tiny", rows)
    assert "native kernel" in capsys.readouterr().out


def test_projection_shapes_are_the_models_matmuls():
    cfg = GLM2Config.preset("tiny", multi_query_group_num=2, **measure.CONFIGS["small"])
    shapes = {name: (m, k, n, count) for name, m, k, n, count in measure.projection_shapes(cfg, 128, 1)}
    assert shapes == {"query_key_value": (128, 512, 512 + 2 * 2 * 64, 4), "dense": (128, 512, 512, 4),
                      "dense_h_to_4h": (128, 512, 2 * 1376, 4), "dense_4h_to_h": (128, 1376, 512, 4),
                      "output_layer": (1, 512, 65024, 1)}


def test_backward_shapes_are_the_products_autograd_runs():
    import torch

    (dx, dw) = measure.backward_shapes([("p", 4, 32, 16, 3)], trained=True)
    x, w = torch.ones(4, 32, requires_grad=True), torch.ones(16, 32, requires_grad=True)
    torch.nn.functional.linear(x, w).sum().backward()
    # each product m × k × n makes an m × n result: the gradient it computes
    assert (dx[1], dx[3], dx[4], dx[5]) == (*x.grad.shape, 3, "nn")
    assert (dw[1], dw[3], dw[4], dw[5]) == (*w.grad.shape, 3, "tn")
    assert (dx[2], dw[2]) == (16, 4) and measure.backward_shapes([("p", 4, 32, 16, 3)], trained=False) == [dx]
    rows = measure.kernel_anchors([dx, dw], repeat=2)
    assert [(r["shape"], r["layout"]) for r in rows] == [((4, 16, 32), "nn"), ((16, 4, 32), "tn")]
    for r in rows:
        assert r["ms"] > 0 and r["pt"] > 0 and r["ratio"] == pytest.approx(r["pt"] / r["ms"])


def _spinning() -> list[int]:
    """Children of this process that run the spin loop."""
    own = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields, cmd = stat.read_text().rsplit(")", 1)[1].split(), (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if fields[1] == own and b"while True: pass" in cmd:
            found.append(int(stat.parent.name))
    return found


def test_busy_cores_spin_for_the_block_and_are_gone_after_it():
    with measure.busy_cores(2):
        assert len(_spinning()) == 2
    assert _spinning() == []
    with pytest.raises(RuntimeError), measure.busy_cores(1):  # gone also when the block fails
        raise RuntimeError
    assert _spinning() == []


def test_the_largest_cache_is_read_from_sysfs_sizes(tmp_path):
    for index, size in enumerate(("32K", "512K", "32768K", "")):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert measure.largest_cache(tmp_path) == 32 << 20
    assert measure.largest_cache(tmp_path / "none") == 64 << 20


def test_a_matrix_smaller_than_the_cache_is_timed_over_copies_that_move_twice_it():
    import mindspore as ms

    w = ms.Tensor(np.arange(64, dtype=np.float16).reshape(8, 8))  # 128 bytes
    copies = measure.uncached(w, cache=300)
    assert len(copies) == 1 + 5 and copies[0] is w  # the other five move 640 ≥ 600 bytes
    assert len({c.data_ptr() for c in copies}) == len(copies)  # distinct buffers
    assert all((c.asnumpy() == w.asnumpy()).all() for c in copies)
    assert measure.uncached(w, cache=64) == [w]
    called = []
    first_calls = measure.uncached(w, cache=300, op=lambda x, c: called.append((x, c)) or c, x="x")
    assert called == [("x", c) for c in first_calls]  # each copy's first call made, in turn
