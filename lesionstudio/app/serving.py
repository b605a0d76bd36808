"""Sampler work for many users at once.

One worker runs every sampler job (generation, inpainting, a reader study's draw), one at a time,
in the order they arrive. Generation requests waiting together with the same settings are drawn
as one batch: a batch costs far less than its samples drawn one by one, and since each sample is
drawn with its own seed, every request still gets exactly its own images.

The worker is processes of their own (one a core by default), forked from the app once the
default models are loaded (so they share their memory): the sampler's per-code loop is Python,
and in the app's process it would hold the interpreter lock that Gradio and every other request
need. Jobs reach them as typed tasks (``Draw``, ``Inpaint``, ``QuizImages``: what to run on the
Studio, and with what) over pipes; progress, results and errors come back the same way. A
generation's seeds are shared among the processes (each draws a run of them, at once), so an
idle app draws one request on every core; other jobs run in the first process.
Each runs on one torch thread: a process forked after OpenMP has run must not start more
threads (libgomp hangs), and more processes use the cores better than threads would (the
per-code loop is one thread's work). Where fork is unavailable (macOS, Windows) the worker is a
thread of the app's process instead, with the same queue.

The app's torch thread budget is set once, at start-up (:func:`set_thread_budget`), never around
a request: the setting is process-wide, and threads first used while it was changed would keep it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from .readerstudy import Trial
from .studio import GenerationRequest, Inpainting, Studio, StudioError

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


class SamplerError(StudioError):
    """The sampler process stopped while it drew a request (it is restarted for the next one)."""


@dataclass
class Timing:
    """Where a sampler job's time went (seconds)."""

    waited: float = 0.0  # queued behind other sampler jobs
    ran: float = 0.0  # its batch's drawing and decoding
    cpu: float = 0.0  # CPU time the worker got while it ran (ran - cpu: waiting for a core)
    batch: int = 1  # requests drawn together


@dataclass
class Generated:
    images: list[Image.Image]
    timing: Timing


class Task(Protocol):
    """A job for the sampler worker: what it runs on the Studio (it must pickle: it crosses a pipe)."""

    def run(self, studio: Studio, progress: Callable[[float], None]) -> Any: ...


@dataclass(frozen=True)
class Draw:
    """Generation: one image per seed (several waiting requests' seeds, merged)."""

    request: GenerationRequest
    seeds: list[int]

    def run(self, studio: Studio, progress: Callable[[float], None]) -> list[Image.Image]:
        return studio.draw(self.request, self.seeds, progress)


@dataclass(frozen=True)
class Inpaint:
    """The Inpaint tab's request."""

    image: str | Path | Image.Image | None
    mask: Image.Image | np.ndarray | list[np.ndarray] | None  # a mask, or the painted layers
    latent: int
    n: int
    temperature: float
    seed: int

    def run(self, studio: Studio, progress: Callable[[float], None]) -> Inpainting:
        return studio.inpaint(self.image, self.mask, self.latent, self.n, self.temperature, self.seed, progress)


@dataclass(frozen=True)
class QuizImages:
    """The reader study's synthetic images, drawn when it starts."""

    trials: list[Trial]

    def run(self, studio: Studio, progress: Callable[[float], None]) -> dict[int, Image.Image]:
        return studio.quiz_synthetic_images(self.trials, progress)


@dataclass
class _Job:
    task: Task
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False
    progress: float = 0.0
    timing: Timing = field(default_factory=Timing)

    @property
    def request(self) -> GenerationRequest | None:
        """The generation request, for a job that can be merged with others; None for the rest."""
        return self.task.request if isinstance(self.task, Draw) else None

    @property
    def draws(self) -> int:
        if not isinstance(self.task, Draw):
            return 1
        return len(self.task.seeds) * self.task.request.draws_per_sample


# What passes over the pipe: a Task one way; progress, then a result or an error, the other.
@dataclass
class _Progress:
    fraction: float


@dataclass
class _Done:
    result: Any
    cpu: float


@dataclass
class _Failed:
    error: Exception


def sampler_processes(cores: int | None = None) -> int:
    """Sampler processes for an app: one a core, so one request's samples are drawn on every
    core at once when the app is idle (each process takes a share of the seeds)."""
    return max(1, cores or os.cpu_count() or 1)


@dataclass
class _Child:
    """One sampler process (or, without fork, the one thread) and the app's end of its pipe."""

    conn: Connection
    handle: BaseProcess | threading.Thread


class SamplerWorker:
    """The one queue for sampler work (see the module docstring). ``process=None`` chooses
    processes where fork is available; False keeps the worker in this process (a thread).
    ``processes`` sampler processes share each generation's seeds (default: one a core)."""

    def __init__(
        self,
        studio: Studio,
        max_batch_draws: int = MAX_BATCH_DRAWS,
        process: bool | None = None,
        processes: int | None = None,
    ) -> None:
        self.studio = studio
        self.max_batch_draws = max_batch_draws
        self.process = can_fork() if process is None else process
        if self.process and not can_fork():
            raise RuntimeError("a sampler process needs the fork start method (Linux)")
        if processes is not None and processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.processes = (processes or sampler_processes()) if self.process else 1
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._held: list[_Job] = []  # taken from the queue but not mergeable into the last batch
        self._children: list[_Child] = []
        self._start_children()
        self._thread = threading.Thread(target=self._loop, name="lesionstudio-sampler", daemon=True)
        self._thread.start()

    @property
    def pids(self) -> list[int]:
        """The processes the sampler runs in (this one when it is a thread)."""
        return [
            c.handle.pid if isinstance(c.handle, BaseProcess) and c.handle.pid else os.getpid() for c in self._children
        ]

    @property
    def pid(self) -> int:
        """The first sampler process (the one plain jobs run in)."""
        return self.pids[0]

    def generate(self, request: GenerationRequest, seeds: list[int], progress: Progress | None = None) -> Generated:
        """One image per seed, drawn by the worker (perhaps in a batch with other requests)."""
        job = _Job(Draw(request, list(seeds)))
        return Generated(self._submit(job, progress), job.timing)

    def run(self, task: Task, progress: Progress | None = None) -> Any:
        """``task.run(studio)`` on the worker, after the jobs already queued (result must pickle)."""
        return self._submit(_Job(task), progress)

    def submit(self, task: Task) -> Future:
        """Queue ``task.run(studio)`` like ``run`` and return at once: the Future holds its result."""
        job = _Job(task)
        self._queue.put(job)
        return job.future

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

    def _start_children(self) -> None:
        self._children = [self._start_child() for _ in range(self.processes)]

    def _start_child(self) -> _Child:
        ours, theirs = multiprocessing.Pipe()
        if self.process:
            child: BaseProcess | threading.Thread = multiprocessing.get_context("fork").Process(
                target=_serve_in_process, args=(theirs, ours, self.studio), name="lesionstudio-sampler", daemon=True
            )
        else:
            child = threading.Thread(target=_serve, args=(theirs, self.studio, time.thread_time), daemon=True)
        child.start()
        if self.process:
            theirs.close()  # the child's end lives in the child: its exit then reads as EOF here
        return _Child(ours, child)

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            started = time.perf_counter()
            for job in jobs:
                job.started = True
                job.timing.waited = started - job.submitted
                job.timing.batch = len(jobs)
            try:
                results, cpu = self._run(jobs)
            except Exception as exc:  # handed to every waiting request, which raises it
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            ran = time.perf_counter() - started
            for job, result in zip(jobs, results, strict=True):
                job.timing.ran, job.timing.cpu = ran, cpu
                job.future.set_result(result)

    def _next_batch(self) -> list[_Job]:
        """The oldest job, with the queued generation requests that share its settings."""
        first = self._held.pop(0) if self._held else self._queue.get()
        if first.request is None:
            return [first]
        while True:  # everything queued now: merge what fits, keep the rest in arrival order
            try:
                self._held.append(self._queue.get_nowait())
            except queue.Empty:
                break
        batch, draws, rest = [first], first.draws, []
        for job in self._held:
            fits = draws + job.draws <= self.max_batch_draws
            if job.request == first.request and fits and not _overtakes(rest):
                batch.append(job)
                draws += job.draws
            else:
                rest.append(job)
        self._held = rest
        return batch

    def _run(self, jobs: list[_Job]) -> tuple[list[Any], float]:
        """Each job's result (a merged draw split back by request) and the workers' CPU seconds."""
        first = jobs[0]
        if first.request is None:
            done = self._ask([first.task], jobs)
            return [done[0].result], done[0].cpu
        seeds = [s for job in jobs for s in job.task.seeds]
        shares = split_seeds(seeds, self.processes)
        done = self._ask([Draw(first.request, share) for share in shares], jobs, weights=[len(s) for s in shares])
        images = [image for part in done for image in part.result]
        out, start = [], 0
        for job in jobs:
            out.append(images[start : start + len(job.task.seeds)])
            start += len(job.task.seeds)
        return out, sum(part.cpu for part in done)

    def _ask(self, tasks: list[Task], jobs: list[_Job], weights: list[int] | None = None) -> list[_Done]:
        """Send task k to sampler process k, relay their progress to the jobs (weighted by
        ``weights``) until every one has answered, and return the answers in order."""
        if any(isinstance(c.handle, BaseProcess) and not c.handle.is_alive() for c in self._children):
            self._restart()  # one died between jobs: nobody was waiting on it
        children = self._children[: len(tasks)]
        weights = weights or [1] * len(tasks)
        fractions = [0.0] * len(tasks)
        answers: dict[int, _Done] = {}
        try:
            for child, task in zip(children, tasks, strict=True):
                child.conn.send(task)
            while len(answers) < len(tasks):
                for conn in wait([c.conn for k, c in enumerate(children) if k not in answers]):
                    k = next(k for k, c in enumerate(children) if c.conn is conn)
                    message = conn.recv()
                    if isinstance(message, _Progress):
                        fractions[k] = message.fraction
                    elif isinstance(message, _Failed):
                        self._drain(children, answers, k)
                        raise message.error
                    else:
                        answers[k] = message
                        fractions[k] = 1.0
                done = sum(f * w for f, w in zip(fractions, weights, strict=True)) / sum(weights)
                for job in jobs:
                    job.progress = done
        except (EOFError, OSError) as exc:  # a process died (killed, out of memory)
            self._restart()
            raise SamplerError(
                "The sampler stopped while drawing this request and has been restarted; please try again."
            ) from exc
        return [answers[k] for k in range(len(tasks))]

    def _drain(self, children: list[_Child], answers: dict[int, _Done], failed: int) -> None:
        """After one share failed, wait for the others' answers, so none is read by a later job."""
        for k, child in enumerate(children):
            while k != failed and k not in answers:
                message = child.conn.recv()
                if not isinstance(message, _Progress):
                    answers[k] = message

    def _restart(self) -> None:
        """Stop every sampler process (the others may be mid-share of a failed draw) and start anew."""
        for child in self._children:
            child.conn.close()
            if isinstance(child.handle, BaseProcess):
                if child.handle.is_alive():
                    child.handle.terminate()
                child.handle.join(timeout=5)
        self._start_children()


def split_seeds(seeds: list[int], parts: int) -> list[list[int]]:
    """The seeds in at most ``parts`` runs of consecutive seeds, as even as can be, in order."""
    parts = max(1, min(parts, len(seeds)))
    size, extra = divmod(len(seeds), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        out.append(seeds[start:end])
        start = end
    return out


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def _serve_in_process(conn: Connection, app_end: Connection, studio: Studio) -> None:
    """The sampler process: set up as the module docstring says, then serve."""
    app_end.close()  # else the pipe would never read as closed here when the app goes
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the app, which closes the pipe
    torch.set_num_threads(1)
    studio.forked()
    _serve(conn, studio, time.process_time)


def _serve(conn: Connection, studio: Studio, clock: Callable[[], float]) -> None:
    """The worker's side: run each task it is sent, reporting progress, until the pipe closes."""
    while True:
        try:
            task: Task = conn.recv()
        except (EOFError, OSError):
            return
        cpu = clock()
        try:
            result = task.run(studio, _reporter(conn))
            reply: _Done | _Failed = _Done(result, clock() - cpu)
        except Exception as exc:  # the caller raises it
            reply = _Failed(_travelling(exc))
        try:
            _reply(conn, reply)
        except OSError:  # the app has gone
            return


def _travelling(exc: Exception) -> Exception:
    """The error itself if it survives the pipe (it pickles and unpickles), else its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _reply(conn: Connection, reply: _Done | _Failed) -> None:
    try:
        conn.send(reply)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:  # a result or error that cannot travel
        conn.send(_Failed(RuntimeError(f"the sampler's answer could not be sent back: {exc}")))


def _reporter(conn: Connection, every: float = 0.1) -> Callable[[float], None]:
    """A progress callback that sends the fraction done, at most every ``every`` seconds."""
    last = 0.0

    def report(fraction: float) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every:
            last = now
            conn.send(_Progress(fraction))

    return report


def _overtakes(rest: list[_Job]) -> bool:
    """A plain job (inpaint, reader study) left waiting is not overtaken by later generations."""
    return any(job.request is None for job in rest)


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
