"""Teacher-forced draws: what a prior would write at each position of a real grid."""

from __future__ import annotations

import pytest
import torch

from lesionstudio.models.pixelcnn import GatedPixelCNN
from lesionstudio.sampling.teacherforcing import likeliest_classes, mix_codes, teacher_forced_draws


def tiny_prior(num_classes: int = 0, coarse: bool = False) -> GatedPixelCNN:
    torch.manual_seed(0)
    prior = GatedPixelCNN(
        num_codes=6,
        channels=8,
        num_layers=2,
        kernel_size=3,
        num_classes=num_classes,
        grid_size=8,
        cond_num_codes=5 if coarse else 0,
        cond_grid_size=4 if coarse else 0,
    ).eval()
    for p in prior.parameters():  # spread-out logits, so the distributions differ by position
        p.data.normal_(0, 0.4)
    return prior


def test_draws_follow_the_softmax_given_the_real_codes_before_each_position():
    prior = tiny_prior(coarse=True)
    real = torch.randint(0, 6, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    coarse = torch.randint(0, 5, (2, 4, 4), generator=torch.Generator().manual_seed(2))
    draws = teacher_forced_draws(prior, real, None, coarse, draws=3000, generator=torch.Generator().manual_seed(3))
    assert draws.shape == (3000, 2, 8, 8) and draws.dtype == torch.int64
    assert int(draws.min()) >= 0 and int(draws.max()) < 6
    with torch.no_grad():
        probs = torch.softmax(prior(real, None, coarse), dim=1)  # [B, K, h, w]
    freq = torch.stack([(draws == k).float().mean(0) for k in range(6)], dim=1)
    # 3000 draws: the standard error of a frequency is at most 0.009.
    assert float((freq - probs).abs().max()) < 0.045


def test_a_draw_at_one_position_does_not_depend_on_the_real_code_there_or_after():
    prior = tiny_prior()
    real = torch.randint(0, 6, (1, 8, 8), generator=torch.Generator().manual_seed(1))
    changed = real.clone()
    changed[0, 4, 5:] = (changed[0, 4, 5:] + 1) % 6
    changed[0, 5:] = (changed[0, 5:] + 2) % 6
    a = teacher_forced_draws(prior, real, generator=torch.Generator().manual_seed(0))
    b = teacher_forced_draws(prior, changed, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[0, 0, :4], b[0, 0, :4]) and torch.equal(a[0, 0, 4, :6], b[0, 0, 4, :6])


def test_class_conditional_draws_need_labels_and_the_likeliest_class_is_the_argmax():
    prior = tiny_prior(num_classes=2)
    real = torch.randint(0, 6, (3, 8, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="labels"):
        teacher_forced_draws(prior, real)
    ll = prior.grid_log_likelihoods(real)
    assert torch.equal(likeliest_classes(prior, real), ll.argmax(1))
    drawn = teacher_forced_draws(prior, real, likeliest_classes(prior, real), draws=2)
    assert drawn.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        likeliest_classes(tiny_prior(), real)
    with pytest.raises(ValueError, match="draws"):
        teacher_forced_draws(prior, real, torch.zeros(3, dtype=torch.long), draws=0)
    with pytest.raises(ValueError, match="temperature"):
        teacher_forced_draws(prior, real, torch.zeros(3, dtype=torch.long), temperature=0)


def test_mixing_takes_the_asked_share_of_positions_from_the_draws():
    real = torch.zeros(3, 32, 32, dtype=torch.long)
    drawn = torch.ones(3, 32, 32, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(mix_codes(real, drawn, 0.0, gen), real)
    assert torch.equal(mix_codes(real, drawn, 1.0, gen), drawn)
    mixed = mix_codes(real, drawn, torch.tensor([0.0, 0.5, 1.0]), gen)
    shares = mixed.float().flatten(1).mean(1)
    assert shares[0] == 0 and shares[2] == 1 and abs(float(shares[1]) - 0.5) < 0.06
    with pytest.raises(ValueError, match="share"):
        mix_codes(real, drawn, 1.5)
    with pytest.raises(ValueError, match="shape"):
        mix_codes(real, drawn[:, :16], 0.5)
