"""Write the README.md model card of a shipped checkpoint from its run and its evaluation.

    python -m train.modelcard --model checkpoints/vqvae-64 --run runs/vq64 --eval eval.json \\
        --command "python -m train.vqvae ..." [--samples samples.png]

``--eval`` is the JSON line printed by ``python -m lesionstudio.evaluate --json``; the card
takes epochs, wall time and throughput from the run's metrics.jsonl and the hyper-parameters
from config.json, so every number in it comes from that run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

DATA_NOTE = (
    "Trained on `isic256/train`: 7,040 real dermoscopic images (256×256 JPEG, 3,710 benign / "
    "3,330 malignant) from the ISIC archive, via the Kaggle 'Melanoma Skin Cancer Dataset of "
    "10000 Images'; 10% held out (seeded split, seed 0) for validation. ISIC images are "
    "published under CC-0, CC-BY or CC-BY-NC (HAM10000: CC BY-NC-SA 4.0); with per-image "
    "licences unknown, treat the weights as **research and non-commercial use only**."
)


def read_runs(runs: list[Path]) -> list[dict]:
    """Per-epoch records of one run, or of several runs in order (a run continued by another, such
    as a decoder fine-tune), each record then starting with its run's number."""
    records = []
    for i, run in enumerate(runs, 1):
        for line in (run / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                records.append({"run": i, **r} if len(runs) > 1 else r)
    return records


def card(
    model: Path,
    runs: list[Path],
    evaluation: dict,
    command: str,
    samples: str | None,
    extra: str,
    hours: float | None,
) -> str:
    config = json.loads((model / "config.json").read_text())
    records = read_runs(runs)
    kind = "prior" if "num_layers" in config else "vqvae"
    epochs = len(records)  # over all runs (each numbers its epochs from 1)
    if hours is None and records and all("epoch_seconds" in r for r in records):
        hours = sum(r["epoch_seconds"] for r in records) / 3600
    if kind == "vqvae":
        grid = config["image_size"] // config["downsample"]
        title = f"LesionStudio VQ-VAE, {grid}×{grid} code grid"
        tags = ["vq-vae", "dermoscopy", "skin-lesion", "isic", "lesionstudio"]
    else:
        title = f"LesionStudio Gated PixelCNN prior, {config['grid_size']}×{config['grid_size']} code grid"
        tags = ["pixelcnn", "autoregressive", "dermoscopy", "skin-lesion", "isic", "lesionstudio"]
    lines = [
        "---",
        "library_name: lesionstudio",
        "license: apache-2.0",
        "tags:",
        *[f"- {t}" for t in tags],
        "datasets:",
        "- isic-archive",
        "---",
        "",
        f"# {title}",
        "",
        "Research and education only; not a diagnostic tool.",
        "",
        "## Training",
        "",
        DATA_NOTE,
        "",
        f"Command (CPU, 2 cores): `{command}`",
        "",
        f"Epochs: {epochs}." + (f" Training wall time on the CPU: {hours:.2f} h." if hours else ""),
        "",
        "Hyper-parameters (config.json):",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
        "## Metrics on the validation split",
        "",
        "Output of `python -m lesionstudio.evaluate ... --split val --json`:",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key, value in evaluation.items():
        if value is not None:
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    columns = list(dict.fromkeys(k for r in records for k in r))  # runs may log different fields
    lines += ["", "Per-epoch training log (from metrics.jsonl):", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + " --- |" * len(columns))
    for r in records:
        cells = [r.get(k, "") for k in columns]
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    if samples:
        lines += ["", "## Samples", "", f"![samples]({samples})"]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True, action="append",
                   help="training run folder; repeat for a run continued by another, in order")  # fmt: skip
    p.add_argument("--eval", type=Path, required=True, help="JSON from lesionstudio.evaluate --json")
    p.add_argument("--command", required=True)
    p.add_argument("--samples", type=Path, default=None, help="image to copy beside the card and show")
    p.add_argument("--extra", default="", help="markdown appended to the card")
    p.add_argument("--wall-hours", type=float, default=None, help="training wall time, if the log lacks it")
    args = p.parse_args(argv)
    evaluation = json.loads(args.eval.read_text().strip().splitlines()[-1])
    samples = None
    if args.samples:
        shutil.copy(args.samples, args.model / args.samples.name)
        samples = args.samples.name
    text = card(args.model, args.run, evaluation, args.command, samples, args.extra, args.wall_hours)
    (args.model / "README.md").write_text(text, encoding="utf-8")
    print(f"wrote {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
