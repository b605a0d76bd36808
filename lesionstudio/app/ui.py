"""The Gradio interface: four tabs wired to :class:`lesionstudio.app.studio.Studio`.

Each task is also a named API endpoint (``/reconstruct``, ``/codebook``, ``/generate``,
``/inpaint``) for ``gradio_client``. Errors a user can cause are shown as messages, never as
stack traces, and the app keeps serving.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from ..data import IMAGE_EXTENSIONS
from ..sampling.generation import (
    DEFAULT_CANDIDATES,
    DEFAULT_LAYOUTS,
    MAX_CANDIDATES,
    MAX_GUIDANCE,
    MAX_LAYOUTS,
    GenerationSettings,
)
from .readerstudy import (
    REAL,
    SYNTHETIC,
    ReaderStudyError,
    Session,
    Trial,
    answers_csv,
    append_log,
    draw_plan,
    summarize,
)
from .serving import Inpaint, QuizImages, SamplerWorker, TimingLog, request_workers
from .studio import (
    MAX_SAMPLES,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
    Studio,
    StudioError,
    zip_images,
)

# Sampler requests Gradio hands to the sampler's own queue at once (they wait there, merged into
# batches); the rest wait in Gradio's queue of at most MAX_QUEUE events.
SAMPLER_WAITING = 16
CONFIDENCE_START = 3  # the reader study's confidence slider, for every new image
MAX_QUEUE = 64
UPLOAD_TYPES = (*IMAGE_EXTENSIONS, ".tif", ".tiff", ".bmp", ".webp", ".gif")

NOTICE = (
    "**Research and education only — not a diagnostic tool.** LesionStudio generates and "
    "reconstructs synthetic dermoscopic images; do not use it for any clinical decision. "
    "Uploads are processed in memory and not stored (Gradio's temporary copies are deleted "
    "within ten minutes)."
)


QUIZ_HELP = (
    "**Real or synthetic?** A reader study: one image at a time, real or generated in a seeded "
    "random order, both at 256 px through the same processing. Answer, give your confidence, and "
    "at the end see your accuracy (50% = cannot tell them apart) and download your answers."
)
QUIZ_NEEDS_DATA = (
    "The reader study needs your own real images (none are shipped): start the app with "
    "`python app.py --reader-images REAL_DIR` (real lesions the models never saw), and add "
    "`--quiz-log answers.csv` to keep every answer on the server."
)


@dataclass(frozen=True)
class GenerateExample:
    """One of the Generate tab's example settings."""

    latent: int
    n: int
    seed: int
    settings: GenerationSettings  # candidates and layouts given: examples are cached as shown

    def row(self) -> list:
        """The example as the Generate tab's inputs, in their order (``g_inputs``)."""
        s = self.settings
        latent, detail = str(self.latent), s.temperatures[1]
        return [latent, s.temperature, self.n, self.seed, s.class_name, detail, s.candidates, s.guidance, s.layouts]

    def runs_on(self, studio: Studio) -> bool:
        return (
            self.latent in studio.latents
            and (studio.has_critic or self.settings.candidates == 1)
            and (bool(studio.layout_grid) or self.settings.layouts == 1)
        )


GENERATE_EXAMPLES = [
    GenerateExample(64, 4, 0, GenerationSettings(candidates=DEFAULT_CANDIDATES, layouts=DEFAULT_LAYOUTS)),
    GenerateExample(
        64,
        4,
        1,
        GenerationSettings(
            temperature=0.9, detail_temperature=1.0, class_name="malignant", candidates=4, layouts=1, guidance=2.0
        ),
    ),
    GenerateExample(32, 4, 2, GenerationSettings(class_name="benign", candidates=1, layouts=1)),
]


def grid_size(latent: str | int) -> int:
    """The latent size a control or an API call sends (a string), as the Studio takes it."""
    try:
        return int(latent)
    except (TypeError, ValueError):
        raise StudioError(f"The latent size must be a whole number, not {latent!r}.") from None


def user_errors(fn: Callable) -> Callable:
    """Show a StudioError (bad upload, bad setting) as a message in the UI instead of a crash."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (StudioError, ReaderStudyError) as exc:
            raise gr.Error(str(exc), print_exception=False) from exc

    return wrapper


def _editor_parts(value: dict | None) -> tuple[Any, list[np.ndarray]]:
    """(background image, painted layers) from an ImageEditor value; the studio reads the paint."""
    if not value or value.get("background") is None:
        return None, []
    return value["background"], [np.asarray(layer) for layer in value.get("layers") or [] if layer is not None]


def editor_value(path: str) -> dict:
    """An ImageEditor value with `path` as the background and nothing painted yet."""
    return {"background": path, "layers": [], "composite": path}


def example_gallery(examples: list[str] | None, elem_id: str) -> gr.Gallery | None:
    """Clickable example thumbnails (a click loads the image into the tab's input)."""
    if not examples:
        return None
    return gr.Gallery(
        examples,
        label="Examples (made by the shipped models): click one",
        columns=4,
        rows=2,
        height=190,
        object_fit="cover",
        allow_preview=False,
        interactive=False,
        elem_id=elem_id,
    )


class ResultFiles:
    """Results written as uniquely named PNG files, removed after ten minutes.

    Handing Gradio a PIL image makes it (re)write a cache file named by the image's hash; two
    requests with identical results (the same upload reconstructed twice at once) then rewrite
    a file while it is being sent, and one client gets a truncated answer. Gradio copies a file
    path into its cache atomically instead.
    """

    def __init__(self, max_age: float = 600) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lesionstudio-"))
        self.max_age = max_age

    def png(self, img: Any) -> str:
        path = self.dir / f"{uuid.uuid4().hex}.png"
        img.save(path, compress_level=1)  # a few times faster than the default, files a little larger
        return str(path)

    def path(self, name: str) -> Path:
        return self.dir / f"{uuid.uuid4().hex[:8]}-{name}"

    def prune(self) -> None:
        cutoff = time.time() - self.max_age
        for f in self.dir.iterdir():
            with contextlib.suppress(OSError):
                if f.stat().st_mtime < cutoff:
                    f.unlink()


@dataclass
class App:
    """What the tabs share: the studio, the sampler worker, result files, timings, examples."""

    studio: Studio
    sampler: SamplerWorker
    files: ResultFiles
    timings: TimingLog
    examples: list[str] | None

    @property
    def latents(self) -> list[str]:
        return [str(n) for n in self.studio.latents]

    @property
    def default_latent(self) -> str:
        return str(self.studio.default_latent)


def reconstruct_tab(app: App) -> None:
    studio, files, timings, examples = app.studio, app.files, app.timings, app.examples
    latents, default_latent = app.latents, app.default_latent

    @user_errors
    def reconstruct(image: str | None, latent: str):
        began, cpu = time.perf_counter(), time.thread_time()
        files.prune()
        r = studio.reconstruct(image, grid_size(latent))
        encoding, cpu = time.perf_counter(), time.thread_time() - cpu
        stats = {"psnr_db": round(r.psnr, 2), "ssim": round(r.ssim, 4), "latent": grid_size(latent)}
        rendered = None
        if r.rendered is not None:
            stats |= {
                "generation_decoder_psnr_db": round(r.rendered_psnr, 2),
                "generation_decoder_ssim": round(r.rendered_ssim, 4),
            }
            rendered = files.png(r.rendered)
        out = (
            files.png(r.original),
            files.png(r.reconstruction),
            rendered,
            files.png(r.error),
            files.png(r.code_map),
            stats,
        )
        done = time.perf_counter()
        timings.record("reconstruct", handler=done - began, ran=encoding - began, cpu=cpu, encode=done - encoding)
        return out

    def picked(evt: gr.SelectData) -> str:
        return examples[evt.index]

    def reconstruct_new(image: str | None, latent: str):
        """Reconstruct as soon as an image arrives (upload or example); clearing does nothing."""
        return reconstruct(image, latent) if image else tuple(gr.skip() for _ in range(6))

    with gr.Row():
        with gr.Column(scale=1):
            # A file input, not gr.Image: the studio decodes uploads itself, so an odd or
            # hostile file gets the studio's clear message rather than a decoder error.
            r_in = gr.File(label="Lesion image", file_types=list(UPLOAD_TYPES), type="filepath", elem_id="upload")
            r_examples = example_gallery(examples, "reconstruct-examples")
            r_latent = gr.Radio(latents, value=default_latent, label="Latent grid (codes per side)")
            r_btn = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-btn")
            r_stats = gr.JSON(label="Metrics")
        with gr.Column(scale=2), gr.Row():
            r_orig = gr.Image(label="Preprocessed input", format="png")
            r_rec = gr.Image(label="Reconstruction", format="png", elem_id="reconstruction")
            r_rendered = gr.Image(
                label="Generation decoder",  # what renders the samples; empty for a grid without one
                format="png",
                elem_id="rendered",
                visible=bool(studio.decoder_latents),  # shown where the checkpoints have one
            )
        with gr.Column(scale=2), gr.Row():
            r_err = gr.Image(label="Error heat-map", format="png")
            r_map = gr.Image(label="Code map", format="png")
    r_outputs = [r_orig, r_rec, r_rendered, r_err, r_map, r_stats]
    r_btn.click(reconstruct, [r_in, r_latent], r_outputs, api_name="reconstruct")
    r_in.change(reconstruct_new, [r_in, r_latent], r_outputs, api_name=False)
    if r_examples:
        r_examples.select(picked, None, r_in, api_name=False)


def codebook_tab(app: App) -> None:
    studio, files = app.studio, app.files
    latents, default_latent = app.latents, app.default_latent

    @user_errors
    def codebook(latent: str, code: float):
        size = grid_size(latent)
        fig, stats = studio.codebook_usage(size)
        patch, atlas = files.png(studio.code_patch(size, int(code))), files.png(studio.codebook_atlas(size))
        where = [(files.png(img), caption) for img, caption in studio.code_occurrences(size, int(code))]
        return fig, stats, patch, atlas, where

    with gr.Row():
        c_latent = gr.Radio(latents, value=default_latent, label="Latent grid")
        c_code = gr.Number(value=0, precision=0, label="Code to look at", minimum=0)
        c_btn = gr.Button("Show", variant="primary")
    c_plot = gr.Plot(label="Usage over the training images")
    with gr.Row():
        c_stats = gr.JSON(label="Summary")
        c_patch = gr.Image(label="The chosen code, decoded as a patch", format="png")
        c_atlas = gr.Image(label="All codes, each decoded as a tile", format="png")
    c_where = gr.Gallery(
        label="Where the code occurs most in the data folder (outlined)",
        interactive=False,
        columns=4,
        format="png",
        visible=bool(studio.data_files),
    )
    c_btn.click(codebook, [c_latent, c_code], [c_plot, c_stats, c_patch, c_atlas, c_where], api_name="codebook")


@dataclass
class GenerateTab:
    """What other tabs connect to: the gallery, its grid, the send-to-Inpaint button."""

    gallery: gr.Gallery
    latent: gr.Radio
    send: gr.Button


def generate_tab(app: App) -> GenerateTab:
    studio, files, timings, sampler = app.studio, app.files, app.timings, app.sampler
    latents, default_latent = app.latents, app.default_latent
    defaults = studio.default_settings(studio.default_latent)

    @user_errors
    def generate(
        latent: str,
        temperature: float,
        n: float,
        seed: float,
        label: str,
        detail: float | None = None,
        candidates: float | None = None,
        guidance: float | None = None,
        layouts: float | None = None,
        progress=gr.Progress(),
    ):
        began = time.perf_counter()
        given = {
            "temperature": temperature,
            "class_name": label,
            "detail_temperature": detail,
            "candidates": candidates,
            "guidance": guidance,
            "layouts": layouts,
        }
        request = studio.request(grid_size(latent), **{k: v for k, v in given.items() if v is not None})
        out = sampler.generate(request, studio.sample_seeds(int(n), int(seed)), lambda f, desc: progress(f, desc=desc))
        encoding = time.perf_counter()
        images = out.images
        if len(images) == 1:  # the download is the shown image's file: encoded once
            path = files.path(f"lesion_seed{int(seed)}.png")
            images[0].save(path, compress_level=1)
            shown = [str(path)]
        else:
            path = files.path(f"lesions_seed{int(seed)}_{len(images)}.zip")
            path.write_bytes(zip_images(images))
            shown = [files.png(i) for i in images]
        searching = time.perf_counter()
        progress(1, desc="finding the nearest training images")
        near = [(files.png(img), caption) for img, caption in studio.nearest_training(images)]
        done = time.perf_counter()
        timings.record(
            "generate",
            handler=done - began,
            waited=out.timing.waited,
            ran=out.timing.ran,
            cpu=out.timing.cpu,
            batch=out.timing.batch,
            encode=searching - encoding,
            nearest=done - searching,
        )
        return shown, str(path), near

    with gr.Row():
        with gr.Column(scale=1):
            g_latent = gr.Radio(latents, value=default_latent, label="Latent grid")
            g_temp = gr.Slider(
                0.0,
                1.5,
                value=defaults.temperature,
                step=0.05,
                label="Temperature of the layout (coarsest grid; 0 = most likely code)",
            )
            g_detail = gr.Slider(
                0.0,
                1.5,
                value=defaults.temperatures[1],
                step=0.05,
                label="Detail temperature (every finer grid)",
            )
            g_cand = gr.Slider(
                1,
                MAX_CANDIDATES,
                value=defaults.candidates,
                step=1,
                label="Candidates per sample (the critic keeps the most real-looking)",
                visible=studio.has_critic,
            )
            g_layouts = gr.Slider(
                1,
                MAX_LAYOUTS,
                value=defaults.layouts,
                step=1,
                label="Layouts per candidate (the critic keeps the one most like a whole lesion on skin)",
                visible=bool(studio.layout_grid),
            )
            g_guidance = gr.Slider(
                0.0,
                MAX_GUIDANCE,
                value=defaults.guidance,
                step=0.25,
                label="Layout guidance (how closely finer grids follow the layout; 1 = as trained)",
            )
            g_n = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="Number of samples")
            g_seed = gr.Number(value=0, precision=0, label="Seed")
            g_class = gr.Dropdown(studio.class_choices(default_latent), value="any", label="Class")
            g_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
        with gr.Column(scale=2):
            g_gallery = gr.Gallery(
                label="Synthetic lesions", columns=4, format="png", interactive=False, elem_id="gallery"
            )
            g_file = gr.File(label="Download (PNG, or zip for several)")
            g_send = gr.Button("Inpaint the first sample")
            # A memorisation check at a glance: is a sample a copy of a training image?
            g_near = gr.Gallery(
                label="Nearest training image of each sample (ratio to the typical "
                "real-to-real distance; near 0 = copy)",
                columns=4,
                format="png",
                visible=bool(studio.data_files),
                interactive=False,
                elem_id="nearest",
            )
    g_inputs = [g_latent, g_temp, g_n, g_seed, g_class, g_detail, g_cand, g_guidance, g_layouts]
    runnable = [e.row() for e in GENERATE_EXAMPLES if e.runs_on(studio)]
    if runnable:
        gr.Examples(
            runnable,
            inputs=g_inputs,
            outputs=[g_gallery, g_file, g_near],
            fn=generate,
            cache_examples=True,
            cache_mode="lazy",
            label="Example settings (results cached)",
            api_visibility="private",
            elem_id="generate-examples",
        )
    # All sampler work (generate, with its ranking; inpaint; the reader study's draw) goes to one
    # worker, one job at a time; waiting generations with the same settings share a batch.
    g_btn.click(
        generate,
        g_inputs,
        [g_gallery, g_file, g_near],
        api_name="generate",
        concurrency_limit=SAMPLER_WAITING,
        concurrency_id="sampler",
    )
    return GenerateTab(g_gallery, g_latent, g_send)


@dataclass
class InpaintTab:
    editor: gr.ImageEditor
    latent: gr.Radio


def inpaint_tab(app: App) -> InpaintTab:
    files, sampler, examples = app.files, app.sampler, app.examples
    latents, default_latent = app.latents, app.default_latent

    def picked_for_editor(evt: gr.SelectData) -> dict:
        return editor_value(examples[evt.index])

    @user_errors
    def inpaint(editor: dict | None, latent: str, temperature: float, n: float, seed: float, progress=gr.Progress()):
        background, layers = _editor_parts(editor)
        task = Inpaint(background, layers, grid_size(latent), int(n), float(temperature), int(seed))
        out = sampler.run(task, progress=lambda f, desc: progress(f, desc=desc))
        info = {"codes_resampled": int(out.code_mask.sum()), "grid": grid_size(latent), "variants": len(out.variants)}
        return files.png(out.original), [files.png(v) for v in out.variants], info

    gr.Markdown(
        "Upload a lesion, paint over the region to change, and the prior redraws the codes "
        "under the paint. It draws in raster order and sees only codes above and to the left, "
        "so each variant is the best of several fills at meeting the codes kept below and right. "
        "A stack of levels (the shipped 32x32, 64x64 and 128x128 grids stand on a 16x16 layout level) "
        "redraws the painted region at every level, coarsest first: the layout, then the detail."
    )
    with gr.Row():
        with gr.Column(scale=1):
            i_edit = gr.ImageEditor(
                type="pil",
                image_mode="RGBA",
                label="Paint the region to change",
                sources=["upload"],
                layers=False,
                transforms=(),
                brush=gr.Brush(colors=["#ff00ff"], default_size=24),
            )
            i_examples = example_gallery(examples, "inpaint-examples")
            i_latent = gr.Radio(latents, value=default_latent, label="Latent grid")
            i_temp = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Temperature")
            i_n = gr.Slider(1, 8, value=3, step=1, label="Variants")
            i_seed = gr.Number(value=0, precision=0, label="Seed")
            i_btn = gr.Button("Inpaint", variant="primary")
        with gr.Column(scale=2):
            i_orig = gr.Image(label="Original (as the model encodes it)", format="png")
            i_gallery = gr.Gallery(label="Variants", columns=3, format="png", interactive=False)
            i_info = gr.JSON(label="Details")
    if i_examples:
        i_examples.select(picked_for_editor, None, i_edit, api_name=False)
    i_btn.click(
        inpaint,
        [i_edit, i_latent, i_temp, i_n, i_seed],
        [i_orig, i_gallery, i_info],
        api_name="inpaint",
        concurrency_limit=SAMPLER_WAITING,
        concurrency_id="sampler",
    )
    return InpaintTab(i_edit, i_latent)


def send_to_inpaint(generate: GenerateTab, inpaint: InpaintTab) -> None:
    """The Generate tab's "Inpaint the first sample" button."""

    def to_editor(gallery: list | None, latent: str):
        if not gallery:
            raise gr.Error("Generate a sample first.", print_exception=False)
        first = gallery[0][0] if isinstance(gallery[0], (list, tuple)) else gallery[0]
        return editor_value(first.get("path") if isinstance(first, dict) else first), latent

    generate.send.click(
        to_editor, [generate.gallery, generate.latent], [inpaint.editor, inpaint.latent], api_name=False
    )


def build(
    studio: Studio,
    examples: list[str] | None = None,
    quiz_log: Path | None = None,
    timings: TimingLog | None = None,
    sampler_processes: int | None = None,
) -> gr.Blocks:
    sampler = SamplerWorker(studio, processes=sampler_processes)
    app = App(studio, sampler, ResultFiles(), timings or TimingLog(None), examples)
    with gr.Blocks(title="LesionStudio", delete_cache=(600, 600)) as demo:
        gr.Markdown("# LesionStudio\nVQ-VAE + Gated PixelCNN for dermoscopic skin-lesion images.")
        gr.Markdown(NOTICE, elem_id="notice")
        with gr.Tab("Reconstruct"):
            reconstruct_tab(app)
        with gr.Tab("Codebook"):
            codebook_tab(app)
        with gr.Tab("Generate"):
            generate = generate_tab(app)
        with gr.Tab("Inpaint"):
            inpaint = inpaint_tab(app)
        with gr.Tab("Real or synthetic?"):
            quiz_tab(studio, app.files, quiz_log, app.sampler)
        send_to_inpaint(generate, inpaint)
        gr.Markdown(
            f"Limits: uploads up to {MAX_UPLOAD_BYTES // 2**20} MB and {MAX_UPLOAD_PIXELS // 10**6} megapixels "
            f"({', '.join(UPLOAD_TYPES)}); at most {MAX_SAMPLES} samples a request."
        )
    demo.queue(default_concurrency_limit=request_workers(), max_size=MAX_QUEUE)
    return demo


QUIZ_AHEAD = 2  # trials past the one shown whose synthetic images must be drawn before it shows


@dataclass
class QuizState:
    """One reader's study in the browser session: the answers so far, the synthetic images
    drawn, by trial index, and the key of those still being drawn (``DrawsAhead``)."""

    session: Session
    drawn: dict[int, Any] = field(default_factory=dict)
    study: str = ""


@dataclass
class PendingDraw:
    trials: list[Trial]
    images: Future  # of {trial index: image}, from the sampler


class DrawsAhead:
    """The reader studies' synthetic images still being drawn, per study: each batch's trials
    and the sampler's Future for them. The server holds them (a browser session's state is
    copied, and a Future is not data); past ``limit`` studies the oldest is dropped."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._studies: dict[str, list[PendingDraw]] = {}
        self._lock = threading.Lock()

    def add(self, pending: list[PendingDraw]) -> str:
        study = uuid.uuid4().hex
        with self._lock:
            self._studies[study] = pending
            while len(self._studies) > self.limit:
                self._studies.pop(next(iter(self._studies)))
        return study

    def collect(self, study: str, upto: int) -> dict[int, Any]:
        """The images of every batch holding a trial up to index ``upto``, waiting for them."""
        with self._lock:
            pending = self._studies.get(study, [])
            due = [p for p in pending if min(t.index for t in p.trials) <= upto]
            self._studies[study] = [p for p in pending if p not in due]
        drawn: dict[int, Any] = {}
        for p in due:
            drawn |= p.images.result()
        return drawn

    def forget(self, study: str) -> None:
        with self._lock:
            self._studies.pop(study, None)


def quiz_tab(studio: Studio, files: ResultFiles, quiz_log: Path | None, sampler: SamplerWorker) -> None:
    """The reader study: real and generated images in a seeded order, answers, accuracy, CSV."""
    gr.Markdown(QUIZ_HELP)
    if not studio.reader_files:
        gr.Markdown(QUIZ_NEEDS_DATA, elem_id="quiz-needs-data")
        return
    if quiz_log:
        gr.Markdown(f"Each answer is also appended to the server's log (`{quiz_log.name}`), with the reader id.")
    session = gr.State(None)
    ahead = DrawsAhead()

    def shown(q: QuizState) -> tuple:
        trial = q.session.current()
        q.drawn |= ahead.collect(q.study, trial.index + QUIZ_AHEAD)
        img = q.drawn.pop(trial.index, None)
        if img is None and trial.real_path is None:  # its study was dropped from DrawsAhead: draw it now
            img = sampler.run(QuizImages([trial]))[trial.index]
        if img is None:  # a real image: it loads at once
            img = studio.quiz_real_image(trial)
        return files.png(img), f"Image {trial.index + 1} of {len(q.session.trials)}"

    @user_errors
    def start(reader: str, n: float, seed: float, progress=gr.Progress()):
        q = QuizState(Session(studio.quiz_trials(int(n), int(seed)), reader))
        # The first synthetic images are drawn before the study starts and the rest while the
        # reader answers, always ahead of the image shown (readerstudy.draw_plan): drawing one
        # while the reader waits would take seconds where a real one appears at once.
        first, *rest = draw_plan(q.session.trials, QUIZ_AHEAD, sampler.processes)
        if first:
            q.drawn = sampler.run(QuizImages(first), progress=lambda f, desc: progress(f, desc=desc))
        q.study = ahead.add([PendingDraw(batch, sampler.submit(QuizImages(batch))) for batch in rest])
        return q, *shown(q), gr.update(visible=True), "", None

    @user_errors
    def answer(q: QuizState | None, choice: str | None, confidence: float):
        if q is None or q.session.finished:
            raise gr.Error("Start a study first.", print_exception=False)
        if not choice:
            raise gr.Error("Choose real or synthetic.", print_exception=False)
        a = q.session.answer(choice.lower(), int(confidence))
        if quiz_log:
            append_log(quiz_log, a)
        if not q.session.finished:
            return q, *shown(q), gr.update(), "", None
        ahead.forget(q.study)
        answers = q.session.answers
        path = files.path("reader_study_answers.csv")
        path.write_text(answers_csv(answers))
        done = f"Study finished: {len(answers)} answers."
        return q, None, done, gr.update(visible=False), summarize(answers).markdown(), str(path)

    with gr.Row():
        with gr.Column(scale=1):
            q_reader = gr.Textbox(label="Reader id (optional; goes into the answers)", elem_id="quiz-reader")
            q_n = gr.Slider(4, 60, value=20, step=2, label="Images in the study", elem_id="quiz-n")
            q_seed = gr.Number(value=0, precision=0, label="Study seed (the same seed gives the same order)")
            q_start = gr.Button("Start", variant="primary", elem_id="quiz-start")
        with gr.Column(scale=2):
            q_progress = gr.Markdown(elem_id="quiz-progress")
            q_image = gr.Image(label="Real or synthetic?", format="png", interactive=False, elem_id="quiz-image")
            with gr.Group(visible=False) as q_form:
                q_choice = gr.Radio(
                    [REAL.capitalize(), SYNTHETIC.capitalize()], label="This image is", elem_id="quiz-choice"
                )
                q_conf = gr.Slider(
                    1,
                    5,
                    value=CONFIDENCE_START,
                    step=1,
                    label="Confidence (1 = guess, 5 = certain)",
                    elem_id="quiz-conf",
                )
                q_submit = gr.Button("Answer", variant="primary", elem_id="quiz-answer")
            q_summary = gr.Markdown(elem_id="quiz-summary")
            q_csv = gr.File(label="Your answers (CSV)", elem_id="quiz-csv")
    outputs = [session, q_image, q_progress, q_form, q_summary, q_csv]
    q_start.click(
        start,
        [q_reader, q_n, q_seed],
        outputs,
        api_name=False,
        concurrency_limit=SAMPLER_WAITING,
        concurrency_id="sampler",
    )
    # Each image starts unanswered, at the middle confidence: the last answer's would carry over.
    q_submit.click(answer, [session, q_choice, q_conf], outputs, api_name=False).then(
        lambda: (None, CONFIDENCE_START), None, [q_choice, q_conf], api_name=False
    )
