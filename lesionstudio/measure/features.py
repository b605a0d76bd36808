"""Image features for nearest-neighbour search and distribution distances, computable offline.

The feature network is a LesionStudio VQ-VAE encoder (by default the shipped 32x32 one): it was
trained on dermoscopic images, so its activations describe what matters here (lesion colour,
border, network pattern, hair, vignette) rather than ImageNet classes, and it loads from disk
with no download. Its numbers are not comparable to anything computed with Inception.

* ``layout`` features: encoder activations averaged over a 4x4 grid of the image (64 x 16 =
  1,024 values for D = 64): where things are and what they look like, for finding near-copies;
* ``stats`` features: per-channel mean and standard deviation over the whole image (2 x D): a
  compact summary whose covariance can be estimated from a few hundred images, for Frechet
  distance and KID;
* pixel features: the image itself downscaled to 32x32 (antialiased), for the pixel-space check.

Feature sets of image folders are cached on disk (``.npz`` with a JSON key of the weights and
the files' sizes and modification times; no pickle).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from .. import npzcache
from ..codes import state_sha256
from ..data import dihedral_variant, load_image
from ..models.hubmodel import CheckpointError
from ..models.vqvae import VQVAE
from ..sampling.loading import LATENTS, load_stack

PIXEL_SIZE = 32
CACHE_ENV = "LESIONSTUDIO_CACHE"
# The shipped VQ-VAEs whose encoders may give the features: not the 16x16 layout level's, whose
# grid is coarser than the copy threshold was set with.
FEATURE_LATENTS = tuple(n for n in LATENTS if n >= 32)


class EncoderFeatures(nn.Module):
    """Pooled activations of a VQ-VAE's encoder (before quantisation) for images in [0, 1]."""

    def __init__(self, vqvae: VQVAE, pooling: str = "layout", grid: int = 4) -> None:
        super().__init__()
        if pooling not in ("layout", "stats"):
            raise ValueError(f"pooling must be 'layout' or 'stats', got {pooling!r}")
        self.encoder = vqvae.encoder
        self.pooling = pooling
        self.grid = grid
        d = vqvae.code_dim
        self.num_features = d * grid * grid if pooling == "layout" else 2 * d
        self.weights_key = state_sha256(vqvae.encoder)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encoder(images.float() - 0.5)
        if self.pooling == "layout":
            return F.adaptive_avg_pool2d(z, self.grid).flatten(1)
        return torch.cat([z.mean(dim=(2, 3)), z.std(dim=(2, 3))], dim=1)


def robust_scale(x: torch.Tensor, q: float = 0.005) -> torch.Tensor:
    """Per-image scaling of [3, H, W] to [0, 1] by its q and 1-q quantiles (all channels together).

    The models' min-max scaling lets one extreme pixel shift the whole image, so a JPEG re-save
    can move a copy's features far from its original. Quantiles ignore such pixels, so a
    re-encoded copy stays a copy.
    """
    flat = x.float().flatten()
    lo, hi = torch.quantile(flat, torch.tensor([q, 1 - q]))
    return ((x.float() - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)


def feature_transform(size: int = 256) -> Callable[[Image.Image], torch.Tensor]:
    """Image -> [3, size, size] in [0, 1] for the feature network (robust per-image scaling)."""
    resize = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])
    return lambda img: robust_scale(resize(img))


def pixel_features(images: torch.Tensor, size: int = PIXEL_SIZE) -> torch.Tensor:
    """Images [B, 3, H, W] downscaled to size x size (antialiased) and flattened."""
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True).flatten(1)


def dihedral(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and right-angle rotations of a batch (a copy may come back turned or mirrored)."""
    return [dihedral_variant(images, k) for k in range(8)]


@dataclass
class FeatureSet:
    files: list[Path]  # the readable images, in order
    features: torch.Tensor  # [N, F] (or [N, 8, F] with all flips and rotations)
    pixels: torch.Tensor  # [N, P] (or [N, 8, P])


Extractor = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def compute(
    files: Sequence[Path],
    extractor: Extractor,
    all_orientations: bool = False,
    batch_size: int = 16,
    image_size: int = 256,
    desc: str = "features",
) -> FeatureSet:
    """Features and pixel features of image files (evaluation transform); unreadable files are
    skipped (with a warning line). With all_orientations, each of the 8 flips/rotations."""
    transform = feature_transform(image_size)
    kept: list[Path] = []
    feats, pixels = [], []
    for start in tqdm(range(0, len(files), batch_size), desc=desc, unit="batch", mininterval=2):
        batch, names = [], []
        for path in files[start : start + batch_size]:
            try:
                batch.append(transform(load_image(path)))
                names.append(Path(path))
            except (OSError, ValueError) as exc:
                tqdm.write(f"skipped {path}: {exc}")
        if not batch:
            continue
        x = torch.stack(batch)
        views = dihedral(x) if all_orientations else [x]
        f = torch.stack([extractor(v).cpu() for v in views], dim=1)  # [B, V, F]
        p = torch.stack([pixel_features(v).cpu() for v in views], dim=1)
        feats.append(f if all_orientations else f[:, 0])
        pixels.append(p if all_orientations else p[:, 0])
        kept += names
    if not kept:
        raise ValueError("none of the images could be read")
    return FeatureSet(kept, torch.cat(feats), torch.cat(pixels))


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lesionstudio")
    return Path(root).expanduser()


def _files_key(files: Sequence[Path]) -> list[list]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return out


def cached(
    files: Sequence[Path],
    extractor: EncoderFeatures,
    cache: Path | None = None,
    desc: str = "features",
    batch_size: int = 16,
) -> FeatureSet:
    """compute() for a folder's images, reusing a cache made by the same weights from the same
    files (same sizes and modification times); anything else is recomputed and the cache rewritten."""
    key = {
        "weights": extractor.weights_key,
        "pooling": extractor.pooling,
        "grid": extractor.grid,
        "pixel_size": PIXEL_SIZE,
        "scaling": "quantile-0.005",
        "files": _files_key(files),
    }
    cache = cache or cache_dir() / f"features-{npzcache.digest(key)}.npz"
    found = npzcache.load(cache, key, ("files", "features", "pixels"))
    if found is not None:
        features, pixels = torch.from_numpy(found["features"]), torch.from_numpy(found["pixels"])
        return FeatureSet([Path(f) for f in found["files"]], features, pixels)
    fs = compute(files, extractor, batch_size=batch_size, desc=desc)
    files_array = np.array([str(p) for p in fs.files])
    arrays = {"files": files_array, "features": fs.features.numpy(), "pixels": fs.pixels.numpy()}
    try:
        npzcache.save(cache, key, arrays)
    except OSError as exc:  # a read-only cache only costs time
        tqdm.write(f"could not write the feature cache {cache}: {exc}")
    return fs


def generating_latent(generated_dir: Path) -> int | None:
    """The latent size recorded in a synthesize folder's metadata.csv, if there is one."""
    try:
        with open(generated_dir / "metadata.csv", newline="") as f:
            row = next(csv.DictReader(f), None)
        return int(row["latent"]) if row else None
    except (OSError, KeyError, ValueError, TypeError, csv.Error):
        return None


@dataclass(frozen=True)
class FeatureModel:
    """The VQ-VAE chosen for the features, and where it came from."""

    vqvae: VQVAE
    folder: str
    made_the_samples: bool = False

    def describe(self) -> str:
        own = " (the model that made the samples)" if self.made_the_samples else ""
        return f"features: encoder of {self.folder}{own}"


def feature_model(path: str | None, source: str | None, generated_dir: Path | None = None) -> FeatureModel:
    """The VQ-VAE whose encoder gives the features: a folder, else a shipped one, preferring 32x32
    and, when the samples' metadata.csv names their latent size, one that did not make them."""
    if path:
        return FeatureModel(VQVAE.from_pretrained(path).eval(), str(path))
    made_by = generating_latent(generated_dir) if generated_dir else None
    order = sorted(FEATURE_LATENTS, key=lambda n: (n == made_by, n))
    last: Exception | None = None
    for latent in order:
        try:
            stack = load_stack(latent, source, require_prior=False)
        except (CheckpointError, OSError, ValueError) as exc:  # try the next latent size
            last = exc
            continue
        return FeatureModel(stack.vqvae, str(stack.vqvae_dir), latent == made_by)
    raise CheckpointError(f"no VQ-VAE found for the features (pass --feature-model DIR): {last}")
