"""Train the realism critic that ranks candidate samples: real training images vs a stack's own samples.

    python -m lesionstudio.synthesize --n 600 --latent 64 --seed 5000 --out runs/critic_fakes
    python -m train.critic --real ../shared/data/isic256/train --generated runs/critic_fakes --out runs/critic

Real images come from the trainers' training split of --real (the validation split stays unseen,
for the two-sample test); a seeded tenth of each side is held out to measure the critic.
Writes OUT/metrics.json and OUT/final/ (config.json, model.safetensors, README.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from lesionstudio.critic import FitSettings, RealismCritic, fit
from lesionstudio.data import find_images, split_files
from lesionstudio.twosample import load_uint8

from .modelcard import DATA_NOTE, KINDS, LICENSE_NOTE, metric_table, title, with_metadata


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.critic", description=__doc__.split("\n")[0])
    p.add_argument("--real", type=Path, required=True, help="folder of real images (its training split is used)")
    p.add_argument("--generated", type=Path, required=True, help="folder of the stack's samples")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--real-limit", type=int, default=2000, help="seeded subset of the real training images")
    p.add_argument("--epochs", type=int, default=FitSettings.epochs)
    p.add_argument("--batch-size", type=int, default=FitSettings.batch_size)
    p.add_argument("--lr", type=float, default=FitSettings.lr)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of each side held out to measure it")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def held_out_accuracy(critic: RealismCritic, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """Balanced accuracy (the mean of the two sides' accuracies: the sides differ in size) per score."""
    judged = critic.judge(torch.cat([real, fake]).float() / 255)
    n = len(real)
    scores = {"layout": judged.layout, "texture": judged.texture, "realism": judged.realism}
    return {
        f"heldout_{k}_accuracy": round(float(((v[:n] > 0).float().mean() + (v[n:] <= 0).float().mean()) / 2), 4)
        for k, v in scores.items()
    }


def split(images: torch.Tensor, fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(len(images), generator=gen)
    n_held = max(1, round(len(images) * fraction))
    return images[perm[n_held:]], images[perm[:n_held]]


def model_card(metrics: dict, config: dict, command: str) -> str:
    """The critic's README.md: metadata (huggingface_hub ``ModelCardData``) and its held-out accuracies."""
    rows = {row: metrics.get(key) for row, key in KINDS["critic"].metrics.items()}
    table = "\n".join(metric_table(rows, KINDS["critic"].header))
    text = f"""
# {title(config)}

Ranks candidate samples (`candidates=M` in the library, `--candidates M` in `synthesize`, the
Generate tab's candidates control): a small CNN with two branches, *layout* (the whole image at
{config["view_size"]} px) and *texture* ({config["view_size"]} px crops at full resolution), trained to tell real
training images from the shipped stack's samples. A sample's realism score is the mean of the
two logits (> 0: looks real). Research and education only; not a diagnostic tool.

## Training

{DATA_NOTE}

{LICENSE_NOTE}

Command: `{command}`

{metrics["real_images"]} real training images vs {metrics["generated_images"]} samples; a tenth of each held out.
Wall time on the CPU: {metrics["seconds"] / 60:.1f} min.

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
    critic = RealismCritic(channels=args.channels)
    settings = FitSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    losses = fit(critic, real_train, fake_train, settings)
    metrics = {
        "real_images": len(real),
        "generated_images": len(fake),
        "epochs": args.epochs,
        "final_loss": round(losses[-1], 4),
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
