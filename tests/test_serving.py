"""The sampler worker: one job at a time, waiting generations merged into a batch, each request
still given exactly its own seeds' images, in a process of its own (or a thread); the thread
budget set once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_pair

from lesionstudio.app.serving import (
    Inpaint,
    SamplerError,
    SamplerWorker,
    TimingLog,
    request_workers,
    sampler_processes,
    set_thread_budget,
    split_seeds,
)
from lesionstudio.app.studio import Studio, StudioError


@pytest.fixture(scope="module")
def studio(tmp_path_factory) -> Studio:
    root = tmp_path_factory.mktemp("ckpts")
    make_pair(root, 32)
    return Studio(root)


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(img) for img in images]


FORK = multiprocessing.get_context("fork")


class Harness:
    """The studio as the worker sees it, with jobs for the tests: hold the worker, note the order
    of batches and jobs, fail, say where it runs. Its events and its record live in whichever
    process the worker runs in (events made before the fork work in both)."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio
        self.started, self.release = FORK.Event(), FORK.Event()
        self.order: list = []

    def __getattr__(self, name):
        return getattr(self.studio, name)

    def draw(self, request, seeds, progress=None):
        self.order.append(list(seeds))
        return self.studio.draw(request, seeds, progress)

    def block(self, progress=None):
        self.started.set()
        self.release.wait(30)

    def nap(self, seconds: float, progress=None):
        self.started.set()
        time.sleep(seconds)

    def note(self, label: str, progress=None):
        self.order.append(label)

    def recorded(self, progress=None) -> list:
        return self.order

    def fail(self, progress=None):
        raise StudioError("no such thing")

    def whereabouts(self, progress=None) -> tuple[int, int]:
        return os.getpid(), torch.get_num_threads()


@dataclass(frozen=True)
class Block:
    def run(self, studio, progress):
        return studio.block()


@dataclass(frozen=True)
class Nap:
    seconds: float

    def run(self, studio, progress):
        return studio.nap(self.seconds)


@dataclass(frozen=True)
class Note:
    label: str

    def run(self, studio, progress):
        return studio.note(self.label)


@dataclass(frozen=True)
class Recorded:
    def run(self, studio, progress):
        return studio.recorded()


@dataclass(frozen=True)
class Fail:
    def run(self, studio, progress):
        return studio.fail()


@dataclass(frozen=True)
class Whereabouts:
    def run(self, studio, progress):
        return studio.whereabouts()


@pytest.fixture(params=[False, True], ids=["thread", "process"])
def worker(request, studio: Studio) -> SamplerWorker:
    """A worker in this process and one in a process of its own: the same queue either way."""
    return SamplerWorker(Harness(studio), process=request.param, processes=1)


def hold(worker: SamplerWorker) -> threading.Thread:
    """Keep the worker busy with a plain job until ``worker.studio.release`` is set."""
    harness = worker.studio
    harness.started.clear()
    harness.release.clear()
    thread = threading.Thread(target=worker.run, args=(Block(),))
    thread.start()
    assert harness.started.wait(30)
    return thread


def in_threads(calls) -> list:
    """Run each call in its own thread, started in order (each queued before the next starts)."""
    results: list = [None] * len(calls)

    def run(i, fn):
        try:
            results[i] = fn()
        except Exception as exc:  # handed back to the test
            results[i] = exc

    threads = []
    for i, fn in enumerate(calls):
        threads.append(threading.Thread(target=run, args=(i, fn)))
        threads[-1].start()
        time.sleep(0.05)
    return threads, results


def test_waiting_generations_are_one_batch_and_each_gets_its_own_images(studio: Studio, worker: SamplerWorker):
    settings = studio.request(32)
    requests = [[5], [9, 10], [100]]
    blocker = hold(worker)
    threads, results = in_threads([lambda s=s: worker.generate(settings, s) for s in requests])
    worker.studio.release.set()
    for t in [blocker, *threads]:
        t.join(60)
    for seeds, out in zip(requests, results, strict=True):
        assert out.timing.batch == 3
        alone = studio.generate(32, n=len(seeds), seed=seeds)
        assert len(out.images) == len(seeds)
        for got, want in zip(arrays(out.images), arrays(alone), strict=True):
            np.testing.assert_array_equal(got, want)


def test_other_settings_wait_for_their_own_batch_and_plain_jobs_keep_their_turn(studio: Studio, worker: SamplerWorker):
    any_class = studio.request(32)
    benign = studio.request(32, class_name="benign")
    blocker = hold(worker)
    threads, results = in_threads(
        [
            lambda: worker.generate(any_class, [1]),
            lambda: worker.generate(benign, [2]),
            lambda: worker.generate(any_class, [3]),  # joins the first: same settings, nothing plain between
            lambda: worker.run(Note("plain")),
            lambda: worker.generate(any_class, [4]),  # may not overtake the plain job
        ]
    )
    worker.studio.release.set()
    for t in [blocker, *threads]:
        t.join(60)
    assert worker.run(Recorded()) == [[1, 3], [2], "plain", [4]]
    assert [results[i].timing.batch for i in (0, 1, 2, 4)] == [2, 1, 2, 1]


def test_a_batch_never_exceeds_its_draw_limit(studio: Studio):
    worker = SamplerWorker(Harness(studio), max_batch_draws=3, process=False)
    settings = studio.request(32)
    blocker = hold(worker)
    threads, results = in_threads([lambda s=s: worker.generate(settings, [s, s + 1]) for s in (0, 10, 20)])
    worker.studio.release.set()
    for t in [blocker, *threads]:
        t.join(60)
    assert [r.timing.batch for r in results] == [1, 1, 1]


def test_a_failing_job_raises_in_its_caller_and_the_worker_keeps_serving(studio: Studio, worker: SamplerWorker):
    with pytest.raises(StudioError, match="no such thing"):
        worker.run(Fail())
    with pytest.raises(StudioError, match="upload an image"):
        worker.run(Inpaint(None, [], 32, 1, 1.0, 0))
    out = worker.generate(studio.request(32), [4])
    assert len(out.images) == 1


def test_progress_reports_the_wait_then_the_drawing(studio: Studio, worker: SamplerWorker):
    seen: list[str] = []
    blocker = hold(worker)
    settings = studio.request(32)
    threads, _ = in_threads([lambda: worker.generate(settings, [1, 2, 3, 4], lambda f, desc: seen.append(desc))])
    time.sleep(0.6)
    worker.studio.release.set()
    for t in [blocker, *threads]:
        t.join(60)
    assert seen and seen[0].startswith("waiting for the sampler")


def test_the_sampler_process_draws_on_one_thread_and_leaves_the_apps_setting_alone(studio: Studio):
    threads = torch.get_num_threads()
    worker = SamplerWorker(Harness(studio), process=True)
    pid, its_threads = worker.run(Whereabouts())
    assert pid == worker.pid != os.getpid() and its_threads == 1
    assert torch.get_num_threads() == threads
    assert SamplerWorker(Harness(studio), process=False).run(Whereabouts()) == (os.getpid(), threads)


def test_sampler_processes_share_a_request_seed_by_seed(studio: Studio):
    worker = SamplerWorker(Harness(studio), process=True, processes=2)
    assert len(set(worker.pids)) == 2 and os.getpid() not in worker.pids
    seeds = [5, 6, 7]
    out = worker.generate(studio.request(32), seeds)
    for got, want in zip(arrays(out.images), arrays(studio.generate(32, n=3, seed=seeds)), strict=True):
        np.testing.assert_array_equal(got, want)
    assert worker.run(Recorded()) == [[5, 6]]  # the first process drew the first share; the other [7]
    assert worker.generate(studio.request(32), [8]).timing.batch == 1  # one seed: the first process draws it
    assert worker.submit(Recorded()).result(timeout=60) == [[5, 6], [8]]  # queued like run, not waited on


def test_seeds_are_shared_in_runs_as_even_as_can_be():
    assert split_seeds([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split_seeds([7], 4) == [[7]]  # never an empty share
    assert split_seeds([1, 2, 3, 4], 3) == [[1, 2], [3], [4]]


def test_a_sampler_process_that_dies_is_restarted(studio: Studio):
    worker = SamplerWorker(Harness(studio), process=True, processes=2)
    settings = studio.request(32)
    first = worker.pids
    os.kill(first[1], signal.SIGKILL)  # between jobs: the next request is simply served
    time.sleep(0.5)
    assert len(worker.generate(settings, [1, 2]).images) == 2 and not set(worker.pids) & set(first)
    worker.studio.started.clear()  # while working: that request gets a clear error, the next is served
    threads, results = in_threads([lambda: worker.run(Nap(30))])
    assert worker.studio.started.wait(30)
    os.kill(worker.pid, signal.SIGKILL)
    threads[0].join(60)
    assert isinstance(results[0], SamplerError) and "try again" in str(results[0])
    out = worker.generate(settings, [2])
    np.testing.assert_array_equal(arrays(out.images)[0], arrays(studio.generate(32, n=1, seed=2))[0])


def test_generate_checks_its_request_before_it_is_queued(studio: Studio):
    with pytest.raises(StudioError, match="Unknown class"):
        studio.request(32, class_name="nevus")
    with pytest.raises(StudioError, match="between 1 and"):
        studio.sample_seeds(0, 1)
    with pytest.raises(StudioError, match="seeds"):
        studio.sample_seeds(2, [1, 2, 3])
    assert studio.sample_seeds(3, 7) == [7, 8, 9]


def test_sample_i_of_a_request_is_what_its_seed_gives_alone(studio: Studio):
    together = arrays(studio.generate(32, n=3, seed=20))
    for i, got in enumerate(together):
        np.testing.assert_array_equal(got, arrays(studio.generate(32, n=1, seed=20 + i))[0])


def test_thread_budget_is_half_the_cores_and_leaves_room_for_one_more_request():
    before = torch.get_num_threads()
    try:
        assert set_thread_budget(2) == 1 and torch.get_num_threads() == 1
        assert set_thread_budget(16) == 8 and torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)
    assert request_workers(2) == 1 and request_workers(16) == 1 and request_workers(1) == 1


def test_timing_log_writes_one_json_line_per_request(tmp_path: Path):
    import json

    log = TimingLog(tmp_path / "t.jsonl")
    log.record("generate", handler=1.23456, batch=2)
    log.record("reconstruct", handler=0.5)
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert lines == [
        {"endpoint": "generate", "handler": 1.2346, "batch": 2},
        {"endpoint": "reconstruct", "handler": 0.5},
    ]
    TimingLog(None).record("generate", handler=1.0)  # no file: nothing written, no error


def test_through_the_app_sampler_work_never_overlaps_and_no_request_changes_the_thread_setting(
    studio: Studio, tmp_path: Path, monkeypatch
):
    """Generations, inpaintings and reconstructs sent at once through the API: the draws and
    inpaintings run one job at a time in the sampler's own processes (a draw's seeds shared
    among them, at once), the reconstructs in the app's, and the app's thread setting is never
    touched."""
    from conftest import free_port, lesion_image
    from gradio_client import Client, handle_file
    from PIL import Image

    from lesionstudio.app.ui import build

    log = tmp_path / "spans.txt"  # written by both processes

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                with log.open("a") as f:
                    f.write(f"{name} {os.getpid()} {start} {time.monotonic()}\n")

        return wrapper

    monkeypatch.setattr(studio, "draw", timed("draw", studio.draw))
    monkeypatch.setattr(studio, "inpaint", timed("inpaint", studio.inpaint))
    monkeypatch.setattr(studio, "reconstruct", timed("reconstruct", studio.reconstruct))
    demo = build(studio)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        threads_before = torch.get_num_threads()
        changes: list[int] = []
        monkeypatch.setattr(torch, "set_num_threads", lambda n: changes.append(n))
        upload = tmp_path / "lesion.png"
        lesion_image(280, seed=9).save(upload)
        mask = np.zeros((280, 280, 4), dtype=np.uint8)
        mask[110:170, 110:170] = (255, 0, 255, 255)
        Image.fromarray(mask, "RGBA").save(tmp_path / "mask.png")
        editor = {
            "background": handle_file(str(upload)),
            "layers": [handle_file(str(tmp_path / "mask.png"))],
            "composite": None,
        }
        url = f"http://127.0.0.1:{port}/"
        calls = [("generate", ("32", 1.0, 2, seed, "any")) for seed in (1, 2, 3)]
        calls += [("inpaint", (editor, "32", 1.0, 2, seed)) for seed in (4, 5)]
        calls += [("reconstruct", (handle_file(str(upload)), "32"))] * 4
        threads, results = in_threads(
            [
                lambda name=name, args=args: Client(url, verbose=False).predict(*args, api_name=f"/{name}")
                for name, args in calls
            ]
        )
        for t in threads:
            t.join(300)
        assert not [r for r in results if isinstance(r, Exception)]
        assert changes == [] and torch.get_num_threads() == threads_before
        lines = map(str.split, log.read_text().splitlines())
        spans = [(name, int(pid), float(a), float(b)) for name, pid, a, b in lines]
        assert {pid for name, pid, *_ in spans if name == "reconstruct"} == {os.getpid()}
        assert os.getpid() not in {pid for name, pid, *_ in spans if name != "reconstruct"}
        sampler = sorted((start, end, name, pid) for name, pid, start, end in spans if name in ("draw", "inpaint"))
        assert len([n for n, *_ in spans if n == "inpaint"]) == 2
        assert len([n for n, *_ in spans if n == "reconstruct"]) == 4
        for i, (_, end, name, pid) in enumerate(sampler):
            for later_start, _, later_name, later_pid in sampler[i + 1 :]:
                if later_start < end:  # overlapping: only two shares of one draw, in two processes
                    assert name == later_name == "draw" and pid != later_pid
    finally:
        demo.close()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_the_sampler_process_goes_with_the_app(tmp_path: Path, stop: int):
    import subprocess
    import sys
    import urllib.request

    import psutil
    from conftest import ROOT, free_port

    make_pair(tmp_path / "ckpts", 32)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    args = ["app.py", "--checkpoints", str(tmp_path / "ckpts"), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the app did not start"
                time.sleep(0.5)
        children = psutil.Process(proc.pid).children()
        # The sampler processes, forked: one a core.
        assert [c.name() for c in children] == [psutil.Process(proc.pid).name()] * sampler_processes()
        proc.send_signal(stop)
        proc.wait(30)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive
    finally:
        proc.kill()
