"""Layout guidance: how closely the finer levels of a stack follow the grid below them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lesionstudio.sampling import loading
from lesionstudio.sampling.generation import GenerationSettings
from lesionstudio.sampling.grid import inpaint, sample
from lesionstudio.sampling.stack import inpaint_stack, level_seed, sample_ranked, sample_stack


def test_guidance_scales_how_much_the_coarse_grid_matters(stack_with_critic: Path):
    prior = loading.load_stack(32, stack_with_critic).checked_prior()
    a, b = torch.zeros(2, 16, 16, dtype=torch.long), torch.full((2, 16, 16), 7, dtype=torch.long)
    draw = {"seed": [1, 2], "labels": [0, 1]}
    # Guidance 0 ignores the coarse grid; 1 is the prior as trained.
    ignored = [sample(prior, 2, coarse=c, guidance=0.0, **draw) for c in (a, b)]
    assert torch.equal(ignored[0], ignored[1])
    assert not torch.equal(sample(prior, 2, coarse=a, **draw), sample(prior, 2, coarse=b, **draw))
    assert torch.equal(sample(prior, 2, coarse=a, **draw), sample(prior, 2, coarse=a, guidance=1.0, **draw))
    strong = sample(prior, 2, coarse=a, guidance=2.5, **draw)
    assert not torch.equal(strong, sample(prior, 2, coarse=a, **draw))
    # The scaled features are what every gate gets: the forward pass and both samplers agree.
    feats = prior.coarse_features(a, (32, 32), 2.5)
    torch.testing.assert_close(feats, 2.5 * prior.coarse_features(a, (32, 32)))
    prior = prior.double()
    assert torch.equal(
        sample(prior, 2, coarse=a, guidance=2.5, method="naive", **draw),
        sample(prior, 2, coarse=a, guidance=2.5, **draw),
    )


def test_guidance_needs_a_coarse_grid_to_scale(stack_with_critic: Path):
    plain = loading.load_stack(16, stack_with_critic).checked_prior()
    with pytest.raises(ValueError, match="not conditioned on a coarse grid"):
        plain.coarse_features(torch.zeros(1, 8, 8, dtype=torch.long), (16, 16))
    # A plain prior (the coarsest level) draws the same at any guidance: it has nothing to follow.
    assert torch.equal(sample(plain, 2, seed=3, guidance=3.0), sample(plain, 2, seed=3))


def test_a_stack_draws_and_inpaints_every_finer_level_with_guidance(stack_with_critic: Path):
    stack = loading.load_stack(32, stack_with_critic)
    guided = sample_stack(stack, 2, seed=[3, 4], labels=[0, 1], guidance=2.0)
    plain = sample_stack(stack, 2, seed=[3, 4], labels=[0, 1])
    assert torch.equal(guided.levels[0], plain.levels[0]), "the layout is drawn the same"
    assert not torch.equal(guided.codes, plain.codes)
    expected = sample(
        stack.checked_prior(), 2, seed=level_seed([3, 4], 1), labels=[0, 1], coarse=guided.levels[0], guidance=2.0
    )
    assert torch.equal(guided.codes, expected)
    ranked = sample_ranked(stack, 2, candidates=2, seed=[3, 4], guidance=2.0)
    assert ranked.scores is not None and ranked.codes.shape == (2, 32, 32)
    # Inpainting redraws the finer level with the same guidance.
    codes = [guided.levels[0][0], guided.codes[0]]
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:24, 4:28] = True
    filled = [inpaint_stack(stack, codes, mask, seed=5, guidance=g) for g in (0.0, 2.5)]
    assert not torch.equal(filled[0], filled[1])
    assert all(torch.equal(f[0][~mask], codes[1][~mask]) for f in filled)
    one = inpaint(stack.checked_prior(), codes[1], mask, coarse=codes[0], seed=5, guidance=2.5, fills=1)
    assert torch.equal(one[0][~mask], codes[1][~mask])


def test_studio_and_synthesize_take_guidance(stack_with_critic: Path, tmp_path: Path):
    from lesionstudio.app.studio import Studio, StudioError
    from lesionstudio.sampling.generation import MAX_GUIDANCE
    from lesionstudio.synthesize import synthesize

    studio = Studio(stack_with_critic)
    request = studio.request(32, candidates=1, guidance=2.0)
    assert request.settings.guidance == 2.0
    a = studio.generate(32, n=2, seed=4, candidates=1, guidance=2.0)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in studio.draw(request, [4, 5])]
    assert [im.tobytes() for im in a] != [im.tobytes() for im in studio.generate(32, n=2, seed=4, candidates=1)]
    with pytest.raises(StudioError, match="Layout guidance"):
        studio.generate(32, n=1, guidance=MAX_GUIDANCE + 1)

    stack = loading.load_stack(32, stack_with_critic)
    rows = synthesize(tmp_path / "s", 2, stack, GenerationSettings(guidance=2.0), batch_size=2, show_progress=False)
    assert all(r["guidance"] == "2.0" for r in rows)
    assert "layout guidance 2.0" in (tmp_path / "s" / "README.md").read_text()
    with pytest.raises(ValueError, match="guidance"):  # a folder made with other settings is refused
        synthesize(tmp_path / "s", 3, stack, batch_size=2, show_progress=False)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="Layout guidance must be between 0 and 4"):
            synthesize(tmp_path / "t", 1, stack, GenerationSettings(guidance=bad), show_progress=False)
