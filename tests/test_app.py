"""The app launched as a user would (python app.py), driven through gradio_client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import launch_app, lesion_image, painted_editor, result_pixels
from hostile import CORPUS

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    yield from launch_app(tmp_path_factory)


@pytest.fixture(scope="module")
def client(app_url: str) -> Client:
    return Client(app_url, verbose=False)


@pytest.fixture
def upload(tmp_path: Path) -> str:
    p = tmp_path / "lesion.jpg"
    lesion_image(280, seed=9).save(p)
    return str(p)


load = result_pixels


def test_reconstruct_endpoint(client: Client, upload: str):
    original, recon, rendered, error, code_map, stats = client.predict(
        handle_file(upload), "32", api_name="/reconstruct"
    )
    for img in (original, recon, error, code_map):
        assert load(img).shape == (256, 256, 3)
    assert set(stats) >= {"psnr_db", "ssim"} and np.isfinite(stats["psnr_db"])
    assert rendered is None and "generation_decoder_psnr_db" not in stats  # no decoder-32/ here


def test_codebook_endpoint(client: Client):
    plot, stats, patch, atlas, where = client.predict("32", 3, api_name="/codebook")
    assert where == []  # no --data folder given
    assert stats["codes"] == 16 and stats["used"] == 15
    assert "plot" in plot and "Codebook usage" in str(plot["plot"])
    assert load(patch).shape == (256, 256, 3) and load(atlas).shape[0] > 0


def test_generate_endpoint_is_reproducible(client: Client):
    gallery, download, nearest = client.predict("32", 1.0, 3, 7, "malignant", api_name="/generate")
    assert nearest == []  # no --data folder given
    again, _, _ = client.predict("32", 1.0, 3, 7, "malignant", api_name="/generate")
    assert len(gallery) == 3
    for a, b in zip(gallery, again, strict=True):
        assert load(a).shape == (256, 256, 3)
        assert np.array_equal(load(a), load(b))
    assert str(download).endswith(".zip")
    single, png, _ = client.predict("32", 0.5, 1, 7, "any", api_name="/generate")
    assert len(single) == 1 and str(png).endswith(".png")


def test_generate_shows_nearest_training_images_with_a_data_folder(tmp_path_factory, monkeypatch):
    from conftest import write_images

    data = tmp_path_factory.mktemp("data")
    write_images(data, 6)
    monkeypatch.setenv("LESIONSTUDIO_CACHE", str(tmp_path_factory.mktemp("cache")))  # inherited by the app
    launcher = launch_app(tmp_path_factory, extra_args=("--data", str(data)))
    url = next(launcher)
    try:
        _, _, nearest = Client(url, verbose=False).predict("32", 1.0, 2, 3, "any", api_name="/generate")
        assert len(nearest) == 2
        for item in nearest:
            assert load(item).shape == (256, 256, 3)
            assert item["caption"].startswith(("1: ", "2: "))
            assert ", lesion_" in item["caption"]
    finally:
        next(launcher, None)  # stop the app


def test_inpaint_endpoint_changes_only_the_painted_region(client: Client, upload: str, tmp_path: Path):
    editor = painted_editor(upload, tmp_path, 280, 110, 170)
    original, variants, info = client.predict(editor, "32", 1.0, 2, 3, api_name="/inpaint")
    assert len(variants) == 2 and info["codes_resampled"] > 0
    base = load(original).astype(int)
    # far from the painted square (beyond the decoder's reach) the pixels are the original's
    far = np.ones((256, 256), dtype=bool)
    far[60:200, 60:200] = False
    changed_inside = False
    for v in variants:
        img = load(v).astype(int)
        assert np.abs(img[far] - base[far]).max() <= 1
        changed_inside |= bool(np.abs(img[~far] - base[~far]).max() > 0)
    assert changed_inside


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_odd_uploads_through_the_api(client: Client, corpus: Path, upload: str, name: str):
    """Each odd upload works or gets a clear message; the app answers the next request normally."""
    expectation = CORPUS[name][1]
    if expectation == "ok":
        _, recon, *_, stats = client.predict(handle_file(str(corpus / name)), "32", api_name="/reconstruct")
        assert load(recon).shape == (256, 256, 3) and np.isfinite(stats["psnr_db"])
    else:
        with pytest.raises(Exception, match=expectation):
            client.predict(handle_file(str(corpus / name)), "32", api_name="/reconstruct")
    _, recon, *_ = client.predict(handle_file(upload), "32", api_name="/reconstruct")
    assert load(recon).shape == (256, 256, 3)


def test_sampler_work_shares_one_queue_group(tmp_path: Path):
    """Generate (with its candidate ranking) and inpaint run one at a time, in one group."""
    from conftest import make_pair

    from lesionstudio.app.studio import Studio
    from lesionstudio.app.ui import SAMPLER_WAITING, build

    make_pair(tmp_path, 32)
    fns = {fn.api_name: fn for fn in build(Studio(tmp_path)).fns.values()}
    assert fns["generate"].concurrency_id == fns["inpaint"].concurrency_id == "sampler"
    # Gradio hands them to the sampler worker, which runs one job at a time (tests/test_serving.py)
    assert fns["generate"].concurrency_limit == fns["inpaint"].concurrency_limit == SAMPLER_WAITING
    assert fns["reconstruct"].concurrency_id != "sampler"


def test_without_a_data_folder_the_reader_study_says_what_it_needs(app_url: str):
    import json
    import urllib.request

    config = json.loads(urllib.request.urlopen(app_url + "config", timeout=30).read())
    texts = [c.get("props", {}).get("value") for c in config["components"]]
    needs = [t for t in texts if isinstance(t, str) and "reader study needs your own real images" in t]
    assert needs and "--reader-images REAL_DIR" in needs[0]
    assert not any(c.get("props", {}).get("elem_id") == "quiz-start" for c in config["components"])


def test_a_quiz_log_of_other_data_is_refused_at_start_up(tmp_path: Path):
    from conftest import run_module

    other = tmp_path / "scores.csv"
    other.write_text("name,score\na,1\n")
    res = run_module(["app.py", "--quiz-log", str(other), "--port", "1"], timeout=120)
    assert res.returncode != 0 and res.stderr.startswith("error:") and "scores.csv" in res.stderr
    assert other.read_text() == "name,score\na,1\n"  # left as it was
