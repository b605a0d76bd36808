"""One set of generation settings: the same defaults and rules in the app, its API, the Studio,
the reader study and ``synthesize``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import launch_app, make_pair, result_pixels, run_module

from lesionstudio.app.readerstudy import plan_trials
from lesionstudio.app.studio import Studio
from lesionstudio.sampling import loading
from lesionstudio.sampling.generation import (
    DEFAULT_CANDIDATES,
    DEFAULT_LAYOUTS,
    GenerationError,
    GenerationSettings,
    draw_samples,
    sample_labels,
)
from lesionstudio.synthesize import image_seed


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def test_the_rules_are_checked_once_where_the_settings_are_made():
    for bad, match in (
        ({"temperature": -0.1}, "Temperature must be between 0 and 4"),
        ({"temperature": float("nan")}, "Temperature"),
        ({"detail_temperature": 9.0}, "Detail temperature"),
        ({"guidance": float("inf")}, "Layout guidance"),
        ({"candidates": 0}, "Candidates per sample must be between 1 and 8"),
        ({"layouts": 17}, "Layouts per candidate must be between 1 and 16"),
    ):
        with pytest.raises(GenerationError, match=match):
            GenerationSettings(**bad)
    s = GenerationSettings(temperature=0, candidates=2.0, class_name="")
    assert (s.temperature, s.candidates, s.class_name, s.temperatures) == (0.0, 2, "any", (0.0, 0.0))


def test_the_defaults_are_what_the_stack_can_honour(tmp_path: Path, stack_with_layout_critic: Path):
    make_pair(tmp_path / "plain", 32)
    plain = loading.load_stack(32, tmp_path / "plain")
    assert GenerationSettings().resolved(plain) == GenerationSettings(candidates=1, layouts=1)
    with pytest.raises(GenerationError, match="needs a realism critic"):
        GenerationSettings(candidates=2).resolved(plain)
    with pytest.raises(GenerationError, match="layout head"):
        GenerationSettings(layouts=2).resolved(plain)
    with pytest.raises(GenerationError, match="Unknown class 'nevus'"):
        GenerationSettings(class_name="nevus").resolved(plain)
    ranked = loading.load_stack(32, stack_with_layout_critic)
    best = GenerationSettings().resolved(ranked)
    assert (best.candidates, best.layouts) == (DEFAULT_CANDIDATES, DEFAULT_LAYOUTS) and best.ranked
    assert best.resolved(ranked) == best


def test_ranking_keeps_each_samples_class(stack_with_layout_critic: Path):
    stack = loading.load_stack(32, stack_with_layout_critic)
    seeds = list(range(12))
    labels = sample_labels(stack, GenerationSettings(), seeds)
    assert set(labels) == {0, 1}  # both classes drawn, by each seed
    drawn = draw_samples(stack, GenerationSettings(candidates=3, layouts=2), seeds)
    assert drawn.labels.tolist() == labels
    fixed = draw_samples(stack, GenerationSettings(candidates=1, layouts=1, class_name="malignant"), seeds[:3])
    assert fixed.labels.tolist() == [1, 1, 1]


def test_every_entry_point_draws_the_same_default_images(
    stack_with_layout_critic: Path, tmp_path: Path, tmp_path_factory
):
    """The Generate tab's API with only its required inputs, ``Studio.generate()``, the reader
    study and ``synthesize`` with no options: the same image for the same per-sample seed."""
    from gradio_client import Client

    root = stack_with_layout_critic
    studio = Studio(root)
    assert studio.default_settings(32) == GenerationSettings(candidates=DEFAULT_CANDIDATES, layouts=DEFAULT_LAYOUTS)
    alone = pixels(studio.generate(32, n=2, seed=4))

    app = launch_app(tmp_path_factory, source=root)
    url = next(app)
    try:
        gallery, _, _ = Client(url, verbose=False).predict("32", 1.0, 2, 4, "any", api_name="/generate")
    finally:
        next(app, None)
    for got, want in zip([result_pixels(g) for g in gallery], alone, strict=True):
        np.testing.assert_array_equal(got[..., :3], want)

    res = run_module(
        [
            "-m",
            "lesionstudio.synthesize",
            "--n",
            "2",
            "--latent",
            "32",
            "--checkpoints",
            str(root),
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "s" / "metadata.csv").open()))
    assert {(r["candidates"], r["layouts"]) for r in rows} == {(str(DEFAULT_CANDIDATES), str(DEFAULT_LAYOUTS))}
    seeds = [image_seed(0, i) for i in range(2)]
    for i, want in enumerate(pixels(studio.generate(32, n=2, seed=seeds))):
        np.testing.assert_array_equal(np.asarray(result_pixels(str(tmp_path / "s" / rows[i]["file"])))[..., :3], want)

    trials = [t for t in plan_trials([f"real{i}.png" for i in range(4)], 8, seed=3) if t.real_path is None]
    drawn = studio.quiz_synthetic_images(trials)
    for t in trials:
        want = pixels(studio.generate(studio.default_latent, n=1, seed=[t.seed]))[0]
        np.testing.assert_array_equal(np.asarray(drawn[t.index]), want)


def test_readmes_library_snippet_runs(monkeypatch):
    """The README's "The library" example, as written, on the shipped checkpoints."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## The library") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    monkeypatch.chdir(root)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert tuple(scope["images"].shape) == (2, 3, 256, 256) and tuple(scope["codes"].shape) == (2, 64, 64)
    assert scope["drawn"].labels.tolist() == [1, 1]  # malignant
