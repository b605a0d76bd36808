"""The VQ-VAE trainer through its real command line, on 16 generated images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import TINY_VQVAE_ARGS, kill_when_exists, run_module
from safetensors.torch import load_file

from lesionstudio.models.vqvae import VQVAE

TINY = [*TINY_VQVAE_ARGS, "--seed", "3"]


def train(data: Path, out: Path, epochs: int, *extra: str):
    res = run_module(
        ["-m", "train.vqvae", "--data", str(data), "--out", str(out), "--epochs", str(epochs), *TINY, *extra]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_exports(image_folder: Path, tmp_path: Path):
    out = tmp_path / "run"
    res = train(image_folder / "train", out, 3)
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert recs[-1]["train_reconstruction"] < recs[0]["train_reconstruction"]
    assert recs[-1]["val_psnr"] > recs[0]["val_psnr"]
    for name in (
        "curves.html",
        "recon_epoch003.png",
        "checkpoint.pt",
        "final/config.json",
        "final/model.safetensors",
        "final/codebook_usage.json",
    ):
        assert (out / name).exists(), name
    assert "val PSNR" in res.stdout
    usage = json.loads((out / "final/codebook_usage.json").read_text())
    assert len(usage["counts"]) == 32 and sum(usage["counts"]) == 12 * 32 * 32

    model = VQVAE.from_pretrained(out / "final")
    again = VQVAE.from_pretrained(out / "final")
    x = torch.rand(2, 3, 64, 64)
    assert model.latent_size == 32
    assert torch.equal(model.encode(x), again.encode(x))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v), k


def test_resume_matches_uninterrupted_run(image_folder: Path, tmp_path: Path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(image_folder / "train", full, 3)
    args = [
        "-m",
        "train.vqvae",
        "--data",
        str(image_folder / "train"),
        "--out",
        str(part),
        "--epochs",
        "3",
        *TINY,
    ]
    kill_when_exists(args, part / "checkpoint.pt")
    assert not (part / "final").exists(), "the run finished before it could be interrupted"
    res = train(image_folder / "train", part, 3, "--resume")
    assert "resumed" in res.stdout
    a = load_file(full / "final/model.safetensors")
    b = load_file(part / "final/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["epoch"] for r in records(part)] == [1, 2, 3]


def test_unwritable_out_fails_early(image_folder: Path, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = run_module(["-m", "train.vqvae", "--data", str(image_folder / "train"), "--out", str(blocker / "x"), *TINY])
    assert res.returncode != 0 and "cannot write to --out" in res.stderr


def test_empty_data_folder_is_a_clear_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    res = run_module(["-m", "train.vqvae", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), *TINY])
    assert res.returncode != 0 and "no images" in res.stderr


def test_torchrun_two_cpu_processes(image_folder: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    res = run_module(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "train.vqvae",
            "--data",
            str(image_folder / "train"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--device",
            "cpu",
            *TINY,
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["epoch"] for r in records(out)] == [1]
    VQVAE.from_pretrained(out / "final")


def test_warm_start_grows_the_decoder_without_changing_its_output():
    from train.vqvae import warm_start

    source = VQVAE(
        hidden_channels=16, res_channels=8, num_res_blocks=1, downsample=8, num_codes=32, code_dim=8, image_size=64
    ).eval()
    for p in source.parameters():  # non-trivial weights everywhere
        torch.nn.init.normal_(p, std=0.2)
    grown = VQVAE(**{**source.config, "upsample_res_blocks": 2}).eval()
    assert len(grown.decoder.net) == len(source.decoder.net) + 4
    warm_start(grown, source)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(grown.encode(x), source.encode(x))
    assert torch.allclose(grown.reconstruct(x)[0], source.reconstruct(x)[0], atol=1e-6)
    smaller = VQVAE(**{**source.config, "num_res_blocks": 0})
    try:
        warm_start(smaller, source)
    except (ValueError, RuntimeError) as e:
        assert "decoder" in str(e) or "size mismatch" in str(e) or "Missing" in str(e)
    else:
        raise AssertionError("a decoder with fewer layers accepted the source's weights")


def test_decoder_fine_tune_keeps_encoder_and_codes(image_folder: Path, tmp_path: Path):
    base = tmp_path / "base"
    train(image_folder / "train", base, 1)
    tuned = tmp_path / "tuned"
    res = train(
        image_folder / "train",
        tuned,
        2,
        "--init-from",
        str(base / "final"),
        "--upsample-res-blocks",
        "1",
        "--freeze-encoder",
    )
    assert "val PSNR" in res.stdout
    a = VQVAE.from_pretrained(base / "final")
    b = VQVAE.from_pretrained(tuned / "final")
    assert b.config["upsample_res_blocks"] == 1 and a.config["upsample_res_blocks"] == 0
    for part in ("encoder", "quantizer"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k} changed"
    x = torch.rand(4, 3, 64, 64)
    assert torch.equal(a.encode(x), b.encode(x)), "the codes changed: priors trained on them would no longer fit"
    assert not torch.equal(a.decode_codes(a.encode(x)), b.decode_codes(b.encode(x))), "the decoder did not train"
    assert json.loads((base / "final/codebook_usage.json").read_text()) == json.loads(
        (tuned / "final/codebook_usage.json").read_text()
    )


def test_freeze_encoder_needs_a_trained_model(image_folder: Path, tmp_path: Path):
    data, out = str(image_folder / "train"), str(tmp_path / "o")
    res = run_module(["-m", "train.vqvae", "--data", data, "--out", out, "--freeze-encoder", *TINY])
    assert res.returncode != 0 and "--freeze-encoder needs --init-from" in res.stderr
    res = run_module(["-m", "train.vqvae", "--data", data, "--out", out, "--init-from", str(tmp_path / "nope"), *TINY])
    assert res.returncode != 0 and "nope" in res.stderr and "Traceback" not in res.stderr


def test_init_from_keeps_the_source_decoder_unless_told(tmp_path: Path):
    from train.vqvae import build_model, parse_args

    source = VQVAE(
        hidden_channels=16,
        res_channels=8,
        num_res_blocks=1,
        downsample=8,
        num_codes=32,
        code_dim=8,
        image_size=64,
        upsample_res_blocks=1,
    )
    source.save_pretrained(tmp_path / "src")

    def build(*extra: str) -> VQVAE:
        return build_model(parse_args(["--data", "x", "--out", "y", "--init-from", str(tmp_path / "src"), *extra]))

    again = build()
    assert again.config == source.config
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(again.eval().reconstruct(x)[0], source.eval().reconstruct(x)[0])
    assert build("--upsample-res-blocks", "2").config["upsample_res_blocks"] == 2
    try:
        build("--upsample-res-blocks", "0")
    except ValueError as e:
        assert "decoder" in str(e)
    else:
        raise AssertionError("dropping trained decoder blocks was accepted silently")
