"""Are the synthetic lesions useful? Train a benign/malignant classifier on real, synthetic or
mixed images and test it on held-out real ones.

    python -m lesionstudio.downstream --real ../shared/data/isic256/train \\
        --labels ../shared/data/isic256/MANIFEST.csv --synthetic synth/ [synth_more/ ...] \\
        [--json-out downstream.json] [--plot downstream.html] [--seeds 5] [--workers 2] [--quick]

Every arm trains the same small CNN (``lesionstudio.measure.classifier``: architecture, steps,
batch and augmentations fixed), from scratch, once per training seed; only its training images
differ. The test set is the trainers' validation split of ``--real``, which no shipped model saw
(or ``--test DIR``: real images held out elsewhere).

- **TRTR**: N real training images (class-balanced), for each N of ``--sizes`` and all of them;
- **TSTR**: N synthetic images (labels: the class each was drawn for, from ``metadata.csv``);
- **augmented**: the same N real images as TRTR's arm of that seed, plus M = k x N synthetic ones;
- **class fidelity**: the all-real classifier scores the synthetic images against the class each
  was drawn for, beside its AUC on the real test images.

AUCs are the mean over training seeds, with a bootstrap 95% interval that resamples the test
images (each class apart) and the seeds; augmentation's gain over real-only is paired by seed.
The synthetic images must come from models trained on the training split only (the shipped
ones are), or the test leaks.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cli import HelpFormatter
from .data import ImageLoadError, LesionImageFolder, find_images, split_files
from .files import atomic_write
from .measure.auc import Interval, Resamples, auc_difference, mean_auc, per_seed
from .measure.classifier import ClassifierDesign, malignancy_scores, train_classifier
from .measure.twosample import load_uint8
from .plots import downstream_figure

POSITIVE = "malignant"
NEGATIVE = "benign"
METADATA = "metadata.csv"


class DownstreamError(ValueError):
    """The benchmark cannot run on these inputs (too few images of a class, no labels, ...)."""


@dataclass(frozen=True)
class Protocol:
    sizes: tuple[int, ...] = (100, 400)  # N: the scarce training-set sizes, each class-balanced
    multiples: tuple[int, ...] = (1, 2)  # augmentation adds M = k x N synthetic images
    seeds: int = 4
    replicates: int = 2000  # bootstrap replicates
    design: ClassifierDesign = field(default_factory=ClassifierDesign)

    def as_dict(self) -> dict:
        return {**asdict(self), "design": self.design.as_dict()}


QUICK = Protocol(
    sizes=(8,), multiples=(1,), seeds=2, replicates=200, design=ClassifierDesign(size=32, steps=8, batch_size=8)
)


@dataclass(frozen=True)
class Arm:
    """One training set: ``real`` real images (None: all of them) and ``synthetic`` synthetic ones."""

    kind: str  # TRTR, TSTR or augmented
    real: int | None
    synthetic: int

    @property
    def name(self) -> str:
        real = "all" if self.real is None else str(self.real)
        if self.kind == "TRTR":
            return f"TRTR N={real}"
        if self.kind == "TSTR":
            return f"TSTR N={self.synthetic}"
        return f"real {real} + synthetic {self.synthetic}"


def arms(protocol: Protocol) -> list[Arm]:
    out = [Arm("TRTR", n, 0) for n in protocol.sizes] + [Arm("TRTR", None, 0)]
    out += [Arm("TSTR", 0, n) for n in protocol.sizes]
    out += [Arm("augmented", n, k * n) for n in protocol.sizes for k in protocol.multiples]
    return out


@dataclass(frozen=True)
class LabelledImages:
    """uint8 images [N, 3, S, S] and their labels [N] (1: malignant)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        positives = int(self.labels.sum())
        return {NEGATIVE: len(self) - positives, POSITIVE: positives}

    def balanced(self, n: int, gen: torch.Generator) -> LabelledImages:
        """n images drawn without replacement, half of each class (the odd one benign)."""
        picks = []
        for label, count in ((0, n - n // 2), (1, n // 2)):
            pool = torch.nonzero(self.labels == label).flatten()
            if count > len(pool):
                name = (NEGATIVE, POSITIVE)[label]
                raise DownstreamError(f"{n} class-balanced images need {count} {name}, the set has {len(pool)}")
            picks.append(pool[torch.randperm(len(pool), generator=gen)[:count]])
        pick = torch.cat(picks)
        return LabelledImages(self.images[pick], self.labels[pick])

    def __add__(self, other: LabelledImages) -> LabelledImages:
        return LabelledImages(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]))


@dataclass(frozen=True)
class DataSets:
    train: LabelledImages  # real training split
    test: LabelledImages  # real held-out images (the validation split, or --test)
    synthetic: LabelledImages


def subset_seed(seed: int, source: str, n: int) -> int:
    """The seed of a training seed's subset of n images of a source: the same in every arm, so
    the augmented arm holds exactly the real images of the real-only arm it is paired with."""
    return 1_000_003 * seed + 7919 * n + (1 if source == "synthetic" else 0)


def training_set(arm: Arm, seed: int, data: DataSets) -> LabelledImages:
    parts = []
    if arm.real is None:
        parts.append(data.train)
    elif arm.real:
        parts.append(data.train.balanced(arm.real, torch.Generator().manual_seed(subset_seed(seed, "real", arm.real))))
    if arm.synthetic:
        gen = torch.Generator().manual_seed(subset_seed(seed, "synthetic", arm.synthetic))
        parts.append(data.synthetic.balanced(arm.synthetic, gen))
    return functools.reduce(LabelledImages.__add__, parts)


@dataclass(frozen=True)
class Job:
    arm: Arm
    seed: int


@dataclass(frozen=True)
class JobScores:
    """A trained classifier's scores on the real test images, and (all-real arm) the synthetic ones."""

    job: Job
    test: np.ndarray
    synthetic: np.ndarray | None


_DATA: DataSets | None = None  # the worker processes' data, set before they fork


def run_job(job: Job, data: DataSets, design: ClassifierDesign) -> JobScores:
    train = training_set(job.arm, job.seed, data)
    model = train_classifier(train.images, train.labels, design, seed=job.seed)
    test = malignancy_scores(model, data.test.images, design.test_views).numpy()
    synthetic = None
    if job.arm.kind == "TRTR" and job.arm.real is None:
        synthetic = malignancy_scores(model, data.synthetic.images, design.test_views).numpy()
    return JobScores(job, test, synthetic)


def _run_in_worker(job: Job, design: ClassifierDesign) -> JobScores:
    torch.set_num_threads(1)
    assert _DATA is not None, "the data are set before the workers fork"
    return run_job(job, _DATA, design)


def run_jobs(jobs: Sequence[Job], data: DataSets, design: ClassifierDesign, workers: int) -> list[JobScores]:
    """Every job, in ``workers`` forked processes of one thread each (the results do not depend on
    how many: each job is seeded on its own)."""
    global _DATA
    shown = {"desc": "classifiers trained", "total": len(jobs), "disable": len(jobs) < 10}
    if workers <= 1:
        return [run_job(job, data, design) for job in tqdm(jobs, **shown)]
    _DATA = data
    try:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            return list(tqdm(pool.map(_run_in_worker, jobs, [design] * len(jobs)), **shown))
    finally:
        _DATA = None


@dataclass(frozen=True)
class ArmResult:
    arm: Arm
    auc: Interval
    per_seed: list[float]

    def as_dict(self) -> dict:
        return {
            "name": self.arm.name,
            **asdict(self.arm),
            "auc": self.auc.as_dict(),
            "per_seed": [round(a, 4) for a in self.per_seed],
        }


def summarize(scores: Sequence[JobScores], data: DataSets, protocol: Protocol) -> dict:
    """The arms' AUCs, augmentation's paired gains, and the class fidelity, as one JSON-able dict."""
    by_arm: dict[Arm, np.ndarray] = {}
    for arm in arms(protocol):
        rows = sorted((s for s in scores if s.job.arm == arm), key=lambda s: s.job.seed)
        by_arm[arm] = np.stack([s.test for s in rows])
    labels = data.test.labels.numpy()
    resamples = Resamples.draw(labels, protocol.seeds, protocol.replicates, seed=0)
    results = {arm: ArmResult(arm, mean_auc(s, labels, resamples), per_seed(s, labels)) for arm, s in by_arm.items()}
    gains = []
    for arm in by_arm:
        if arm.kind == "augmented":
            baseline = Arm("TRTR", arm.real, 0)
            diff = auc_difference(by_arm[arm], by_arm[baseline], labels, resamples)
            gains.append({"arm": arm.name, "real": arm.real, "synthetic": arm.synthetic, "gain": diff.as_dict()})
    return {
        "arms": [r.as_dict() for r in results.values()],
        "augmentation_gain": gains,
        "class_fidelity": class_fidelity(scores, data, protocol, results[Arm("TRTR", None, 0)].auc),
    }


def class_fidelity(scores: Sequence[JobScores], data: DataSets, protocol: Protocol, real_auc: Interval) -> dict:
    rows = sorted((s for s in scores if s.synthetic is not None), key=lambda s: s.job.seed)
    labels = data.synthetic.labels.numpy()
    resamples = Resamples.draw(labels, protocol.seeds, protocol.replicates, seed=1)
    synthetic_auc = mean_auc(np.stack([s.synthetic for s in rows]), labels, resamples)
    return {
        "synthetic_auc": synthetic_auc.as_dict(),
        "real_auc": real_auc.as_dict(),
        "ratio": round(synthetic_auc.estimate / real_auc.estimate, 4),
    }


def targets(summary: dict, protocol: Protocol) -> dict:
    """The issue's targets, as measured (ratios and the gain at the smallest N)."""
    auc = {(a["kind"], a["real"], a["synthetic"]): a["auc"]["estimate"] for a in summary["arms"]}
    out: dict = {"class_fidelity_ratio": summary["class_fidelity"]["ratio"]}
    n = 400 if 400 in protocol.sizes else max(protocol.sizes)
    out[f"tstr_over_trtr_n{n}"] = round(auc[("TSTR", 0, n)] / auc[("TRTR", n, 0)], 4)
    smallest = min(protocol.sizes)
    out[f"augmentation_gain_n{smallest}"] = [g["gain"] for g in summary["augmentation_gain"] if g["real"] == smallest]
    return out


def read_synthetic(folders: Sequence[Path], size: int) -> LabelledImages:
    """The images of synthetic sets and the class each was drawn for (``metadata.csv``)."""
    files: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        meta = folder / METADATA
        if not meta.is_file():
            raise DownstreamError(f"{folder} has no {METADATA}: give sets written by lesionstudio.synthesize")
        with open(meta, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                files.append(folder / row["file"])
                labels.append(class_label(row.get("class", ""), meta))
    if not files:
        raise DownstreamError(f"no synthetic images listed in {', '.join(map(str, folders))}")
    return LabelledImages(load_uint8(files, size), torch.tensor(labels))


def class_label(name: str, source: Path | str) -> int:
    if name not in (NEGATIVE, POSITIVE):
        raise DownstreamError(f"{source}: class {name!r} is neither {NEGATIVE} nor {POSITIVE}")
    return int(name == POSITIVE)


def read_real(root: Path, labels_csv: Path, split: str, size: int) -> LabelledImages:
    """The labelled images of one of the trainers' splits of a real folder (unlabelled ones skipped)."""
    files = split_files(find_images(root), split)
    folder = LesionImageFolder(root, labels_csv=labels_csv, classes=(NEGATIVE, POSITIVE), files=files)
    labelled = [i for i, target in enumerate(folder.targets) if target >= 0]
    if not labelled:
        raise DownstreamError(f"no {NEGATIVE}/{POSITIVE} labels in {labels_csv} for the {split} split of {root}")
    images = load_uint8([folder.files[i] for i in labelled], size)
    return LabelledImages(images, torch.tensor([folder.targets[i] for i in labelled]))


def load_data(real: Path, labels_csv: Path, synthetic: Sequence[Path], size: int, test: Path | None = None) -> DataSets:
    """The real training split, the test images (the validation split, or all of ``test``) and
    the synthetic sets."""
    return DataSets(
        train=read_real(real, labels_csv, "train", size),
        test=read_real(real, labels_csv, "val", size) if test is None else read_real(test, labels_csv, "all", size),
        synthetic=read_synthetic(synthetic, size),
    )


def check_sizes(data: DataSets, protocol: Protocol) -> None:
    """Refuse up front an arm that the sets cannot fill (instead of failing after an hour)."""
    needs = {"real": max(protocol.sizes), "synthetic": max(protocol.sizes) * max(protocol.multiples)}
    for source, sets in (("real", data.train), ("synthetic", data.synthetic)):
        counts = sets.class_counts()
        if min(counts.values()) < (needs[source] + 1) // 2:
            raise DownstreamError(
                f"the {source} training images hold {counts}; the arms need {needs[source]} class-balanced"
            )
    if min(data.test.class_counts().values()) < 1:
        raise DownstreamError("the real test split needs images of both classes")


def run(data: DataSets, protocol: Protocol, workers: int = 1) -> dict:
    """The whole benchmark on loaded data: every arm and seed trained and scored, then summarized."""
    check_sizes(data, protocol)
    start = time.perf_counter()
    jobs = [Job(arm, seed) for arm in arms(protocol) for seed in range(protocol.seeds)]
    scores = run_jobs(jobs, data, protocol.design, workers)
    summary = summarize(scores, data, protocol)
    return {
        "protocol": protocol.as_dict(),
        "images": {
            "train": data.train.class_counts(),
            "test": data.test.class_counts(),
            "synthetic": data.synthetic.class_counts(),
        },
        **summary,
        "targets": targets(summary, protocol),
        "train_seconds": round(time.perf_counter() - start, 1),
    }


def markdown_table(result: dict) -> str:
    """The result as a Markdown table: every arm's AUC, augmentation's paired gains, the class fidelity."""
    lines = ["| training images | AUC on held-out real images (95% interval) | per seed |", "| --- | --- | --- |"]
    for a in result["arms"]:
        lines.append(f"| {a['name']} | {Interval(**a['auc'])} | {' '.join(f'{x:.3f}' for x in a['per_seed'])} |")
    for g in result["augmentation_gain"]:
        lines.append(f"| gain of {g['arm']} over real {g['real']} alone (paired) | {Interval(**g['gain'])} | |")
    fid = result["class_fidelity"]
    lines.append(
        f"| class fidelity: the all-real classifier on the synthetic images, by drawn class "
        f"| {Interval(**fid['synthetic_auc'])} (on real: {Interval(**fid['real_auc'])}; ratio {fid['ratio']:.3f}) | |"
    )
    return "\n".join(lines)


def print_report(result: dict) -> None:
    images = result["images"]
    print(f"train {images['train']}, test {images['test']}, synthetic {images['synthetic']}")
    print(markdown_table(result))
    print(f"targets: {json.dumps(result['targets'])}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lesionstudio.downstream", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--real", type=Path, help="real images (the trainers' folder: train + val split)")
    p.add_argument("--labels", type=Path, help="CSV of benign/malignant labels (e.g. MANIFEST.csv)")
    p.add_argument("--synthetic", type=Path, nargs="+", help="synthesize output folders")
    p.add_argument(
        "--test", type=Path, default=None, help="real test images, labelled in --labels (default: --real's val split)"
    )
    p.add_argument("--sizes", type=int, nargs="+", help=f"N real or synthetic images (default: {Protocol.sizes})")
    p.add_argument("--multiples", type=int, nargs="+", help=f"augmentation M / N (default: {Protocol.multiples})")
    p.add_argument("--seeds", type=int, help=f"training seeds per arm (default: {Protocol.seeds})")
    p.add_argument("--steps", type=int, help=f"the classifier's training steps (default: {ClassifierDesign.steps})")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="training processes")
    p.add_argument("--quick", action="store_true", help="a tiny protocol for tests (few steps, 32 px, 2 seeds)")
    p.add_argument("--json-out", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write the AUC-against-N plot (HTML) here")
    p.add_argument("--title", default=None, help="the plot's title (e.g. which models drew the synthetic images)")
    p.add_argument("--from-json", type=Path, default=None, help="report (table, --plot) a saved result, no training")
    args = p.parse_args(argv)
    if args.from_json is None and not (args.real and args.labels and args.synthetic):
        p.error("--real, --labels and --synthetic are required (except with --from-json)")
    for name in ("sizes", "multiples"):
        if getattr(args, name) and min(getattr(args, name)) < 1:
            p.error(f"--{name} must be positive")
    if (args.seeds is not None and args.seeds < 2) or (args.steps is not None and args.steps < 1):
        p.error("--seeds must be at least 2 (an interval over seeds) and --steps at least 1")
    return args


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    """The default protocol (or --quick's), with what the command line sets."""
    base = QUICK if args.quick else Protocol()
    return replace(
        base,
        sizes=tuple(args.sizes or base.sizes),
        multiples=tuple(args.multiples or base.multiples),
        seeds=args.seeds or base.seeds,
        design=replace(base.design, steps=args.steps or base.design.steps),
    )


def measure(args: argparse.Namespace) -> dict:
    protocol = protocol_from_args(args)
    start = time.perf_counter()
    data = load_data(args.real, args.labels, args.synthetic, protocol.design.size, args.test)
    result = run(data, protocol, args.workers)
    result["synthetic_folders"] = [str(p) for p in args.synthetic]
    result["test_images"] = str(args.test) if args.test else f"{args.real} (validation split)"
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = json.loads(args.from_json.read_text()) if args.from_json else measure(args)
    except (DownstreamError, FileNotFoundError, ImageLoadError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print_report(result)
    print(f"{result['seconds']:.0f} s in all ({result['train_seconds']:.0f} s training and scoring)")
    if args.json_out and not args.from_json:
        atomic_write(args.json_out, (json.dumps(result, indent=1) + "\n").encode())
    if args.plot:
        figure = downstream_figure(result, args.title) if args.title else downstream_figure(result)
        figure.write_html(args.plot, include_plotlyjs=True, config={"displayModeBar": False})


if __name__ == "__main__":
    main()
