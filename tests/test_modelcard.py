"""Model cards are written from the runs' logs: every number in them comes from a file."""

from __future__ import annotations

import json
from pathlib import Path

from train.modelcard import main


def _run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_card_of_a_run_continued_by_a_fine_tune(tmp_path: Path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"image_size": 256, "downsample": 8, "num_codes": 512}))
    first = _run(tmp_path / "a", [{"epoch": e, "epoch_seconds": 1800.0, "val_ssim": 0.8} for e in (1, 2)])
    second = _run(tmp_path / "b", [{"epoch": 1, "epoch_seconds": 3600.0, "val_ssim": 0.81}])
    ev = tmp_path / "eval.txt"
    ev.write_text('images: 3\n{"psnr": 33.5, "ssim": 0.8123, "bits_per_code": null}\n')
    main(["--model", str(model), "--run", str(first), "--run", str(second), "--eval", str(ev),
          "--command", "python -m train.vqvae ...", "--extra", "- a note"])  # fmt: skip
    text = (model / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: lesionstudio\n")
    assert "32×32 code grid" in text
    assert "Epochs: 3. Training wall time on the CPU: 2.00 h." in text
    assert "| run | epoch | epoch_seconds | val_ssim |" in text
    assert "| 2 | 1 | 3600 | 0.81 |" in text
    assert "| ssim | 0.8123 |" in text and "bits_per_code" not in text
    assert text.rstrip().endswith("- a note")


def test_runs_that_logged_different_fields_share_one_table(tmp_path: Path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"image_size": 256, "downsample": 4}))
    old = _run(tmp_path / "a", [{"epoch": 1, "val_ssim": 0.88, "val_images": 256}])
    new = _run(tmp_path / "b", [{"epoch": 1, "epoch_seconds": 60.0, "val_ssim": 0.9}])
    ev = tmp_path / "eval.json"
    ev.write_text('{"psnr": 35.0}')
    main(["--model", str(model), "--run", str(old), "--run", str(new), "--eval", str(ev), "--command", "x",
          "--wall-hours", "1.5"])  # fmt: skip
    text = (model / "README.md").read_text()
    assert "Epochs: 2. Training wall time on the CPU: 1.50 h." in text
    assert "| run | epoch | val_ssim | val_images | epoch_seconds |" in text
    assert "| 1 | 1 | 0.88 | 256 |  |" in text and "| 2 | 1 | 0.9 |  | 60 |" in text
