"""Odd and hostile uploads through the library: each is converted correctly or refused clearly."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest
from hostile import CORPUS

from lesionstudio.app.studio import StudioError, open_upload
from lesionstudio.data import eval_transform


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_upload_is_converted_or_refused_clearly(corpus: Path, name: str):
    expectation = CORPUS[name][1]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, high-water mark
    if expectation == "ok":
        img = open_upload(str(corpus / name))
        assert img.mode == "RGB"
        x = eval_transform(256)(img)
        assert x.shape == (3, 256, 256) and float(x.min()) >= 0 and float(x.max()) <= 1
    else:
        with pytest.raises(StudioError, match=expectation):
            open_upload(str(corpus / name))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 300, f"{name} made the process grow by {grown_mib:.0f} MiB"


def test_exif_orientation_is_applied(corpus: Path):
    img = open_upload(str(corpus / "exif_rotated.jpg"))
    assert img.size == (60, 120)  # stored 120x60, displayed rotated
    arr = np.asarray(img).astype(int)
    assert arr[:20].mean() < arr[-20:].mean()  # the dark band stored on the left is now on top


def test_animated_gif_uses_first_frame(corpus: Path):
    assert open_upload(str(corpus / "animated.gif")).size == (64, 64)
