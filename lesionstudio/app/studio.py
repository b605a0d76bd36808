"""The four tasks of the studio as plain library calls (the Gradio UI only wires these).

Reconstruct an upload, browse the codebook, generate new lesions, inpaint codes. Models are
loaded once per latent size and shared by all requests; every input image goes through
:func:`lesionstudio.data.load_image` (any mode, EXIF orientation, decompression-bomb guard).
"""

from __future__ import annotations

import contextlib
import io
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import ImageLoadError, eval_transform, find_images, load_image, to_pil
from ..measure import metrics
from ..measure.features import EncoderFeatures, cached, compute, dihedral, feature_transform
from ..measure.neighbours import DEFAULT_THRESHOLD, nearest
from ..plots import code_map_image, codebook_usage_figure, error_heatmap
from ..sampling.generation import GenerationError, GenerationSettings, draw_samples
from ..sampling.loading import (
    LATENTS,
    available_latents,
    critic_layout_grid,
    decoder_latents,
    default_source,
    has_critic,
    load_stack,
)
from ..sampling.stack import ModelStack, coarse_mask, inpaint_stack, per_sample_seeds
from .readerstudy import Trial, plan_trials

# Upload limits: what the studio accepts before decoding (the README's Limits section).
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000
MAX_SAMPLES = 16
REFERENCE_IMAGES = 64  # data images whose nearest other data image sets the typical distance


class StudioError(ValueError):
    """A request the studio cannot serve, with a message meant for the user."""


def check_upload(path: str | Path) -> None:
    size = Path(path).stat().st_size
    if size == 0:
        raise StudioError("The uploaded file is empty.")
    if size > MAX_UPLOAD_BYTES:
        raise StudioError(f"The upload is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB.")


def open_upload(image: str | Path | Image.Image | None) -> Image.Image:
    """An uploaded file (or image) as RGB, or a StudioError with a message for the user."""
    if image is None:
        raise StudioError("Please upload an image first.")
    if not isinstance(image, Image.Image):
        check_upload(image)
    try:
        # Image.open reads only the header: the size is checked before any pixel is decoded.
        with contextlib.nullcontext(image) if isinstance(image, Image.Image) else Image.open(image) as probe:
            if probe.width * probe.height > MAX_UPLOAD_PIXELS:
                raise StudioError(
                    f"The image is {probe.width}x{probe.height} pixels; the limit is {MAX_UPLOAD_PIXELS:,} pixels."
                )
        return load_image(image)
    except StudioError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise StudioError(f"The image is too large to decode safely: {exc}") from exc
    except Exception as exc:  # any decoder failure becomes one clear message
        detail = str(exc) if isinstance(image, Image.Image) else str(exc).replace(str(image), Path(image).name)
        raise StudioError(f"This file could not be read as an image ({type(exc).__name__}: {detail}).") from exc


@dataclass
class NeighbourIndex:
    extractor: EncoderFeatures
    files: list[Path]
    features: torch.Tensor
    typical: float  # median leave-one-out nearest-neighbour distance among the data images


@dataclass
class Reconstruction:
    original: Image.Image
    reconstruction: Image.Image  # by the VQ-VAE's own (faithful) decoder
    error: Image.Image
    code_map: Image.Image
    psnr: float
    ssim: float
    codes: torch.Tensor
    # By the post-trained decoder that renders generated codes, where the stack has one.
    rendered: Image.Image | None = None
    rendered_psnr: float | None = None
    rendered_ssim: float | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """A generation request but its seeds, checked: requests that share it can be drawn as one
    batch."""

    latent: int
    settings: GenerationSettings  # resolved for the latent's stack

    @property
    def draws_per_sample(self) -> int:
        return self.settings.candidates or 1


class Inpainting(NamedTuple):
    """Variants of an upload with the painted region redrawn."""

    original: Image.Image  # the upload as the model encodes it
    variants: list[Image.Image]
    codes: torch.Tensor  # [grid, grid], the upload's
    code_mask: torch.Tensor  # [grid, grid] bool, the codes redrawn
    variant_codes: list[torch.Tensor]


class Studio:
    """Loads model stacks lazily (once per latent size) and serves the app's tasks."""

    def __init__(
        self,
        source: str | Path | None = None,
        device: str = "cpu",
        data_dir: str | Path | None = None,
        data_limit: int = 256,
        reader_dir: str | Path | None = None,
    ) -> None:
        self.source = default_source() if source is None else source
        self.device = device
        # The training images (where a code occurs, each sample's nearest one): the first data_limit.
        self.data_files = find_images(data_dir)[:data_limit] if data_dir else []
        # The reader study's real images: real lesions the models never saw.
        self.reader_files = find_images(reader_dir) if reader_dir else []
        self._data_codes: dict[int, torch.Tensor] = {}
        self._atlases: dict[tuple[int, int], Image.Image] = {}
        self._stacks: dict[int, ModelStack] = {}
        self._neighbours: NeighbourIndex | None = None
        self._index_lock = threading.Lock()  # building the index takes a while: not under self._lock
        self._lock = threading.Lock()
        # A latent size with a VQ-VAE but no prior still serves Reconstruct and Codebook.
        self.latents = available_latents(self.source, require_prior=False)
        self.has_critic = has_critic(self.source)
        # Grids whose samples a post-trained decoder renders (Reconstruct shows it beside the VQ-VAE's).
        self.decoder_latents = decoder_latents(self.source)
        # Layouts can be chosen when the critic's layout head judges this source's coarsest grid.
        self.layout_grid = critic_layout_grid(self.source)
        if not self.latents:
            raise StudioError(f"no VQ-VAE checkpoints (vqvae-32/, vqvae-64/, vqvae-128/) found in {self.source}")

    def default_settings(self, latent: int) -> GenerationSettings:
        """The settings a request that sets nothing gets on this grid (GenerationSettings'
        defaults, as far as the stack can honour them)."""
        return self.request(latent).settings

    @property
    def default_latent(self) -> int:
        """The grid the tabs start on: 64 where it exists (the most detailed shipped stack)."""
        return 64 if 64 in self.latents else self.latents[0]

    def forked(self) -> None:
        """Fresh locks for a forked copy of the studio (the sampler process): a lock that another
        thread held at the fork would never be released in the copy."""
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()

    @property
    def loaded_latents(self) -> list[int]:
        """The grid sizes loaded so far (each with its coarser levels); others load on first use."""
        with self._lock:
            return sorted({level.latent for stack in self._stacks.values() for level in stack.levels})

    def preload(self) -> None:
        """Load the default stack now, so the first request does not pay for it."""
        self.stack(self.default_latent)

    def stack(self, latent: int) -> ModelStack:
        latent = int(latent)
        if latent not in self.latents:
            raise StudioError(f"Latent size {latent} is not available; choose one of {self.latents}.")
        with self._lock:
            if latent not in self._stacks:
                self._stacks[latent] = load_stack(latent, self.source, device=self.device, require_prior=False)
            return self._stacks[latent]

    def _tensor(self, img: Image.Image, stack: ModelStack) -> torch.Tensor:
        return eval_transform(stack.vqvae.image_size)(img).unsqueeze(0).to(self.device)

    @torch.no_grad()
    def reconstruct(self, image: str | Path | Image.Image | None, latent: int) -> Reconstruction:
        stack = self.stack(latent)
        x = self._tensor(open_upload(image), stack)
        recon, codes = stack.vqvae.reconstruct(x)
        out = Reconstruction(
            original=to_pil(x),
            reconstruction=to_pil(recon),
            error=error_heatmap(recon[0], x[0]),
            code_map=code_map_image(codes[0], stack.vqvae.num_codes, x.shape[-1]),
            psnr=float(metrics.psnr(recon, x)[0]),
            ssim=float(metrics.ssim(recon, x)[0]),
            codes=codes[0].cpu(),
        )
        if stack.decoder is not None:
            rendered = stack.decoder.decode_codes(codes)
            out.rendered = to_pil(rendered)
            out.rendered_psnr = float(metrics.psnr(rendered, x)[0])
            out.rendered_ssim = float(metrics.ssim(rendered, x)[0])
        return out

    def codebook_usage(self, latent: int) -> tuple[go.Figure, dict]:
        """Sorted usage histogram over the training images and its summary numbers."""
        stack = self.stack(latent)
        if stack.usage is None:
            raise StudioError(f"{stack.vqvae_dir} has no codebook_usage.json")
        counts = torch.tensor(stack.usage)
        stats = {
            "codes": stack.vqvae.num_codes,
            "used": metrics.codes_used(counts),
            "dead": metrics.dead_code_count(counts),
            "perplexity": round(metrics.perplexity(counts), 1),
        }
        title = (
            f"Codebook usage ({latent}x{latent} grid): {stats['used']}/{stats['codes']} codes used, "
            f"perplexity {stats['perplexity']}"
        )
        return codebook_usage_figure(stack.usage, title), stats

    @torch.no_grad()
    def code_patch(self, latent: int, code: int, tiles: int = 8) -> Image.Image:
        """What one code looks like: a small grid filled with it, decoded."""
        stack = self.stack(latent)
        if not 0 <= int(code) < stack.vqvae.num_codes:
            raise StudioError(f"Code must be between 0 and {stack.vqvae.num_codes - 1}.")
        grid = torch.full((1, tiles, tiles), int(code), dtype=torch.long, device=self.device)
        return to_pil(stack.vqvae.decode_codes(grid)).resize((256, 256), Image.NEAREST)

    @torch.no_grad()
    def codebook_atlas(self, latent: int, tile: int = 4) -> Image.Image:
        """Every code decoded as a tile-by-tile patch, laid out in code order (made once per size)."""
        key = (int(latent), tile)
        if key not in self._atlases:
            self._atlases[key] = self._make_atlas(latent, tile)
        return self._atlases[key]

    def _make_atlas(self, latent: int, tile: int) -> Image.Image:
        stack = self.stack(latent)
        k = stack.vqvae.num_codes
        side = int(np.ceil(np.sqrt(k)))
        codes = torch.arange(k, device=self.device)
        grids = codes[:, None, None].expand(k, tile, tile)
        patches = stack.vqvae.decode_codes(grids, chunk=64)
        ph = patches.shape[-1]
        canvas = torch.ones(3, side * ph, side * ph)
        for i in range(k):
            r, c = divmod(i, side)
            canvas[:, r * ph : (r + 1) * ph, c * ph : (c + 1) * ph] = patches[i].cpu()
        return to_pil(canvas)

    @torch.no_grad()
    def _codes_of_data(self, latent: int) -> torch.Tensor:
        """Code grids of the data folder's images (encoded once per latent size), [N, h, w]."""
        with self._lock:
            if latent not in self._data_codes:
                stack = self._stacks[latent]
                transform = eval_transform(stack.vqvae.image_size)
                grids = []
                for path in self.data_files:
                    try:
                        x = transform(load_image(path)).unsqueeze(0).to(self.device)
                    except ImageLoadError:
                        continue
                    grids.append(stack.vqvae.encode(x)[0].cpu())
                self._data_codes[latent] = torch.stack(grids) if grids else torch.empty(0, latent, latent)
            return self._data_codes[latent]

    def code_occurrences(self, latent: int, code: int, top: int = 4) -> list[tuple[Image.Image, str]]:
        """The data-folder images where a code occurs most, the code's positions outlined in magenta."""
        if not self.data_files:
            return []
        stack = self.stack(latent)
        code = int(code)
        grids = self._codes_of_data(int(latent))
        if len(grids) == 0:
            return []
        counts = (grids == code).flatten(1).sum(1)
        found = []
        for i in counts.argsort(descending=True)[:top].tolist():
            if counts[i] == 0:
                break
            img = eval_transform(stack.vqvae.image_size)(load_image(self.data_files[i]))
            where = (grids[i] == code).float()[None, None]
            where = F.interpolate(where, size=img.shape[-2:], mode="nearest")[0, 0] > 0
            edge = where & ~(F.max_pool2d(-where.float()[None, None], 3, 1, 1)[0, 0] < 0)
            img[:, edge] = torch.tensor([1.0, 0.0, 1.0])[:, None]
            found.append((to_pil(img), f"{self.data_files[i].name}: {int(counts[i])} times"))
        return found

    def _neighbour_index(self) -> NeighbourIndex:
        """Features of the data folder's images (built on first use, cached on disk) and the
        typical distance of one of them to its nearest other one (leave-one-out)."""
        with self._index_lock:
            if self._neighbours is None:
                # The cheapest encoder; see lesionstudio.measure.features.
                extractor = EncoderFeatures(self.stack(min(self.latents)).vqvae)
                train = cached(self.data_files, extractor, desc="data-folder features")
                k = min(REFERENCE_IMAGES, len(train.files))
                probe = compute(train.files[:k], extractor, all_orientations=True, desc="reference")
                ref = nearest(probe.features, train.features, exclude=torch.arange(k)).distance
                typical = float(ref[torch.isfinite(ref)].median()) if len(train.files) > 1 else float("nan")
                self._neighbours = NeighbourIndex(extractor, train.files, train.features, typical)
            return self._neighbours

    @torch.no_grad()
    def nearest_training(self, images: list[Image.Image]) -> list[tuple[Image.Image, str]]:
        """For each image, the nearest data-folder image (VQ-VAE encoder features, any flip or
        rotation) with its distance as a ratio to the typical distance between real images."""
        if not self.data_files or not images:
            return []
        index = self._neighbour_index()
        to_features = feature_transform(256)
        x = torch.stack([to_features(img) for img in images])
        queries = torch.stack([index.extractor(v) for v in dihedral(x)], dim=1)
        found = nearest(queries, index.features)
        to_thumb = eval_transform(256)
        out = []
        for i, (j, d) in enumerate(zip(found.index.tolist(), found.distance.tolist(), strict=True)):
            ratio = d / index.typical if index.typical > 0 else float("nan")
            note = " copy?" if ratio < DEFAULT_THRESHOLD else ""
            thumb = to_pil(to_thumb(load_image(index.files[j])))
            # Short, the ratio first: a gallery shows one line of caption (its label says what the ratio is).
            out.append((thumb, f"{i + 1}: {ratio:.2f}{note}, {index.files[j].name}"))
        return out

    def class_choices(self, latent: int) -> list[str]:
        prior = self.stack(latent).prior
        return ["any", *(prior.class_names if prior is not None and prior.num_classes else [])]

    def generate(
        self,
        latent: int,
        n: int = 4,
        seed: int | list[int] | None = 0,
        progress: Callable[[float], None] | None = None,
        settings: GenerationSettings | None = None,
        **changes: object,
    ) -> list[Image.Image]:
        """n samples drawn with ``settings`` (default: ``GenerationSettings()``), with any of its
        fields changed by keyword (``temperature=0.8``, ``candidates=2``, ...). Sample i is drawn
        with its own seed (``seed + i``, or the i-th of a list), so it is the image that seed
        gives alone."""
        return self.draw(self.request(latent, settings, **changes), self.sample_seeds(n, seed), progress)

    @staticmethod
    def sample_seeds(n: int, seed: int | list[int] | None) -> list[int]:
        """The seed of each of n requested samples: the given list, or seed, seed + 1, ..."""
        if not 1 <= int(n) <= MAX_SAMPLES:
            raise StudioError(f"Number of samples must be between 1 and {MAX_SAMPLES}.")
        if isinstance(seed, Sequence) and len(seed) != int(n):
            raise StudioError(f"Give one seed or {int(n)} seeds, not {len(seed)}.")
        return per_sample_seeds(seed, int(n))

    def request(self, latent: int, settings: GenerationSettings | None = None, **changes: object) -> GenerationRequest:
        """A checked generation request (a StudioError names what is wrong)."""
        stack = self.stack(latent)
        try:
            settings = replace(settings or GenerationSettings(), **changes)
            return GenerationRequest(stack.latent, settings.resolved(stack))
        except GenerationError as exc:
            raise StudioError(str(exc)) from exc
        except TypeError as exc:  # a keyword that is no setting
            raise StudioError(f"Unknown generation setting: {exc}") from exc

    @torch.no_grad()
    def draw(
        self, request: GenerationRequest, seeds: list[int], progress: Callable[[float], None] | None = None
    ) -> list[Image.Image]:
        """One sample per seed, in one batch (no limit on its size: the caller sets it)."""
        stack = self.stack(request.latent)
        drawn = draw_samples(stack, request.settings, seeds, progress)
        return [to_pil(img) for img in stack.images(drawn)]

    @torch.no_grad()
    def inpaint(
        self,
        image: str | Path | Image.Image | None,
        mask: Image.Image | np.ndarray | Sequence[np.ndarray] | None,
        latent: int,
        n: int = 3,
        temperature: float = 1.0,
        seed: int | None = 0,
        progress: Callable[[float], None] | None = None,
    ) -> Inpainting:
        """Resample the codes under the painted mask (a mask or a list of painted layers)."""
        stack = self.stack(latent)
        if stack.prior is None:
            raise StudioError(f"No prior is installed for the {latent}x{latent} grid; inpainting needs one.")
        n = int(n)
        if not 1 <= n <= MAX_SAMPLES:
            raise StudioError(f"Number of variants must be between 1 and {MAX_SAMPLES}.")
        x = self._tensor(open_upload(image), stack)
        codes = stack.vqvae.encode(x)[0]
        # A hierarchical stack redraws the coarser grids' codes under the mask first.
        levels = [c[0] for c in stack.encode(x)]
        code_mask = mask_to_codes(mask, codes.shape[-1])
        if not bool(code_mask.any()):
            raise StudioError("Paint over the region to change first (the mask is empty).")
        out = inpaint_stack(
            stack, levels, code_mask.to(codes.device), n=n, temperature=float(temperature), seed=seed, progress=progress
        )
        images = [to_pil(img) for img in stack.render(out)]
        original = to_pil(stack.render(codes[None]))
        return Inpainting(original, images, codes.cpu(), code_mask, list(out.cpu()))

    def quiz_trials(self, n: int, seed: int) -> list[Trial]:
        """A reader study's seeded order of real (from the reader folder) and synthetic images."""
        if not self.reader_files:
            raise StudioError("The reader study needs real images: start the app with --reader-images REAL_DIR.")
        return plan_trials(self.reader_files, int(n), int(seed))

    def quiz_real_image(self, trial: Trial) -> Image.Image:
        """A real trial's image through the models' input transform (the size a sample has)."""
        try:
            image = load_image(trial.real_path)
        except ImageLoadError as exc:
            raise StudioError(f"Cannot show {Path(trial.real_path).name}: {exc}") from exc
        return to_pil(self._tensor(image, self.stack(self.default_latent))[0])

    def quiz_synthetic_images(
        self, trials: list[Trial], progress: Callable[[float], None] | None = None
    ) -> dict[int, Image.Image]:
        """The synthetic trials' images, by trial index: default samples of each trial's seed,
        drawn in batches (per-sample seeds, so each is the image it would be alone)."""
        drawn: dict[int, Image.Image] = {}
        for start in range(0, len(trials), MAX_SAMPLES):
            batch = trials[start : start + MAX_SAMPLES]
            images = self.generate(
                self.default_latent,
                len(batch),
                [t.seed for t in batch],
                progress=_part(progress, start / len(trials), len(batch) / len(trials)),
            )
            drawn |= {t.index: img for t, img in zip(batch, images, strict=True)}
        return drawn


def _part(progress: Callable[[float], None] | None, start: float, share: float):
    return None if progress is None else (lambda f: progress(start + share * f))


def mask_to_codes(mask: Image.Image | np.ndarray | Sequence[np.ndarray] | None, grid: int) -> torch.Tensor:
    """A painted mask (any size; painted where alpha, or the grey level, is > 0), or a list of
    painted layers, to a [grid, grid] boolean code mask: a code is resampled if any pixel of its
    patch is painted on any layer."""
    layers = mask if isinstance(mask, (list, tuple)) else [] if mask is None else [mask]
    codes = torch.zeros(grid, grid, dtype=torch.bool)
    for layer in layers:
        codes |= _painted_codes(np.asarray(layer), grid)
    return codes


def _painted_codes(arr: np.ndarray, grid: int) -> torch.Tensor:
    if arr.ndim == 3:
        arr = arr[..., 3] if arr.shape[-1] == 4 else arr.max(-1)
    m = torch.from_numpy((arr > 0).astype(np.float32))[None, None]
    painted = F.interpolate(m, size=(256, 256), mode="nearest")[0, 0] > 0  # the frame the models see
    return coarse_mask(painted, grid)


def zip_images(images: list[Image.Image], prefix: str = "lesion") -> bytes:
    """PNG files in a zip archive, in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, img in enumerate(images):
            png = io.BytesIO()
            img.save(png, format="PNG")
            zf.writestr(f"{prefix}_{i:03d}.png", png.getvalue())
    return buf.getvalue()


__all__ = ["LATENTS", "Inpainting", "Reconstruction", "Studio", "StudioError", "mask_to_codes", "zip_images"]
