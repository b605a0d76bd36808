"""The codes cache key: what decides the codes, and nothing else."""

from __future__ import annotations

import torch

from lesionstudio.codes import codes_key
from lesionstudio.models.vqvae import VQVAE

TINY = dict(hidden_channels=16, res_channels=8, num_res_blocks=1, downsample=4, num_codes=16, code_dim=4)


def test_decoder_changes_keep_the_key_encoder_and_codebook_changes_do_not():
    vq = VQVAE(**TINY, image_size=64)
    key = codes_key(vq)
    with torch.no_grad():
        vq.decoder.net[0].weight.add_(1.0)
    assert codes_key(vq) == key, "a decoder-only change must keep the cached codes"
    with torch.no_grad():
        vq.quantizer.embedding.add_(1.0)
    assert codes_key(vq) != key
    key = codes_key(vq)
    with torch.no_grad():
        vq.encoder.net[0].bias.add_(1.0)
    assert codes_key(vq) != key
    same_weights = VQVAE(**TINY, image_size=128)
    same_weights.load_state_dict(vq.state_dict())
    assert codes_key(same_weights) != codes_key(vq), "another image size gives other codes"
