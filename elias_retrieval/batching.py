"""Dynamic batching: concurrent single queries are searched as one batch by one worker thread.

A caller `submit`s a checked query and waits on the returned future. The worker takes the first waiting
query, then gathers more for at most `max_wait_us` microseconds or until `max_batch` queries, and makes
one `Searcher.search_checked` call per distinct (beam_size, shortlist_size, re-ranking and its candidate
depth) in the batch (k is the largest asked; each caller gets its own k back).

It only waits for queries that are known to be coming: callers that `arrive()` on entry (the gRPC
servicer does, before parsing its request) and have not submitted yet. A lone client therefore pays no
batching delay; under load, requests already inside the server join the batch being formed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from elias_retrieval.searcher import Query, Searcher, SearchParams, SearchResults


class DeadlineExpired(TimeoutError):
    """The caller's deadline passed before its query was searched (it was skipped)."""


class BatcherClosed(RuntimeError):
    """The batcher no longer accepts queries (the server is shutting down)."""


@dataclass
class _Job:
    query: Query
    params: SearchParams
    future: Future
    deadline: float | None  # time.monotonic() seconds


_STOP = object()


class DynamicBatcher:
    """Collects (query, future) pairs and searches them in batches on one worker thread."""

    def __init__(self, searcher: Searcher, max_batch: int = 64, max_wait_us: int = 500,
                 on_batch: Callable[[int, bool], None] | None = None):
        """`on_batch(size, inline)` is told of every search: `size` queries batched by the worker, or one inline."""
        if max_batch < 1 or max_wait_us < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_us >= 0")
        self.searcher = searcher
        self.max_batch = max_batch
        self.max_wait = max_wait_us / 1e6
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._announced = 0  # callers that arrived and have not submitted (or departed) yet
        self._busy = 0  # batches being formed or searched, plus inline searches
        self._closed = False
        # Statistics: batches searched, queries searched in them, queries searched inline, queries skipped.
        self.batches = self.queries = self.inline = self.expired = 0
        self.on_batch = on_batch
        self._thread = threading.Thread(target=self._run, name="elias-batcher", daemon=True)
        self._thread.start()

    # ----- caller side -----

    def arrive(self) -> None:
        """Announce a query that will be submitted soon (the worker may wait for it)."""
        with self._lock:
            self._announced += 1

    def depart(self) -> None:
        """Withdraw an announcement without submitting (e.g. the request was invalid)."""
        with self._lock:
            self._announced = max(0, self._announced - 1)

    def try_inline(self) -> bool:
        """For an announced caller: True (and the caller searches in its own thread, then calls
        `inline_done`) when it is alone - nothing queued, searched or announced - so a lone client pays
        no thread hand-off; False means submit as usual."""
        with self._lock:
            if self._closed or self._busy or self._announced != 1 or not self._queue.empty():
                return False
            self._announced, self._busy = 0, 1
            self.inline += 1
        if self.on_batch is not None:
            self.on_batch(1, True)
        return True

    def inline_done(self) -> None:
        with self._lock:
            self._busy -= 1

    def submit(self, query: Query, params: SearchParams, deadline: float | None = None,
               announced: bool = False) -> Future:
        """Queue a checked query; the future yields a one-row SearchResults (or raises the search's error)."""
        fut: Future = Future()
        with self._lock:
            if announced:
                self._announced = max(0, self._announced - 1)
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._queue.put(_Job(query, params, fut, deadline))
        return fut

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting queries; the worker searches what is queued, then exits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    # ----- worker side -----

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            with self._lock:
                self._busy += 1
            batch = [first]
            end = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    with self._lock:
                        coming = self._announced
                    remaining = end - time.monotonic()
                    if coming == 0 or remaining <= 0:
                        break
                    try:
                        job = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if job is _STOP:
                    stop = True
                    break
                batch.append(job)
            try:
                self._search(batch)
            finally:
                with self._lock:
                    self._busy -= 1

    def _search(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the caller gave up (cancelled)
            if job.deadline is not None and job.deadline <= now:
                self.expired += 1
                job.future.set_exception(DeadlineExpired("the deadline passed before the query was searched"))
                continue
            live.append(job)
        groups: dict[tuple[int, int, bool, int], list[_Job]] = {}
        for job in live:  # a re-ranked query sees the same candidates as when alone
            p = job.params
            rerank = self.searcher.reranks(p)
            key = (p.beam_size, p.shortlist_size, rerank, self.searcher.candidates(p) if rerank else 0)
            groups.setdefault(key, []).append(job)
        for (beam, shortlist, rerank, _depth), jobs in groups.items():
            params = SearchParams(k=max(j.params.k for j in jobs), beam_size=beam, shortlist_size=shortlist,
                                  explain=any(j.params.explain for j in jobs), rerank=rerank)
            try:
                res = self.searcher.search_checked([j.query for j in jobs], params)
            except BaseException as e:  # noqa: BLE001 - every caller must get an answer
                for j in jobs:
                    j.future.set_exception(e)
                continue
            self.batches += 1
            self.queries += len(jobs)
            if self.on_batch is not None:
                self.on_batch(len(jobs), False)
            for i, j in enumerate(jobs):
                row = res.rows(i, i + 1, j.params.k)
                if not j.params.explain:
                    row.cluster = row.path = row.label_prob = None
                j.future.set_result(row)


def search_one(batcher: DynamicBatcher, query: Query, params: SearchParams,
               timeout: float | None = None) -> SearchResults:
    """Submit one checked query and wait for its result (convenience for callers without a server)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    return batcher.submit(query, params, deadline).result(timeout)
