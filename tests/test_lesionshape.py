"""The lesion segmentation, its shape features and the critic's shape head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from lesionstudio.measure.lesionshape import FEATURE_NAMES, features_of, segment, shape_features
from lesionstudio.models.critic import RealismCritic, ShapeHead

SIZE = 64
COLUMN = {name: i for i, name in enumerate(FEATURE_NAMES)}


def skin(seed: int = 0, shading: float = 0.25) -> np.ndarray:
    """Skin lit like a dermatoscope's field (brighter in the centre), with a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
    light = 1 - shading * (yy**2 + xx**2) * 2
    tone = np.array([0.85, 0.65, 0.58]) + rng.uniform(-0.04, 0.04, 3)
    return np.clip(light[..., None] * tone + rng.normal(0, 0.01, (SIZE, SIZE, 3)), 0, 1)


def disc(centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def with_lesion(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[mask] = np.array([0.40, 0.24, 0.18])
    return out


def mottled(seed: int) -> np.ndarray:
    """Pigment scattered over the whole frame in blotches: no one lesion."""
    rng = np.random.default_rng(seed)
    image = skin(seed)
    for _ in range(14):
        centre = tuple(rng.uniform(0, SIZE, 2))
        image = with_lesion(image, disc(centre, rng.uniform(2, 5)))
    return image


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_segmentation_finds_a_lesion_on_shaded_skin_and_not_the_shading():
    lesion = disc((30, 34), 9)
    seg = segment(with_lesion(skin(shading=0.35), lesion))
    assert iou(seg.lesion, lesion) > 0.8
    assert not seg.vignette.any()
    f = features_of(with_lesion(skin(shading=0.35), lesion))
    assert f[COLUMN["edge_contact"]] == 0
    assert f[COLUMN["roundness"]] > 0.75 and f[COLUMN["solidity"]] > 0.9
    assert f[COLUMN["off_centre"]] < 0.15
    assert f[COLUMN["dominance"]] > 0.9 and f[COLUMN["visibility"]] > 5
    blank = features_of(skin(shading=0.35))
    assert blank[COLUMN["visibility"]] < f[COLUMN["visibility"]] / 3, "plain skin shows no visible lesion"


def test_a_lesion_cut_by_the_frame_touches_it_and_a_vignette_is_set_aside():
    cut = features_of(with_lesion(skin(), disc((32, 2), 12)))
    assert cut[COLUMN["edge_contact"]] > 0.2
    assert cut[COLUMN["off_centre"]] > 0.8
    circle = ~disc((31.5, 31.5), 30)
    image = with_lesion(skin(), disc((32, 32), 7))
    image[circle] = 0.02
    seg = segment(image)
    assert iou(seg.vignette, circle) > 0.8, "the circle, give or take its blurred rim"
    assert iou(seg.lesion, disc((32, 32), 7)) > 0.8, "the lesion, not the black circle"
    f = features_of(image)
    assert abs(f[COLUMN["vignette"]] - circle.mean()) < 0.1 and f[COLUMN["edge_contact"]] == 0


def test_scattered_pigment_is_not_one_dominant_lesion():
    one = features_of(with_lesion(skin(), disc((32, 32), 8)))
    scattered = features_of(mottled(3))
    assert scattered[COLUMN["components"]] > one[COLUMN["components"]]
    assert scattered[COLUMN["dominance"]] < one[COLUMN["dominance"]]


def test_an_all_black_image_has_nothing_to_segment():
    f = features_of(np.zeros((SIZE, SIZE, 3)))
    assert f[COLUMN["vignette"]] == 1 and f[COLUMN["area"]] == 0
    assert np.isfinite(f).all()
    assert np.isfinite(features_of(np.full((SIZE, SIZE, 3), 0.7))).all(), "a flat image"


def test_shape_features_take_image_batches_and_check_them():
    x = torch.from_numpy(np.stack([with_lesion(skin(), disc((32, 32), 8)), mottled(1)])).permute(0, 3, 1, 2)
    big = torch.nn.functional.interpolate(x.float(), size=(128, 128), mode="bilinear", align_corners=False)
    f = shape_features(big)
    assert f.shape == (2, len(FEATURE_NAMES)) and f.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        shape_features(torch.rand(3, 64, 64))


def one_lesion_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [with_lesion(skin(seed + i), disc(tuple(rng.uniform(24, 40, 2)), rng.uniform(5, 11))) for i in range(n)]


def feature_rows(images: list[np.ndarray]) -> torch.Tensor:
    return torch.tensor(np.stack([features_of(x) for x in images]), dtype=torch.float32)


def test_shape_head_learns_one_whole_lesion_against_scattered_pigment():
    real, fake = feature_rows(one_lesion_images(40, 0)), feature_rows([mottled(100 + i) for i in range(40)])
    head = ShapeHead()
    loss = head.fit(real[:30], fake[:30])
    assert loss < 0.3
    with torch.no_grad():
        held_real, held_fake = head(real[30:]), head(fake[30:])
    assert (held_real > 0).all() and (held_fake < 0).all()
    assert torch.isfinite(head(torch.full((1, len(FEATURE_NAMES)), 1e6))).all(), "clipped, never extreme"
    with pytest.raises(ValueError, match="at least 2"):
        ShapeHead().fit(real[:1], fake)


def test_a_critic_with_a_shape_head_adds_its_log_odds_and_round_trips(tmp_path: Path):
    torch.manual_seed(0)
    critic = RealismCritic(channels=4, view_size=32, crops_per_side=2, shape_head=True)
    real, fake = one_lesion_images(12, 0), [mottled(100 + i) for i in range(12)]
    critic.shape_head.fit(feature_rows(real), feature_rows(fake))
    images = torch.from_numpy(np.stack(real[:2] + fake[:2])).permute(0, 3, 1, 2).float()
    judged = critic.judge(images)
    assert judged.shape is not None and (judged.shape[:2] > 0).all() and (judged.shape[2:] < 0).all()
    torch.testing.assert_close(judged.realism, (judged.layout + judged.texture) / 2 + judged.shape)
    critic.save_pretrained(tmp_path / "critic")
    again = RealismCritic.from_pretrained(tmp_path / "critic")
    assert again.config["shape_head"] is True
    torch.testing.assert_close(again.judge(images).realism, judged.realism)
    plain = RealismCritic(channels=4, view_size=32, crops_per_side=2)
    assert plain.judge(images).shape is None
    with pytest.raises(ValueError, match="shape_head"):
        RealismCritic(shape_head="yes")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data/isic256")
def test_real_lesions_mostly_segment_as_one_whole_lesion():
    """On real ISIC images (the shared set, when present): most are one visible lesion, whole
    in the frame, and the segmentation says so."""
    from lesionstudio.data import find_images, split_files
    from lesionstudio.measure.twosample import load_uint8

    files = split_files(find_images(SHARED_DATA / "train"), "val")[:64]
    f = shape_features(load_uint8(files).float() / 255)
    whole = (f[:, COLUMN["edge_contact"]] < 0.1) & (f[:, COLUMN["visibility"]] > 2) & (f[:, COLUMN["area"]] > 0.01)
    assert whole.float().mean() > 0.6
