"""Encode an image data set into VQ-VAE code grids, cached on disk.

The cache is an ``.npz`` (uint16 codes [N, h, w], int64 labels, file names; no pickle) with a
JSON key beside it: a fingerprint of what decides the codes (encoder, codebook, image size) and
the list of files. A cache whose key does not match is rebuilt rather than silently reused; a
VQ-VAE whose decoder alone changed keeps its cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import npzcache
from .data import LesionImageFolder, collate_skip_bad
from .models.vqvae import VQVAE


@dataclass
class CodeSet:
    codes: np.ndarray  # uint16 [N, h, w]
    labels: np.ndarray  # int64 [N], -1 where unknown
    files: list[str]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_sha256(model: torch.nn.Module) -> str:
    """A fingerprint of a model's weights (for cache keys when it has no file)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def codes_key(vqvae: torch.nn.Module) -> str:
    """Fingerprint of what decides a VQ-VAE's codes: encoder and codebook weights, image size.

    The decoder is left out: a decoder-only fine-tune keeps every code, and so the cache.
    """
    parts = torch.nn.ModuleDict({"encoder": vqvae.encoder, "quantizer": vqvae.quantizer})
    return f"{state_sha256(parts)}:{vqvae.image_size}"


@torch.no_grad()
def extract_codes(
    model: VQVAE, dataset: LesionImageFolder, device: torch.device | str = "cpu", batch_size: int = 16
) -> CodeSet:
    """Encode every readable image of dataset (its transform should be the eval transform)."""
    if model.num_codes > 65536:
        raise ValueError("codes are stored as uint16: K must be at most 65536")
    model.eval()
    loader = DataLoader(range(len(dataset)), batch_size=batch_size, shuffle=False)
    codes, labels, files = [], [], []
    for idx in tqdm(loader, desc="encoding images", unit="batch", mininterval=2):
        items = [dataset[int(i)] for i in idx]
        batch = collate_skip_bad(items)
        if batch.images.numel() == 0:
            continue
        codes.append(model.encode(batch.images.to(device)).cpu().numpy().astype(np.uint16))
        labels.append(batch.labels.numpy())
        files += [dataset.files[int(i)].name for i, it in zip(idx, items, strict=True) if it is not None]
    if not codes:
        raise ValueError(f"no readable images under {dataset.root}")
    return CodeSet(np.concatenate(codes), np.concatenate(labels).astype(np.int64), files)


def load_or_extract(
    cache: Path,
    model: VQVAE,
    dataset: LesionImageFolder,
    model_key: str,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> CodeSet:
    """Codes from `cache` if it was made by the same model from the same files, else encode and save."""
    key = {"model": model_key, "files": [str(p) for p in dataset.files], "targets": list(dataset.targets)}
    found = npzcache.load(cache, key, ("codes", "labels", "files"))
    if found is not None:
        return CodeSet(found["codes"], found["labels"], [str(f) for f in found["files"]])
    codeset = extract_codes(model, dataset, device, batch_size)
    arrays = {"codes": codeset.codes, "labels": codeset.labels, "files": np.array(codeset.files)}
    npzcache.save(cache, key, arrays)
    return codeset
