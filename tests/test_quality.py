"""python -m lesionstudio.quality: offline FD/KID on VQ-VAE features; Inception FID from a local file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import lesion_image, make_pair, run_module, write_images
from safetensors.torch import save_file

from lesionstudio.quality import frechet_kid, inception_fid, load_inception_state


def test_frechet_and_kid_separate_shifted_features():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    same_fd, same_kid, _ = frechet_kid(a, b)
    shifted_fd, shifted_kid, _ = frechet_kid(a, b + 1.0)
    assert same_fd < 0.5 and shifted_fd == pytest.approx(8.0, rel=0.15)  # ||mu shift||^2 = 8
    assert shifted_kid > 10 * max(same_kid, 1e-3)


def test_cli_reports_offline_distances(tmp_path: Path):
    make_pair(tmp_path / "ck", 32)
    write_images(tmp_path / "real", 12)
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(6):  # "generated": flat grey squares, far from the lesions
        lesion_image(64, seed=i).convert("L").convert("RGB").point(lambda v: 128).save(gen / f"g{i}.png")
    r = run_module(
        [
            "-m",
            "lesionstudio.quality",
            "--real",
            str(tmp_path / "real"),
            "--generated",
            str(gen),
            "--feature-model",
            str(tmp_path / "ck" / "vqvae-32"),
            "--json",
        ]
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["real_images"] == 12 and out["generated_images"] == 6
    assert out["fd_vq_real_half_vs_generated"] > out["fd_vq_real_split"]
    assert out["inception_fid"] is None and "not Inception FID" in r.stdout
    bad = run_module(
        [
            "-m",
            "lesionstudio.quality",
            "--real",
            str(gen),
            "--generated",
            str(gen),
            "--limit",
            "2",
            "--feature-model",
            str(tmp_path / "ck" / "vqvae-32"),
        ]
    )
    assert bad.returncode != 0 and "at least 4 real" in bad.stderr


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """Randomly initialised weights of the FID Inception network (the real file cannot be downloaded here)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    no_load = mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    no_download = mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={})
    with no_load, no_download:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for m in net.modules():  # He initialisation keeps activations from vanishing through ~50 layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("w") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_inception_fid_from_a_local_file(inception_weights: Path, tmp_path: Path):
    real = write_images(tmp_path / "real", 6)
    fake = write_images(tmp_path / "fake", 6, start_seed=50)
    same, _, _ = inception_fid(real, real, inception_weights, batch_size=6)
    other, kid, _ = inception_fid(real, fake, inception_weights, batch_size=6)
    assert abs(same) < 1e-3 < other and kid == kid  # identical sets: 0; different sets: > 0


def test_inception_weights_are_never_unpickled(tmp_path: Path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv.weight": Evil()}, f)
    with pytest.raises(ValueError, match="not a tensor-only weights file"):
        load_inception_state(path)
    assert not marker.exists()
    torch.save({"w": torch.zeros(2), "n": 3}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_inception_state(tmp_path / "mixed.pth")
    with pytest.raises(FileNotFoundError):
        load_inception_state(tmp_path / "missing.pth")
