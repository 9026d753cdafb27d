"""Continuous batching for `adjust serve`: one worker thread steps the one decoding loop, pass by pass.

A request becomes a `Job` of rows (one per prompt and sample). The worker keeps one running
`decode.Decoding` and, before each full pass:
- takes out the rows of requests that were cancelled (the client left), failed or ran past the
  time limit: a disconnected client's rows stop costing anything within one pass;
- takes out finished rows (their "done" events are posted at once);
- fills free slots (up to `max_batch_size` rows) with waiting rows. Each slot goes to the waiting
  request that has had the fewest rows started so far (ties: the oldest), so requests are served
  round-robin and one large request cannot starve small ones. A row joins the running batch when it
  can share it: same settings and prompt length, no key/value cache (the cache is the batch's, per
  block). Once a request that cannot join is waiting, no more rows join: the batch drains and the
  next one starts with the request whose turn it is.

Batched or alone, a row gets the same tokens: its random draws come from its own generator
(seed, prompt, sample index), and by default only prompts of equal token length share a batch,
so no row is padded. Left padding changes the hidden states in the last bits (about 2e-6 on
the shipped model, because the padded attention sums over more keys), which could flip a
near-tie; `mixed_lengths=True` batches any lengths with padding for more throughput and gives
up that guarantee (padded batches take no joiners).

Limits kept here: the queue's depth in rows (`max_queued_rows`, a 429 with Retry-After), each
request's time limit (`Job.deadline`, a 504), and the drain at shutdown (`drain`: no new requests,
in-flight rows finish until the deadline, then every request still open fails with a 503).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from ..decode import Decoding
from ..errors import AdjustError
from ..sampling import SamplingConfig
from ..strategies import make_strategy
from .errors import ApiError, shutting_down

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
    unroll: str = "full"  # how ADJUST's sampler unrolls are computed (decode.UNROLL_MODES; requests resolve it)
    early_exit: bool = False  # stop a row at its first stop token (chat: EOS / end of turn), as --chat does
    logprobs: int | None = None  # record each drawn token's log-probability and the N most likely (None: off)
    cache_verify: int = 0  # positions each cached pass also recomputes (decode's module docstring)

    def make_strategy(self):
        return make_strategy(self.strategy, **dict(self.strategy_params))

    def decoding(self, base, sampler) -> Decoding:
        return Decoding(base, self.make_strategy(), self.sampling, self.gen_length, self.block_length, self.seed,
                        sampler, early_exit=self.early_exit, cache=self.cache, unroll=self.unroll,
                        logprobs=self.logprobs, cache_verify=self.cache_verify)


@dataclass(eq=False)
class Row:
    job: "Job"
    index: int  # choice index within the job
    prompt_ids: list[int]
    sample_index: int
    key: tuple = ()
    passes: int = 0  # full passes this row took part in
    unrolls: int = 0  # sampler passes of those
    batch_size: int = 0  # the largest batch it ran in


class Job:
    """One request's rows and the channel from the worker thread back to its event loop.

    Events posted (in order per row): ("step", index, step, cols, tokens), ("done", index, tokens,
    stats, logprobs or None); or ("error", exception) once for the whole job. `timeout`: seconds from submission after
    which the job fails with a 504 (None: no limit).
    """

    def __init__(self, rows: list[tuple[list[int], int]], settings: DecodeSettings, post,
                 timeout: float | None = None):
        self.settings = settings
        self.rows = [Row(self, i, ids, s) for i, (ids, s) in enumerate(rows)]
        self.pending: list[Row] = []  # rows not started yet (set at submission)
        self.started = 0  # rows started so far: the round-robin's measure
        self.seq = 0  # arrival order
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.solo = False  # rerun in a batch of its own (after a batch it was in failed)
        self._post = post  # thread-safe: called from the worker with one event
        self.cancelled = False
        self.failed = False

    @property
    def gone(self) -> bool:
        return self.cancelled or self.failed

    def post(self, event) -> None:
        if not self.cancelled:
            self._post(event)

    def fail(self, error: Exception) -> None:
        if not self.gone:
            self.post(("error", error))
            self.failed = True

    def cancel(self) -> None:
        self.cancelled = True


class ScoreJob(Job):
    """A request's prompts to score by the chain rule (`likelihood.chain_logprobs`: echo + logprobs).

    The worker scores `max_batch_size` positions per turn, between decoding passes. Events: ("scored", index,
    (logprobs, top_ids, top_logprobs)) per prompt, in order; or ("error", exception)."""

    def __init__(self, prompts: list[list[int]], top: int, post, timeout: float | None = None):
        super().__init__([], None, post, timeout)
        self.prompts, self.top = prompts, top
        self._prompt, self._pos, self._parts = 0, 0, []

    def turn(self, base, positions: int) -> int:
        """Score up to `positions` more positions (returns how many); `done` tells when every prompt is."""
        from ..likelihood import chain_logprobs

        budget = positions
        while self._prompt < len(self.prompts) and positions > 0:
            ids = self.prompts[self._prompt]
            stop = min(len(ids), self._pos + positions)
            if stop > self._pos:
                self._parts.append(chain_logprobs(base, ids, self._pos, self.top, batch_size=positions,
                                                  stop=stop))
                positions -= stop - self._pos
            self._pos = stop
            if self._pos >= len(ids):
                parts = self._parts or [chain_logprobs(base, ids, 0, self.top, stop=0)]
                self.post(("scored", self._prompt, tuple(torch.cat([p[k] for p in parts]) for k in range(3))))
                self._prompt, self._pos, self._parts = self._prompt + 1, 0, []
        return budget - positions

    @property
    def done(self) -> bool:
        return self._prompt >= len(self.prompts)


@dataclass
class BatcherStats:
    queued_rows: int = 0
    running_rows: int = 0
    batches: int = 0  # decodings started
    passes: int = 0  # full passes over all batches
    rows_done: int = 0
    joined_rows: int = 0  # rows that joined a batch already running
    largest_batch: int = 0
    aborted_batches: int = 0  # batches that ended because every client in them left
    cancelled_jobs: int = 0
    failed_batches: int = 0
    expired_jobs: int = 0  # requests past the time limit
    rejected_jobs: int = 0  # requests refused because the queue was full
    scored_positions: int = 0  # prompt positions scored (echo + logprobs)
    batch_sizes: dict = field(default_factory=dict)  # rows in a full pass -> how many passes

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        return d


class Batcher:
    """The queue and the worker thread. `submit` / `cancel` from any thread; `start` / `drain` / `stop` once."""

    def __init__(self, base, sampler=None, max_batch_size: int = 16, batch_wait_ms: float = 20.0,
                 mixed_lengths: bool = False, max_queued_rows: int = 1024):
        if max_batch_size < 1:
            raise AdjustError(f"--max-batch-size must be at least 1, got {max_batch_size}")
        if not batch_wait_ms >= 0:
            raise AdjustError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
        if max_queued_rows < 1:
            raise AdjustError(f"--max-queued-rows must be at least 1, got {max_queued_rows}")
        self.base, self.sampler = base, sampler
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait_ms / 1000.0
        self.mixed_lengths, self.max_queued_rows = mixed_lengths, max_queued_rows
        self.stats = BatcherStats()
        self._jobs: list[Job] = []  # jobs with rows waiting
        self._scoring: list[ScoreJob] = []  # prompt scoring, first come first served, a turn between passes
        self._cond = threading.Condition()
        self._stopping = self._paused = False
        self._drain_deadline: float | None = None
        self._seq = 0
        self._last_rows = 0
        self._busy_seconds = 0.0  # time spent in passes: with rows_done, the throughput Retry-After uses
        # worker-owned: the running decoding and its rows, in its row order
        self._decoding: Decoding | None = None
        self._running: list[Row] = []
        self._key: tuple | None = None
        self._thread = threading.Thread(target=self._work, name="adjust-serve-batcher", daemon=True)

    # ---- control -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        for job in self._open_jobs():  # nothing is left waiting forever
            job.fail(shutting_down())

    def drain(self, timeout: float) -> None:
        """Refuse new requests (503); rows in flight or queued finish until `timeout` seconds from now, then
        every request still open fails with a 503."""
        with self._cond:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + max(0.0, timeout)
            self._cond.notify_all()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def pause(self) -> None:
        """Admit no row to a batch until `resume` (requests still queue): lets a caller line up a batch."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def submit(self, job: Job) -> None:
        """Queue a job's rows (a ScoreJob counts as one); an ApiError (503 while draining, 429 when the queue is
        full) refuses it."""
        with self._cond:
            if self._stopping or self.draining:
                raise shutting_down()
            waiting = self._waiting()
            if waiting + max(1, len(job.rows)) > self.max_queued_rows:
                self.stats.rejected_jobs += 1
                raise ApiError(f"the server is busy: {waiting} rows are waiting and this request adds "
                               f"{len(job.rows)}, beyond the queue's {self.max_queued_rows}; retry later", None,
                               "queue_full", 429, "rate_limit_error", {"Retry-After": str(self._retry_after(waiting))})
            job.seq = self._seq
            self._seq += 1
            if isinstance(job, ScoreJob):
                self._scoring.append(job)
            else:
                for row in job.rows:
                    row.key = self._key_of(row)
                job.pending = list(job.rows)
                self._jobs.append(job)
            self.stats.queued_rows = waiting + max(1, len(job.rows))
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        with self._cond:
            if not job.cancelled:
                job.cancel()
                if not job.failed:
                    self.stats.cancelled_jobs += 1
            self._cond.notify_all()

    # ---- scheduling (under the lock) ---------------------------------------------------------
    def _key_of(self, row: Row) -> tuple:
        job = row.job
        return (job.settings, None if self.mixed_lengths else len(row.prompt_ids), id(job) if job.solo else None)

    def _retry_after(self, waiting: int) -> int:
        rate = self.stats.rows_done / self._busy_seconds if self._busy_seconds > 0 else 0.0
        return int(min(600, max(1, math.ceil(waiting / rate)))) if rate > 0 else 5

    def _waiting(self) -> int:
        """Rows queued, not started (a scoring job counts as one): the queue's depth."""
        return sum(len(j.pending) for j in self._jobs) + len(self._scoring)

    def _open_jobs(self) -> list[Job]:
        jobs = {id(j): j for j in self._jobs + self._scoring}
        jobs.update({id(r.job): r.job for r in self._running})
        return [j for j in jobs.values() if not j.gone]

    def _tidy(self) -> None:
        """Fail jobs past their time limit (and all at the drain deadline); forget jobs that are gone."""
        now = time.monotonic()
        for job in self._open_jobs():
            if self._drain_deadline is not None and now >= self._drain_deadline:
                job.fail(shutting_down())
            elif job.deadline is not None and now >= job.deadline:
                self.stats.expired_jobs += 1
                job.fail(ApiError(f"the request ran past the server's time limit of {job.timeout:g} s "
                                  "(--request-timeout); ask for fewer rows or tokens", None, "timeout", 504,
                                  "server_error"))
        self._jobs = [j for j in self._jobs if not j.gone and j.pending]
        self._scoring = [j for j in self._scoring if not j.gone]
        self.stats.queued_rows = self._waiting()

    def _next_job(self) -> Job | None:
        """The waiting job whose turn it is: fewest rows started, then the oldest."""
        return min(self._jobs, key=lambda j: (j.started, j.seq), default=None)

    def _fits(self, row: Row) -> bool:
        """Whether `row` can join the batch: a new one (no row running yet) by its key; a running one if also
        the decoding takes rows now (no cache, no padding) of its prompt length."""
        if row.key != self._key:
            return False
        d = self._decoding
        return not self._running or (d.joinable and len(row.prompt_ids) == d.prompt_length)

    def _admit(self) -> list[Row]:
        """Rows that start now: into free slots, round-robin over jobs, while the job whose turn it is fits."""
        if self._paused:
            return []
        taken: list[Row] = []
        while len(self._running) + len(taken) < self.max_batch_size:
            job = self._next_job()
            if job is None:
                break
            row = job.pending[0]
            if not self._running and not taken:  # a new batch: its settings are this row's
                self._key = row.key
            elif not self._fits(row):
                # the job whose turn it is cannot join: others that can join while none is waiting for that
                job = min((j for j in self._jobs if self._fits(j.pending[0])), key=lambda j: (j.started, j.seq),
                          default=None) if not self._running else None
                if job is None:
                    break
                row = job.pending[0]
            job.pending.pop(0)
            job.started += 1
            taken.append(row)
            if not job.pending:
                self._jobs.remove(job)
        self.stats.queued_rows = self._waiting()
        return taken

    def _wait_for_work(self) -> bool:
        """Wait until there is a pass to run or rows to admit (False: stopping); wakes for deadlines too."""
        while not self._stopping:
            self._tidy()
            if self._running or (self._jobs or self._scoring) and not self._paused:
                return True
            deadlines = [j.deadline for j in self._jobs + self._scoring if j.deadline is not None]
            if self._drain_deadline is not None:
                deadlines.append(self._drain_deadline)
            self._cond.wait(None if not deadlines else max(0.0, min(deadlines) - time.monotonic()) + 0.01)
        return False

    def _form_batch(self) -> None:
        """Before a new batch starts with other clients active: wait up to batch_wait for companions."""
        job = self._next_job()
        if self._running or job is None or self._paused:
            return
        busy = self._last_rows > 1 or sum(len(j.pending) for j in self._jobs) > 1
        deadline = time.monotonic() + (self.batch_wait if busy else 0.0)
        while not self._stopping:
            key = job.pending[0].key if job.pending else None
            same = sum(1 for j in self._jobs for r in j.pending if r.key == key)
            left = deadline - time.monotonic()
            if job.gone or same >= self.max_batch_size or left <= 0:
                return
            self._cond.wait(left)

    # ---- worker --------------------------------------------------------------------------
    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not self._wait_for_work():
                        return
                    self._form_batch()
                    self._tidy()
                    self._drop_gone()
                    joining = self._admit()
                try:
                    self._start_rows(joining)
                    if self._running:
                        self._pass()
                except Exception as e:  # noqa: BLE001 - a bug here must not stop the worker
                    self._fail_batch(e)
                self._score_turn()

    def _drop_gone(self) -> None:
        """Take the rows of cancelled / failed jobs out of the running batch (they free their slots now)."""
        gone = [i for i, r in enumerate(self._running) if r.job.gone]
        if not gone:
            return
        self._decoding.remove(gone)
        self._running = [r for r in self._running if not r.job.gone]
        if not self._running:
            self.stats.aborted_batches += 1
            self._end_batch()
        self.stats.running_rows = len(self._running)

    def _end_batch(self) -> None:
        self._decoding, self._key = None, None

    def _start_rows(self, rows: list[Row]) -> None:
        if not rows:
            return
        if self._running:
            self.stats.joined_rows += len(rows)
        else:
            self.stats.batches += 1
            self._decoding = rows[0].job.settings.decoding(self.base, self.sampler)
        self._running += rows
        self.stats.running_rows = len(self._running)
        self._decoding.add([r.prompt_ids for r in rows], [r.sample_index for r in rows])

    def _pass(self) -> None:
        """One full pass of the running batch; posts its step events and the finished rows' results."""
        d, rows = self._decoding, list(self._running)
        n = len(rows)

        def on_step(step, r, cols, tokens):
            per_row: dict[int, tuple[list, list]] = {}
            for i, c, t in zip(r.tolist(), cols.tolist(), tokens.tolist()):
                per_row.setdefault(i, ([], []))
                per_row[i][0].append(c)
                per_row[i][1].append(t)
            for i, (cs, ts) in per_row.items():
                rows[i].job.post(("step", rows[i].index, step, cs, ts))

        t0 = time.perf_counter()
        d.step(on_step)
        self._busy_seconds += time.perf_counter() - t0
        self._last_rows = n
        self.stats.passes += 1
        self.stats.largest_batch = max(self.stats.largest_batch, n)
        self.stats.batch_sizes[n] = self.stats.batch_sizes.get(n, 0) + 1
        for i in d.active.nonzero(as_tuple=True)[0].tolist():
            rows[i].passes += 1
            rows[i].unrolls += d.last_unrolls
            rows[i].batch_size = max(rows[i].batch_size, n)
        done = d.finished()
        if not done:
            return
        tokens = d.tokens(done)
        lp = d.token_logprobs(done) if d.logprobs is not None else None
        self.stats.rows_done += len(done)  # counted before the answers go out: a client then sees it in /health
        for b, (t, i) in enumerate(zip(tokens, done)):
            r = rows[i]
            r.job.post(("done", r.index, t.tolist(),
                        {"full_passes": r.passes, "sampler_passes": r.unrolls, "batch_size": r.batch_size},
                        None if lp is None else tuple(x[b] for x in lp)))
        d.remove(done)
        gone = set(done)
        self._running = [r for i, r in enumerate(rows) if i not in gone]
        self.stats.running_rows = len(self._running)
        if not self._running:
            self._end_batch()

    def _score_turn(self) -> None:
        """One turn of the oldest scoring job: up to max_batch_size positions (a pass's worth of rows)."""
        if self._paused or not self._scoring:
            return
        job = self._scoring[0]
        t0 = time.perf_counter()
        try:
            self.stats.scored_positions += job.turn(self.base, self.max_batch_size)
        except Exception as e:  # noqa: BLE001 - this request fails, the server keeps serving
            if not isinstance(e, (AdjustError, ApiError)):
                log.error("scoring failed", exc_info=e)
            job.fail(e)
        self._busy_seconds += time.perf_counter() - t0
        if job.done or job.gone:
            with self._cond:
                if job in self._scoring:
                    self._scoring.remove(job)
                self.stats.queued_rows = self._waiting()

    def _fail_batch(self, e: Exception) -> None:
        """A pass failed. Rows of several requests: each request reruns from its start in a batch of its own
        (same tokens), so that a bad one fails alone; one request: it fails."""
        rows, jobs = self._running, {}
        for r in rows:
            jobs.setdefault(id(r.job), r.job)
        with self._cond:
            self._running, self.stats.running_rows = [], 0
            self._end_batch()
            if len(jobs) > 1:
                log.warning("a batch of %d rows of %d requests failed (%s: %s); rerunning each request alone",
                            len(rows), len(jobs), type(e).__name__, e)
                for job in jobs.values():
                    job.solo = True
                    back = [r for r in rows if r.job is job]
                    for r in job.rows:
                        r.key = self._key_of(r)
                        r.passes = r.unrolls = r.batch_size = 0
                    job.pending = sorted(back + job.pending, key=lambda r: r.index)
                    job.started -= len(back)
                    if job not in self._jobs and not job.gone:
                        self._jobs.append(job)
                return
            self.stats.failed_batches += 1
            if not isinstance(e, (AdjustError, ApiError)):
                log.error("generation failed", exc_info=e)
            for job in jobs.values():
                job.fail(e)
