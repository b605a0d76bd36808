"""Model cards are written from the runs' logs: every number in them comes from a file."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard

from lesionstudio.models.hubmodel import WEIGHTS_LICENSE as LICENSE
from train.modelcard import LICENSE_NOTE, main


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
    main(
        [
            "--model",
            str(model),
            "--run",
            str(first),
            "--run",
            str(second),
            "--eval",
            str(ev),
            "--command",
            "python -m train.vqvae ...",
            "--extra",
            "- a note",
        ]
    )
    text = (model / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: lesionstudio\n")
    data = ModelCard.load(model / "README.md").data
    assert data.license == LICENSE == "cc-by-nc-sa-4.0" and LICENSE in text and LICENSE_NOTE in text
    assert "datasets" not in data.to_dict() and "datasets:" not in text
    assert data.pipeline_tag == "unconditional-image-generation" and data.library_name == "lesionstudio"
    assert data.model_name == "LesionStudio VQ-VAE, 32×32 code grid"
    assert {(r.metric_type, r.metric_value) for r in data.eval_results} == {("psnr", 33.5), ("ssim", 0.8123)}
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in data.eval_results} == {
        ("unconditional-image-generation", "isic256", "validation")
    }
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
    main(
        [
            "--model",
            str(model),
            "--run",
            str(old),
            "--run",
            str(new),
            "--eval",
            str(ev),
            "--command",
            "x",
            "--wall-hours",
            "1.5",
        ]
    )
    text = (model / "README.md").read_text()
    assert "Epochs: 2. Training wall time on the CPU: 1.50 h." in text
    assert "| run | epoch | val_ssim | val_images | epoch_seconds |" in text
    assert "| 1 | 1 | 0.88 | 256 |  |" in text and "| 2 | 1 | 0.9 |  | 60 |" in text


OLD_FRONT = """---
library_name: lesionstudio
license: apache-2.0
tags:
- vq-vae
datasets:
- isic-archive
---
"""


def _card(tmp_path: Path, config: dict, evaluation: str) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    run = _run(tmp_path / "run", [{"epoch": 1, "epoch_seconds": 60.0}])
    (tmp_path / "eval.json").write_text(evaluation)
    main(["--model", str(model), "--run", str(run), "--eval", str(tmp_path / "eval.json"), "--command", "x"])
    return model


def test_refresh_rewrites_old_metadata_and_licence_and_keeps_the_text(tmp_path: Path):
    config = {"num_layers": 12, "grid_size": 16, "num_codes": 512}
    model = _card(tmp_path, config, '{"psnr": 28.28, "bits_per_code": 5.8437, "codes_used": 512, "ssim": null}')
    fresh = ModelCard.load(model / "README.md")
    assert fresh.data.pipeline_tag == "unconditional-image-generation"
    # The form shipped before: Apache-2.0 in the metadata (and here once in the text), a non-Hub dataset id.
    old_text = fresh.text.replace(LICENSE_NOTE, "License: apache-2.0.")
    (model / "README.md").write_text(OLD_FRONT + old_text, encoding="utf-8")
    main(["--refresh", str(model)])
    refreshed = ModelCard.load(model / "README.md")
    assert refreshed.text == fresh.text and refreshed.data.to_dict() == fresh.data.to_dict()
    assert {(r.metric_type, r.metric_value) for r in refreshed.data.eval_results} == {
        ("psnr", 28.28),
        ("bits_per_code", 5.844),
        ("codes_used", 512),
    }  # as the card's table shows them
    assert "apache" not in refreshed.text.replace(LICENSE_NOTE, "").lower()
    # A card that never stated the licence in its text gets the sentence after the data note, once.
    (model / "README.md").write_text(OLD_FRONT + fresh.text.replace(LICENSE_NOTE + "\n\n", ""), encoding="utf-8")
    main(["--refresh", str(model)])
    main(["--refresh", str(model)])
    assert (model / "README.md").read_text(encoding="utf-8") == str(fresh)


def test_critic_card_and_its_refresh(tmp_path: Path):
    from train.critic import model_card

    config = {"channels": 32, "crops_per_side": 3, "view_size": 64}
    metrics = {
        "real_images": 2000,
        "generated_images": 424,
        "seconds": 354.0,
        "heldout_layout_accuracy": 0.8511,
        "heldout_texture_accuracy": 0.5315,
        "heldout_realism_accuracy": 0.8486,
    }
    text = model_card(metrics, config, "python -m train.critic ...")
    assert "| realism (the ranking score) | 0.8486 |" in text and LICENSE_NOTE in text
    card = ModelCard(text)
    assert card.data.license == LICENSE and card.data.pipeline_tag == "image-classification"
    assert "datasets" not in card.data.to_dict()
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {k: v for k, v in metrics.items() if k.startswith("heldout_")}
    assert {r.task_type for r in card.data.eval_results} == {"image-classification"}
    model = tmp_path / "critic"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    (model / "README.md").write_text(text.replace(f"license: {LICENSE}", "license: other"), encoding="utf-8")
    main(["--refresh", str(model)])
    assert (model / "README.md").read_text(encoding="utf-8") == text
    # A card without the accuracy table still refreshes, without eval results.
    (model / "README.md").write_text("---\nlicense: other\n---\n\n# critic\n", encoding="utf-8")
    main(["--refresh", str(model)])
    bare = ModelCard.load(model / "README.md")
    assert bare.data.license == LICENSE and bare.data.eval_results is None and LICENSE_NOTE in bare.text
