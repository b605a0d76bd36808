"""The decoder post-trainer through its real command line, and the post-trained decoder in use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import kill_when_exists, run_module
from safetensors.torch import load_file

from lesionstudio import quality
from lesionstudio.app.studio import Studio
from lesionstudio.codes import file_sha256
from lesionstudio.models.codedecoder import CodeDecoder
from lesionstudio.models.critic import FitSettings
from lesionstudio.models.hubmodel import CheckpointError
from lesionstudio.models.vqvae import VQVAE
from lesionstudio.sampling import loading


def cli(ckpts: Path, folder: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "-m",
        "train.decoder",
        "--checkpoints",
        str(ckpts),
        "--latent",
        "32",
        "--data",
        str(folder / "train"),
        "--labels",
        str(folder / "labels.csv"),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--steps-per-epoch",
        "3",
        "--batch-size",
        "2",
        "--crop",
        "64",
        "--warmup-steps",
        "1",
        "--disc-start",
        "3",
        "--disc-channels",
        "8",
        "--val-fraction",
        "0.25",
        "--val-limit",
        "2",
        "--lr",
        "1e-3",
        "--res-blocks",
        "2",
        *extra,
    ]


def train(ckpts: Path, folder: Path, out: Path, epochs: int, *extra: str):
    res = run_module(cli(ckpts, folder, out, epochs, *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture
def trained(stack_with_critic: Path, image_folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "dec"
    before = {p.name: file_sha256(p) for p in (stack_with_critic / "vqvae-32").iterdir()}
    train(stack_with_critic, image_folder, out, 2)
    after = {p.name: file_sha256(p) for p in (stack_with_critic / "vqvae-32").iterdir()}
    assert before == after, "the VQ-VAE's folder must not change"
    return out


def test_post_training_changes_the_decoder_only(trained: Path, stack_with_critic: Path):
    vq = VQVAE.from_pretrained(stack_with_critic / "vqvae-32")
    dec = CodeDecoder.from_pretrained(trained / "final")
    assert dec.config["objective"] == "adversarial"
    assert torch.equal(dec.codebook, vq.quantizer.codebook), "the codebook is frozen, bit for bit"
    dec.check_fits(vq)
    assert dec.config["num_res_blocks"] == 2 and vq.config["num_res_blocks"] == 1  # --res-blocks 2
    codes = torch.randint(0, vq.num_codes, (1, 32, 32))
    assert not torch.equal(dec.decode_codes(codes), vq.decode_codes(codes)), "post-training changed nothing"
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    # Steps 0-2 without the discriminator's pull, steps 3-5 with it (--disc-start 3).
    assert records[0]["train_adversarial"] == 0 and records[1]["train_adversarial"] != 0
    assert records[1]["train_weight"] > 0
    for key in ("val_psnr_real_codes", "val_mse_psnr_real_codes", "val_psnr_drawn_codes"):
        assert torch.isfinite(torch.tensor(records[-1][key]))
    assert (trained / "decoded_epoch002.png").exists() and (trained / "pairs.npz").exists()


def test_a_fresh_decoder_copy_decodes_as_the_vqvae_does(stack_with_critic: Path):
    vq = VQVAE.from_pretrained(stack_with_critic / "vqvae-32")
    dec = CodeDecoder.from_vqvae(vq)
    codes = torch.randint(0, vq.num_codes, (2, 32, 32))
    assert torch.equal(dec.decode_codes(codes), vq.decode_codes(codes))
    with pytest.raises(ValueError, match="must be in"):
        dec.decode_codes(codes + vq.num_codes)
    with pytest.raises(ValueError, match="objective"):
        CodeDecoder(objective="gan")
    grown = CodeDecoder.from_vqvae(vq, num_res_blocks=vq.config["num_res_blocks"] + 2)
    assert torch.equal(grown.decode_codes(codes), vq.decode_codes(codes)), "added blocks start at zero"
    with pytest.raises(ValueError, match="at least"):
        CodeDecoder.from_vqvae(vq, num_res_blocks=0)


def test_resume_matches_uninterrupted_run(stack_with_critic: Path, image_folder: Path, tmp_path: Path):
    full, part = tmp_path / "full", tmp_path / "part"
    # The high-pass discriminator: its spectral norm's power-iteration state must resume too.
    train(stack_with_critic, image_folder, full, 3, "--disc-highpass")
    kill_when_exists(cli(stack_with_critic, image_folder, part, 3, "--disc-highpass"), part / "checkpoint.pt")
    assert not (part / "final").exists(), "the run finished before it could be interrupted"
    res = train(stack_with_critic, image_folder, part, 3, "--disc-highpass", "--resume")
    assert "resumed" in res.stdout
    a, b = load_file(full / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_two_cpu_processes(stack_with_critic: Path, image_folder: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    args = cli(stack_with_critic, image_folder, out, 1, "--device", "cpu")
    res = run_module(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    CodeDecoder.from_pretrained(out / "final")


def test_bad_settings_are_refused(stack_with_critic: Path, image_folder: Path, tmp_path: Path):
    res = run_module(cli(stack_with_critic, image_folder, tmp_path / "a", 1, "--real-share", "2"))
    assert res.returncode != 0 and "--real-share must be in [0, 1]" in res.stderr
    res = run_module(cli(stack_with_critic, image_folder, tmp_path / "b", 1, "--crop", "60"))
    assert res.returncode != 0 and "--crop must be a multiple of 8" in res.stderr
    (stack_with_critic / "pixelcnn-32" / "model.safetensors").unlink()
    res = run_module(cli(stack_with_critic, image_folder, tmp_path / "c", 1))
    assert res.returncode != 0 and "missing model.safetensors" in res.stderr


def test_a_shipped_decoder_renders_samples_and_is_shown_in_reconstruct(trained: Path, stack_with_critic: Path):
    shutil.copytree(trained / "final", stack_with_critic / "decoder-32")
    stack = loading.load_stack(32, stack_with_critic)
    assert stack.decoder is not None and stack.coarse.decoder is None
    codes = torch.randint(0, stack.vqvae.num_codes, (2, 32, 32))
    assert torch.equal(stack.render(codes), stack.decoder.decode_codes(codes))
    assert not torch.equal(stack.render(codes), stack.vqvae.decode_codes(codes))
    assert torch.equal(stack.coarse.render(codes[:, :16, :16]), stack.coarse.vqvae.decode_codes(codes[:, :16, :16]))

    studio = Studio(stack_with_critic)
    assert studio.decoder_latents == [32]
    upload = next((trained.parent / "images" / "train").iterdir())
    r = studio.reconstruct(str(upload), 32)
    assert r.rendered is not None and r.rendered.size == r.reconstruction.size
    assert r.rendered_psnr is not None and r.rendered_ssim is not None

    # The yardstick's calibration gets a row for the post-trained decoder's reconstructions.
    files = sorted((trained.parent / "images" / "train").iterdir())[:8]
    rows = quality.c2st_calibration(files, FitSettings(epochs=1), stack=stack, controls=False)
    assert set(rows) == {
        "real vs decoded 32x32 teacher-forced draws (post-trained decoder)",
        "real vs 32x32 reconstructions (post-trained decoder)",
    }
    images = quality.load_uint8(files[:2])
    codes = stack.vqvae.encode(images.float() / 255)
    assert torch.equal(
        quality.rendered_reconstructions(images, stack), quality.as_uint8(stack.decoder.decode_codes(codes))
    )


def test_a_decoder_for_another_codebook_is_refused(trained: Path, stack_with_critic: Path):
    folder = stack_with_critic / "decoder-32"
    shutil.copytree(trained / "final", folder)
    dec = CodeDecoder.from_pretrained(folder)
    dec.codebook[0, 0] += 1e-6
    dec.save_pretrained(folder)
    with pytest.raises(CheckpointError, match="another codebook"):
        loading.load_stack(32, stack_with_critic)
