"""Write a labelled synthetic lesion data set with a record of how each image was made.

    python -m lesionstudio.synthesize --n 200 --out synth/ [--latent 64] [--class malignant]
        [--temperature 1.0] [--detail-temperature T] [--candidates M] [--guidance W] [--seed 0]
        [--batch-size 8]
        [--checkpoints DIR | --hub REPO]

Writes ``synthetic_000000.png`` ... , ``metadata.csv`` (one row per image: class, latent size,
temperatures, seeds, the models and the SHA-256 of their ``model.safetensors``, bits per code of
the sampled codes under the stack (all levels together); for a stack of several levels also its
coarser priors, which drew the layout; with a realism critic beside the checkpoints, each image's
realism score and how many candidates it was chosen from; the layout guidance) and a
``README.md`` saying the images are synthetic.

Image i is drawn with its own seed, derived from ``--seed`` and i, so it does not depend on
which batch it fell in: re-running the same command skips the images that exist (an
interrupted run resumes), ``--n`` can be raised later to extend a set, and the same ``--seed``
gives the same images. A folder made with other settings or other models is refused rather
than mixed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import io
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .codes import file_sha256, state_sha256
from .data import to_pil
from .files import atomic_write
from .hubmodel import WEIGHTS_NAME, CheckpointError
from .loading import LATENTS, load_stack
from .sampling import make_generator, resolve_labels
from .stack import ModelStack, sample_ranked, sample_stack, stack_nll_bits

REQUIRED = [
    "file",
    "class",
    "latent",
    "temperature",
    "seed",
    "index",
    "image_seed",
    "bits_per_code",
    "vqvae",
    "vqvae_sha256",
    "prior",
    "prior_sha256",
]
# Empty for a plain prior or without a critic (and absent from folders made before them).
OPTIONAL = [
    "coarse_prior",
    "coarse_prior_sha256",
    "detail_temperature",
    "candidates",
    "critic_sha256",
    "realism_score",
    "guidance",
    "layouts",
    "decoder_sha256",
]
COLUMNS = REQUIRED + OPTIONAL
# Columns that must agree between the rows already in a folder and a new run.
SETTINGS = [
    "latent",
    "temperature",
    "seed",
    "requested_class",
    "vqvae_sha256",
    "prior_sha256",
    "coarse_prior_sha256",
    "detail_temperature",
    "candidates",
    "critic_sha256",
    "guidance",
    "layouts",
    "decoder_sha256",
]
# What a folder made before a column existed holds for it (so it still resumes).
DEFAULTS = {
    "detail_temperature": "",
    "candidates": "1",
    "critic_sha256": "",
    "guidance": "1.0",
    "layouts": "1",
    "decoder_sha256": "",
}
METADATA = "metadata.csv"


def image_seed(seed: int, index: int) -> int:
    """The sampling seed of image `index` of a run seeded `seed` (63 bits; runs with different
    seeds never share an image seed, unlike seed + index would)."""
    digest = hashlib.sha256(f"lesionstudio-synthesize:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def critic_sha256(stack: ModelStack) -> str:
    """SHA-256 of the critic's weights as loaded (it may come from a Hub cache), or "" without one."""
    return "" if stack.critic is None else state_sha256(stack.critic)


def decoder_sha256(stack: ModelStack) -> str:
    """SHA-256 of the post-trained decoder's weights as loaded, or "" where the VQ-VAE's own decodes."""
    return "" if stack.decoder is None else state_sha256(stack.decoder)


def file_name(index: int) -> str:
    return f"synthetic_{index:06d}.png"


def read_metadata(path: Path) -> dict[str, dict[str, str]]:
    """Rows of an existing metadata.csv by file name (empty when there is none)."""
    if not path.exists():
        return {}
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path} exists but cannot be read ({exc}); use another --out") from exc
    if rows and not set(REQUIRED) <= set(rows[0]):
        raise ValueError(f"{path} is not a LesionStudio metadata file; use another --out")
    return {r["file"]: r for r in rows}


def _write_metadata(path: Path, rows: dict[str, dict[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + ["requested_class"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows.values(), key=lambda r: int(r["index"])))
    atomic_write(path, buf.getvalue().encode())


def _readme(settings: dict[str, str], pair: ModelStack, count: int, command: str) -> str:
    return f"""# Synthetic dermoscopic lesion images (LesionStudio)

**Every image in this folder is synthetic**: sampled from a Gated PixelCNN prior over VQ-VAE
codes and decoded by the VQ-VAE. None is a photograph of a patient. They are not for diagnosis
or any clinical purpose; models trained on them must be validated on real images.

- images: {count} (`synthetic_*.png`, 256x256); one row each in `metadata.csv`
- latent grid: {settings["latent"]}x{settings["latent"]}; temperature {settings["temperature"]};
  run seed {settings["seed"]}; class requested: {settings["requested_class"]}
- VQ-VAE: `{pair.vqvae_dir}` (model.safetensors SHA-256 `{settings["vqvae_sha256"]}`)
- prior: `{pair.prior_dir}` (model.safetensors SHA-256 `{settings["prior_sha256"]}`){_coarse_line(settings)}
- made with: `{command}`
- last written: {dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}

The models were trained on ISIC archive images (research and non-commercial use; see their
model cards). Check the set for copies of training images before sharing it:
`python -m lesionstudio.memorization --generated THIS_FOLDER --train TRAINING_IMAGES`.
"""


def _coarse_line(settings: dict[str, str]) -> str:
    lines = ""
    if settings["coarse_prior"]:
        lines += (
            f"\n- coarse prior, which drew each lesion's layout first: `{settings['coarse_prior']}` "
            f"(model.safetensors SHA-256 `{settings['coarse_prior_sha256']}`)"
        )
    if settings["critic_sha256"]:
        lines += (
            f"\n- each image the best of {settings['candidates']} candidates by the realism critic "
            f"(model.safetensors SHA-256 `{settings['critic_sha256']}`; score in `realism_score`)"
        )
    if int(settings["layouts"]) > 1:
        lines += f"\n- each candidate's layout the best of {settings['layouts']} drawn, by the critic's layout head"
    if float(settings["guidance"]) != 1.0:
        lines += f"\n- layout guidance {settings['guidance']}: the finer levels follow the layout more closely"
    if settings["decoder_sha256"]:
        lines += (
            "\n- decoded by the post-trained decoder (`decoder-N/`, weights SHA-256 "
            f"`{settings['decoder_sha256']}`), not the VQ-VAE's own"
        )
    return lines


@torch.no_grad()
def synthesize(
    out: str | Path,
    n: int,
    pair: ModelStack,
    class_name: str = "any",
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    command: str = "",
    show_progress: bool = True,
    detail_temperature: float | None = None,
    candidates: int = 1,
    guidance: float = 1.0,
    layouts: int = 1,
) -> list[dict[str, str]]:
    """Make images 0..n-1 in `out` that are not there yet; returns all n metadata rows.

    ``detail_temperature`` (default: ``temperature``) is that of every level but the coarsest;
    with ``candidates`` > 1 each image is the best-scored of that many (the stack needs a critic);
    ``guidance`` sets how closely the finer levels follow the layout (1: the priors as trained);
    with ``layouts`` > 1 each candidate's layout is the best of that many (the critic's layout head)."""
    prior = pair.prior
    if prior is None:
        raise CheckpointError(f"no prior for the {pair.latent}x{pair.latent} grid in {pair.source}")
    if n < 1 or batch_size < 1:
        raise ValueError("--n and --batch-size must be at least 1")
    if not temperature > 0:
        raise ValueError(f"--temperature must be positive, got {temperature}")
    if detail_temperature is not None and not detail_temperature > 0:
        raise ValueError(f"--detail-temperature must be positive, got {detail_temperature}")
    if candidates < 1:
        raise ValueError(f"--candidates must be at least 1, got {candidates}")
    if candidates > 1 and pair.critic is None:
        raise CheckpointError(f"--candidates {candidates} needs a realism critic (critic/) in {pair.source}")
    if layouts < 1:
        raise ValueError(f"--layouts must be at least 1, got {layouts}")
    if layouts > 1 and (pair.critic is None or pair.critic.layout_head is None):
        raise CheckpointError(
            f"--layouts {layouts} needs a realism critic with a layout head (critic/) in {pair.source}"
        )
    if not 0 <= guidance < float("inf"):
        raise ValueError(f"--guidance must be a finite non-negative number, got {guidance}")
    fixed_label = prior.class_label(class_name)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "latent": str(pair.latent),
        "temperature": repr(float(temperature)),
        "seed": str(seed),
        "requested_class": class_name or "any",
        "vqvae": str(pair.vqvae_dir),
        "vqvae_sha256": file_sha256(Path(pair.vqvae_dir) / WEIGHTS_NAME),
        "prior": str(pair.prior_dir),
        "prior_sha256": file_sha256(Path(pair.prior_dir) / WEIGHTS_NAME),
        # Every coarser level, finest first.
        "coarse_prior": ";".join(str(lv.prior_dir) for lv in reversed(pair.levels[:-1])),
        "coarse_prior_sha256": ";".join(
            file_sha256(Path(lv.prior_dir) / WEIGHTS_NAME) for lv in reversed(pair.levels[:-1]) if lv.prior_dir
        ),
        "detail_temperature": "" if detail_temperature is None else repr(float(detail_temperature)),
        "candidates": str(candidates),
        "critic_sha256": critic_sha256(pair),
        "guidance": repr(float(guidance)),
        "layouts": str(layouts),
        "decoder_sha256": decoder_sha256(pair),
    }
    rows = read_metadata(out / METADATA)
    for row in rows.values():
        for key in SETTINGS:
            if row.get(key, DEFAULTS.get(key, "")) != settings[key]:
                raise ValueError(
                    f"{out} holds images made with {key}={row.get(key)!r}, not {settings[key]!r}; "
                    "use another --out (or the same settings to resume)"
                )
    todo = [i for i in range(n) if file_name(i) not in rows or not (out / file_name(i)).exists()]
    device = prior.embedding.weight.device
    bar = tqdm(total=n, initial=n - len(todo), desc="synthesizing", unit="img", disable=not show_progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        seeds = [image_seed(seed, i) for i in batch]
        if fixed_label is None and prior.num_classes:
            # The class of a "any" image is drawn from the training frequencies, by its own seed.
            labels = resolve_labels(prior, len(batch), None, [make_generator(s + 1) for s in seeds])
        elif prior.num_classes:
            labels = torch.full((len(batch),), fixed_label, dtype=torch.long)
        else:
            labels = None
        lab = None if labels is None else labels.to(device)
        temps = (temperature, temperature if detail_temperature is None else detail_temperature)
        if pair.critic is None:
            drawn = sample_stack(pair, len(batch), temps, seeds, lab, guidance=guidance)
        else:
            drawn = sample_ranked(pair, len(batch), candidates, temps, seeds, lab, guidance=guidance, layouts=layouts)
        labels = drawn.labels
        bits = stack_nll_bits(pair, drawn.levels, labels).cpu()
        images = pair.render(drawn.codes).cpu()
        for j, i in enumerate(batch):
            png = io.BytesIO()
            to_pil(images[j]).save(png, format="PNG")
            atomic_write(out / file_name(i), png.getvalue())
            rows[file_name(i)] = {
                **settings,
                "file": file_name(i),
                "class": prior.class_names[int(labels[j])] if labels is not None else "",
                "index": str(i),
                "image_seed": str(seeds[j]),
                "bits_per_code": f"{float(bits[j]):.4f}",
                "realism_score": "" if drawn.scores is None else f"{float(drawn.scores[j]):.4f}",
            }
        _write_metadata(out / METADATA, rows)  # after the PNGs: a row always has its image
        bar.update(len(batch))
    bar.close()
    atomic_write(out / "README.md", _readme(settings, pair, len(rows), command).encode())
    return [rows[file_name(i)] for i in range(n)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lesionstudio.synthesize", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--out", type=Path, required=True, help="output folder (re-run to resume)")
    p.add_argument("--latent", type=int, choices=LATENTS, default=64, help="code grid side")
    p.add_argument("--class", dest="class_name", default="any", help="benign, malignant or any (training mix)")
    p.add_argument("--temperature", type=float, default=1.0, help="of the coarsest level (the layout)")
    p.add_argument(
        "--detail-temperature", type=float, default=None, help="of every finer level (default: --temperature)"
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="keep the best of M candidates per image by the realism critic (needs critic/)",
    )
    p.add_argument(
        "--layouts",
        type=int,
        default=1,
        help="draw K layouts per candidate and keep the one the critic's layout head scores best",
    )
    p.add_argument(
        "--guidance", type=float, default=1.0, help="how closely the finer levels follow the layout (1: as trained)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="grids sampled together")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--checkpoints",
        default=None,
        help="checkpoints folder (default: $LESIONSTUDIO_CHECKPOINTS or the bundled checkpoints/)",
    )
    src.add_argument("--hub", default=None, help="Hugging Face Hub repo id holding vqvae-N/ and pixelcnn-N/")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    command = "python -m lesionstudio.synthesize " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        pair = load_stack(args.latent, args.hub or args.checkpoints, device=args.device)
        rows = synthesize(
            args.out,
            args.n,
            pair,
            args.class_name,
            args.temperature,
            args.seed,
            args.batch_size,
            command=command,
            detail_temperature=args.detail_temperature,
            candidates=args.candidates,
            guidance=args.guidance,
            layouts=args.layouts,
        )
    except (CheckpointError, ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    classes: dict[str, int] = {}
    for r in rows:
        classes[r["class"] or "unconditional"] = classes.get(r["class"] or "unconditional", 0) + 1
    mean_bits = sum(float(r["bits_per_code"]) for r in rows) / len(rows)
    print(
        f"{len(rows)} images in {args.out} ({', '.join(f'{k}: {v}' for k, v in sorted(classes.items()))}); "
        f"mean {mean_bits:.3f} bits/code under the prior"
    )


if __name__ == "__main__":
    main()
