"""The downstream benchmark: AUC and its bootstrap, the arms' training sets, and the command on
small lesion-like sets made here (no data set needed)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lesion_image
from PIL import Image
from torchmetrics.functional.classification import binary_auroc

from lesionstudio import downstream
from lesionstudio.data import split_files
from lesionstudio.downstream import QUICK, Arm, DataSets, LabelledImages, arms, training_set
from lesionstudio.measure.auc import Resamples, auc, auc_difference, mean_auc
from lesionstudio.measure.classifier import ClassifierDesign, malignancy_scores, train_classifier


def test_auc_known_values():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count a half
    assert auc([3, 2, 1], [1, 1, 0]) == 1.0 and auc([1, 2, 3], [1, 1, 0]) == 0.0
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=300), rng.integers(0, 2, 300)
    scores[labels == 1] += 0.8
    expected = binary_auroc(torch.tensor(scores), torch.tensor(labels)).item()
    assert auc(scores, labels) == pytest.approx(expected, abs=1e-6)  # torchmetrics: float32
    with pytest.raises(ValueError, match="both classes"):
        auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        auc([0.1, 0.2], [0, 2])


def test_bootstrap_interval_matches_the_known_standard_error():
    """Normal scores d apart: AUC = Phi(d / sqrt 2); the 95% interval covers it and is as wide as
    Hanley & McNeil's standard error says (within 20%)."""
    rng = np.random.default_rng(1)
    n, d = 400, 1.0
    labels = np.repeat([0, 1], n)
    scores = rng.normal(size=2 * n) + d * labels
    truth = 0.5 * (1 + math.erf(d / 2))
    resamples = Resamples.draw(labels, num_seeds=1, replicates=2000, seed=0)
    interval = mean_auc(scores[None], labels, resamples)
    assert interval.low < truth < interval.high
    a = interval.estimate
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (n * n))
    assert (interval.high - interval.low) / (2 * 1.96 * se) == pytest.approx(1.0, rel=0.2)


def test_paired_difference_and_seed_resampling():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 50)
    arm = rng.normal(size=(3, 100)) + labels
    resamples = Resamples.draw(labels, num_seeds=3, replicates=500, seed=0)
    same = auc_difference(arm, arm, labels, resamples)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    better = auc_difference(arm + 3 * labels, arm, labels, resamples)
    assert better.low > 0
    # Seeds that agree add no spread: three copies of one seed give that seed's interval.
    one = mean_auc(arm[:1], labels, Resamples.draw(labels, 1, 500, seed=0))
    copies = mean_auc(np.repeat(arm[:1], 3, 0), labels, resamples)
    assert (copies.estimate, copies.low, copies.high) == pytest.approx((one.estimate, one.low, one.high))
    with pytest.raises(ValueError, match="seeds"):
        mean_auc(arm[:2], labels, resamples)


def labelled(n: int, positives: int, size: int = 8, offset: int = 0) -> LabelledImages:
    images = torch.arange(offset, offset + n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, size, size)
    return LabelledImages(images.clone(), torch.tensor([0] * (n - positives) + [1] * positives))


def test_balanced_subset_draws_each_class_without_repeats():
    pool = labelled(30, 12)
    sub = pool.balanced(10, torch.Generator().manual_seed(0))
    assert sub.class_counts() == {"benign": 5, "malignant": 5}
    assert len(set(sub.images[:, 0, 0, 0].tolist())) == 10
    with pytest.raises(downstream.DownstreamError, match="malignant"):
        pool.balanced(30, torch.Generator().manual_seed(0))


def test_arms_differ_only_in_their_training_images():
    """The augmented arm holds exactly the real images of the real-only arm of the same seed, and
    every arm trains with one design: the same data and seed give the same classifier."""
    data = DataSets(train=labelled(60, 30), test=labelled(10, 5, offset=100), synthetic=labelled(40, 20, offset=200))
    names = [a.name for a in arms(QUICK)]
    assert names == ["TRTR N=8", "TRTR N=all", "TSTR N=8", "real 8 + synthetic 8"]
    for seed in range(3):
        real = training_set(Arm("TRTR", 8, 0), seed, data)
        mixed = training_set(Arm("augmented", 8, 16), seed, data)
        synthetic = training_set(Arm("TSTR", 0, 16), seed, data)
        assert torch.equal(mixed.images[:8], real.images) and torch.equal(mixed.images[8:], synthetic.images)
        assert (mixed.images[8:, 0, 0, 0] >= 200).all() and (real.images[:, 0, 0, 0] < 100).all()
    other = training_set(Arm("TRTR", 8, 0), 1, data)
    assert not torch.equal(other.images, training_set(Arm("TRTR", 8, 0), 0, data).images)
    design = ClassifierDesign(size=8, channels=4, blocks=2, steps=3, batch_size=4)
    a, b = (train_classifier(real.images, real.labels, design, seed=5) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def marked_lesion(seed: int, malignant: bool, size: int = 48) -> Image.Image:
    """A lesion-like image; a malignant one gets a dark blue-grey patch (learnable in a few steps)."""
    img = np.asarray(lesion_image(size, seed)).copy()
    if malignant:
        img[size // 3 : size // 2, size // 3 : size // 2] = (70, 70, 110)
    return Image.fromarray(img)


@pytest.fixture
def downstream_sets(tmp_path: Path) -> dict[str, Path]:
    real = tmp_path / "real"
    real.mkdir()
    rows = []
    for i in range(100):
        path = real / f"img_{i:03d}.jpg"
        marked_lesion(i, i % 2 == 1).save(path, quality=95)
        rows.append({"file": f"train/{path.name}", "label_if_known": ("benign", "malignant")[i % 2]})
    labels = tmp_path / "MANIFEST.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "label_if_known"])
        writer.writeheader()
        writer.writerows(rows)
    synthetic = tmp_path / "synth"
    synthetic.mkdir()
    with open(synthetic / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "class"])
        writer.writeheader()
        for i in range(24):
            name = f"synthetic_{i:06d}.png"
            marked_lesion(1000 + i, i % 3 == 0).save(synthetic / name)
            writer.writerow({"file": name, "class": "malignant" if i % 3 == 0 else "benign"})
    return {"real": real, "labels": labels, "synthetic": synthetic}


def test_command_quick(downstream_sets: dict[str, Path], tmp_path: Path, capsys):
    val = [int(p.stem[-3:]) % 2 for p in split_files(sorted(downstream_sets["real"].iterdir()), "val")]
    out, plot = tmp_path / "result.json", tmp_path / "plot.html"
    downstream.main(
        [
            "--quick",
            "--real", str(downstream_sets["real"]),
            "--labels", str(downstream_sets["labels"]),
            "--synthetic", str(downstream_sets["synthetic"]),
            "--workers", "2",
            "--json-out", str(out),
            "--plot", str(plot),
        ]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["images"]["test"] == {"benign": val.count(0), "malignant": val.count(1)}
    assert result["images"]["synthetic"] == {"benign": 16, "malignant": 8}
    assert [a["name"] for a in result["arms"]] == [a.name for a in arms(QUICK)]
    for arm in result["arms"]:
        assert len(arm["per_seed"]) == QUICK.seeds
        assert 0 <= arm["auc"]["low"] <= arm["auc"]["estimate"] <= arm["auc"]["high"] <= 1
    assert result["augmentation_gain"][0]["real"] == 8
    fidelity = result["class_fidelity"]
    assert fidelity["ratio"] == pytest.approx(
        fidelity["synthetic_auc"]["estimate"] / fidelity["real_auc"]["estimate"], abs=1e-3
    )
    assert set(result["targets"]) == {"class_fidelity_ratio", "tstr_over_trtr_n8", "augmentation_gain_n8"}
    assert "plotly" in plot.read_text()[:100_000]
    printed = capsys.readouterr().out
    assert "| TSTR N=8 |" in printed and "class fidelity" in printed
    plot.unlink()
    downstream.main(["--from-json", str(out), "--plot", str(plot)])  # redrawn from the JSON alone
    assert capsys.readouterr().out == printed and plot.exists()


def test_the_classifier_learns_a_visible_marker(downstream_sets: dict[str, Path]):
    """The arms' classifier, trained a little longer, tells the marked lesions apart on held-out
    images: the pipeline from files to AUC carries the labels through."""
    data = downstream.load_data(downstream_sets["real"], downstream_sets["labels"], [downstream_sets["synthetic"]], 32)
    design = ClassifierDesign(size=32, channels=8, blocks=3, steps=60, batch_size=16)
    model = train_classifier(data.train.images, data.train.labels, design, seed=0)
    assert auc(malignancy_scores(model, data.test.images).numpy(), data.test.labels.numpy()) > 0.9
    assert auc(malignancy_scores(model, data.synthetic.images).numpy(), data.synthetic.labels.numpy()) > 0.9


def test_worker_count_does_not_change_the_scores(downstream_sets: dict[str, Path]):
    data = downstream.load_data(
        downstream_sets["real"], downstream_sets["labels"], [downstream_sets["synthetic"]], QUICK.design.size
    )
    jobs = [downstream.Job(arm, 1) for arm in arms(QUICK)[:2]]
    one = downstream.run_jobs(jobs, data, QUICK.design, workers=1)
    two = downstream.run_jobs(jobs, data, QUICK.design, workers=2)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a.test, b.test, rtol=1e-5, atol=1e-5)
    assert one[1].synthetic is not None and one[0].synthetic is None  # only the all-real arm scores them


def test_command_refuses_bad_input(downstream_sets: dict[str, Path], tmp_path: Path):
    base = ["--quick", "--real", str(downstream_sets["real"]), "--labels", str(downstream_sets["labels"])]
    empty = tmp_path / "no_metadata"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no metadata.csv"):
        downstream.main([*base, "--synthetic", str(empty)])
    with pytest.raises(SystemExit, match="class-balanced"):
        downstream.main([*base, "--synthetic", str(downstream_sets["synthetic"]), "--sizes", "40"])
    with pytest.raises(SystemExit):
        downstream.main([*base, "--synthetic", str(downstream_sets["synthetic"]), "--seeds", "1"])


def test_an_external_test_folder_replaces_the_validation_split(downstream_sets: dict[str, Path]):
    args = (downstream_sets["real"], downstream_sets["labels"], [downstream_sets["synthetic"]], 16)
    default = downstream.load_data(*args)
    external = downstream.load_data(*args, test=downstream_sets["real"])
    assert len(default.test) == 10 and len(external.test) == 100
    assert torch.equal(default.train.images, external.train.images)
