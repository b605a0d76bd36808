"""Write a labelled synthetic lesion data set with a record of how each image was made.

    python -m lesionstudio.synthesize --n 200 --out synth/ [--latent 64] [--class malignant]
        [--temperature 1.0] [--detail-temperature T] [--candidates M] [--layouts K] [--guidance W]
        [--seed 0] [--batch-size 8] [--workers 2] [--checkpoints DIR | --hub REPO]
    torchrun --nproc-per-node 2 [--nnodes M ...] -m lesionstudio.synthesize --images 200 --out synth/ ...

The generation settings default to the Generate tab's (``lesionstudio.sampling.generation``): with the
shipped checkpoints, each image the critic's pick of 4 candidates, each candidate's layout the
best of 8.

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

The work can be shared: ``--workers N`` draws N shares at once on this machine, and under
torchrun each rank draws one (over several machines, ``--out`` must be a folder they all write
to). Share r of N is the images r, r + N, r + 2N, ...; its rows wait in a file of their own
(``metadata.partRofN.csv``) until every share is done and they are merged into ``metadata.csv``,
so the set is the same, file for file, as one process makes. An interrupted sharded run resumes
with the same command, or with one process.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import io
import multiprocessing
import os
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .cli import HelpFormatter
from .codes import file_sha256, state_sha256
from .data import to_pil
from .files import atomic_write
from .models.hubmodel import WEIGHTS_NAME, CheckpointError
from .sampling.generation import GenerationSettings, add_generation_args, draw_samples, settings_from_args
from .sampling.loading import LATENTS, load_stack
from .sampling.stack import ModelStack, judge_codes, stack_nll_bits

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


@dataclass(frozen=True)
class Shard:
    """One process's share of a set: images rank, rank + world, rank + 2 world, ... Each image
    depends on its index alone, so the shares together are the images one process draws."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"a shard's rank must be in [0, world), world at least 1; got {self.rank} of {self.world}")

    def indices(self, n: int) -> range:
        return range(self.rank, n, self.world)

    @property
    def metadata(self) -> str:
        """Where this share's rows go until ``merge_metadata`` folds them into metadata.csv."""
        return METADATA if self.world == 1 else f"{PART_PREFIX}{self.rank}of{self.world}.csv"


PART_PREFIX = "metadata.part"


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    """Every row written in ``out``: metadata.csv's and those of shares not merged yet (an
    interrupted sharded run), by file name."""
    rows = read_metadata(out / METADATA)
    for part in sorted(out.glob(f"{PART_PREFIX}*.csv")):
        rows.update(read_metadata(part))
    return rows


def merge_metadata(out: str | Path, stack: ModelStack, command: str = "") -> int:
    """Fold the shares' rows into metadata.csv, remove their files and write the README:
    after every share of a sharded run is done. Returns the images in the set."""
    out = Path(out)
    rows = read_rows(out)
    if not rows:
        raise ValueError(f"{out} holds no synthetic images to merge")
    finish_set(out, rows, stack, command)
    return len(rows)


def finish_set(out: Path, rows: dict[str, dict[str, str]], stack: ModelStack, command: str) -> None:
    """Write every row of the set to metadata.csv, remove the shares' files and write the README."""
    _write_metadata(out / METADATA, rows)
    for part in out.glob(f"{PART_PREFIX}*.csv"):
        part.unlink()
    record = next(iter(rows.values()))
    atomic_write(out / "README.md", _readme(record, stack, len(rows), command).encode())


def _write_metadata(path: Path, rows: dict[str, dict[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + ["requested_class"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows.values(), key=lambda r: int(r["index"])))
    atomic_write(path, buf.getvalue().encode())


def _readme(settings: dict[str, str], stack: ModelStack, count: int, command: str) -> str:
    return f"""# Synthetic dermoscopic lesion images (LesionStudio)

**Every image in this folder is synthetic**: sampled from a Gated PixelCNN prior over VQ-VAE
codes and decoded by the VQ-VAE. None is a photograph of a patient. They are not for diagnosis
or any clinical purpose; models trained on them must be validated on real images.

- images: {count} (`synthetic_*.png`, 256x256); one row each in `metadata.csv`
- latent grid: {settings["latent"]}x{settings["latent"]}; temperature {settings["temperature"]};
  run seed {settings["seed"]}; class requested: {settings["requested_class"]}
- VQ-VAE: `{stack.vqvae_dir}` (model.safetensors SHA-256 `{settings["vqvae_sha256"]}`)
- prior: `{stack.prior_dir}` (model.safetensors SHA-256 `{settings["prior_sha256"]}`){_coarse_line(settings)}
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
        chosen = f"the best of {settings['candidates']} candidates" if int(settings["candidates"]) > 1 else "scored"
        lines += (
            f"\n- each image {chosen} by the realism critic "
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


def record_of(stack: ModelStack, settings: GenerationSettings, seed: int) -> dict[str, str]:
    """What every row of a set records of how it was made (``settings`` resolved)."""
    return {
        "latent": str(stack.latent),
        "temperature": repr(settings.temperature),
        "seed": str(seed),
        "requested_class": settings.class_name,
        "vqvae": str(stack.vqvae_dir),
        "vqvae_sha256": file_sha256(Path(stack.vqvae_dir) / WEIGHTS_NAME),
        "prior": str(stack.prior_dir),
        "prior_sha256": file_sha256(Path(stack.prior_dir) / WEIGHTS_NAME),
        # Every coarser level, finest first.
        "coarse_prior": ";".join(str(lv.prior_dir) for lv in reversed(stack.levels[:-1])),
        "coarse_prior_sha256": ";".join(
            file_sha256(Path(lv.prior_dir) / WEIGHTS_NAME) for lv in reversed(stack.levels[:-1]) if lv.prior_dir
        ),
        "detail_temperature": "" if settings.detail_temperature is None else repr(settings.detail_temperature),
        "candidates": str(settings.candidates),
        "critic_sha256": critic_sha256(stack),
        "guidance": repr(settings.guidance),
        "layouts": str(settings.layouts),
        "decoder_sha256": decoder_sha256(stack),
    }


def check_folder(out: Path, record: dict[str, str]) -> dict[str, dict[str, str]]:
    """The rows already in ``out``, checked to have been made as ``record`` says (else ValueError)."""
    rows = read_rows(out)
    for row in rows.values():
        for key in SETTINGS:
            if row.get(key, DEFAULTS.get(key, "")) != record[key]:
                raise ValueError(
                    f"{out} holds images made with {key}={row.get(key)!r}, not {record[key]!r}; "
                    "use another --out (or the same settings to resume)"
                )
    return rows


@torch.no_grad()
def synthesize(
    out: str | Path,
    n: int,
    stack: ModelStack,
    settings: GenerationSettings | None = None,
    seed: int = 0,
    batch_size: int = 8,
    command: str = "",
    show_progress: bool = True,
    shard: Shard | None = None,
) -> list[dict[str, str]]:
    """Make images 0..n-1 in `out` that are not there yet, drawn with ``settings`` (default:
    ``GenerationSettings()``, the Generate tab's); returns all n metadata rows. With a
    ``shard`` of several, only its share, whose rows go to its own file until
    ``merge_metadata``; returns the share's rows."""
    prior = stack.prior
    if prior is None:
        raise CheckpointError(f"no prior for the {stack.latent}x{stack.latent} grid in {stack.source}")
    if n < 1 or batch_size < 1:
        raise ValueError("--n and --batch-size must be at least 1")
    settings = (settings or GenerationSettings()).resolved(stack)
    shard = shard or Shard()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    record = record_of(stack, settings, seed)
    rows = check_folder(out, record)
    share = shard.indices(n)
    todo = [i for i in share if file_name(i) not in rows or not (out / file_name(i)).exists()]
    mine = {f: r for f, r in rows.items() if int(r["index"]) in share}
    desc = "synthesizing" if shard.world == 1 else f"synthesizing {shard.rank + 1}/{shard.world}"
    bar = tqdm(
        total=len(share),
        initial=len(share) - len(todo),
        desc=desc,
        unit="img",
        position=shard.rank,
        disable=not show_progress,
    )
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        seeds = [image_seed(seed, i) for i in batch]
        drawn = draw_samples(stack, settings, seeds)
        if drawn.scores is None and stack.critic is not None:
            judged = judge_codes(stack, drawn.codes)
            drawn = replace(drawn, scores=judged.realism, judged=judged.images)
        labels, scores = drawn.labels, drawn.scores
        bits = stack_nll_bits(stack, drawn.levels, labels).cpu()
        images = stack.images(drawn).cpu()
        for j, i in enumerate(batch):
            png = io.BytesIO()
            to_pil(images[j]).save(png, format="PNG")
            atomic_write(out / file_name(i), png.getvalue())
            mine[file_name(i)] = {
                **record,
                "file": file_name(i),
                "class": prior.class_names[int(labels[j])] if labels is not None else "",
                "index": str(i),
                "image_seed": str(seeds[j]),
                "bits_per_code": f"{float(bits[j]):.4f}",
                "realism_score": "" if scores is None else f"{float(scores[j]):.4f}",
            }
        # After the PNGs: a row always has its image.
        _write_metadata(out / shard.metadata, mine if shard.world > 1 else {**rows, **mine})
        bar.update(len(batch))
    bar.close()
    if shard.world > 1:
        return [mine[file_name(i)] for i in share]
    rows.update(mine)  # with the rows of an earlier sharded run's shares, read at the start
    finish_set(out, rows, stack, command)
    return [rows[file_name(i)] for i in range(n)]


@dataclass(frozen=True)
class ShareJob:
    """What a worker process needs to draw its share (it loads the models itself)."""

    out: Path
    n: int
    latent: int
    source: str | None
    device: str
    settings: GenerationSettings
    seed: int
    batch_size: int
    threads: int


def draw_share(job: ShareJob, shard: Shard) -> int:
    """A worker's share of ``--workers``: the images it drew. Every thread pool in it (torch's,
    OpenMP's, NumPy's BLAS) is held to its share of the cores, as torchrun's OMP_NUM_THREADS does."""
    with threadpool_limits(job.threads):
        torch.set_num_threads(job.threads)
        stack = load_stack(job.latent, job.source, device=job.device)
        return len(synthesize(job.out, job.n, stack, job.settings, job.seed, job.batch_size, shard=shard))


def run_workers(job: ShareJob, workers: int) -> None:
    """Every share of the set at once, one process each (spawned: each loads its own models)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(draw_share, job, Shard(rank, workers)) for rank in range(workers)]
        for future in futures:
            future.result()  # the first share's error, if any, is raised here


def torchrun_shard() -> Shard | None:
    """This process's share under torchrun (RANK and WORLD_SIZE set, world above 1), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Shard(int(os.environ.get("RANK", "0")), world) if world > 1 else None


def run_torchrun(job: ShareJob, shard: Shard, command: str) -> None:
    """This rank's share; then, once every rank is done, rank 0 merges the metadata. The
    output folder must be one every machine writes to (a shared file system)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        stack = load_stack(job.latent, job.source, device=job.device)
        synthesize(job.out, job.n, stack, job.settings, job.seed, job.batch_size, command, shard.rank == 0, shard)
        dist.barrier()
        if shard.rank == 0:
            merge_metadata(job.out, stack, command)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, command: str) -> list[dict[str, str]]:
    """The command's set: drawn by this process, by ``--workers`` processes, or by this
    torchrun rank and the others; its n rows once complete (none on a torchrun rank but 0)."""
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    settings = settings_from_args(args)
    source = args.hub or args.checkpoints
    shard = torchrun_shard()
    if shard is not None and args.workers > 1:
        raise ValueError("under torchrun each rank is one worker: use --nproc-per-node, not --workers")
    threads = max(1, torch.get_num_threads() // args.workers)
    job = ShareJob(args.out, args.n, args.latent, source, args.device, settings, args.seed, args.batch_size, threads)
    if shard is None and args.workers == 1:
        stack = load_stack(args.latent, source, device=args.device)
        return synthesize(args.out, args.n, stack, settings, args.seed, args.batch_size, command=command)
    if shard is not None:
        run_torchrun(job, shard, command)
        if shard.rank > 0:
            return []  # rank 0 reports the set
        rows = read_metadata(args.out / METADATA)
        return [rows[file_name(i)] for i in range(args.n)]
    # Checked here first: a folder made with other settings is refused before any worker starts.
    stack = load_stack(args.latent, source, device=args.device)
    check_folder(args.out, record_of(stack, settings.resolved(stack), args.seed))
    run_workers(job, args.workers)
    rows = read_rows(args.out)
    finish_set(args.out, rows, stack, command)
    return [rows[file_name(i)] for i in range(args.n)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lesionstudio.synthesize",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    # --images too: torchrun's own parser takes "--n" for an abbreviation of its options.
    p.add_argument("--n", "--images", dest="n", type=int, required=True, help="number of images")
    p.add_argument("--out", type=Path, required=True, help="output folder (re-run to resume)")
    p.add_argument("--latent", type=int, choices=LATENTS, default=64, help="code grid side")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (each image's is derived from it)")
    p.add_argument("--batch-size", type=int, default=8, help="images drawn together (each with its candidates)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--checkpoints",
        default=None,
        help="checkpoints folder (default: $LESIONSTUDIO_CHECKPOINTS or the bundled checkpoints/)",
    )
    src.add_argument("--hub", default=None, help="Hugging Face Hub repo id holding vqvae-N/ and pixelcnn-N/")
    p.add_argument("--device", default="cpu", help="where the models run (cpu, cuda, ...)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes drawing shares of the set at once, on this machine (under torchrun: one a rank)",
    )
    add_generation_args(p)
    args = p.parse_args(argv)
    command = "python -m lesionstudio.synthesize " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        rows = run(args, command)
    except (CheckpointError, ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if not rows:
        return
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
