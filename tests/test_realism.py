"""The realism yardstick (classifier two-sample test), the realism critic and candidate ranking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lesion_image, run_module, write_images

from lesionstudio.data import as_saved
from lesionstudio.data import to_pil as to_image
from lesionstudio.measure.twosample import TestDesign, blurred, two_sample_test
from lesionstudio.models.critic import FitSettings, RealismCritic
from lesionstudio.quality import detail_transplanted
from lesionstudio.sampling import loading
from lesionstudio.sampling.generation import GenerationSettings, sample_labels
from lesionstudio.sampling.stack import CANDIDATE_SEED_OFFSET, sample_ranked, sample_stack

QUICK = FitSettings(epochs=8, batch_size=16, lr=3e-3, seed=0)
SMALL = TestDesign(channels=8)


def lesions(n: int, start: int, size: int = 96) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(np.asarray(lesion_image(size, seed=start + i))).permute(2, 0, 1) for i in range(n)]
    )


def test_two_sample_test_is_near_chance_for_one_distribution_and_high_for_another():
    real, other = lesions(48, 0), lesions(48, 1000)
    same = two_sample_test(real, other, QUICK, SMALL)
    assert same.train_per_set == 24 and same.test_per_set == 24
    assert same.layout_accuracy <= 0.75 and same.texture_accuracy <= 0.75
    noisy = other.float() + 60 * torch.randn(other.shape, generator=torch.Generator().manual_seed(0))
    apart = two_sample_test(real, noisy.clamp(0, 255).to(torch.uint8), QUICK, SMALL)
    assert apart.texture_accuracy >= 0.9 and apart.layout_accuracy >= 0.6
    again = two_sample_test(real, other, QUICK, SMALL)
    assert (again.layout_accuracy, again.texture_accuracy) == (same.layout_accuracy, same.texture_accuracy), "seeded"


def test_the_yardstick_sees_a_one_pixel_blur_that_the_plain_texture_branch_misses():
    real, other = lesions(64, 0), lesions(64, 1000)
    settings = FitSettings(epochs=10, batch_size=16, lr=2e-3, seed=0, crops=4)
    blur = two_sample_test(real, blurred(other, 1.0), settings, SMALL)
    assert blur.texture_accuracy >= 0.8, blur
    same = two_sample_test(real, other, settings, SMALL)
    assert abs(same.texture_accuracy - 0.5) <= 0.15 and abs(same.layout_accuracy - 0.5) <= 0.2, same
    plain = two_sample_test(real, blurred(other, 1.0), settings, TestDesign(channels=8, texture_highpass=False))
    assert plain.texture_accuracy < blur.texture_accuracy


def test_transplanted_detail_costs_what_unrelated_detail_should():
    """Reconstructions given back another image's lost detail: share 0 is the reconstruction; at
    share 1 the unrelated detail doubles the squared error (3 dB), as for a decoder that invents
    texture as rich as the real one."""
    images = lesions(16, 0, size=32)
    recon = blurred(images, 1.0)
    none = detail_transplanted(images, recon, 0.0)
    assert torch.equal(none.images, recon)
    full = detail_transplanted(images, recon, 1.0, seed=3)
    assert none.psnr - full.psnr == pytest.approx(3.0, abs=0.6)
    own = (images.float() - recon.float()).abs().sum((1, 2, 3))
    moved = (full.images.float() - recon.float()).abs().sum((1, 2, 3))
    assert not torch.allclose(own, moved)  # each image got another's detail, not its own
    with pytest.raises(ValueError, match="at least 2"):
        detail_transplanted(images[:1], recon[:1], 1.0)


def test_critic_training_with_several_crops_per_image_keeps_one_crop_as_before():
    critic = RealismCritic(channels=4, view_size=32, crops_per_side=2).eval()  # no dropout: comparable losses
    images, real = torch.rand(4, 3, 48, 48), torch.tensor([1.0, 0.0, 1.0, 0.0])
    one = critic.training_loss(images, real, torch.Generator().manual_seed(0))
    again = critic.training_loss(images, real, torch.Generator().manual_seed(0), crops=1)
    assert torch.equal(one, again)
    many = critic.training_loss(images, real, torch.Generator().manual_seed(0), crops=3)
    assert torch.isfinite(many) and not torch.equal(many, one)


def test_blur_is_a_blur():
    x = lesions(2, 0)
    y = blurred(x, 1.0)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert float((y.float() - x.float()).abs().mean()) > 0
    assert float(y.float().diff(dim=-1).abs().mean()) < float(x.float().diff(dim=-1).abs().mean())


def test_critic_judges_layout_and_texture_and_checks_its_input():
    critic = RealismCritic(channels=4, view_size=32, crops_per_side=2).eval()
    judged = critic(torch.rand(3, 3, 64, 64))
    assert judged.layout.shape == judged.texture.shape == judged.realism.shape == (3,)
    assert critic.crop_corners(64, 64) == [(0, 0), (0, 32), (32, 0), (32, 32)]
    with pytest.raises(ValueError, match="sides of at least 32"):
        critic(torch.rand(1, 3, 16, 16))


def test_ranking_keeps_the_best_scored_candidate_of_each_sample(stack_with_critic: Path):
    stack = loading.load_stack(32, stack_with_critic)
    assert stack.critic is not None
    ranked = sample_ranked(stack, 2, candidates=3, seed=[11, 12], temperature=(1.0, 0.8))
    seeds = [s + j * CANDIDATE_SEED_OFFSET for s in (11, 12) for j in range(3)]
    every = sample_stack(stack, 6, seed=seeds, temperature=(1.0, 0.8))
    scores = stack.critic.judge(as_saved(stack.vqvae.decode_codes(every.codes))).realism.view(2, 3)
    best = scores.argmax(1)
    assert len({tuple(g.flatten().tolist()) for g in every.codes}) > 1, "candidates differ"
    for i in range(2):
        assert torch.equal(ranked.codes[i], every.codes[i * 3 + best[i]])
        assert torch.equal(ranked.levels[0][i], every.levels[0][i * 3 + best[i]])
    torch.testing.assert_close(ranked.scores, scores.max(1).values)
    # One candidate is the sample drawn without ranking, with the same per-sample seeds.
    single = sample_ranked(stack, 2, candidates=1, seed=[11, 12])
    assert torch.equal(single.codes, sample_stack(stack, 2, seed=[11, 12]).codes)
    # A requested class is kept by every candidate.
    assert sample_ranked(stack, 2, candidates=2, seed=1, labels=1).labels.tolist() == [1, 1]
    stack.critic = None
    with pytest.raises(ValueError, match="critic"):
        sample_ranked(stack, 1, candidates=2)


def test_synthesize_ranks_candidates_and_records_scores(stack_with_critic: Path, tmp_path: Path):
    from lesionstudio.synthesize import synthesize

    stack = loading.load_stack(32, stack_with_critic)
    rows = synthesize(
        tmp_path / "s",
        2,
        stack,
        GenerationSettings(candidates=3, detail_temperature=0.8),
        batch_size=2,
        show_progress=False,
    )
    assert all(r["realism_score"] and r["candidates"] == "3" and r["detail_temperature"] == "0.8" for r in rows)
    assert "best of 3 candidates" in (tmp_path / "s" / "README.md").read_text()
    with pytest.raises(ValueError, match="candidates"):
        synthesize(
            tmp_path / "s",
            3,
            stack,
            GenerationSettings(candidates=2, detail_temperature=0.8),
            batch_size=2,
            show_progress=False,
        )


def test_studio_generates_with_candidates_and_detail_temperature(stack_with_critic: Path):
    from lesionstudio.app.studio import Studio, StudioError

    studio = Studio(stack_with_critic)
    assert studio.has_critic
    a = studio.generate(32, n=2, seed=4, candidates=2, detail_temperature=0.5)
    assert [im.tobytes() for im in a] == [
        im.tobytes() for im in studio.generate(32, n=2, seed=4, candidates=2, detail_temperature=0.5)
    ]
    with pytest.raises(StudioError, match="Candidates"):
        studio.generate(32, n=1, candidates=99)


def test_quality_c2st_and_calibration_commands(tmp_path: Path, stack_with_critic: Path):
    write_images(tmp_path / "real", 12, size=96)
    write_images(tmp_path / "fake", 12, size=96, start_seed=500)
    res = run_module(
        [
            "-m",
            "lesionstudio.quality",
            "--real",
            str(tmp_path / "real"),
            "--generated",
            str(tmp_path / "fake"),
            "--c2st-only",
            "--c2st-epochs",
            "1",
            "--json",
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])["c2st"]
    assert 0 <= out["layout_accuracy"] <= 1 and out["test_per_set"] == 6
    vq = str(stack_with_critic / "vqvae-32")
    res = run_module(
        [
            "-m",
            "lesionstudio.quality",
            "--real",
            str(tmp_path / "real"),
            "--c2st-calibrate",
            "--c2st-epochs",
            "1",
            "--reconstruct-with",
            vq,
            "--teacher-forced",
            "32",
            "--checkpoints",
            str(stack_with_critic),
            "--transplant",
            "1",
            "--json",
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    transplant = [r for r in rows if r.startswith("real vs 32x32 reconstructions + 1 x another image's lost detail (")]
    assert set(rows) - set(transplant) == {
        "real vs real",
        "real vs blurred real (sigma 1 px)",
        "real vs 32x32 VQ-VAE reconstructions",
        "real vs decoded 32x32 teacher-forced draws (VQ-VAE's own decoder)",
    }
    assert len(transplant) == 1
    res = run_module(["-m", "lesionstudio.quality", "--real", str(tmp_path / "real")])
    assert res.returncode != 0 and "--generated is required" in res.stderr


def test_train_critic_command(tmp_path: Path):
    write_images(tmp_path / "real", 20, size=96)
    write_images(tmp_path / "fake", 10, size=96, start_seed=300)
    out = tmp_path / "critic"
    res = run_module(
        [
            "-m",
            "train.critic",
            "--real",
            str(tmp_path / "real"),
            "--generated",
            str(tmp_path / "fake"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--channels",
            "4",
            "--batch-size",
            "8",
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # The real side is the training split only: 18 of the 20 images.
    assert metrics["real_images"] == 18 and metrics["generated_images"] == 10
    assert 0 <= metrics["heldout_realism_accuracy"] <= 1
    critic = RealismCritic.from_pretrained(out / "final")
    assert critic.channels == 4 and "realism critic" in (out / "final" / "README.md").read_text()


def test_train_critic_fits_the_heads_on_a_kept_critic(tmp_path: Path, stack_with_critic: Path):
    write_images(tmp_path / "real", 20, size=96)
    write_images(tmp_path / "fake", 10, size=96, start_seed=300)
    out = tmp_path / "critic"
    common = ["-m", "train.critic", "--real", str(tmp_path / "real"), "--generated", str(tmp_path / "fake")]
    base = stack_with_critic / "critic"
    heads = ["--shape-head", "--layout-head", str(stack_with_critic), "--layouts", "12"]
    res = run_module([*common, "--out", str(out), "--from-critic", str(base), *heads])
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cnn_from"] == str(base) and "epochs" not in metrics
    assert 0 <= metrics["heldout_shape_accuracy"] <= 1 and 0 <= metrics["heldout_layout_head_accuracy"] <= 1
    assert metrics["layouts"] == 12
    critic, kept = RealismCritic.from_pretrained(out / "final"), RealismCritic.from_pretrained(base)
    assert critic.config == {**kept.config, "shape_head": True, "layout_grid": 16}
    assert critic.layout_head.linear.weight.abs().sum() > 0, "the layout head was fitted"
    for name, weights in kept.state_dict().items():
        assert torch.equal(critic.state_dict()[name], weights), f"{name} kept as it was"
    assert critic.shape_head.linear.weight.abs().sum() > 0, "the head was fitted"
    card = (out / "final" / "README.md").read_text()
    assert "shape head" in card and "heldout_shape_accuracy" in card and "layout head" in card
    refused = run_module([*common, "--out", str(tmp_path / "x"), "--from-critic", str(base)])
    assert refused.returncode != 0 and "--shape-head" in refused.stderr
    coarse = run_module(
        [*common, "--out", str(tmp_path / "z"), "--from-critic", str(base), *heads[1:3]] + ["--layout-latent", "32"]
    )
    assert coarse.returncode != 0 and "not the coarsest level" in coarse.stderr
    missing = run_module([*common, "--out", str(tmp_path / "y"), "--from-critic", str(tmp_path), "--shape-head"])
    assert missing.returncode != 0 and "cannot load --from-critic" in missing.stderr


def test_layouts_are_chosen_per_candidate_by_the_layout_head(stack_with_layout_critic: Path):
    from lesionstudio.sampling.grid import sample
    from lesionstudio.sampling.stack import LAYOUT_SEED_OFFSET

    stack = loading.load_stack(32, stack_with_layout_critic)
    critic, top = stack.critic, stack.levels[0]
    seeds, labels = [11, 12], torch.tensor([0, 1])
    ranked = sample_ranked(stack, 2, candidates=2, seed=seeds, labels=labels, layouts=3)
    # By hand: 3 layouts per candidate, the layout head's best kept, then the finer level drawn on it.
    cand = [s + j * CANDIDATE_SEED_OFFSET for s in seeds for j in range(2)]
    cand_labels = labels.repeat_interleave(2)
    every = [c + k * LAYOUT_SEED_OFFSET for c in cand for k in range(3)]
    grids = sample(top.prior, 12, seed=every, labels=cand_labels.repeat_interleave(3)).view(4, 3, 16, 16)
    layout_scores = critic.judge_layouts(top.vqvae.decode_codes(grids.flatten(0, 1))).view(4, 3)
    assert (layout_scores.argmax(1) != 0).any(), "the head's choice is not always the first layout"
    chosen = grids[torch.arange(4), layout_scores.argmax(1)]
    drawn = sample_stack(stack, 4, seed=cand, labels=cand_labels, layout=chosen)
    final = critic.judge(as_saved(stack.vqvae.decode_codes(drawn.codes)))
    assert final.shape is not None, "the shape head's log-odds count in the ranking"
    best = final.realism.view(2, 2).argmax(1)
    for i in range(2):
        assert torch.equal(ranked.codes[i], drawn.codes[i * 2 + best[i]])
        assert torch.equal(ranked.levels[0][i], chosen[i * 2 + best[i]])
    # A sample is the same drawn alone as in a batch (what synthesize's --batch-size relies on).
    for i in range(2):
        alone = sample_ranked(stack, 1, candidates=2, seed=seeds[i : i + 1], labels=labels[i : i + 1], layouts=3)
        assert torch.equal(alone.codes[0], ranked.codes[i])
    # Layout 0 of a candidate is the layout it has without choosing.
    plain = sample_stack(stack, 4, seed=cand, labels=cand_labels)
    assert torch.equal(plain.levels[0], grids[:, 0])
    one = sample_ranked(stack, 2, candidates=2, seed=seeds, labels=labels, layouts=1)
    assert torch.equal(one.codes, sample_ranked(stack, 2, candidates=2, seed=seeds, labels=labels).codes)
    with pytest.raises(ValueError, match="at least 1"):
        sample_ranked(stack, 1, candidates=2, layouts=0)
    with pytest.raises(ValueError, match=r"layout must be \[4, 16, 16\]"):
        sample_stack(stack, 4, seed=cand, layout=chosen[:2])


def test_layouts_need_a_layout_head_for_the_stacks_coarsest_grid(stack_with_critic: Path, tmp_path: Path):
    from lesionstudio.app.studio import Studio, StudioError
    from lesionstudio.synthesize import synthesize

    stack = loading.load_stack(32, stack_with_critic)
    with pytest.raises(ValueError, match="layout head"):
        sample_ranked(stack, 1, candidates=1, layouts=2)
    with pytest.raises(ValueError, match="layout head"):
        synthesize(tmp_path / "s", 1, stack, GenerationSettings(layouts=2), show_progress=False)
    stack.critic = RealismCritic(**{**stack.critic.config, "layout_grid": 32})
    with pytest.raises(ValueError, match="judges 32x32 layouts, but this stack's coarsest level is 16x16"):
        sample_ranked(stack, 1, candidates=1, layouts=2)
    studio = Studio(stack_with_critic)
    assert studio.layout_grid == 0 and studio.default_settings(32).layouts == 1
    with pytest.raises(StudioError, match="layout head"):
        studio.generate(32, n=1, layouts=2)


def test_synthesize_and_studio_choose_layouts(stack_with_layout_critic: Path, tmp_path: Path):
    from lesionstudio.app.studio import Studio, StudioError
    from lesionstudio.sampling.generation import DEFAULT_LAYOUTS
    from lesionstudio.synthesize import synthesize

    stack = loading.load_stack(32, stack_with_layout_critic)
    rows = synthesize(
        tmp_path / "s", 2, stack, GenerationSettings(candidates=2, layouts=3), batch_size=2, show_progress=False
    )
    assert all(r["layouts"] == "3" and r["candidates"] == "2" and r["realism_score"] for r in rows)
    assert "best of 3 drawn, by the critic's layout head" in (tmp_path / "s" / "README.md").read_text()
    with pytest.raises(ValueError, match="layouts"):
        synthesize(
            tmp_path / "s", 3, stack, GenerationSettings(candidates=2, layouts=4), batch_size=2, show_progress=False
        )
    studio = Studio(stack_with_layout_critic)
    assert studio.layout_grid == 16 and studio.default_settings(32).layouts == DEFAULT_LAYOUTS
    a = studio.generate(32, n=2, seed=4, candidates=2, layouts=3)
    # Each sample's class is drawn from its seed before any candidate: ranking keeps it.
    labels = sample_labels(studio.stack(32), GenerationSettings(), [4, 5])
    ranked = sample_ranked(studio.stack(32), 2, 2, 1.0, [4, 5], labels, layouts=3)
    assert ranked.labels.tolist() == labels
    assert [im.tobytes() for im in a] == [
        im.tobytes() for im in (to_image(x) for x in studio.stack(32).vqvae.decode_codes(ranked.codes))
    ]
    with pytest.raises(StudioError, match="Layouts per candidate"):
        studio.generate(32, n=1, layouts=99)
