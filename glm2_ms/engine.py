"""Continuous batching: concurrent requests share each decoding step.

A fixed number of slots (rows of one batched KV cache) serve the requests; a request joins at the next step,
after its prompt is prefilled on its own, and leaves when it is done or cancelled, freeing its row. Every row has
its own cache columns (its prompt at 0…n-1, then one column a step), so a request's arithmetic is the same whether
it runs alone or beside others. The batch and the cache length follow the rows in use, in powers of two, so one
stream reads the weights once per step as glm2-generate does, N streams once for all of them, and the compiled
steps stay few (one per batch × length bucket).

Everything MindSpore runs on the engine's own thread; requests come in through `submit` from any thread, and each
job's `emit` is called there with its tokens and its end."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, ops

from glm2_core.errors import UserError

from .generation import CACHE_BUCKET, cache_length, check_budget
from .sampling import SamplingConfig, choose


@dataclass
class Job:
    """One request as the engine runs it. `emit(token, finish)` is called on the engine thread with each new token
    (finish None), then once with token None and why it ended: "stop" (a stop token), "length" (max_new),
    "cancelled", or "error: …"."""
    ids: list[int]
    max_new: int
    sampling: SamplingConfig
    stops: frozenset
    emit: Callable[[int | None, str | None], None]
    cancelled: bool = False  # set by the caller (a client gone, a stop string met): the row frees at the next step

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    job: Job
    column: int  # the next cache column to write (= tokens in the cache)
    history: list[int]  # prompt and new tokens (the repetition penalty's)
    rng: np.random.Generator
    made: int = 0
    last: int = 0


class QueueFull(Exception):
    """More requests wait than the queue holds."""


@dataclass
class EngineStats:
    """Counters read by /metrics (written on the engine thread only)."""
    steps: int = 0
    step_rows: int = 0  # summed over steps: the average batch is step_rows / steps
    busy_s: float = 0.0
    step_s: float = 0.0  # in decoding steps: step_rows / step_s is the decoding rate of the batch


def _failure(exc: Exception) -> str:
    return f"error: {exc}" if isinstance(exc, UserError) else f"error: {type(exc).__name__}: {exc}"


def _bucket(n: int, low: int, high: int) -> int:
    """The power of two times `low` that holds n, at most `high`."""
    size = low
    while size < n:
        size *= 2
    return min(size, high)


class Engine:
    """Runs the jobs of one model: `submit` from any thread, `start`, `stop`."""

    def __init__(self, model, slots: int, context: int, queue: int):
        """`slots`: requests decoded together; `context`: prompt + new tokens of one request at most (each slot's
        cache length); `queue`: requests that may wait for a slot. The caches the slots need at full length are
        checked against the memory available here, before anything is allocated."""
        self.model, self.decoder = model, model.decoder
        self.check(model.config, slots, context, self.decoder.itemsize)
        self.slots, self.context, self.queue_size = slots, context, queue
        self.longest = cache_length(context)
        self.rows: list[_Row | None] = [None] * slots
        self.caches: list | None = None
        self.pending: deque[Job] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.stats = EngineStats()
        self.thread = threading.Thread(target=self._run, name="glm2-engine", daemon=True)

    @staticmethod
    def check(cfg, slots: int, context: int, itemsize: int) -> None:
        """`context` within the model's, and the caches of `slots` rows at that length within the memory available
        (`itemsize`: the cache's bytes per value): UserError otherwise, naming --context and --slots."""
        if context > cfg.seq_length:
            raise UserError(f"--context {context} passes the model's context of {cfg.seq_length} tokens "
                            f"(seq_length in its config.json)")
        check_budget(cfg, 0, context, rows=slots, itemsize=itemsize, option="--context", rows_option="--slots")

    # -- the caller's side --------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue `job`: UserError when its prompt and max_new do not fit in `context` (each request's bound, said
        in the words a client reads), QueueFull when the queue is full."""
        n, room = len(job.ids), self.context - len(job.ids)
        if n == 0 or room < 1:
            raise UserError(f"the prompt's {n} tokens fill the server's context of {self.context} tokens "
                            f"(glm2-serve --context)" if n else "the prompt is empty")
        if not 1 <= job.max_new <= room:
            raise UserError(f"max_tokens {job.max_new}: the prompt's {n} tokens and {job.max_new} new ones pass the "
                            f"server's context of {self.context} tokens; at most {room} fit")
        with self.wake:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.pending) >= self.queue_size:
                raise QueueFull(f"{len(self.pending)} requests already wait for a slot")
            self.pending.append(job)
            self.wake.notify()

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def waiting(self) -> int:
        return len(self.pending)

    def start(self) -> None:
        """Start the engine's thread (once: a second call does nothing)."""
        if self.thread.ident is None:
            self.thread.start()

    def stop(self, timeout: float) -> None:
        """Cancel what waits and what runs, and wait (at most `timeout` s) for the thread to end its step."""
        with self.wake:
            self.stopping = True
            for job in self.pending:
                job.cancel()
            for row in self.rows:
                if row is not None:
                    row.job.cancel()
            self.wake.notify()
        self.thread.join(timeout)

    # -- the engine's thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.pending and not self.busy:
                    self.wake.wait()
                if self.stopping and not self.busy:
                    for job in self.pending:
                        job.emit(None, "cancelled")
                    self.pending.clear()
                    return
            clock = time.perf_counter()
            try:
                self._admit()
                self._drop_cancelled()
                if self.busy:
                    self._step()
            except Exception as exc:  # every job still running hears it; the server goes on
                self._fail_all(_failure(exc))
            self.stats.busy_s += time.perf_counter() - clock

    def _admit(self) -> None:
        """Prefill waiting jobs into free rows, lowest row first (the batch stays as small as it can)."""
        while None in self.rows:
            with self.wake:
                if not self.pending or self.stopping:
                    return
                job = self.pending.popleft()
            if job.cancelled:
                job.emit(None, "cancelled")
                continue
            r = self.rows.index(None)
            try:
                self._prefill(r, job)
            except Exception as exc:  # this job hears it (and the rows in use go on)
                if self.rows[r] is None:
                    job.emit(None, _failure(exc))
                else:
                    self._finish(r, _failure(exc))

    def _prefill(self, r: int, job: Job) -> None:
        n = len(job.ids)
        length = cache_length(n)
        valid = np.ones((1, length), np.int32)
        logits, small = self.decoder.forward(np.array([job.ids], np.int32), np.arange(n, dtype=np.int32)[None],
                                             valid, 0, self.decoder.new_cache(1, length))
        self.model.settle()
        self._fit(max(r + 1, self._rows_in_use()), max(n, self._columns_in_use()) + 1)
        for big, part in zip(self.caches, small, strict=True):
            big[r:r + 1, :, :n] = part[:, :, :n]
        self.rows[r] = row = _Row(job, n, list(job.ids), np.random.default_rng(job.sampling.seed))
        self._choose(r, row, logits)

    def _step(self) -> None:
        """One decoding step of every row in use."""
        self._fit(self._rows_in_use(), self._columns_in_use() + 1)
        b, length = self.caches[0].shape[0], self.caches[0].shape[2]
        ids, positions = np.zeros((b, 1), np.int32), np.zeros((b, 1), np.int32)
        starts, valid = np.full(b, -1), np.zeros((b, length), np.int32)
        for r, row in self._live():
            ids[r, 0], positions[r, 0], starts[r] = row.last, row.column, row.column
            valid[r, :row.column + 1] = 1
        clock = time.perf_counter()
        logits, self.caches = self.decoder.forward(ids, positions, valid, starts, self.caches)
        self.caches = list(self.caches)
        self.stats.step_s += time.perf_counter() - clock
        self.stats.steps += 1
        self.stats.step_rows += self.busy
        for r, row in self._live():
            row.column += 1
            self._choose(r, row, logits[r:r + 1])

    def _choose(self, r: int, row: _Row, logits: np.ndarray) -> None:
        token = int(choose(logits, np.array([row.history]), row.job.sampling, row.rng)[0])
        row.history.append(token)
        row.made += 1
        row.last = token
        row.job.emit(token, None)
        if token in row.job.stops:
            self._finish(r, "stop")
        elif row.made >= row.job.max_new:
            self._finish(r, "length")

    def _finish(self, r: int, why: str) -> None:
        row, self.rows[r] = self.rows[r], None
        row.job.emit(None, why)

    def _drop_cancelled(self) -> None:
        for r, row in self._live():
            if row.job.cancelled:
                self._finish(r, "cancelled")

    def _fail_all(self, why: str) -> None:
        for r, _ in self._live():
            self._finish(r, why)

    def _live(self) -> list[tuple[int, _Row]]:
        return [(r, row) for r, row in enumerate(self.rows) if row is not None]

    def _rows_in_use(self) -> int:
        return max((r + 1 for r, _ in self._live()), default=1)

    def _columns_in_use(self) -> int:
        return max((row.column for _, row in self._live()), default=0)

    def _fit(self, rows: int, columns: int) -> None:
        """Size the caches to the buckets of `rows` and `columns`: grown with zeros, or cut when the rows and
        columns in use fit in half (what is cut is out of every live row's reach)."""
        want = (_bucket(rows, 1, self.slots), _bucket(columns, 4 * CACHE_BUCKET, self.longest))
        if self.caches is None:
            self.caches = list(self.decoder.new_cache(*want))
            return
        have = (self.caches[0].shape[0], self.caches[0].shape[2])
        if have == want:
            return
        self.caches = [_resized(t, want) for t in self.caches]


def _resized(t: Tensor, want: tuple[int, int]) -> Tensor:
    """`t` [rows, groups, columns, d] cut or zero-padded to `want` (rows, columns)."""
    rows, columns = want
    t = t[:rows, :, :columns]
    extra_rows, extra_columns = rows - t.shape[0], columns - t.shape[2]
    if extra_columns > 0:
        t = ops.cat((t, ops.zeros((t.shape[0], t.shape[1], extra_columns, t.shape[3]), t.dtype)), 2)
    if extra_rows > 0:
        t = ops.cat((t, ops.zeros((extra_rows, *t.shape[1:]), t.dtype)), 0)
    return t
