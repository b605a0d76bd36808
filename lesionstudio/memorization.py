"""Does the model hand back copies of its training images? A nearest-neighbour check.

For every generated image: its nearest training image in a feature space (pooled activations of
a dermoscopy-trained VQ-VAE encoder, see :mod:`lesionstudio.measure.features`) and in pixel space (32x32),
each as a distance and as a *ratio* to the typical (median) nearest-neighbour distance between
held-out real images and the same training set. A ratio near 1 is what a new real lesion looks
like; a ratio near 0 is a copy. Both sides are compared under all 8 flips and right-angle
rotations (the minimum is kept), so a mirrored or turned copy is still found.

    python -m lesionstudio.memorization --generated synth/ --train isic256/train --out memo/

writes ``memorization.csv`` (one row per generated image), ``closest_pairs.png`` and
``closest_pairs.html`` (the closest pairs side by side, for a person to inspect) and
``summary.json``. Held-out images are ``--heldout DIR`` or, by default, the same seeded 10%
validation split of ``--train`` that the trainers hold out (those are removed from the
training side, so the training side is what the models actually saw).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .cli import HelpFormatter
from .data import eval_transform, find_images, load_image, split_indices, to_pil
from .files import atomic_write
from .measure.features import EncoderFeatures, FeatureModel, FeatureSet, cached, compute, feature_model
from .measure.neighbours import DEFAULT_THRESHOLD, nearest
from .models.hubmodel import CheckpointError


class MemorizationError(ValueError):
    """Inputs the memorisation check cannot measure: no generated images, a degenerate reference."""


@dataclass
class Report:
    rows: list[dict]
    summary: dict


def check(
    generated: FeatureSet,
    train: FeatureSet,
    heldout: FeatureSet,
    threshold: float = DEFAULT_THRESHOLD,
) -> Report:
    """Nearest training images of generated and held-out images; ratios to the held-out median."""
    rows = []
    summary: dict = {
        "threshold": threshold,
        "generated": len(generated.files),
        "train": len(train.files),
        "heldout": len(heldout.files),
    }
    per_space = {}
    for space, gen_f, tr_f, ho_f in (
        ("feature", generated.features, train.features, heldout.features),
        ("pixel", generated.pixels, train.pixels, heldout.pixels),
    ):
        ref = nearest(ho_f, tr_f).distance
        typical = float(ref.median())
        if typical <= 0:
            raise MemorizationError(
                f"held-out images have a median {space} distance of 0 to the training set: "
                "are the held-out images copies of training images?"
            )
        nn = nearest(gen_f, tr_f)
        ratio = nn.distance / typical
        ref_ratio = ref / typical
        per_space[space] = (nn, ratio)
        summary[space] = {
            "typical_heldout_distance": typical,
            "heldout_ratio_quantiles": _quantiles(ref_ratio),
            "heldout_below_threshold": int((ref_ratio < threshold).sum()),
            "generated_ratio_quantiles": _quantiles(ratio),
            "generated_below_threshold": int((ratio < threshold).sum()),
        }
    (fn, fr), (pn, pr) = per_space["feature"], per_space["pixel"]
    for i, path in enumerate(generated.files):
        f_ratio, p_ratio = float(fr[i]), float(pr[i])
        rows.append(
            {
                "generated": str(path),
                "nearest_feature": str(train.files[int(fn.index[i])]),
                "feature_distance": round(float(fn.distance[i]), 5),
                "feature_ratio": round(f_ratio, 4),
                "nearest_pixel": str(train.files[int(pn.index[i])]),
                "pixel_distance": round(float(pn.distance[i]), 5),
                "pixel_ratio": round(p_ratio, 4),
                "flagged": int(min(f_ratio, p_ratio) < threshold),
            }
        )
    summary["flagged"] = sum(r["flagged"] for r in rows)
    return Report(rows, summary)


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    qs = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
    vals = torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64))
    return {f"q{int(q * 100):02d}": round(float(v), 4) for q, v in zip(qs, vals, strict=True)}


def histogram(values: list[float], lo: float = 0.0, hi: float = 2.0, bins: int = 10, width: int = 40) -> str:
    """A text histogram of ratios (last bin includes everything above hi)."""
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / (hi - lo) * bins), bins - 1) if v >= lo else 0] += 1
    top = max(counts) or 1
    step = (hi - lo) / bins
    lines = []
    for i, c in enumerate(counts):
        a = lo + i * step
        label = f"{a:4.1f}-{a + step:<4.1f}" if i < bins - 1 else f"{a:4.1f}+    "
        lines.append(f"{label} {'#' * round(c / top * width):<{width}} {c}")
    return "\n".join(lines)


def _thumb(path: str | Path, size: int) -> Image.Image:
    return to_pil(eval_transform(size)(load_image(path)))


def contact_sheet(rows: list[dict], top: int = 16, size: int = 128) -> Image.Image:
    """The `top` pairs with the smallest feature ratio: generated | nearest (feature) | nearest (pixel)."""
    chosen = sorted(rows, key=lambda r: min(r["feature_ratio"], r["pixel_ratio"]))[:top]
    pad, text_h = 6, 28
    sheet = Image.new("RGB", (3 * size + 4 * pad, max(1, len(chosen)) * (size + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(chosen):
        y = pad + k * (size + text_h + pad)
        tiles = [
            (Path(r["generated"]), Path(r["generated"]).name + ("  FLAGGED" if r["flagged"] else "")),
            (Path(r["nearest_feature"]), f"feature ratio {r['feature_ratio']:.2f}"),
            (Path(r["nearest_pixel"]), f"pixel ratio {r['pixel_ratio']:.2f}"),
        ]
        for j, (path, label) in enumerate(tiles):
            x = pad + j * (size + pad)
            sheet.paste(_thumb(path, size), (x, y + text_h))
            draw.text((x, y + 2), label[:24], fill="red" if r["flagged"] and j == 0 else "black")
            if j:
                draw.text((x, y + 14), Path(path).name[:24], fill="gray")
    return sheet


def contact_html(rows: list[dict], summary: dict, top: int = 32, size: int = 128) -> str:
    """A self-contained HTML page (thumbnails embedded) of the closest pairs."""

    def img(path: Path) -> str:
        buf = io.BytesIO()
        _thumb(path, size).save(buf, format="PNG")
        return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" width="{size}">'

    chosen = sorted(rows, key=lambda r: min(r["feature_ratio"], r["pixel_ratio"]))[:top]
    out = [
        "<!doctype html><meta charset='utf-8'><title>LesionStudio memorisation check</title>",
        "<style>body{font-family:sans-serif} td{padding:4px;vertical-align:top} .f{color:#c00}</style>",
        f"<h1>Closest generated / training pairs</h1><p>{html.escape(json.dumps(summary))}</p>",
        "<table><tr><th>generated</th><th>nearest (features)</th><th>nearest (pixels)</th></tr>",
    ]
    for r in chosen:
        flag = " <b class='f'>flagged</b>" if r["flagged"] else ""
        out.append(
            f"<tr><td>{img(Path(r['generated']))}<br>{html.escape(Path(r['generated']).name)}{flag}</td>"
            f"<td>{img(Path(r['nearest_feature']))}<br>{html.escape(Path(r['nearest_feature']).name)}"
            f"<br>ratio {r['feature_ratio']:.3f}</td>"
            f"<td>{img(Path(r['nearest_pixel']))}<br>{html.escape(Path(r['nearest_pixel']).name)}"
            f"<br>ratio {r['pixel_ratio']:.3f}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def write_report(report: Report, out: Path, top: int = 16) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(report.rows[0]))
    writer.writeheader()
    writer.writerows(report.rows)
    atomic_write(out / "memorization.csv", buf.getvalue().encode())
    atomic_write(out / "summary.json", (json.dumps(report.summary, indent=2) + "\n").encode())
    png = io.BytesIO()
    contact_sheet(report.rows, top=top).save(png, format="PNG")
    atomic_write(out / "closest_pairs.png", png.getvalue())
    atomic_write(out / "closest_pairs.html", contact_html(report.rows, report.summary).encode())


def split_train_heldout(
    train_dir: Path, heldout_dir: Path | None, fraction: float, seed: int, heldout_limit: int
) -> tuple[list[Path], list[Path]]:
    """Training files and held-out files: --heldout, or the trainers' seeded validation split."""
    files = find_images(train_dir)
    if heldout_dir is not None:
        held = find_images(heldout_dir)
    else:
        tr_idx, val_idx = split_indices(len(files), fraction, seed)
        if not val_idx:
            raise MemorizationError(f"--holdout-fraction {fraction} leaves no held-out images among {len(files)}")
        held = [files[i] for i in val_idx]
        files = [files[i] for i in tr_idx]
    rng = np.random.default_rng(seed)
    if len(held) > heldout_limit:
        held = [held[i] for i in sorted(rng.choice(len(held), heldout_limit, replace=False))]
    return files, held


def default_report_folder(generated_dir: Path) -> Path:
    """Beside the set, not inside it: a report inside would be read as samples by every other tool."""
    generated_dir = generated_dir.resolve()
    return generated_dir.with_name(f"{generated_dir.name}-memorization")


def generated_files(generated_dir: Path, out: Path) -> list[Path]:
    """The generated images: the folder's images but the report's own (when it is written inside)."""
    files = [f for f in find_images(generated_dir) if not f.resolve().is_relative_to(out)]
    if not files:
        raise MemorizationError(f"no images found under {generated_dir}")
    return files


def measure(
    model: FeatureModel,
    generated: list[Path],
    train: list[Path],
    heldout: list[Path],
    threshold: float = DEFAULT_THRESHOLD,
    cache: Path | None = None,
) -> Report:
    """Features of the three image sets (training ones cached; the others in all 8 orientations), checked."""
    extractor = EncoderFeatures(model.vqvae)
    train_set = cached(train, extractor, cache, desc="training images")
    held = compute(heldout, extractor, all_orientations=True, desc="held-out images")
    gen = compute(generated, extractor, all_orientations=True, desc="generated images")
    return check(gen, train_set, held, threshold)


def print_summary(report: Report, threshold: float, out: Path) -> None:
    s = report.summary
    print(f"{s['generated']} generated vs {s['train']} training images; reference: {s['heldout']} held-out images")
    for space in ("feature", "pixel"):
        q = s[space]
        print(
            f"\n{space} space: typical held-out NN distance {q['typical_heldout_distance']:.4g}; "
            f"generated ratio quantiles {q['generated_ratio_quantiles']}; "
            f"held-out ratio quantiles {q['heldout_ratio_quantiles']}"
        )
        print(histogram([r[f"{space}_ratio"] for r in report.rows]))
    print(f"\nflagged (ratio < {threshold} in either space): {s['flagged']} of {s['generated']}")
    print(f"wrote {out / 'memorization.csv'}, {out / 'closest_pairs.png'}, {out / 'closest_pairs.html'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lesionstudio.memorization", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--generated", type=Path, required=True, help="folder of generated images")
    p.add_argument("--train", type=Path, required=True, help="the training images' folder")
    p.add_argument("--heldout", type=Path, default=None, help="real images the model never saw (default: a split)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="without --heldout: the trainers' split")
    p.add_argument("--seed", type=int, default=0, help="split seed (the trainers' --seed)")
    p.add_argument("--heldout-limit", type=int, default=256, help="held-out images used for the reference")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="flag a generated image whose feature or pixel ratio is below this",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="report folder (default: GENERATED-memorization, beside the set)"
    )
    p.add_argument(
        "--feature-model",
        default=None,
        help="VQ-VAE folder for features (default: shipped vqvae-32, or vqvae-64 for 32x32 samples)",
    )
    p.add_argument("--checkpoints", default=None, help="checkpoints folder or Hub repo for the default model")
    p.add_argument("--top", type=int, default=16, help="pairs in the contact sheet")
    p.add_argument("--cache", type=Path, default=None, help="feature cache file for the training images")
    args = p.parse_args(argv)
    if not args.threshold > 0:
        raise SystemExit("--threshold must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = (args.out or default_report_folder(args.generated)).resolve()
    try:
        generated = generated_files(args.generated, out)
        train, heldout = split_train_heldout(
            args.train, args.heldout, args.holdout_fraction, args.seed, args.heldout_limit
        )
        model = feature_model(args.feature_model, args.checkpoints, args.generated)
        print(model.describe())
        report = measure(model, generated, train, heldout, args.threshold, args.cache)
        write_report(report, out, top=args.top)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print_summary(report, args.threshold, out)


if __name__ == "__main__":
    main()
