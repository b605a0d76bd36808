"""LesionStudio: a VQ-VAE and Gated PixelCNN priors for dermoscopic skin-lesion images.

The library is laid out by what it does: ``models`` (the networks and their Hub format),
``sampling`` (drawing codes: one grid, a stack of levels, the generation settings, loading),
``measure`` (metrics, features, the two-sample test), ``app`` (the studio and its interface),
and the commands at the top (``python -m lesionstudio.synthesize``, ``.quality``, ...). The names
most uses need are importable from here, e.g. ``from lesionstudio import load_stack``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Name -> the module that holds it; imported on first use, so `import lesionstudio` stays light.
_PUBLIC = {
    "VQVAE": "models.vqvae",
    "GatedPixelCNN": "models.pixelcnn",
    "RealismCritic": "models.critic",
    "CodeDecoder": "models.codedecoder",
    "CheckpointError": "models.hubmodel",
    "sample": "sampling.grid",
    "inpaint": "sampling.grid",
    "ModelStack": "sampling.stack",
    "sample_stack": "sampling.stack",
    "sample_ranked": "sampling.stack",
    "inpaint_stack": "sampling.stack",
    "GenerationSettings": "sampling.generation",
    "draw_samples": "sampling.generation",
    "load_stack": "sampling.loading",
    "preprocess": "data",
    "Studio": "app.studio",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lesionstudio' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
