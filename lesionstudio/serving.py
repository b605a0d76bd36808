"""Sampler work for many users at once.

One worker thread runs every sampler job (generation, inpainting, a reader study's draw), one at
a time, in the order they arrive. Generation requests waiting together with the same settings
are drawn as one batch: a batch costs far less than its samples drawn one by one, and since each
sample is drawn with its own seed, every request still gets exactly its own images.

The torch thread budget is set once, at start-up (:func:`set_thread_budget`), never around a
request: the setting is process-wide, and threads first used while it was changed would keep it.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .studio import GenerationSettings, Studio

Progress = Callable[[float, str], None]
# Samples x candidates drawn in one merged batch: larger batches save little time per sample and
# hold more memory while they are drawn.
MAX_BATCH_DRAWS = 32
POLL_SECONDS = 0.25


def set_thread_budget(cores: int | None = None) -> int:
    """Give each request one core's share: torch threads = cores // 2 (at least 1), set once at
    start-up. The sampler's per-code products are too small to gain from more threads, and two
    requests each spreading over every core make them wait on each other."""
    cores = cores or os.cpu_count() or 1
    threads = max(1, cores // 2)
    torch.set_num_threads(threads)
    return threads


def request_workers(cores: int | None = None) -> int:
    """Requests other than sampler work served at once beside the sampler, one budget each:
    the budgets the sampler leaves free."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, cores // 2) - 1)


@dataclass
class Timing:
    """Where a sampler job's time went (seconds)."""

    waited: float = 0.0  # queued behind other sampler jobs
    ran: float = 0.0  # its batch's drawing and decoding
    cpu: float = 0.0  # CPU time the worker thread got while it ran (ran - cpu: waiting for a core)
    batch: int = 1  # requests drawn together


@dataclass
class Generated:
    images: list[Image.Image]
    timing: Timing


@dataclass
class _Job:
    work: Callable[[Callable[[float], None]], Any] | None  # a plain job, given its progress callback
    settings: GenerationSettings | None = None  # or a generation request
    seeds: list[int] = field(default_factory=list)
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False
    progress: float = 0.0
    timing: Timing = field(default_factory=Timing)

    @property
    def draws(self) -> int:
        return len(self.seeds) * (self.settings.candidates if self.settings else 1)


class SamplerWorker:
    """The one queue for sampler work (see the module docstring)."""

    def __init__(self, studio: Studio, max_batch_draws: int = MAX_BATCH_DRAWS) -> None:
        self.studio = studio
        self.max_batch_draws = max_batch_draws
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._held: list[_Job] = []  # taken from the queue but not mergeable into the last batch
        self._thread = threading.Thread(target=self._loop, name="lesionstudio-sampler", daemon=True)
        self._thread.start()

    def generate(self, settings: GenerationSettings, seeds: list[int], progress: Progress | None = None) -> Generated:
        """One image per seed, drawn by the worker (perhaps in a batch with other requests)."""
        job = _Job(None, settings, list(seeds))
        return Generated(self._submit(job, progress), job.timing)

    def call(self, work: Callable[[Callable[[float], None]], Any], progress: Progress | None = None) -> Any:
        """Run ``work(progress)`` on the worker, after the jobs already queued."""
        return self._submit(_Job(work), progress)

    def waiting(self) -> int:
        return self._queue.qsize() + len(self._held)

    def _submit(self, job: _Job, progress: Progress | None) -> Any:
        self._queue.put(job)
        while True:
            try:
                return job.future.result(timeout=POLL_SECONDS)
            except TimeoutError:
                if progress:
                    n = self.waiting()
                    waiting = f"waiting for the sampler ({n} request{'s' if n != 1 else ''} waiting)"
                    progress(job.progress, "sampling codes" if job.started else waiting)

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            started, cpu = time.perf_counter(), time.thread_time()
            for job in jobs:
                job.started = True
                job.timing.waited = started - job.submitted
                job.timing.batch = len(jobs)
            try:
                results = self._run(jobs)
            except Exception as exc:  # handed to every waiting request, which raises it
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            ran, cpu = time.perf_counter() - started, time.thread_time() - cpu
            for job, result in zip(jobs, results, strict=True):
                job.timing.ran, job.timing.cpu = ran, cpu
                job.future.set_result(result)

    def _next_batch(self) -> list[_Job]:
        """The oldest job, with the queued generation requests that share its settings."""
        first = self._held.pop(0) if self._held else self._queue.get()
        if first.settings is None:
            return [first]
        while True:  # everything queued now: merge what fits, keep the rest in arrival order
            try:
                self._held.append(self._queue.get_nowait())
            except queue.Empty:
                break
        batch, draws, rest = [first], first.draws, []
        for job in self._held:
            fits = draws + job.draws <= self.max_batch_draws
            if job.settings == first.settings and fits and not _overtakes(rest):
                batch.append(job)
                draws += job.draws
            else:
                rest.append(job)
        self._held = rest
        return batch

    def _run(self, jobs: list[_Job]) -> list[Any]:
        first = jobs[0]
        if first.work is not None:
            return [first.work(_progress_of(jobs))]
        seeds = [s for job in jobs for s in job.seeds]
        images = self.studio.draw(first.settings, seeds, _progress_of(jobs))
        out, start = [], 0
        for job in jobs:
            out.append(images[start : start + len(job.seeds)])
            start += len(job.seeds)
        return out


def _overtakes(rest: list[_Job]) -> bool:
    """A plain job (inpaint, reader study) left waiting is not overtaken by later generations."""
    return any(job.settings is None for job in rest)


def _progress_of(jobs: list[_Job]) -> Callable[[float], None]:
    def report(fraction: float) -> None:
        for job in jobs:
            job.progress = fraction

    return report


class TimingLog:
    """Per-request timings as JSON lines (``app.py --timings FILE``; the load benchmark reads them)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, endpoint: str, **seconds: float) -> None:
        if self.path is None:
            return
        line = json.dumps({"endpoint": endpoint, **{k: round(v, 4) for k, v in seconds.items()}})
        with self._lock, self.path.open("a") as f:
            f.write(line + "\n")
