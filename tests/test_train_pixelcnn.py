"""The prior trainer through its real command line, on codes of generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_when_exists, run_module
from safetensors.torch import load_file

from lesionstudio.data import split_indices
from lesionstudio.measure.scoring import prior_bits
from lesionstudio.models.pixelcnn import GatedPixelCNN
from lesionstudio.models.vqvae import VQVAE
from lesionstudio.sampling.grid import sample
from train.pixelcnn import random_windows


@pytest.fixture
def tiny_vqvae(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    vq = VQVAE(
        hidden_channels=16,
        res_channels=8,
        num_res_blocks=1,
        downsample=4,
        num_codes=32,
        code_dim=8,
        image_size=64,
        init_from_data=False,
    )
    vq.save_pretrained(tmp_path / "vq")
    return tmp_path / "vq"


def cli(vq: Path, folder: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "-m",
        "train.pixelcnn",
        "--vqvae",
        str(vq),
        "--data",
        str(folder / "train"),
        "--labels",
        str(folder / "labels.csv"),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--channels",
        "16",
        "--layers",
        "3",
        "--kernel",
        "3",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "1",
        "--val-fraction",
        "0.25",
        "--samples",
        "2",
        *extra,
    ]


def train(vq: Path, folder: Path, out: Path, epochs: int, *extra: str):
    res = run_module(cli(vq, folder, out, epochs, *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_bits_exports_and_resumes(tiny_vqvae: Path, image_folder: Path, tmp_path: Path):
    out = tmp_path / "px"
    train(tiny_vqvae, image_folder, out, 4)
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["val_bits_per_code"] < recs[0]["val_bits_per_code"]
    assert recs[-1]["train_bits_per_code"] < recs[0]["train_bits_per_code"]
    for name in ("curves.html", "samples_epoch004.png", "codes.npz", "final/config.json"):
        assert (out / name).exists(), name
    with np.load(out / "codes.npz", allow_pickle=False) as z:
        assert z["codes"].dtype == np.uint16 and z["codes"].shape == (16, 16, 16)
        assert sorted(set(z["labels"].tolist())) == [0, 1]

    prior = GatedPixelCNN.from_pretrained(out / "final")
    assert prior.num_classes == 2 and prior.class_names == ["benign", "malignant"]
    assert prior.grid_size == 16 and prior.code_dim == 8 and sum(prior.class_counts) == 12
    again = GatedPixelCNN.from_pretrained(out / "final")
    assert torch.equal(sample(prior, 2, seed=1), sample(again, 2, seed=1))

    # resume: two more epochs continue from the checkpoint of epoch 4
    res = train(tiny_vqvae, image_folder, out, 6, "--resume")
    assert "resumed" in res.stdout and "encoding" not in res.stderr  # the codes cache was reused
    assert [r["epoch"] for r in records(out)] == [1, 2, 3, 4, 5, 6]


def test_val_limit_scores_the_first_validation_grids(tiny_vqvae: Path, image_folder: Path, tmp_path: Path):
    out = tmp_path / "px"
    train(tiny_vqvae, image_folder, out, 1, "--val-limit", "1", "--samples", "0")
    with np.load(out / "codes.npz", allow_pickle=False) as z:
        codes, labels = torch.from_numpy(z["codes"].astype("int64")), torch.from_numpy(z["labels"])
    first_val = split_indices(len(codes), 0.1, seed=0)[1][:1]
    prior = GatedPixelCNN.from_pretrained(out / "final")
    expected = prior_bits(prior, codes[first_val], labels[first_val])
    assert records(out)[0]["val_bits_per_code"] == pytest.approx(expected, rel=1e-5)


def test_resume_matches_uninterrupted_run(tiny_vqvae: Path, image_folder: Path, tmp_path: Path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_vqvae, image_folder, full, 3, "--crop", "8")
    kill_when_exists(cli(tiny_vqvae, image_folder, part, 3, "--crop", "8"), part / "checkpoint.pt")
    assert not (part / "final").exists(), "the run finished before it could be interrupted"
    res = train(tiny_vqvae, image_folder, part, 3, "--crop", "8", "--resume")
    assert "resumed" in res.stdout
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(part / "final" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_two_cpu_processes(tiny_vqvae: Path, image_folder: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    args = cli(tiny_vqvae, image_folder, out, 1, "--device", "cpu")
    res = run_module(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["epoch"] for r in records(out)] == [1]
    GatedPixelCNN.from_pretrained(out / "final")


def test_hierarchical_prior_on_a_coarse_vqvae(tiny_vqvae: Path, image_folder: Path, tmp_path: Path):
    torch.manual_seed(1)
    coarse_vq = VQVAE(
        hidden_channels=16,
        res_channels=8,
        num_res_blocks=1,
        downsample=8,
        num_codes=8,
        code_dim=8,
        image_size=64,
        init_from_data=False,
    )
    coarse_vq.save_pretrained(tmp_path / "cvq")
    plain = tmp_path / "plain"
    train(tiny_vqvae, image_folder, plain, 1)
    out = tmp_path / "hier"
    res = train(
        tiny_vqvae, image_folder, out, 2, "--coarse-vqvae", str(tmp_path / "cvq"), "--init-from", str(plain / "final")
    )
    assert "on 8x8 coarse codes" in res.stdout
    with np.load(out / "coarse_codes.npz", allow_pickle=False) as z:
        assert z["codes"].shape == (16, 8, 8)
    prior = GatedPixelCNN.from_pretrained(out / "final")
    assert prior.hierarchical and (prior.cond_num_codes, prior.cond_grid_size) == (8, 8)
    # training moved the coarse condition off its zero start: the coarse codes change the logits
    codes = torch.randint(0, 32, (2, 16, 16))
    coarse = torch.randint(0, 8, (2, 8, 8))
    assert not torch.allclose(
        prior(codes, torch.tensor([0, 1]), coarse), prior(codes, torch.tensor([0, 1]), (coarse + 1) % 8)
    )
    assert (out / "samples_epoch002.png").exists()
    # --resume takes the run's own checkpoint even when --init-from is still given (nothing left
    # to train: the export is the checkpoint's weights, not the warm start's)
    before = prior.state_dict()
    train(
        tiny_vqvae,
        image_folder,
        out,
        2,
        "--coarse-vqvae",
        str(tmp_path / "cvq"),
        "--init-from",
        str(plain / "final"),
        "--resume",
    )
    after = GatedPixelCNN.from_pretrained(out / "final").state_dict()
    assert [r["epoch"] for r in records(out)] == [1, 2]
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a warm start's shape must match; a window must cover whole coarse cells
    res = run_module(
        cli(tiny_vqvae, image_folder, tmp_path / "bad", 1, "--init-from", str(plain / "final"), "--layers", "4")
    )
    assert res.returncode != 0 and "different architecture: num_layers 3 vs 4" in res.stderr
    res = run_module(
        cli(tiny_vqvae, image_folder, tmp_path / "bad2", 1, "--coarse-vqvae", str(tmp_path / "cvq"), "--crop", "7")
    )
    assert res.returncode != 0 and "--crop must be a multiple of 2" in res.stderr
    # windows of both grids: an 8x8 window of the 16x16 codes on a 4x4 window of the 8x8 coarse codes
    windowed = tmp_path / "windows"
    train(tiny_vqvae, image_folder, windowed, 1, "--coarse-vqvae", str(tmp_path / "cvq"), "--crop", "8")
    assert GatedPixelCNN.from_pretrained(windowed / "final").hierarchical


def test_windows_of_a_grid_and_its_coarse_grid_cover_the_same_part_of_the_image():
    # Each coarse code is its cell's position and each fine code names its coarse cell (plus
    # noise), so a window is aligned exactly when the two agree.
    gen = torch.Generator().manual_seed(0)
    coarse = torch.arange(64).view(1, 8, 8).repeat(64, 1, 1)
    up = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
    codes = up * 4 + torch.randint(0, 4, (64, 16, 16), generator=gen)
    w = random_windows(codes, 6, coarse, gen)
    assert w.codes.shape == (64, 6, 6) and w.coarse.shape == (64, 3, 3)
    assert torch.equal(w.codes // 4, w.coarse.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert len({int(c[0, 0]) for c in w.coarse}) > 10  # windows start all over the grid
    assert random_windows(codes, 0, coarse).codes is codes  # 0: whole grids
    plain = random_windows(codes, 5, None, gen)
    assert plain.coarse is None and plain.codes.shape == (64, 5, 5)
    with pytest.raises(ValueError, match="whole 2x2 blocks"):
        random_windows(codes, 5, coarse, gen)


def test_dihedral_turns_multiply_the_training_grids_only(tiny_vqvae: Path, image_folder: Path, tmp_path: Path):
    vq = VQVAE.from_pretrained(tiny_vqvae)
    # A codebook spread over the encoder's outputs, so the codes tell the turns apart.
    from lesionstudio.data import LesionImageFolder, dihedral_variant, eval_transform

    ds = LesionImageFolder(image_folder / "train", transform=eval_transform(64))
    z = vq.encoder(torch.stack([ds[i][0] for i in range(4)]) - 0.5).permute(0, 2, 3, 1).reshape(-1, 8)
    vq.quantizer.embedding.copy_(z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:32]].detach())
    vq.save_pretrained(tmp_path / "spread")
    out = tmp_path / "turned"
    res = train(tmp_path / "spread", image_folder, out, 1, "--dihedral", "4")
    # 16 labelled images, a quarter held out: 12 training images in 4 turns, 4 originals to validate.
    assert "48 training / 4 validation grids" in res.stdout and "4 turns of each image" in res.stdout
    with np.load(out / "codes_d1.npz", allow_pickle=False) as turned, np.load(out / "codes.npz") as plain:
        first = ds.files.index(next(p for p in ds.files if p.name == str(plain["files"][0])))
        x = dihedral_variant(ds[first][0][None], 1)
        assert np.array_equal(turned["codes"][0], vq.encode(x)[0].numpy())
        assert not np.array_equal(turned["codes"], plain["codes"])
    prior = GatedPixelCNN.from_pretrained(out / "final")
    assert sum(prior.class_counts) == 12, "class frequencies of the images, not of their turns"


def test_push_to_hub_uploads_the_folder_where_the_app_reads_it(tiny_vqvae: Path, image_folder: Path, tmp_path: Path):
    from fake_hub import serve_hub

    hub = tmp_path / "hub"
    hub.mkdir()
    with serve_hub("lesion/models", hub) as (endpoint, repo):
        env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        res = run_module(cli(tiny_vqvae, image_folder, tmp_path / "out", 1, "--push-to-hub", "lesion/models"), env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert len(repo.commits) == 1
    grid = GatedPixelCNN.from_pretrained(tmp_path / "out" / "final").grid_size
    published = hub / f"pixelcnn-{grid}"
    assert sorted(p.name for p in published.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "license: cc-by-nc-sa-4.0" in (published / "README.md").read_text()  # the weights' licence
    assert (hub / f"pixelcnn-{grid}" / "model.safetensors").read_bytes() == (
        tmp_path / "out" / "final" / "model.safetensors"
    ).read_bytes()
