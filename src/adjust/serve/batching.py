"""Dynamic batching for `adjust serve`: one worker thread decodes batches of compatible rows.

A request becomes a `Job` of rows (one per prompt and sample). Rows wait in one FIFO queue;
the worker takes the oldest row, waits up to `batch_wait_ms` for more rows with the same key
(strategy, sampling, lengths, seed) until `max_batch_size` rows (it does not wait when a lone
client is all there is: the last batch had one row and nothing else is queued), and runs them
through the one decoding loop, `adjust.decode.generate`, whose `on_step` callback feeds each
job's event queue (for streaming) and lets a batch stop once every client in it has gone.

Batched or alone, a row gets the same tokens: its random draws come from its own generator
(seed, prompt, sample index), and by default only prompts of equal token length share a batch,
so no row is padded. Left padding changes the hidden states in the last bits (about 2e-6 on
the shipped model, because the padded attention sums over more keys), which could flip a
near-tie; `mixed_lengths=True` batches any lengths with padding for more throughput and gives
up that guarantee.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..decode import generate
from ..errors import AdjustError
from ..sampling import SamplingConfig
from ..strategies import make_strategy

log = logging.getLogger("adjust.serve")


@dataclass(frozen=True)
class DecodeSettings:
    """Everything about a request that must be equal for two rows to share a batch (but the prompt)."""

    strategy: str
    strategy_params: tuple  # sorted (name, value) pairs given to make_strategy
    sampling: SamplingConfig
    gen_length: int
    block_length: int | None
    seed: int
    cache: str = "none"  # the decoding loop's key/value cache (needs block_length)
    unroll: str = "full"  # how ADJUST's sampler unrolls are computed (decode.UNROLL_MODES)

    def make_strategy(self):
        return make_strategy(self.strategy, **dict(self.strategy_params))


@dataclass
class Row:
    job: "Job"
    index: int  # choice index within the job
    prompt_ids: list[int]
    sample_index: int
    key: tuple = ()


class Job:
    """One request's rows and the channel from the worker thread back to its event loop.

    Events posted (in order per row): ("step", index, step, cols, tokens), ("done", index, tokens,
    stats); or ("error", exception) once for the whole job.
    """

    def __init__(self, rows: list[tuple[list[int], int]], settings: DecodeSettings, post):
        self.settings = settings
        self.rows = [Row(self, i, ids, s) for i, (ids, s) in enumerate(rows)]
        self._post = post  # thread-safe: called from the worker with one event
        self.cancelled = False
        self.failed = False

    def post(self, event) -> None:
        if not self.cancelled:
            self._post(event)

    def cancel(self) -> None:
        self.cancelled = True


class _Abort(Exception):
    """Raised from on_step when no client of the running batch is still listening."""


@dataclass
class BatcherStats:
    queued_rows: int = 0
    running_rows: int = 0
    batches: int = 0
    rows_done: int = 0
    largest_batch: int = 0
    aborted_batches: int = 0
    cancelled_jobs: int = 0
    failed_batches: int = 0
    batch_sizes: dict = field(default_factory=dict)  # rows per batch -> how many batches

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        return d


class Batcher:
    """The queue and the worker thread. `submit` from any thread; `start` / `stop` once."""

    def __init__(self, base, sampler=None, max_batch_size: int = 16, batch_wait_ms: float = 20.0,
                 mixed_lengths: bool = False):
        if max_batch_size < 1:
            raise AdjustError(f"--max-batch-size must be at least 1, got {max_batch_size}")
        if not batch_wait_ms >= 0:
            raise AdjustError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
        self.base, self.sampler = base, sampler
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait_ms / 1000.0
        self.mixed_lengths = mixed_lengths
        self.stats = BatcherStats()
        self._queue: deque[Row] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._paused = False
        self._last_rows = 0
        self._thread = threading.Thread(target=self._work, name="adjust-serve-batcher", daemon=True)

    # ---- control -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def pause(self) -> None:
        """Start no new batch until `resume` (requests still queue): lets a caller line up a batch."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def submit(self, job: Job) -> None:
        s = job.settings
        with self._cond:
            for row in job.rows:
                row.key = (s, None if self.mixed_lengths else len(row.prompt_ids))
                self._queue.append(row)
            self.stats.queued_rows = len(self._queue)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        with self._cond:
            if not job.cancelled:
                job.cancel()
                if not job.failed:
                    self.stats.cancelled_jobs += 1
            self._cond.notify_all()

    # ---- worker --------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        if any(r.job.cancelled or r.job.failed for r in self._queue):
            self._queue = deque(r for r in self._queue if not (r.job.cancelled or r.job.failed))
        self.stats.queued_rows = len(self._queue)

    def _take_batch(self) -> list[Row] | None:
        """Under the lock: wait for a first row, then for companions; None when stopping."""
        while True:
            self._drop_cancelled()
            if self._stopping:
                return None
            if self._queue and not self._paused:
                break
            self._cond.wait()
        key = self._queue[0].key
        # Wait for companions only when there is evidence of concurrent clients (the last batch was shared,
        # or others are queued now): a lone client pays no batching delay.
        busy = self._last_rows > 1 or len(self._queue) > 1
        deadline = time.monotonic() + (self.batch_wait if busy else 0.0)
        while True:
            self._drop_cancelled()
            batch = [r for r in self._queue if r.key == key][: self.max_batch_size]
            left = deadline - time.monotonic()
            if not batch or len(batch) >= self.max_batch_size or left <= 0 or self._stopping:
                break
            self._cond.wait(left)
        taken = set(map(id, batch))
        self._queue = deque(r for r in self._queue if id(r) not in taken)
        self.stats.queued_rows = len(self._queue)
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._last_rows = len(batch)
                self.stats.running_rows = len(batch)
                try:
                    self._run(batch, isolate=len({id(r.job) for r in batch}) > 1)
                except Exception as e:  # noqa: BLE001 - a bug here must not stop the worker
                    log.exception("batch bookkeeping failed")
                    for r in batch:
                        r.job.failed = True
                        r.job.post(("error", e))
                finally:
                    self.stats.running_rows = 0

    def _run(self, batch: list[Row], isolate: bool) -> None:
        """Decode one batch and post its events; if it fails, rerun each job alone (when there are several)
        so that one bad request fails alone."""
        s = batch[0].job.settings
        passes = [0] * len(batch)

        def on_step(step, rows, cols, tokens):
            per_row: dict[int, tuple[list, list]] = {}
            for r, c, t in zip(rows.tolist(), cols.tolist(), tokens.tolist()):
                per_row.setdefault(r, ([], []))
                per_row[r][0].append(c)
                per_row[r][1].append(t)
            for r, (cs, ts) in per_row.items():
                passes[r] += 1
                batch[r].job.post(("step", batch[r].index, step, cs, ts))
            if all(row.job.cancelled for row in batch):
                raise _Abort

        try:
            out = generate(self.base, [r.prompt_ids for r in batch], s.make_strategy(), s.sampling, s.gen_length,
                           s.block_length, s.seed, [r.sample_index for r in batch], self.sampler, on_step=on_step,
                           cache=s.cache, unroll=s.unroll)
        except _Abort:
            self.stats.aborted_batches += 1
            return
        except Exception as e:  # noqa: BLE001 - reported to the request(s), the server keeps serving
            if isolate:
                log.warning("a batch of %d rows failed (%s: %s); rerunning each request alone",
                            len(batch), type(e).__name__, e)
                jobs: dict[int, list[Row]] = {}
                for r in batch:
                    jobs.setdefault(id(r.job), []).append(r)
                for rows in jobs.values():
                    self._run(rows, isolate=False)
                return
            self.stats.failed_batches += 1
            if not isinstance(e, AdjustError):
                log.exception("generation failed")
            for job in {id(r.job): r.job for r in batch}.values():
                job.failed = True
                job.post(("error", e))
            return
        n = len(batch)
        self.stats.batches += 1
        self.stats.rows_done += n
        self.stats.largest_batch = max(self.stats.largest_batch, n)
        self.stats.batch_sizes[n] = self.stats.batch_sizes.get(n, 0) + 1
        for b, r in enumerate(batch):
            r.job.post(("done", r.index, out.tokens[b].tolist(),
                        {"full_passes": passes[b], "sampler_passes": out.stats.sampler_passes, "batch_size": n}))
