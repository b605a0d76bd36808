"""Write the README.md model card of a shipped checkpoint from its run and its evaluation.

    python -m train.modelcard --model checkpoints/vqvae-64 --run runs/vq64 --eval eval.json \\
        --command "python -m train.vqvae ..." [--samples samples.png]
    python -m train.modelcard --refresh checkpoints/vqvae-64 [more folders]

``--eval`` is the JSON line printed by ``python -m lesionstudio.evaluate --json``; the card
takes epochs, wall time and throughput from the run's metrics.jsonl and the hyper-parameters
from config.json, so every number in it comes from that run. ``--refresh`` rewrites a shipped
card's metadata (huggingface_hub ``ModelCardData``) from its config.json and its own evaluation
table, and its licence wording, leaving the rest of its text as it is.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from lesionstudio.cli import HelpFormatter
from lesionstudio.models.hubmodel import WEIGHTS_LICENSE

DATA_NOTE = (
    "Trained on `isic256/train`: 7,040 real dermoscopic images (256×256 JPEG, 3,710 benign / "
    "3,330 malignant) from the ISIC archive, via the Kaggle 'Melanoma Skin Cancer Dataset of "
    "10000 Images'; 10% held out (seeded split, seed 0) for validation. ISIC images are "
    "published under CC-0, CC-BY or CC-BY-NC (HAM10000: CC BY-NC-SA 4.0); with per-image "
    "licences unknown, treat the weights as **research and non-commercial use only**."
)
LICENSE_NOTE = (
    "Licence: the weights are released under CC BY-NC-SA 4.0 (`cc-by-nc-sa-4.0`), for research and "
    "non-commercial use only, as some of the ISIC training images require; the code is Apache-2.0."
)
# A statement in a card's text that the weights are Apache-2.0 (what cards said before).
_APACHE_CLAIM = re.compile(
    r"\**licen[cs](?:e|ed under)\**\s*:?\s*\**\s*(?:the\s+)?apache[- ]?(?:license[- ])?2(?:\.0)?\**\.?", re.IGNORECASE
)
GENERATION = "unconditional-image-generation"
VALIDATION = ("isic256", "ISIC 256 px, validation split (10%, seed 0)", "validation")


@dataclass(frozen=True)
class Kind:
    """What a card's metadata says about one kind of checkpoint."""

    pipeline_tag: str
    tags: tuple[str, ...]
    dataset: tuple[str, str, str]  # the evaluation's dataset_type, dataset_name, dataset_split
    header: tuple[str, str] = ("metric", "value")  # the header of the card's evaluation table
    metrics: dict[str, str] = field(default_factory=dict)  # table row -> metric id, where they differ


KINDS = {
    "vqvae": Kind(GENERATION, ("vq-vae", "dermoscopy", "skin-lesion", "isic", "lesionstudio"), VALIDATION),
    "prior": Kind(
        GENERATION, ("pixelcnn", "autoregressive", "dermoscopy", "skin-lesion", "isic", "lesionstudio"), VALIDATION
    ),
    "decoder": Kind(GENERATION, ("vq-vae", "decoder", "dermoscopy", "skin-lesion", "isic", "lesionstudio"), VALIDATION),
    "critic": Kind(
        "image-classification",
        ("dermoscopy", "synthetic-image-detection", "lesionstudio"),
        ("isic256-vs-samples", "ISIC 256 px training-split images vs generated samples, held-out tenth", "heldout"),
        ("branch", "accuracy"),
        {
            "layout": "heldout_layout_accuracy",
            "texture": "heldout_texture_accuracy",
            "shape (lesion-shape head)": "heldout_shape_accuracy",
            "realism (the ranking score)": "heldout_realism_accuracy",
            "layout head (decoded layouts)": "heldout_layout_head_accuracy",
        },
    ),
}


def kind_of(config: dict) -> str:
    """``vqvae``, ``prior``, ``decoder`` or ``critic``, from a checkpoint's config.json."""
    if "view_size" in config:
        return "critic"
    if "objective" in config:
        return "decoder"
    return "prior" if "num_layers" in config else "vqvae"


def title(config: dict) -> str:
    """The card's heading and ``model_name``."""
    kind = kind_of(config)
    if kind == "critic":
        return "LesionStudio realism critic"
    if kind == "prior":
        return f"LesionStudio Gated PixelCNN prior, {config['grid_size']}×{config['grid_size']} code grid"
    if kind == "decoder":
        grid = config["image_size"] // config["downsample"]
        return f"LesionStudio post-trained decoder ({config['objective']}), {grid}×{grid} code grid"
    grid = config["image_size"] // config["downsample"]
    return f"LesionStudio VQ-VAE, {grid}×{grid} code grid"


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _number(cell: str) -> int | float | None:
    for parse in (int, float):
        try:
            return parse(cell)
        except ValueError:
            pass
    return None


def metric_table(values: dict, header: tuple[str, str] = ("metric", "value")) -> list[str]:
    """The lines of a card's two-column evaluation table (None values left out)."""
    rows = [f"| {key} | {_cell(value)} |" for key, value in values.items() if value is not None]
    return [f"| {header[0]} | {header[1]} |", "| --- | --- |", *rows]


def parse_metric_table(text: str, header: tuple[str, str] = ("metric", "value")) -> dict[str, int | float]:
    """The numbers of the table ``metric_table`` wrote into ``text`` ({} where it has none)."""
    lines = text.splitlines()
    head = f"| {header[0]} | {header[1]} |"
    if head not in lines:
        return {}
    values = {}
    for line in lines[lines.index(head) + 2 :]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 2:
            break
        if (value := _number(cells[1])) is not None:
            values[cells[0]] = value
    return values


def evaluation_in(text: str, config: dict) -> dict[str, int | float]:
    """The evaluation numbers a card's text shows, by metric id."""
    kind = KINDS[kind_of(config)]
    return {kind.metrics.get(row, row): v for row, v in parse_metric_table(text, kind.header).items()}


def card_data(config: dict, evaluation: dict) -> ModelCardData:
    """The card's metadata: the weights' licence, tags, pipeline tag and ``evaluation`` as eval results."""
    kind = KINDS[kind_of(config)]
    dataset_type, dataset_name, split = kind.dataset
    results = [
        EvalResult(
            task_type=kind.pipeline_tag,
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=key,
            metric_value=value,
        )
        for key, value in evaluation.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    return ModelCardData(
        library_name="lesionstudio",
        license=WEIGHTS_LICENSE,
        pipeline_tag=kind.pipeline_tag,
        tags=list(kind.tags),
        model_name=title(config),
        eval_results=results or None,
    )


def with_metadata(config: dict, text: str) -> ModelCard:
    """A card of ``text`` (the Markdown after the front matter) with metadata from config and the text's table."""
    return ModelCard(f"---\n{card_data(config, evaluation_in(text, config)).to_yaml()}\n---\n{text}")


def relicense(text: str) -> str:
    """``text`` with Apache-2.0 claims about the weights replaced by LICENSE_NOTE, which it then states once."""
    text = _APACHE_CLAIM.sub(LICENSE_NOTE, text)
    if LICENSE_NOTE in text:
        return text
    if DATA_NOTE in text:
        return text.replace(DATA_NOTE, f"{DATA_NOTE}\n\n{LICENSE_NOTE}", 1)
    return f"{text.rstrip()}\n\n{LICENSE_NOTE}\n"


def refresh(model: Path) -> None:
    """Rewrite ``model``/README.md's metadata and licence wording; the rest of its text stays."""
    config = json.loads((model / "config.json").read_text())
    text = ModelCard.load(model / "README.md").text
    with_metadata(config, relicense(text)).save(model / "README.md")


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


def log_table(records: list[dict]) -> list[str]:
    """The per-epoch training log as a Markdown table (runs may log different fields)."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(_cell(r.get(k, "")) for k in columns) + " |" for r in records]


def recipe_line(recipes: list[str]) -> str:
    """Where the card's recipe files are, in the order they run (``--config FILE``)."""
    files = ", then ".join(f"`{r}`" for r in recipes)
    return f"Recipe: {files} (each run by its trainer with `--config FILE`)."


def card(
    model: Path,
    runs: list[Path],
    evaluation: dict,
    command: str,
    samples: str | None,
    extra: str,
    hours: float | None,
    recipes: list[str] | None = None,
) -> ModelCard:
    config = json.loads((model / "config.json").read_text())
    records = read_runs(runs)
    epochs = len(records)  # over all runs (each numbers its epochs from 1)
    if hours is None and records and all("epoch_seconds" in r for r in records):
        hours = sum(r["epoch_seconds"] for r in records) / 3600
    lines = [
        "",
        f"# {title(config)}",
        "",
        "Research and education only; not a diagnostic tool.",
        "",
        "## Training",
        "",
        DATA_NOTE,
        "",
        LICENSE_NOTE,
        "",
        f"Command (CPU, 2 cores): `{command}`",
        "",
        *([recipe_line(recipes), ""] if recipes else []),
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
        *metric_table(evaluation),
        "",
        "Per-epoch training log (from metrics.jsonl):",
        "",
        *log_table(records),
    ]
    if samples:
        lines += ["", "## Samples", "", f"![samples]({samples})"]
    if extra:
        lines += ["", extra]
    return with_metadata(config, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m train.modelcard", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument(
        "--refresh",
        type=Path,
        nargs="+",
        metavar="FOLDER",
        help="rewrite these shipped cards' metadata and licence wording (needs nothing else)",
    )
    p.add_argument("--model", type=Path)
    p.add_argument(
        "--run", type=Path, action="append", help="training run folder; repeat for a run continued by another, in order"
    )
    p.add_argument("--eval", type=Path, help="JSON from lesionstudio.evaluate --json")
    p.add_argument("--command")
    p.add_argument("--samples", type=Path, default=None, help="image to copy beside the card and show")
    p.add_argument("--extra", default="", help="markdown appended to the card")
    p.add_argument("--wall-hours", type=float, default=None, help="training wall time, if the log lacks it")
    p.add_argument(
        "--recipe", action="append", default=None, help="a recipe file of the run (configs/recipes/); repeat"
    )
    args = p.parse_args(argv)
    if args.refresh:
        for model in args.refresh:
            refresh(model)
            print(f"refreshed {model / 'README.md'}")
        return
    if not (args.model and args.run and args.eval and args.command):
        p.error("--model, --run, --eval and --command are required (or --refresh FOLDER ...)")
    evaluation = json.loads(args.eval.read_text().strip().splitlines()[-1])
    samples = None
    if args.samples:
        shutil.copy(args.samples, args.model / args.samples.name)
        samples = args.samples.name
    written = card(args.model, args.run, evaluation, args.command, samples, args.extra, args.wall_hours, args.recipe)
    written.save(args.model / "README.md")
    print(f"wrote {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
