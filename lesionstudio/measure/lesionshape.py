"""Where the lesion is in a dermoscopic image, and the shape features that say whether it is one
whole lesion with a border on skin.

A rough segmentation, enough to describe a layout: the image's black vignette (dark and joined to
the frame) is set aside, the skin's uneven lighting is divided out (a quadratic surface fitted to
the skin, as dermatoscopes light the centre more than the corners), and the lesion is the largest
region darker than an Otsu threshold of what is left. Its features (``FEATURE_NAMES``) feed the
realism critic's shape head, a small classifier of real against generated layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

FEATURE_NAMES = (
    "vignette",  # fraction of the frame in a black vignette
    "area",  # the lesion's share of the skin in view
    "dominance",  # its share of all darker pixels: one lesion, not scattered pigment
    "components",  # log(1 + dark regions larger than 1% of the skin)
    "edge_contact",  # share of its outline on the frame or the vignette: cut off, not whole
    "roundness",  # 4 pi area / perimeter^2
    "solidity",  # area / convex hull area
    "contrast",  # 1 - its median brightness relative to the skin's
    "visibility",  # contrast / the skin's own variation
    "border_sharpness",  # brightness gradient along its outline / contrast
    "off_centre",  # its centroid's distance from the centre / half the side
    "lesion_variation",  # brightness spread inside it
    "skin_roughness",  # fine-scale variation of the skin (mottled skin)
    "skin_saturation",  # colour saturation of the skin
)

VIGNETTE_LUMINANCE = 0.15  # darker than this and joined to the frame: the dermatoscope's black circle
VIGNETTE_RIM = 2  # pixels of a vignette's soft edge that are neither circle nor skin
MIN_SKIN_FRACTION = 0.05  # less skin in view than this: nothing to segment
LESION_DEPTH = 0.9  # a lesion pixel is at most this bright relative to the lit skin around it


@dataclass
class LesionSegmentation:
    """Masks [H, W] of one image and its brightness relative to the lit skin."""

    vignette: np.ndarray
    skin: np.ndarray  # neither the vignette nor its soft rim
    relative: np.ndarray
    dark: np.ndarray  # every pixel darker than the threshold
    lesion: np.ndarray  # the largest dark region, holes filled


def luminance(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] in [0, 1] -> [H, W], lightly smoothed so single speckles do not form regions."""
    return ndimage.gaussian_filter(image @ np.array([0.299, 0.587, 0.114]), 1.0)


def vignette_mask(lum: np.ndarray) -> np.ndarray:
    """Dark pixels joined to the frame."""
    regions = label(lum < VIGNETTE_LUMINANCE, connectivity=2)
    frame = np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])
    return np.isin(regions, frame[frame > 0])


def relative_brightness(lum: np.ndarray, skin: np.ndarray, refits: int = 2) -> np.ndarray:
    """Brightness over a quadratic lighting surface fitted to the skin, refitted without the
    pixels the lesion darkens (which would pull the surface down)."""
    h, w = lum.shape
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy / (h - 1) - 0.5, xx / (w - 1) - 0.5
    basis = np.stack([np.ones_like(yy), yy, xx, yy * yy, xx * xx, yy * xx], -1)
    fit_on = skin
    for _ in range(refits + 1):
        coef = np.linalg.lstsq(basis[fit_on], lum[fit_on], rcond=None)[0]
        relative = lum / np.maximum(basis @ coef, 1e-3)
        lit = skin & (relative > LESION_DEPTH)
        if lit.sum() < 0.25 * skin.sum():
            break
        fit_on = lit
    return relative


def segment(image: np.ndarray) -> LesionSegmentation:
    """Segment one image [H, W, 3] in [0, 1] (64 px is plenty: this describes the layout)."""
    lum = luminance(image)
    vignette = vignette_mask(lum)
    skin = ~ndimage.binary_dilation(vignette, iterations=VIGNETTE_RIM)  # without the circle's soft rim
    if skin.mean() < MIN_SKIN_FRACTION:
        empty = np.zeros_like(skin)
        return LesionSegmentation(vignette, skin, np.ones_like(lum), empty, empty)
    relative = relative_brightness(lum, skin)
    values = relative[skin]
    threshold = min(threshold_otsu(values), LESION_DEPTH) if np.ptp(values) > 1e-3 else 0.0
    dark = skin & (relative < threshold)
    regions = label(dark, connectivity=2)
    lesion = np.zeros_like(dark)
    if regions.max() > 0:
        largest = np.argmax(np.bincount(regions.ravel())[1:]) + 1
        lesion = ndimage.binary_fill_holes(regions == largest)
    return LesionSegmentation(vignette, skin, relative, dark, lesion)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _frame_or_vignette(vignette: np.ndarray) -> np.ndarray:
    near = ndimage.binary_dilation(vignette, iterations=VIGNETTE_RIM + 1)
    near[[0, -1], :] = True
    near[:, [0, -1]] = True
    return near


def _outline_features(seg: LesionSegmentation, contrast: float) -> tuple[float, float]:
    """Edge contact and border sharpness of the lesion's outline."""
    outline = _outline(seg.lesion)
    n = max(int(outline.sum()), 1)
    contact = (outline & _frame_or_vignette(seg.vignette)).sum() / n
    gy, gx = np.gradient(seg.relative)
    sharpness = float(np.hypot(gx, gy)[outline].mean()) / max(contrast, 0.05) if outline.any() else 0.0
    return float(contact), sharpness


def _region_features(seg: LesionSegmentation, skin_area: int) -> list[float]:
    """Components, area, dominance, roundness, solidity and off-centre of the lesion."""
    sizes = np.bincount(label(seg.dark, connectivity=2).ravel())[1:]
    components = math.log1p(int((sizes > 0.01 * skin_area).sum()))
    area = int(seg.lesion.sum())
    if area == 0:
        return [components, 0.0, 0.0, 0.0, 0.0, 1.0]
    props = regionprops(seg.lesion.astype(np.uint8))[0]
    roundness = min(4 * math.pi * area / max(props.perimeter, 1.0) ** 2, 2.0)
    h, w = seg.lesion.shape
    cy, cx = props.centroid
    off_centre = math.hypot(cy - (h - 1) / 2, cx - (w - 1) / 2) / (min(h, w) / 2)
    dominance = float((seg.lesion & seg.dark).sum()) / max(int(seg.dark.sum()), 1)
    return [components, area / skin_area, dominance, roundness, float(props.solidity), off_centre]


def features_of(image: np.ndarray) -> np.ndarray:
    """The ``FEATURE_NAMES`` of one image [H, W, 3] in [0, 1]."""
    seg = segment(image)
    skin = seg.skin
    skin_area = max(int(skin.sum()), 1)
    components, area, dominance, roundness, solidity, off_centre = _region_features(seg, skin_area)
    around = skin & ~ndimage.binary_dilation(seg.lesion, iterations=2)
    if around.sum() < 20:
        around = skin & ~seg.lesion
    inside = seg.relative[seg.lesion]
    outside = seg.relative[around] if around.any() else np.ones(1)
    contrast = float(np.median(outside) - np.median(inside)) if inside.size else 0.0
    contact, sharpness = _outline_features(seg, contrast)
    fine = seg.relative - ndimage.gaussian_filter(seg.relative, 3.0)
    saturation = (image.max(2) - image.min(2)) / (image.max(2) + 1e-3)
    return np.array(
        [
            float(seg.vignette.mean()),
            area,
            dominance,
            components,
            contact,
            roundness,
            solidity,
            contrast,
            contrast / (float(outside.std()) + 0.02),
            sharpness,
            off_centre,
            float(inside.std()) if inside.size else 0.0,
            float(fine[around].std()) if around.any() else 0.0,
            float(saturation[around].mean()) if around.any() else 0.0,
        ]
    )


def shape_features(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, len(FEATURE_NAMES)], each image judged at ``size`` px."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    small = F.interpolate(images.float().cpu(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    rows = [features_of(x.clamp(0, 1).permute(1, 2, 0).numpy()) for x in small]
    return torch.tensor(np.stack(rows), dtype=torch.float32).reshape(len(rows), len(FEATURE_NAMES))
