"""Train the realism critic that ranks candidate samples: real training images vs a stack's own samples.

    python -m lesionstudio.synthesize --n 600 --latent 64 --seed 5000 --out runs/critic_fakes
    python -m train.critic --real ../shared/data/isic256/train --generated runs/critic_fakes --out runs/critic

Real images come from the trainers' training split of --real (the validation split stays unseen,
for the two-sample test); a seeded tenth of each side is held out to measure the critic.
Writes OUT/metrics.json and OUT/final/ (config.json, model.safetensors, README.md).

--shape-head also fits the lesion-shape head (``lesionstudio.measure.lesionshape``: one whole lesion with a
border on skin?) on the same images; --from-critic DIR keeps DIR's CNN branches as they are and
fits only that head:

    python -m train.critic --real ../shared/data/isic256/train --generated runs/critic_fakes \
        --from-critic checkpoints/critic --shape-head --real-limit 6336 --out runs/critic_shape
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from lesionstudio.cli import HelpFormatter, add_config_argument, parse_with_config
from lesionstudio.data import find_images, split_files
from lesionstudio.measure.lesionshape import shape_features
from lesionstudio.measure.twosample import load_uint8
from lesionstudio.models.critic import FitSettings, RealismCritic, fit
from lesionstudio.sampling.grid import sample
from lesionstudio.sampling.loading import load_stack

from .modelcard import DATA_NOTE, KINDS, LICENSE_NOTE, metric_table, title, with_metadata


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.critic", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--real", type=Path, required=True, help="folder of real images (its training split is used)")
    p.add_argument("--generated", type=Path, required=True, help="folder of the stack's samples")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, logs; OUT/final/ at the end")
    p.add_argument("--real-limit", type=int, default=2000, help="seeded subset of the real training images")
    p.add_argument("--epochs", type=int, default=FitSettings.epochs)
    p.add_argument("--batch-size", type=int, default=FitSettings.batch_size)
    p.add_argument("--lr", type=float, default=FitSettings.lr)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of each side held out to measure it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape-head", action="store_true", help="also fit the lesion-shape head")
    p.add_argument("--layout-head", type=Path, metavar="CHECKPOINTS", help="also fit the layout head on CHECKPOINTS")
    p.add_argument("--layout-latent", type=int, default=16, help="the grid of the coarsest level (the layouts)")
    p.add_argument("--layouts", type=int, default=3200, help="layouts drawn (seeded) and real images for it")
    p.add_argument("--from-critic", type=Path, help="keep this critic's CNN branches; fit only the heads")
    add_config_argument(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser()
    args = parse_with_config(p, argv)
    if args.from_critic is not None and not (args.shape_head or args.layout_head):
        p.error("--from-critic fits only the heads: add --shape-head and/or --layout-head")
    return args


def held_out_accuracy(critic: RealismCritic, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """Balanced accuracy (the mean of the two sides' accuracies: the sides differ in size) per score."""
    judged = critic.judge(torch.cat([real, fake]).float() / 255)
    n = len(real)
    scores = {"layout": judged.layout, "texture": judged.texture, "realism": judged.realism}
    if judged.shape is not None:
        scores["shape"] = judged.shape
    return {
        f"heldout_{k}_accuracy": round(float(((v[:n] > 0).float().mean() + (v[n:] <= 0).float().mean()) / 2), 4)
        for k, v in scores.items()
    }


def features(images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Lesion-shape features of uint8 images, a batch at a time (a float copy of all would be large)."""
    return torch.cat([shape_features(images[i : i + batch].float() / 255) for i in range(0, len(images), batch)])


def with_heads(folder: Path, shape_head: bool, layout_grid: int) -> RealismCritic:
    """A critic with ``folder``'s CNN branches and configuration, and the given heads, unfitted."""
    try:
        base = RealismCritic.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot load --from-critic {folder}: {exc}") from exc
    critic = RealismCritic(**{**base.config, "shape_head": shape_head, "layout_grid": layout_grid})
    critic.layout_net.load_state_dict(base.layout_net.state_dict())
    critic.texture_net.load_state_dict(base.texture_net.state_dict())
    return critic


LAYOUT_SEED = 900_000_000  # the layouts drawn to fit the layout head: seeds LAYOUT_SEED + seed * 10^6 + i


def layout_features(args: argparse.Namespace, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape features of real images (uint8) passed through the coarsest VQ-VAE, and of as many
    layouts as its prior draws, decoded: the layout head's two sides."""
    try:
        level = load_stack(args.layout_latent, args.layout_head)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot load the {args.layout_latent}x{args.layout_latent} level: {exc}") from exc
    if len(level.levels) > 1:
        raise SystemExit(f"error: --layout-latent {args.layout_latent} is not the coarsest level of {args.layout_head}")
    vq, prior, batch = level.vqvae, level.checked_prior(), 64
    real_rows, fake_rows = [], []
    with torch.no_grad():
        for i in range(0, len(real), batch):
            real_rows.append(shape_features(vq.decode_codes(vq.encode(real[i : i + batch].float() / 255))))
        for i in range(0, args.layouts, batch):
            seeds = [LAYOUT_SEED + args.seed * 10**6 + j for j in range(i, min(i + batch, args.layouts))]
            fake_rows.append(shape_features(vq.decode_codes(sample(prior, len(seeds), seed=seeds))))
    return torch.cat(real_rows), torch.cat(fake_rows)


def fit_layout_head(critic: RealismCritic, args: argparse.Namespace, real: torch.Tensor, gen: torch.Generator) -> dict:
    """Fit the layout head on a tenth-held-out split of both sides; its loss and held-out accuracy."""
    real_f, fake_f = layout_features(args, real[: args.layouts])
    real_train, real_held = split(real_f, args.holdout, gen)
    fake_train, fake_held = split(fake_f, args.holdout, gen)
    loss = critic.layout_head.fit(real_train, fake_train)
    with torch.no_grad():
        r, f = critic.layout_head(real_held), critic.layout_head(fake_held)
    accuracy = float(((r > 0).float().mean() + (f <= 0).float().mean()) / 2)
    return {
        "layouts": len(fake_f),
        "layout_head_final_loss": round(loss, 4),
        "heldout_layout_head_accuracy": round(accuracy, 4),
    }


def split(images: torch.Tensor, fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(len(images), generator=gen)
    n_held = max(1, round(len(images) * fraction))
    return images[perm[n_held:]], images[perm[:n_held]]


def model_card(metrics: dict, config: dict, command: str) -> str:
    """The critic's README.md: metadata (huggingface_hub ``ModelCardData``) and its held-out accuracies."""
    rows = {row: metrics.get(key) for row, key in KINDS["critic"].metrics.items()}
    table = "\n".join(metric_table(rows, KINDS["critic"].header))
    shape_note = (
        " A *shape head* (a quadratic logistic regression on the features of a rough lesion"
        " segmentation, `lesionstudio.measure.lesionshape`: one lesion or scattered pigment, whole or cut by the"
        " frame, its roundness, contrast and border) gives the log-odds that the layout is real. A"
        " sample's realism score is the mean of the two CNN logits plus the shape log-odds (> 0: looks real)."
        if config.get("shape_head")
        else " A sample's realism score is the mean of the two logits (> 0: looks real)."
    )
    if config.get("layout_grid"):
        grid = config["layout_grid"]
        shape_note += (
            f" A *layout head*, the same kind of classifier, judges {grid}×{grid} layouts decoded by the"
            f" coarsest VQ-VAE (real images passed through it vs {metrics['layouts']} layouts its prior drew):"
            " with `layouts=K` (`--layouts K`) each candidate's layout is the best of K it scores,"
            " before any detail is drawn."
        )
    trained = f"{metrics['epochs']} epochs." if "epochs" in metrics else ""
    if "cnn_from" in metrics:
        trained = f"CNN branches: those of `{metrics['cnn_from']}`, unchanged; only the heads were fitted here."
    text = f"""
# {title(config)}

Ranks candidate samples (`candidates=M` in the library, `--candidates M` in `synthesize`, the
Generate tab's candidates control): a small CNN with two branches, *layout* (the whole image at
{config["view_size"]} px) and *texture* ({config["view_size"]} px crops at full resolution), trained to tell real
training images from the shipped stack's samples.{shape_note} Research and education only; not a diagnostic tool.

## Training

{DATA_NOTE}

{LICENSE_NOTE}

Command: `{command}`

{metrics["real_images"]} real training images vs {metrics["generated_images"]} samples; a tenth of each held out.
{trained} Wall time on the CPU: {metrics["seconds"] / 60:.1f} min.

## Held-out balanced accuracy (real vs generated; 0.5 = chance)

{table}

```json
{json.dumps(config, indent=2, sort_keys=True)}
```
"""
    return str(with_metadata(config, text))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    real_files = split_files(find_images(args.real), "train")
    pick = torch.randperm(len(real_files), generator=gen)[: args.real_limit].sort().values.tolist()
    try:
        real = load_uint8([real_files[i] for i in pick])
        fake = load_uint8(find_images(args.generated))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    real_train, real_held = split(real, args.holdout, gen)
    fake_train, fake_held = split(fake, args.holdout, gen)
    print(
        f"{len(real_train)} real / {len(fake_train)} generated to train, {len(real_held)} / {len(fake_held)} held out"
    )
    torch.manual_seed(args.seed)
    layout_grid = args.layout_latent if args.layout_head else 0
    if args.from_critic is None:
        critic = RealismCritic(channels=args.channels, shape_head=args.shape_head, layout_grid=layout_grid)
        settings = FitSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        losses = fit(critic, real_train, fake_train, settings)
        trained = {"epochs": args.epochs, "final_loss": round(losses[-1], 4)}
    else:
        critic = with_heads(args.from_critic, args.shape_head, layout_grid)
        trained = {"cnn_from": str(args.from_critic)}
    if critic.shape_head is not None:
        shape_loss = critic.shape_head.fit(features(real_train), features(fake_train))
        trained["shape_final_loss"] = round(shape_loss, 4)
    if critic.layout_head is not None:
        trained.update(fit_layout_head(critic, args, real_train, gen))
    metrics = {
        "real_images": len(real),
        "generated_images": len(fake),
        **trained,
        **held_out_accuracy(critic, real_held, fake_held),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(metrics))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    final = args.out / "final"
    critic.save_pretrained(final)
    command = "python -m train.critic " + shlex.join(sys.argv[1:] if argv is None else argv)
    (final / "README.md").write_text(model_card(metrics, critic.config, command))
    print(f"exported {final}")


if __name__ == "__main__":
    main()
