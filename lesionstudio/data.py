"""Image folders of skin lesions: listing, labels from a CSV, preprocessing and augmentation.

Preprocessing follows the method: resize to a square (256 px by default), then per-image
min-max scaling of all channels together to [0, 1] (together, so the lesion's colour balance is
kept), then for training random flips, right-angle rotations and a mild colour jitter.
"""

from __future__ import annotations

import csv
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Decoding more pixels than this is refused before decode (decompression bombs): 64 MP is
# far above any dermoscope (the largest ISIC images are about 6000x4000 = 24 MP).
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# Column names tried, in order, when a labels CSV does not say which to use.
FILE_COLUMNS = ("file", "filename", "image", "image_name", "image_id", "isic_id", "path")
LABEL_COLUMNS = ("label_if_known", "label", "benign_malignant", "diagnosis", "dx", "target", "class")


class ImageLoadError(ValueError):
    """An image file that cannot be used: unreadable, not an image, or too large."""


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """Open an image as 8-bit RGB, honouring EXIF orientation and refusing decompression bombs.

    Any mode Pillow reads (greyscale, palette, RGBA, CMYK, 16-bit) is converted; transparent
    areas are put on white, as a dermoscope image has no transparency of its own.
    """
    try:
        if isinstance(source, Image.Image):
            img = source
        else:
            with warnings.catch_warnings():
                # A DecompressionBombWarning is raised as an error below, not merely printed.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(source)
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ImageLoadError(
                f"image is {img.width}x{img.height} pixels, more than the limit of {MAX_IMAGE_PIXELS:,}"
            )
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated images: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"image is too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        name = getattr(source, "name", None) or str(source)
        raise ImageLoadError(f"cannot read {name!s} as an image: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the image's own range (min-max follows anyway).
        t = torch.from_numpy(np.asarray(img, dtype=np.float32))
        lo, hi = float(t.min()), float(t.max())
        t = (t - lo) / (hi - lo) * 255 if hi > lo else torch.zeros_like(t)
        img = Image.fromarray(t.round().clamp(0, 255).to(torch.uint8).numpy(), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def min_max_scale(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each image of x ([3, H, W] or [B, 3, H, W]) to [0, 1] by its own min and max.

    A constant image (max == min) becomes all zeros rather than NaN.
    """
    x = x.float()
    dims = tuple(range(x.ndim - 3, x.ndim))
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)


class MinMaxScale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return min_max_scale(x)


class RandomRightAngleRotation(torch.nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees: lossless, and adds no black corners that the
    generative model would otherwise learn as part of the lesion images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


def eval_transform(size: int = 256) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic preprocessing: RGB uint8 -> resize -> min-max scale to [0, 1]."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((size, size), antialias=True),
            MinMaxScale(),
        ]
    )


def train_transform(
    size: int = 256, crop: int | None = None, jitter: float = 0.1, rotate: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """Training preprocessing: the eval transform, then flips, right-angle rotations, colour
    jitter and an optional random crop (the networks are fully convolutional, so training on
    crops is a cheap way to see more images per CPU-second)."""
    steps: list[Callable] = [
        v2.PILToTensor(),
        v2.Resize((size, size), antialias=True),
        MinMaxScale(),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
    ]
    if rotate:
        steps.append(RandomRightAngleRotation())
    if jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=min(jitter / 4, 0.5)))
    if crop:
        steps.append(v2.RandomCrop(crop))
    return v2.Compose(steps)


def dihedral_variant(images: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 flips and right-angle rotations of images [..., H, W] (k = 0: unchanged)."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral variant must be in [0, 8), got {k}")
    x = images.flip(-1) if k >= 4 else images
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


def preprocess(img: Image.Image | str | Path, size: int = 256) -> torch.Tensor:
    """One image (path or PIL) to a [1, 3, size, size] tensor in [0, 1], as the models expect."""
    return eval_transform(size)(load_image(img)).unsqueeze(0)


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as 8-bit levels, rounded (a saved PNG's pixels)."""
    # Rounded, not truncated as to_pil_image does for floats: truncation makes every saved sample
    # half a level darker than the same image rounded, a tell for a critic or a two-sample test.
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def as_saved(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] exactly as their saved PNGs read back (each pixel on an 8-bit level)."""
    return as_uint8(x).float() / 255


def to_pil(x: torch.Tensor) -> Image.Image:
    """A [3, H, W] (or [1, 3, H, W]) tensor in [0, 1] to a PIL image."""
    if x.ndim == 4:
        x = x[0]
    return TF.to_pil_image(as_uint8(x).cpu())


def find_images(root: str | Path) -> list[Path]:
    """All jpg/jpeg/png files below root, recursively, sorted for a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


@dataclass
class Labels:
    """Labels read from a CSV: each file's class name, and the sorted class names."""

    by_key: dict[str, str]
    classes: list[str]

    def lookup(self, path: Path, root: Path) -> str | None:
        rel = path.relative_to(root).as_posix()
        for key in (rel, f"{root.name}/{rel}", path.name, path.stem):
            if key in self.by_key:
                return self.by_key[key]
        return None


def read_labels(csv_path: str | Path, file_column: str | None = None, label_column: str | None = None) -> Labels:
    """Read file -> label pairs from a CSV.

    Columns are found by name (e.g. ``file``/``label_if_known`` in the isic256 MANIFEST.csv,
    ``image_name``/``benign_malignant`` in the ISIC 2020 ground truth) unless given. ISIC
    one-hot ground truth (``image`` plus a 0/1 column per diagnosis, e.g. MEL, NV) is read as
    the column holding the 1. Empty labels are skipped.
    """
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if not columns:
        raise ValueError(f"labels CSV {csv_path} has no header row")
    lower = {c.lower(): c for c in columns}
    fcol = file_column or next((lower[c] for c in FILE_COLUMNS if c in lower), None)
    if fcol is None or fcol not in columns:
        raise ValueError(f"labels CSV {csv_path}: no file column among {columns}; pass file_column")
    lcol = label_column or next((lower[c] for c in LABEL_COLUMNS if c in lower), None)
    one_hot = [c for c in columns if c != fcol] if lcol is None else []
    if lcol is None and not one_hot:
        raise ValueError(f"labels CSV {csv_path}: no label column among {columns}; pass label_column")
    if lcol is not None and lcol not in columns:
        raise ValueError(f"labels CSV {csv_path}: column {lcol!r} not among {columns}")

    by_key: dict[str, str] = {}
    for row in rows:
        name = (row.get(fcol) or "").strip()
        if not name:
            continue
        if lcol is not None:
            label = (row.get(lcol) or "").strip()
        else:
            label = next((c for c in one_hot if _is_one(row.get(c))), "")
        if not label:
            continue
        p = Path(name)
        for key in {p.as_posix(), p.name, p.stem}:
            by_key.setdefault(key, label)
    if not by_key:
        raise ValueError(f"labels CSV {csv_path} gave no labelled rows")
    classes = sorted({v for v in by_key.values()})
    return Labels(by_key=by_key, classes=classes)


def _is_one(value: str | None) -> bool:
    try:
        return float(value or 0) == 1.0
    except ValueError:
        return False


class LesionImageFolder(Dataset):
    """Images below a folder, with optional class ids from a labels CSV.

    Items are ``(image, label)`` with label -1 where the CSV has none; an image that cannot be
    decoded gives ``None`` so :func:`collate_skip_bad` can drop and count it instead of ending
    the epoch.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        labels_csv: str | Path | None = None,
        file_column: str | None = None,
        label_column: str | None = None,
        classes: Sequence[str] | None = None,
        files: Sequence[Path] | None = None,
    ) -> None:
        self.root = Path(root)
        self.files = list(files) if files is not None else find_images(self.root)
        self.transform = transform or eval_transform()
        self.classes: list[str] = list(classes or [])
        self.targets = [-1] * len(self.files)
        if labels_csv is not None:
            labels = read_labels(labels_csv, file_column, label_column)
            self.classes = list(classes or labels.classes)
            index = {c: i for i, c in enumerate(self.classes)}
            for i, path in enumerate(self.files):
                name = labels.lookup(path, self.root)
                if name is not None and name in index:
                    self.targets[i] = index[name]
            n_missing = self.targets.count(-1)
            if n_missing:
                log.warning("%d of %d images have no label in %s", n_missing, len(self.files), labels_csv)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        try:
            img = load_image(self.files[i])
        except ImageLoadError as exc:
            log.warning("skipping %s: %s", self.files[i], exc)
            return None
        return self.transform(img), self.targets[i]

    def subset(self, indices: Sequence[int]) -> LesionImageFolder:
        """A dataset over some of these files, sharing classes and transform."""
        sub = LesionImageFolder.__new__(LesionImageFolder)
        sub.root, sub.transform, sub.classes = self.root, self.transform, self.classes
        sub.files = [self.files[i] for i in indices]
        sub.targets = [self.targets[i] for i in indices]
        return sub

    def limited(self, limit: int | None, seed: int) -> LesionImageFolder:
        """A seeded random subset of ``limit`` of these files, in their order (all when limit is
        None or not smaller): the trainers' ``--limit``."""
        if limit is None or limit >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        return self.subset(sorted(perm[:limit]))

    def with_transform(self, transform: Callable[[Image.Image], torch.Tensor]) -> LesionImageFolder:
        sub = self.subset(range(len(self)))
        sub.transform = transform
        return sub

    def class_counts(self) -> list[int]:
        return [self.targets.count(i) for i in range(len(self.classes))]


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    skipped: int


def collate_skip_bad(items: list[tuple[torch.Tensor, int] | None]) -> Batch:
    """Stack the good items; count the undecodable ones (works inside DataLoader workers too)."""
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([it[0] for it in good])
    labels = torch.tensor([it[1] for it in good], dtype=torch.long)
    return Batch(images, labels, skipped)


def split_files(files: Sequence[Path], split: str, val_fraction: float = 0.1, seed: int = 0) -> list[Path]:
    """The trainers' "train" or "val" split of a file list (the same seeded split), or "all"."""
    if split == "all":
        return list(files)
    if split not in ("train", "val"):
        raise ValueError(f"split must be all, train or val, got {split!r}")
    train_idx, val_idx = split_indices(len(files), val_fraction, seed)
    return [files[i] for i in (val_idx if split == "val" else train_idx)]


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A deterministic train/validation split of range(n) by seed."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * val_fraction))
    if n_val == 0 and val_fraction > 0 and n > 1:
        n_val = 1
    return sorted(perm[n_val:]), sorted(perm[:n_val])
