"""This process's place among msrun's workers (rank 0 of 1 when not launched by msrun)."""
from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(rank, size); initialises MindSpore's communication when msrun started us."""
    if "MS_WORKER_NUM" not in os.environ and "RANK_SIZE" not in os.environ:
        return 0, 1
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()
