"""The app on the shipped checkpoints: every grid size in every tab, the 128x128 one included
(loaded on first use, not at start-up)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, launch_app, lesion_image, painted_editor, result_pixels

from lesionstudio.app.studio import Studio

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

CHECKPOINTS = ROOT / "checkpoints"


load = result_pixels


def test_start_up_loads_the_default_stack_only():
    studio = Studio(CHECKPOINTS)
    assert 128 in studio.latents
    studio.preload()
    assert studio.loaded_latents == [16, 32, 64]
    studio.stack(128)
    assert studio.loaded_latents == [16, 32, 64, 128]


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Client:
    launcher = launch_app(tmp_path_factory, CHECKPOINTS)
    yield Client(next(launcher), verbose=False)
    next(launcher, None)  # stop the app


@pytest.fixture
def upload(tmp_path: Path) -> str:
    path = tmp_path / "lesion.png"
    lesion_image(256, seed=21).save(path)
    return str(path)


def test_reconstruct_at_every_size_is_sharper_on_finer_grids(client: Client, upload: str):
    psnr = {}
    for latent in ("16", "32", "64", "128"):
        original, recon, rendered, error, code_map, stats = client.predict(
            handle_file(upload), latent, api_name="/reconstruct"
        )
        assert load(recon).shape == (256, 256, 3) and stats["latent"] == int(latent)
        # A shipped generation decoder (decoder-N/) is shown beside the faithful one.
        assert (rendered is not None) == (CHECKPOINTS / f"decoder-{latent}").is_dir()
        if rendered is not None:
            assert load(rendered).shape == (256, 256, 3) and stats["generation_decoder_psnr_db"] > 20
        assert load(code_map).shape[:2] == (256, 256)
        psnr[latent] = stats["psnr_db"]
    assert psnr["16"] < psnr["32"] < psnr["64"] < psnr["128"], psnr


def test_codebook_at_128(client: Client):
    plot, stats, patch, atlas, where = client.predict("128", 5, api_name="/codebook")
    assert stats["codes"] == 512 and stats["used"] >= 0.9 * 512
    assert "128x128" in str(plot["plot"])
    assert load(patch).shape == (256, 256, 3) and load(atlas).shape[0] > 0


def test_generate_at_128_draws_every_level_and_is_reproducible(client: Client):
    first, png, _ = client.predict("128", 1.0, 1, 4, "benign", 0.9, 1, api_name="/generate")
    again, _, _ = client.predict("128", 1.0, 1, 4, "benign", 0.9, 1, api_name="/generate")
    assert str(png).endswith(".png") and len(first) == 1
    assert load(first[0]).shape == (256, 256, 3)
    assert np.array_equal(load(first[0]), load(again[0]))


def test_inpaint_at_128_keeps_the_unpainted_pixels(client: Client, upload: str, tmp_path: Path):
    editor = painted_editor(upload, tmp_path, 256, 96, 160)
    original, variants, info = client.predict(editor, "128", 1.0, 1, 3, api_name="/inpaint")
    assert info["grid"] == 128 and info["codes_resampled"] >= 32 * 32
    base, img = load(original).astype(int), load(variants[0]).astype(int)
    far = np.ones((256, 256), dtype=bool)
    far[72:184, 72:184] = False  # the painted square and the decoder's reach around it
    assert np.abs(img[far] - base[far]).max() <= 1
    assert np.abs(img[~far] - base[~far]).max() > 0
